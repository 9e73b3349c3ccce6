"""Bad input: every malformed grid is refused with `file:line: field: message` lines and exit code 2,
without a traceback, quickly, and without writing a single key to Redis.

The corpus lives in tests/bad_grids/; each file's header says what is wrong with it and, in
`# expect:` lines, what stl must say about it: one expectation per line it prints, unless a
`# lines: N` header gives the count (a flood of problems, of which stl shows the first ones).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from typer.testing import CliRunner

from stl.cli.main import app
from stl.jobs.grid.parse import DEFAULT_MAX_RUNS

if TYPE_CHECKING:
    import redis
    from typer.testing import Result

CORPUS = Path(__file__).parent / "bad_grids"
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))
DEMO_DATA = Path(__file__).resolve().parents[1] / "grids" / "demo-data" / "demo_text2text.jsonl"
# Refusing hostile input must not mean expanding it first.
FAST_SECONDS = 2.0


def header_values(path: Path, key: str) -> list[str]:
    raw = path.read_bytes()
    # Headers are ASCII; latin-1 reads any byte, so the binary and non-UTF-8 files still yield them.
    text = raw.decode("utf-16") if raw.startswith(b"\xff\xfe") else raw.decode("latin-1")
    prefix = f"# {key}:"
    return [line.removeprefix(prefix).strip() for line in text.splitlines() if line.startswith(prefix)]


def expectations(path: Path) -> list[str]:
    return header_values(path, "expect")


def enqueue(path: Path | str, *options: str) -> tuple[Result, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, ["enqueue", str(path), *options])
    return result, time.monotonic() - started


def assert_refused(result: Result, given: Path | str, conn: redis.Redis) -> list[str]:
    """The contract for any bad grid; returns its stderr lines."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}"
    lines = result.stderr.splitlines()
    assert lines, "nothing on stderr"
    line_format = re.compile(rf"^{re.escape(str(given))}:\d+: [^ :]+: .+")
    assert [line for line in lines if not line_format.match(line)] == []
    assert conn.dbsize() == 0
    return lines


def test_the_corpus_is_big_enough() -> None:
    assert len(CORPUS_FILES) >= 40
    assert all(expectations(path) for path in CORPUS_FILES), "every corpus file needs an `# expect:` line"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_bad_grid_is_refused_line_by_line(path: Path, stl_env: Path, conn: redis.Redis) -> None:
    result, seconds = enqueue(path)
    lines = assert_refused(result, path, conn)
    expected = expectations(path)
    # One line per problem, and each problem is the one the file was written to show.
    line_count = int(next(iter(header_values(path, "lines")), len(expected)))
    assert len(lines) == line_count, "\n".join(lines)
    for substring in expected:
        assert any(substring in line for line in lines), f"{substring!r} not in:\n" + "\n".join(lines)
    assert seconds < FAST_SECONDS


@pytest.mark.parametrize(("name", "line", "field"), [
    ("01-bad-indentation", 10, "yaml"),
    ("03-unclosed-quote", 3, "yaml"),
    ("04-tab-indentation", 9, "yaml"),
    ("50-latin1-bytes", 3, "file"),
    ("62-duplicate-nested-key", 13, "train.max_steps"),
    ("70-negative-shots", 12, "grid.shots.1"),
    ("71-negative-seed", 10, "grid.seed.0"),
    ("88-unknown-task", 7, "tasks.eval.0"),
    ("92-unknown-split", 14, "grid.split.1"),
])
def test_line_numbers_point_at_the_problem(name: str, line: int, field: str, stl_env: Path,
                                            conn: redis.Redis) -> None:
    path = CORPUS / f"{name}.yaml"
    result, _ = enqueue(path)
    assert assert_refused(result, path, conn)[0].startswith(f"{path}:{line}: {field}: ")


