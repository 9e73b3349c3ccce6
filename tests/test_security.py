"""No one let in: no pickle or code execution anywhere, forged jobs refused, Redis passwords, ids checked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rq import Callback, Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from stl.cli.main import app
from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.queueing import job_id_for
from tests.conftest import REPO, RedisServer, free_port
from tests.helpers import (
    Workers,
    child_env,
    grid_done,
    run_statuses,
    runs_by_model,
    small_grid,
    stl,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import redis

runner = CliRunner()

# What must never appear in product code: deserialising pickles, running a model's own Python code,
# evaluating strings. `conn.eval(` (a Redis script) is not Python's eval, hence the look-behind.
FORBIDDEN = {
    "pickle-like import": re.compile(
        r"^\s*(?:import|from)\s+(?:pickle|cPickle|dill|cloudpickle|marshal|shelve|joblib)\b", re.MULTILINE),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "eval(": re.compile(r"(?<![\w.])eval\s*\("),
    "exec(": re.compile(r"(?<![\w.])exec\s*\("),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"),
    "yaml.load with an unsafe loader": re.compile(r"yaml\.(?:unsafe_load|full_load|load)\((?![^)]*Loader\s*=)"),
    "shell=True": re.compile(r"shell\s*=\s*True"),
}


def product_files() -> list[Path]:
    skip = {"tests", ".venv", ".git", "build", "dist"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def test_the_code_checks_would_catch_what_they_look_for() -> None:
    bad = {
        "pickle-like import": "import pickle\nfrom dill import loads\n",
        "trust_remote_code=True": "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "eval(": "value = eval(text)",
        "exec(": "exec(code)",
        "torch.load without weights_only=True": "torch.load(path, map_location='cpu')",
        "yaml.load with an unsafe loader": "yaml.load(stream)",
        "shell=True": "subprocess.run(cmd, shell=True)",
    }
    for name, sample in bad.items():
        assert FORBIDDEN[name].search(sample), name
    fine = "conn.eval(script, 0)\npipe.execute()\ntorch.load(p, map_location=d, weights_only=True)\n" \
           "yaml.load(text, Loader=_Loader)\nimport pickleball_scores\n"
    assert not any(pattern.search(fine) for pattern in FORBIDDEN.values())


def test_product_code_has_no_pickle_no_remote_code_and_no_eval() -> None:
    files = product_files()
    assert any(p.name == "entry.py" for p in files) and len(files) > 20
    found = [f"{path.relative_to(REPO)}: {name}" for path in files for name, pattern in FORBIDDEN.items()
             if pattern.search(path.read_text())]
    assert not found, found


# --- forged jobs --------------------------------------------------------------------------------------


def test_worker_refuses_forged_stage_jobs(stl_env: Path, conn: redis.Redis, tmp_path: Path) -> None:
    """Jobs that name stl's entry point but were not written by `stl enqueue` are refused unrun."""
    conn.sadd(keys.USERS, "alice")
    queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    stage = "0123456789abcdef0123"
    forged = {
        "a path for a stage id": queue.enqueue("stl.jobs.queue.entry.run_stage", "../../../../tmp/stl-escape"),
        "extra keyword arguments": queue.enqueue("stl.jobs.queue.entry.run_stage", args=(stage,), kwargs={"extra": 1},
                                                 job_id=job_id_for(stage)),
        "an id of another stage": queue.enqueue("stl.jobs.queue.entry.run_stage", stage, job_id=job_id_for("f" * 20)),
        "a failure callback": queue.enqueue("stl.jobs.queue.entry.run_stage", "a" * 20, job_id=job_id_for("a" * 20),
                                            on_failure=Callback("os.system")),
        "a success callback": queue.enqueue("stl.jobs.queue.entry.run_stage", "b" * 20, job_id=job_id_for("b" * 20),
                                            on_success=Callback("shutil.rmtree")),
    }
    result = stl("worker", "--burst", timeout=120)
    assert result.returncode == 0, result.stderr
    expected = {
        "a path for a stage id": "its arguments are not one stage id",
        "extra keyword arguments": "its arguments are not one stage id",
        "an id of another stage": "its id does not match its stage",
        "a failure callback": "it names failure callbacks",
        "a success callback": "it names success callbacks",
    }
    for what, job in forged.items():
        fetched = Job.fetch(job.id, connection=conn, serializer=JSONSerializer)
        assert fetched.get_status().value == "failed", what
        latest = fetched.latest_result()
        assert latest is not None and expected[what] in (latest.exc_string or ""), (what, latest)
    assert not Path("/tmp/stl-escape").exists()
    assert not (stl_env / "stages").exists(), "a refused job must not touch STL_HOME"


