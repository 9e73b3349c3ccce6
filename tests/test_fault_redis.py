"""Redis killed (SIGKILL) and restarted mid-grid, with AOF at everysec.

Writes older than a second survive; the worker waits for Redis instead of exiting; `stl status` says
Redis is unreachable and then shows its tables again; `stl enqueue` fails clearly and writes nothing.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from tests.conftest import REPO, RedisServer, free_port
from tests.helpers import (
    Workers,
    child_env,
    enqueue,
    grid_done,
    run_statuses,
    small_grid,
    stl,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import redis

AOF_WINDOW_S = 1.0  # appendfsync everysec
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")



@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test alone uses, so it may kill it."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory=directory, port=free_port())
    server.start()
    yield server
    server.kill()


def screen(path: Path) -> str:
    return ANSI.sub("", path.read_text(errors="replace"))


@pytest.mark.slow
def test_redis_killed_and_restarted_mid_grid_loses_nothing(
        own_redis: RedisServer, tmp_path: Path, demo_data: Path, workers: Workers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_REDIS_URL", own_redis.url)
    monkeypatch.setenv("STL_HOME", str(tmp_path / "stl-home"))
    monkeypatch.setenv("STL_USER", "alice")
    conn = own_redis.client()
    enqueue(small_grid(tmp_path, demo_data, "redis-grid", seeds=[0, 1, 2], shots=[0, 4],
                       train={"max_steps": 150, "checkpoint_every": 25}))
    worker = workers.start()
    status_out = tmp_path / "status.out"
    # A terminal, as far as rich can tell: the live view redraws every half second.
    status_env = child_env(TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="160")
    with status_out.open("wb") as out:
        status = subprocess.Popen([sys.executable, "-m", "stl.cli.main", "status", "--interval", "0.5"], cwd=REPO,
                                  env=status_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "finished" in run_statuses(conn, "redis-grid").values(), timeout=120,
                 what="a first finished run", diagnostics=workers.logs)
        # Queued more than the fsync window before the kill: it must survive.
        enqueue(small_grid(tmp_path, demo_data, "queued-just-before", seeds=[9], shots=[0]))
        time.sleep(AOF_WINDOW_S + 0.5)

        def training() -> bool:
            running = [text(s) for s in conn.smembers(keys.RUNNING_STAGES)]
            return any(text(conn.hget(keys.stage(s), "kind")) == "finetune" for s in running)

        wait_for(training, timeout=60, interval=0.05, what="a training stage", diagnostics=workers.logs)
        before = {**run_statuses(conn, "redis-grid"), **run_statuses(conn, "queued-just-before")}
        time.sleep(AOF_WINDOW_S + 0.2)
        own_redis.kill()  # SIGKILL, most likely in the middle of that stage

        refused = stl("enqueue", str(small_grid(tmp_path, demo_data, "enqueued-while-down", seeds=[5])))
        assert refused.returncode != 0
        assert "Redis" in refused.stderr and "Traceback" not in refused.stderr + refused.stdout
        wait_for(lambda: "unreachable" in screen(status_out).lower(), timeout=20,
                 what="`stl status` to say Redis is unreachable")
        assert status.poll() is None, screen(status_out)[-2000:]
        time.sleep(2)  # the worker and its horse keep trying meanwhile
        assert worker.alive(), workers.logs()

        own_redis.start()  # same folder: it replays its append-only file
        restarted_at = len(screen(status_out))
        after = {**run_statuses(conn, "redis-grid"), **run_statuses(conn, "queued-just-before")}
        assert set(after) == set(before), "a run was lost"
        lost = [r for r, s in before.items() if s == "finished" and after[r] != "finished"]
        assert not lost, f"finished runs lost their results: {lost}"
        assert "enqueued-while-down" not in {text(g) for g in conn.zrange(keys.GRIDS, 0, -1)}
        wait_for(lambda: "redis-grid" in screen(status_out)[restarted_at:], timeout=20,
                 what="`stl status` to show its tables again")

        wait_for(lambda: grid_done(conn, "redis-grid") and grid_done(conn, "queued-just-before"), timeout=180,
                 what="the grids to finish after the restart", diagnostics=workers.logs)
        final = {**run_statuses(conn, "redis-grid"), **run_statuses(conn, "queued-just-before")}
        assert set(final.values()) == {"finished"}, final
        assert worker.alive(), workers.logs()
    finally:
        status.send_signal(signal.SIGINT)
        status.wait(timeout=10)
    shown = screen(status_out)
    assert "Traceback" not in shown
    log = worker.output()
    assert "Redis is unreachable" in log and "Redis is reachable again" in log
    assert "Traceback" not in log and "quitting" not in log
    worker.kill()


def test_the_lease_heartbeat_takes_a_lost_lease_back_and_yields_to_another_holder(
        conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a Redis restart the lease may be gone (written in the last second) or taken (it expired and
    the stage went to another horse): the heartbeat takes it back in the first case and stops in the second."""
    from stl.jobs.queue import stage_lease

    monkeypatch.setattr(stage_lease, "HEARTBEAT_EVERY_S", 0.05)
    lease = stage_lease.StageLease(conn, "0" * 20, "here:1")
    assert lease.acquire() and conn.sismember(keys.RUNNING_STAGES, "0" * 20)
    assert not stage_lease.StageLease(conn, "0" * 20, "there:2").acquire()
    lease.start_heartbeat()
    try:
        conn.delete(lease.key)
        conn.srem(keys.RUNNING_STAGES, "0" * 20)
        wait_for(lambda: text(conn.get(lease.key)) == "here:1", timeout=5, what="the lease to be taken back")
        assert conn.sismember(keys.RUNNING_STAGES, "0" * 20) and conn.ttl(lease.key) > stage_lease.LEASE_TTL_S - 5
        assert not lease.lost
        conn.set(lease.key, "there:2", ex=30)
        wait_for(lambda: lease.lost, timeout=5, what="the heartbeat to notice another holder")
        assert text(conn.get(lease.key)) == "there:2"
    finally:
        lease.release()
    assert text(conn.get(lease.key)) == "there:2", "release leaves another holder's lease alone"


def test_the_outage_ends_only_when_a_call_gets_through(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import redis as redis_lib
    from redis.backoff import NoBackoff

    from stl.jobs.queue import connection

    monkeypatch.setattr(connection._Outage, "since", None)  # noqa: SLF001 - the process-wide outage state
    retry = connection.PatientRetry(NoBackoff(), retries=5)
    attempts = iter([redis_lib.ConnectionError("refused"), redis_lib.ConnectionError("refused"), "PONG"])

    def flaky() -> str:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def fails() -> str:
        raise redis_lib.ConnectionError("refused")

    with pytest.raises(redis_lib.ConnectionError):
        retry.call_with_retry(fails, lambda error: None)
    assert retry.call_with_retry(lambda: "not a Redis round trip", lambda error: None)
    assert capsys.readouterr().err.count("Redis is unreachable") == 1  # and no false "reachable again"
    assert retry.call_with_retry(flaky, lambda error: None) == "PONG"  # failed, then got through
    assert "Redis is reachable again after" in capsys.readouterr().err
