"""`make demo` / `stl demo`: a grid end to end on a private Redis, never on a queue it did not start.

The "lab's Redis" here is a redis-server the test starts (never the machine's 127.0.0.1:6379), named in
STL_REDIS_URL as a lab member's shell would name the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from stl.jobs import keys
from stl.jobs.errors import RedisUnavailable
from stl.jobs.queue.private_redis import MAX_SOCKET_PATH, private_dir, private_redis
from tests.conftest import REPO, RedisServer, free_port
from tests.helpers import child_env, small_grid, stl, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

PRIVATE_LINE = "stl demo: Redis: a private redis-server on unix://"


@pytest.fixture
def lab_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """The lab's queue, holding other people's keys before any demo starts."""
    directory = tmp_path / "lab-redis"
    directory.mkdir()
    server = RedisServer(directory=directory, port=free_port())
    server.start()
    client = server.client()
    client.rpush("rq:queue:stl.carol.normal", "stl-0123456789abcdef0123")
    client.hset("stl:run:0123456789abcdef", mapping={"status": "queued", "user": "carol", "grid": "carol-study"})
    client.zadd("stl:grid:carol-study:runs", {"0123456789abcdef": 1.0})
    client.set("stl:schema", "1")
    yield server
    server.kill()


def snapshot(server: RedisServer) -> dict[bytes, bytes | None]:
    """Every key of the server with its serialized value."""
    client = server.client()
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


def processes_in(directory: Path) -> list[int]:
    """Processes whose working folder is `directory`: a redis-server runs in its --dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == directory.resolve():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_private_server_gone(home: Path) -> None:
    data_dir = private_dir(home)
    assert processes_in(data_dir) == [], "the demo's private redis-server still runs"
    assert not (data_dir / "socket").exists() and not (data_dir / "redis.sock").exists()
    log = (data_dir / "redis.log").read_text()
    assert "ready to exit" in log, log[-2000:]  # it was shut down, not left behind or killed


def fake_venv(directory: Path) -> Path:
    """A VENV for the Makefile whose `stl` is this repository's, in the interpreter running the tests."""
    (directory / "bin").mkdir(parents=True)
    wrapper = directory / "bin" / "stl"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m stl.cli.main "$@"\n')
    wrapper.chmod(0o755)
    return directory


def checkout(directory: Path, demo_data: Path) -> Path:
    """What `make demo` needs of a checkout: its Makefile and a small demo grid (the example's name), with both arms
    of the effect `make demo` prints."""
    directory.mkdir()
    shutil.copy(REPO / "Makefile", directory / "Makefile")
    shutil.copy(REPO / "pyproject.toml", directory / "pyproject.toml")
    (directory / "grids").mkdir()
    small_grid(directory / "grids", demo_data, "example", filename="small.yaml", mtl=["none", "in-domain"])
    return directory