def test_fifty_megabyte_file_is_refused_unread(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.write(f"name: huge\ndata: {DEMO_DATA}\ngrid:\n  model: [tiny:bart]\n  seed: [".encode())
        chunk = b"0, " * (1 << 20)
        for _ in range(50 * (1 << 20) // len(chunk)):
            handle.write(chunk)
        handle.write(b"0]\n")
    assert path.stat().st_size >= 50_000_000
    result, seconds = enqueue(path)
    (line,) = assert_refused(result, path, conn)
    assert f"{path}:1: file: grid file is " in line and "the limit is" in line
    assert seconds < FAST_SECONDS


def test_missing_file_is_refused(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    path = tmp_path / "no-such-grid.yaml"
    (line,) = assert_refused(enqueue(path)[0], path, conn)
    assert line == f"{path}:1: file: no such grid file; check the path"


def test_directory_is_refused(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    (line,) = assert_refused(enqueue(tmp_path)[0], tmp_path, conn)
    assert "is a directory" in line


def test_path_as_given_is_what_lines_start_with(stl_env: Path, conn: redis.Redis,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CORPUS.parent)
    relative = "bad_grids/71-negative-seed.yaml"
    (line,) = assert_refused(enqueue(relative)[0], relative, conn)
    assert line.startswith(f"{relative}:10: grid.seed.0: ")


def big_grid(directory: Path, seeds: int) -> Path:
    path = directory / "big.yaml"
    path.write_text(yaml.safe_dump({
        "name": "big", "data": str(DEMO_DATA),
        "tasks": {"train": ["sentiment_classification"], "eval": ["emotion_classification"]},
        "grid": {"model": ["tiny:bart"], "seed": list(range(seeds))},
    }, default_flow_style=None))
    return path


def test_max_runs_raises_the_limit(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    runs = DEFAULT_MAX_RUNS + 200
    path = big_grid(tmp_path, runs)
    (line,) = assert_refused(enqueue(path)[0], path, conn)
    assert f"{runs:,} runs, over the limit of {DEFAULT_MAX_RUNS:,}" in line and f"--max-runs {runs}" in line
    result, _ = enqueue(path, "--max-runs", str(2 * DEFAULT_MAX_RUNS), "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"big: {runs} runs" in result.stdout
    assert conn.dbsize() == 0


def test_every_problem_gets_its_own_line(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(f"""name: "../many"
data: {DEMO_DATA}
tasks:
  train: [sentiment_classification]
  eval: [emotion_classification]
grid:
  model: [tiny:bart]
  shots: [0, -4]
  seed: [-1]
train:
  batch_size: 0
  learning_rate: 1e9
eval:
  max_examples: 0
colour: blue
""")
    lines = assert_refused(enqueue(path)[0], path, conn)
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{path}:1", "name"], [f"{path}:8", "grid.shots.1"], [f"{path}:9", "grid.seed.0"],
        [f"{path}:11", "train.batch_size"], [f"{path}:12", "train.learning_rate"],
        [f"{path}:14", "eval.max_examples"], [f"{path}:15", "colour"],
    ]


def test_every_semantic_problem_gets_its_own_line(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(f"""name: many
data: {DEMO_DATA}
tasks:
  train: [sentiment_classification, no_such_source]
  eval: [sentiment_classification]
grid:
  model: [tiny:bart, tiny:lstm]
  mtl: [none, general]
""")
    lines = assert_refused(enqueue(path)[0], path, conn)
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{path}:4", "tasks.train.1"], [f"{path}:5", "tasks.eval"], [f"{path}:7", "grid.model.1"],
        [f"{path}:8", "grid.mtl.1"],
    ]


def test_a_flood_of_problems_is_cut_short(tmp_path: Path, stl_env: Path, conn: redis.Redis) -> None:
    path = tmp_path / "flood.yaml"
    path.write_text(f"""name: flood
data: {DEMO_DATA}
tasks: {{train: [sentiment_classification], eval: [emotion_classification]}}
grid:
  model: [tiny:bart]
  seed: [{", ".join(str(-n) for n in range(1, 1001))}]
""")
    lines = assert_refused(enqueue(path)[0], path, conn)
    assert len(lines) == 51
    assert lines[-1].endswith("950 more problems not shown; fix the ones above first")


def test_a_path_no_command_checked_is_still_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import typer

    from stl.cli.main import handled

    with pytest.raises(typer.Exit) as exit_info, handled():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/out.csv")
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err == "stl: cannot use /tmp/out.csv: Is a directory; check the path and its permissions\n"


def test_bad_settings_are_one_line_and_never_reach_another_redis(tmp_path: Path) -> None:
    import socket
    import threading

    # Something that is not Redis on a port: it answers every connection with an HTTP error.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    port = listener.getsockname()[1]
    cases = {
        "STL_REDIS_URL=' '": ({"STL_REDIS_URL": " "}, "STL_REDIS_URL is set but blank", 2),
        "a database that is not a number": ({"STL_REDIS_URL": f"redis://127.0.0.1:{port}/abc"},
                                             "STL_REDIS_URL names database 'abc'", 2),
        "not Redis on the port": ({"STL_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, "does not speak Redis", 1),
        "no scheme": ({"STL_REDIS_URL": f"127.0.0.1:{port}"}, f"STL_REDIS_URL '127.0.0.1:{port}' has no scheme", 2),
        "a unix socket's path is not a database": ({"STL_REDIS_URL": f"unix://{tmp_path}/no.sock"},
                                                   f"cannot reach Redis at unix://{tmp_path}/no.sock", 1),
        "an STL_HOME that cannot be expanded": ({"STL_REDIS_URL": "redis://127.0.0.1:1/0",
                                                 "STL_HOME": "~no-such-user-here/stl"}, "STL_HOME", 2),
    }
    try:
        for what, (env, says, code) in cases.items():
            result = CliRunner().invoke(app, ["status", "--once"], env={"STL_HOME": str(tmp_path), **env})
            assert result.exit_code == code, (what, result.output)
            assert result.stderr.count("\n") == 1 and says in result.stderr, (what, result.stderr)
            assert "Traceback" not in result.output
    finally:
        listener.close()


def test_a_line_break_in_what_the_user_gave_does_not_split_the_message(tmp_path: Path) -> None:
    env = {"STL_REDIS_URL": "redis://127.0.0.1:1/0", "STL_HOME": str(tmp_path)}
    result = CliRunner().invoke(app, ["enqueue", str(tmp_path / "a\nb.yaml")], env=env)
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path}/a b.yaml:1: file: no such grid file; check the path\n"
    result = CliRunner().invoke(app, ["status", "--once"], env={**env, "STL_USER": "a\nb"})
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and 'STL_USER "a b"' in result.stderr
    result = CliRunner().invoke(app, ["status", "--once"], env={**env, "STL_USER": "a" * 40})
    assert result.exit_code == 2 and "is 40 characters long; at most 32" in result.stderr, result.stderr


def test_a_blank_demo_folder_is_refused_rather_than_read_as_this_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["data", "demo", " "])
    assert result.exit_code == 2 and result.stderr == (
        "stl: DIR is blank; name the folder to write the demo dataset into (. for this one)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "expected"), [
    (["enqueue"], "stl enqueue: Missing argument 'GRID.yaml' (see `stl enqueue --help`)"),
    (["status", "--interval", "x"], "stl status: Invalid value for '--interval': Input should be a valid number"),
    (["disk", "--prune", "bogus"], "stl disk: Invalid value for '--prune': 'bogus' is not one of 'finetune'"),
    (["results", "g", "--no-such-flag"], "stl results: No such option: --no-such-flag"),
    (["bogus"], "stl: No such command 'bogus'"),
])
def test_a_mistyped_command_line_is_one_line_naming_the_command(args: list[str], expected: str) -> None:
    # Through the installed entry point's code path (standalone mode), where click would print a usage block.
    entry_point = "from stl.cli.main import app; app(prog_name='stl')"  # what the `stl` script runs
    result = subprocess.run([sys.executable, "-c", entry_point, *args], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "STL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_results_options_that_cannot_go_together_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    from stl.jobs.errors import UsageError as StlUsageError
    from stl.jobs.results.analysis import parse_effect

    env = {"STL_REDIS_URL": "redis://127.0.0.1:1/0", "STL_HOME": str(tmp_path)}  # no Redis needed to refuse
    for args, says in ((["g", "--rows", "--plot", str(tmp_path / "p.png")], "--rows lists runs one by one"),
                       (["g", "--rows", "--effect", "mtl=none:in-domain"], "--rows lists runs one by one"),
                       (["g", "--by", " , "], "--by ' , ' names no axis")):
        result = CliRunner().invoke(app, ["results", *args], env=env)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert not list(tmp_path.iterdir())
    with pytest.raises(StlUsageError, match="seeds are what each mean is taken over"):
        parse_effect("seed=0:1")


def test_small_command_line_slips_get_one_line_each(tmp_path: Path) -> None:
    env = {"STL_REDIS_URL": "redis://127.0.0.1:1/0", "STL_HOME": str(tmp_path)}
    grid = tmp_path / "g.yaml"
    for args, extra, says in (
            (["enqueue", str(grid), "--max-runs", "0"], {}, "Invalid value for '--max-runs'"),
            (["enqueue", str(grid), "--user", " "], {}, "--user is blank"),
            (["status", "--once"], {"STL_USER": " "}, "STL_USER is blank; unset it to use your login name"),
            (["logs", "f" * 100_000], {}, f'"{"f" * 40}…" is not a run id')):
        result = CliRunner().invoke(app, args, env={**env, **extra})
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, (args, result.stderr[:300])
        assert says in result.stderr and len(result.stderr) < 400, (args, result.stderr[:300])


def test_a_variant_of_a_held_out_task_in_training_is_refused_unless_allowed(
    tmp_path: Path, stl_env: Path, conn: redis.Redis
) -> None:
    """InstructDial's create_data_text2text.py writes `<task>-poluteoptions` twins of its tasks: training on
    the twin of a held-out task leaks it, in a task split and in a mixture alike."""
    import json

    from tests.instructdial_format import get_options_string, row

    data = tmp_path / "variants.jsonl"
    lines = [row(task, f"turn {i}", get_options_string(["yes", "no"]), "yes")
             for task in ("persuasion_present", "persuasion_present-poluteoptions", "toxic_classification")
             for i in range(30)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    grid = {"name": "leaky", "data": str(data),
            "tasks": {"train": ["toxic_classification", "persuasion_present-poluteoptions"],
                      "eval": ["persuasion_present"]},
            "grid": {"model": ["tiny:bart"]}}
    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    (line,) = assert_refused(enqueue(path)[0], path, conn)
    assert ":6: tasks.train.1: " in line and "persuasion_present-poluteoptions" in line and \
        '"persuasion_present"' in line and "allow_task_overlap" in line
    in_mixture = {**grid, "tasks": {"train": ["toxic_classification"], "eval": ["persuasion_present"]},
                  "mixtures": {"twins": {"data": str(data), "tasks": ["persuasion_present-poluteoptions"]}}}
    path.write_text(yaml.safe_dump(in_mixture, sort_keys=False))
    (line,) = assert_refused(enqueue(path)[0], path, conn)
    assert "mixtures.twins.tasks.0: " in line and "persuasion_present-poluteoptions" in line
    path.write_text(yaml.safe_dump({**grid, "allow_task_overlap": True}, sort_keys=False))
    result, _ = enqueue(path, "--dry-run")
    assert result.exit_code == 0, result.output