# --- nothing from a spec runs as code ---------------------------------------------------------------


def test_model_names_are_never_executed(stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    marker = tmp_path / "pwned"
    for name in (f"__import__('os').system('touch {marker}')", f"$(touch {marker})", f"`touch {marker}`",
                 "os.system;touch", f"tiny:bart;touch {marker}"):
        path = small_grid(tmp_path, demo_data, "evil", models=[name], shots=[0])
        result = stl("enqueue", str(path))
        assert result.returncode == 2, (name, result.stdout)
        assert "model name" in result.stderr and "Traceback" not in result.stderr
        assert conn.dbsize() == 0
    assert not marker.exists()


# --- a Redis with a password --------------------------------------------------------------------------



@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "locked-redis"
    directory.mkdir()
    server = RedisServer(directory=directory, port=free_port(), password="c0rrect-h0rse")
    server.start()
    yield server
    server.kill()


@pytest.mark.slow
def test_a_redis_password_in_the_url_works_and_a_wrong_one_is_refused_clearly(
        locked_redis: RedisServer, tmp_path: Path, demo_data: Path, workers: Workers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_REDIS_URL", locked_redis.url)
    monkeypatch.setenv("STL_HOME", str(tmp_path / "stl-home"))
    monkeypatch.setenv("STL_USER", "alice")
    conn = locked_redis.client()
    # A path-like model name is a folder (there, with a config.json that names no model), which fails to load as
    # one: nothing in its name is run.
    marker = tmp_path / "pwned"
    evil = f"./$(touch${{IFS}}{marker})/__import__('os').system('touch${{IFS}}{marker}')"
    (tmp_path / evil).mkdir(parents=True)
    (tmp_path / evil / "config.json").write_text("{}")
    grid = small_grid(tmp_path, demo_data, "locked", models=["tiny:bart", evil], shots=[0])
    result = stl("enqueue", str(grid))
    assert result.returncode == 0, result.stderr
    worker = workers.start()
    wait_for(lambda: grid_done(conn, "locked"), timeout=90, what="the grid to end", diagnostics=workers.logs)
    assert worker.alive()
    status = stl("status", "--json")
    assert status.returncode == 0, status.stderr
    by_model = runs_by_model(json.loads(status.stdout), "locked")
    assert by_model["tiny:bart"]["status"] == "finished"
    assert by_model[evil]["status"] == "failed" and "could not be loaded" in by_model[evil]["error"]
    assert not marker.exists()
    assert set(run_statuses(conn, "locked").values()) == {"finished", "failed"}

    for url, says in ((locked_redis.url.replace("c0rrect-h0rse", "wr0ng"), "refused the password"),
                      (locked_redis.url.replace(":c0rrect-h0rse@", ""), "requires a password")):
        env = child_env(STL_REDIS_URL=url)
        for args in (["status", "--json"], ["enqueue", str(grid)], ["worker", "--burst"]):
            result = stl(*args, env=env)
            shown = result.stdout + result.stderr
            assert result.returncode == 1, (args, shown)
            assert says in result.stderr and "STL_REDIS_URL" in result.stderr, (args, shown)
            assert "Traceback" not in shown and "wr0ng" not in shown and "c0rrect" not in shown
    worker.kill()


# --- run ids -------------------------------------------------------------------------------------------


def test_every_command_checks_run_ids_before_they_become_paths(stl_env: Path, conn: redis.Redis,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    for bad in ["../../etc/passwd", "abc", "$(rm -rf ~)", "0123456789abcdef0", "ABCDEF123456", "..%2f..%2f"]:
        for args in (["cancel", bad], ["retry", bad], ["plot", bad, "--out", str(out)], ["logs", bad]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, (args, result.output)
            assert "is not a run id" in result.stderr, (args, result.stderr)
    assert conn.dbsize() == 0
    assert not out.exists()
    for args in (["cancel", "0123456789abcdef"], ["retry", "0123456789abcdef"], ["plot", "0123456789abcdef"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "no run with id" in result.stderr, (args, result.stderr)


def test_a_job_record_is_never_trusted_for_a_stage_folder(stl_env: Path, conn: redis.Redis) -> None:
    """Even called directly, the entry point refuses what is not a stage id before it touches a path."""
    from stl.jobs.errors import ForeignJob
    from stl.jobs.queue.entry import run_stage

    for bad in ("../x", "/etc", "0" * 19, "0" * 21, "G" * 20, ""):
        with pytest.raises(ForeignJob):
            run_stage(bad)
    assert text(conn.get("nothing")) == "" and conn.dbsize() == 0