def make_demo(tree: Path, venv: Path, user: str, lab: RedisServer, log: Path) -> subprocess.Popen[bytes]:
    env = child_env(STL_REDIS_URL=lab.url, STL_USER=user, STL_HOME=str(tree.parent / "lab-home"),
                    PYTHONPATH=str(REPO))
    with log.open("wb") as out:
        return subprocess.Popen(["make", "-C", str(tree), "demo", f"VENV={venv}", "DEMO_GRID=grids/small.yaml"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_demos_at_once_both_finish_and_the_labs_redis_gains_no_key(
        tmp_path: Path, demo_data: Path, lab_redis: RedisServer) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = fake_venv(tmp_path / "venv")
    trees = {user: checkout(tmp_path / user, demo_data) for user in ("alice", "bob")}
    (venv / ".installed").touch()  # after pyproject.toml: make builds no venv
    before = snapshot(lab_redis)

    logs = {user: tmp_path / f"make-demo-{user}.log" for user in trees}
    demos = {user: make_demo(tree, venv, user, lab_redis, logs[user]) for user, tree in trees.items()}
    try:
        codes = {user: demo.wait(timeout=300) for user, demo in demos.items()}
    finally:
        for demo in demos.values():
            if demo.poll() is None:
                demo.kill()
    outputs = {user: log.read_text(errors="replace") for user, log in logs.items()}

    after = snapshot(lab_redis)
    assert after == before, (f"the lab's Redis changed: added {sorted(after.keys() - before.keys())}, removed "
                             f"{sorted(before.keys() - after.keys())}")
    for user, tree in trees.items():
        output = outputs[user]
        assert codes[user] == 0, output[-5000:]
        assert output.count(PRIVATE_LINE) == 1, output[-5000:]
        assert f"STL_REDIS_URL (redis://127.0.0.1:{lab_redis.port}/0) is not used" in output
        assert "emotion_classification" in output and "│ in-domain │" in output, output[-5000:]  # its results table
        assert "Effect of mtl: in-domain vs none" in output and "mean overall" in output, output[-5000:]
        assert "Traceback" not in output
        assert_private_server_gone(tree / ".stl-demo")
    assert not (tmp_path / "lab-home").exists()  # each demo ran under its own checkout's .stl-demo


def test_a_failing_step_stops_the_private_redis_and_the_demo_says_once_which_redis_it_used(
        stl_env: Path, tmp_path: Path, demo_data: Path, lab_redis: RedisServer) -> None:
    grid = small_grid(tmp_path, demo_data, "example")
    before = snapshot(lab_redis)
    # The worker refuses to start (its notify command does not exist): the demo's second step fails.
    env = child_env(STL_REDIS_URL=lab_redis.url, STL_NOTIFY_CMD="no-such-notifier-xyz")
    result = stl("demo", str(grid), env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(PRIVATE_LINE) == 1, result.stderr
    assert f"unix://{private_dir(stl_env)}" in result.stderr or "/stl-redis-" in result.stderr
    assert "no-such-notifier-xyz" in result.stderr and "Traceback" not in result.stderr
    assert "queued 1 run(s) of grid example" in result.stdout  # the first step ran, on the private server
    assert_private_server_gone(stl_env)
    assert snapshot(lab_redis) == before
    # Its data stayed: the next demo (here, the server alone) still has the queued run.
    with private_redis(stl_env) as server, server.client() as client:
        assert client.zcard(keys.grid_runs("example")) == 1


def test_an_effect_the_grid_cannot_show_is_refused_before_anything_runs(
        stl_env: Path, tmp_path: Path, demo_data: Path, lab_redis: RedisServer) -> None:
    grid = small_grid(tmp_path, demo_data, "example", mtl=["none", "in-domain"])
    for effect, message in (("mtl=none:general", "mtl has no value 'general'"),
                            ("mtl:none:in-domain", "malformed --effect"),
                            ("size=none:in-domain", "unknown axis 'size'")):
        result = stl("demo", str(grid), "--effect", effect, env=child_env(STL_REDIS_URL=lab_redis.url))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("stl: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and result.stdout == ""
    assert not private_dir(stl_env).exists()  # no server was started


def test_commands_on_the_configured_redis_say_nothing_about_which_one(stl_env: Path) -> None:
    result = stl("status", "--once")
    assert result.returncode == 0 and result.stderr == ""


def test_a_second_demo_on_the_same_stl_home_is_refused_and_stops_nothing(
        stl_env: Path, tmp_path: Path, demo_data: Path) -> None:
    grid = small_grid(tmp_path, demo_data, "example")
    with private_redis(stl_env) as first:
        result = stl("demo", str(grid), env=child_env(STL_REDIS_URL=""))  # blank: ignored, not an error, here
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"stl: another `stl demo` (pid {os.getpid()}) is running with STL_HOME {stl_env} and owns its private "
            "redis-server; wait for it to end, or give this one its own STL_HOME")
        with first.client() as client:
            assert client.ping() and client.dbsize() == 0  # still the first's, untouched


def test_a_private_redis_left_by_a_killed_demo_is_stopped_and_its_data_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = ("import sys, time\nfrom pathlib import Path\nfrom stl.jobs.queue.private_redis import private_redis\n"
              "with private_redis(Path(sys.argv[1])) as server, server.client() as client:\n"
              "    client.set('queued', 'yes'); client.save() if False else None\n"
              "    print(server.pid, flush=True); time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script, str(home)], cwd=REPO, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert owner.stdout is not None
    leftover_pid = int(owner.stdout.readline())
    time.sleep(1.2)  # appendfsync everysec
    owner.kill()  # SIGKILL: no finally runs; its redis-server lives on
    owner.wait()
    assert processes_in(private_dir(home)) == [leftover_pid]

    with private_redis(home) as server, server.client() as client:
        assert server.pid != leftover_pid
        assert processes_in(private_dir(home)) == [server.pid]
        assert client.get("queued") == b"yes"
    assert processes_in(private_dir(home)) == []


def test_a_server_that_is_not_this_homes_is_never_stopped(tmp_path: Path) -> None:
    from stl.jobs.queue.connection import redis_server_binary

    other_dir = tmp_path / "someone-else"
    other_dir.mkdir()
    socket = other_dir / "redis.sock"
    binary = redis_server_binary()
    assert binary is not None
    other = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(socket), "--dir", str(other_dir),
                              "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(unix_socket_path=str(socket))
        wait_for(lambda: socket.exists() and client.ping(), timeout=10, what="the other server")
        home = tmp_path / "home"
        private_dir(home).mkdir(parents=True)
        (private_dir(home) / "socket").write_text(str(socket))  # as if a leftover of this home's were there
        with pytest.raises(RedisUnavailable, match="not this STL_HOME's"), private_redis(home):
            pass
        assert client.ping() and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_stopping_the_private_redis_does_not_retry_the_shutdown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SHUTDOWN ends with the server closing the connection; redis-py's default retries took that for a fault and
    reconnected with backoff, which added 4 s to the end of every demo."""
    connects: list[str] = []
    original = redis.connection.UnixDomainSocketConnection._connect

    def counted(connection: redis.connection.UnixDomainSocketConnection) -> object:
        connects.append(connection.path)
        return original(connection)

    home = tmp_path / "home"
    with private_redis(home) as server:
        monkeypatch.setattr(redis.connection.UnixDomainSocketConnection, "_connect", counted)
    assert connects == [str(server.socket)]  # one connection: INFO, then SHUTDOWN on it, and no reconnecting
    assert processes_in(private_dir(home)) == []


def test_a_stl_home_too_deep_for_a_socket_gets_one_in_a_private_temp_folder(tmp_path: Path) -> None:
    home = tmp_path / ("deep-" * 20) / "home"
    assert len(str(private_dir(home) / "redis.sock")) > MAX_SOCKET_PATH
    with private_redis(home) as server, server.client() as client:
        assert len(str(server.socket)) <= MAX_SOCKET_PATH and server.socket.parent.name.startswith("stl-redis-")
        assert server.socket.parent.stat().st_mode & 0o077 == 0  # only its owner reaches it
        assert client.ping()
        folder = server.socket.parent
    assert not folder.exists()
    assert processes_in(private_dir(home)) == []


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_its_worker_puts_the_stage_back_and_its_redis_stops(
        stl_env: Path, tmp_path: Path, demo_data: Path) -> None:
    grid = small_grid(tmp_path, demo_data, "example", train={"max_steps": 2000, "checkpoint_every": 50})
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "stl.cli.main", "demo", str(grid)], cwd=REPO, env=child_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def running_stages() -> int:
            try:
                socket = (private_dir(stl_env) / "socket").read_text()
                with redis.Redis(unix_socket_path=socket) as client:
                    return int(client.scard(keys.RUNNING_STAGES))
            except (OSError, redis.RedisError):
                return 0

        wait_for(running_stages, timeout=120, what="the demo's worker to start a stage",
                 diagnostics=lambda: log.read_text(errors="replace")[-3000:])
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl+C at the terminal: the foreground process group
        assert demo.wait(timeout=120) == 128 + signal.SIGINT
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert "stopping: `stl worker` finishes its part first" in output and "Traceback" not in output
    assert_private_server_gone(stl_env)
    with private_redis(stl_env) as server:  # the stage went back to the queue, nothing failed
        payload = stl("status", "--json", env=child_env(STL_REDIS_URL=server.url))
    assert payload.returncode == 0, payload.stderr
    (run,) = json.loads(payload.stdout)["runs"]
    assert run["status"] == "queued", run


def test_the_demo_runs_torch_on_one_thread_unless_told_otherwise(tmp_path: Path) -> None:
    from stl.jobs.queue.demo import step_environment

    env = step_environment({"PATH": "/bin", "STL_REDIS_URL": "redis://lab:6379/0"}, "unix:///x/redis.sock", tmp_path)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "STL_REDIS_URL": "unix:///x/redis.sock",
                   "STL_HOME": str(tmp_path)}
    assert step_environment({"OMP_NUM_THREADS": "4"}, "unix:///x", tmp_path)["OMP_NUM_THREADS"] == "4"
