"""Preemption with a bounded wait (stl.jobs.queue.preemption): the rule alone, its reading of Redis, and a real
worker that makes a heavy user's long training stage yield to a light user's grid."""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import StagePreempted, UsageError
from stl.jobs.faults import parse_faults
from stl.jobs.queue.preemption import (
    Preemption,
    RunningStage,
    choose_preemption,
    preempt_if_due,
    preempted_line,
    read_queue_view,
)
from stl.jobs.settings import DEFAULT_PREEMPT_AFTER_S, load_settings
from tests.helpers import child_env, enqueue, grid_done, run_statuses, small_grid, stage_log, stl, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import redis

    from tests.helpers import Workers

NOW = 1_000_000.0
AFTER = 1800.0


def stage(stage_id: str, user: str, *, ran_s: float, kind: str = "mtl", yielding: bool = False) -> RunningStage:
    return RunningStage(stage_id=stage_id, user=user, kind=kind, started_at=NOW - ran_s, yielding=yielding)


def choose(running: list[RunningStage], waiting: list[str], usage: dict[str, float], *, idle_workers: int = 0,
           preempt_after_s: float = AFTER) -> Preemption | None:
    return choose_preemption(running, waiting, usage, idle_workers=idle_workers, preempt_after_s=preempt_after_s,
                             now=NOW)


# --- the rule -------------------------------------------------------------------------------------------------

def test_a_heavy_users_training_stage_yields_to_a_lighter_users_waiting_stage_once_it_has_run_long_enough() -> None:
    running = [stage("h1", "heavy", ran_s=AFTER)]
    assert choose(running, ["light"], {"heavy": 5000.0, "light": 10.0}) == Preemption(
        stage_id="h1", user="heavy", for_user="light", ran_s=AFTER)
    assert choose([stage("h1", "heavy", ran_s=AFTER - 1)], ["light"], {"heavy": 5000.0, "light": 10.0}) is None


def test_the_heaviest_users_longest_running_training_stage_is_the_one_that_yields() -> None:
    usage = {"heavy": 9000.0, "medium": 4000.0, "light": 0.0}
    running = [stage("m-long", "medium", ran_s=9 * AFTER), stage("h-short", "heavy", ran_s=AFTER + 5),
               stage("h-long", "heavy", ran_s=3 * AFTER), stage("h-eval", "heavy", ran_s=5 * AFTER, kind="eval"),
               stage("h-young", "heavy", ran_s=AFTER - 5, kind="finetune")]
    chosen = choose(running, ["light"], usage)
    assert chosen is not None and (chosen.stage_id, chosen.for_user) == ("h-long", "light")
    # Without the heavy user's old enough stages, the next heaviest user's stage yields.
    chosen = choose(running[:2] + running[3:], ["light"], usage)
    assert chosen is not None and chosen.stage_id == "h-short"
    chosen = choose([running[0], *running[3:]], ["light"], usage)
    assert chosen is not None and chosen.stage_id == "m-long"


def test_the_waiting_user_served_is_the_lightest_and_only_heavier_users_stages_yield_to_them() -> None:
    usage = {"heavy": 9000.0, "medium": 4000.0, "light": 100.0}
    # medium waits too, but light comes first by fair share; heavy yields to light.
    chosen = choose([stage("h", "heavy", ran_s=AFTER)], ["medium", "light"], usage)
    assert chosen is not None and chosen.for_user == "light"
    # The stage running is the lightest user's: nobody lighter waits, nothing yields.
    assert choose([stage("l", "light", ran_s=10 * AFTER)], ["medium", "heavy"], usage) is None
    # A user waiting behind their own stage, or one as heavy, preempts nothing.
    assert choose([stage("h", "heavy", ran_s=10 * AFTER)], ["heavy"], usage) is None
    assert choose([stage("a", "anna", ran_s=10 * AFTER)], ["bert"], {"anna": 50.0, "bert": 50.0}) is None


def test_a_stage_that_resumed_runs_the_whole_time_again_before_it_can_yield_again() -> None:
    # It yielded once; its started_at is its resumption: all it ran before does not count.
    usage = {"heavy": 9000.0, "light": 0.0}
    assert choose([stage("h", "heavy", ran_s=AFTER - 1)], ["light"], usage) is None
    assert choose([stage("h", "heavy", ran_s=AFTER)], ["light"], usage) is not None


def test_evaluations_never_yield() -> None:
    running = [stage("e", "heavy", ran_s=100 * AFTER, kind="eval")]
    assert choose(running, ["light"], {"heavy": 9000.0, "light": 0.0}) is None


def test_zero_turns_preemption_off() -> None:
    running = [stage("h", "heavy", ran_s=100 * AFTER)]
    assert choose(running, ["light"], {"heavy": 9000.0, "light": 0.0}, preempt_after_s=0) is None


def test_nothing_yields_while_an_idle_worker_could_take_the_waiting_stage_or_one_yields_already() -> None:
    usage = {"heavy": 9000.0, "light": 0.0}
    running = [stage("h1", "heavy", ran_s=5 * AFTER), stage("h2", "heavy", ran_s=2 * AFTER)]
    assert choose(running, ["light"], usage, idle_workers=1) is None
    assert choose([running[0], stage("h2", "heavy", ran_s=AFTER, yielding=True)], ["light"], usage) is None
    assert choose(running, [], usage) is None


def test_the_setting_is_seconds_with_a_default_and_zero_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STL_PREEMPT_AFTER", raising=False)
    assert load_settings().preempt_after_s == DEFAULT_PREEMPT_AFTER_S == 1800
    for value, seconds in [("15", 15.0), (" 0 ", 0.0), ("2.5", 2.5), ("", DEFAULT_PREEMPT_AFTER_S)]:
        monkeypatch.setenv("STL_PREEMPT_AFTER", value)
        assert load_settings().preempt_after_s == seconds, value
    for value in ("-1", "soon", "inf", "nan", "30s"):
        monkeypatch.setenv("STL_PREEMPT_AFTER", value)
        with pytest.raises(UsageError, match=f"STL_PREEMPT_AFTER='{value}' is not a number of seconds"):
            load_settings()


def test_a_bad_setting_stops_the_worker_with_one_line_and_exit_code_2(stl_env: Path) -> None:
    result = stl("worker", "--burst", env=child_env(STL_PREEMPT_AFTER="half an hour"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "stl: STL_PREEMPT_AFTER='half an hour' is not a number of seconds; set it to 0 or more (e.g. 1800), or "
        "unset it for the default (1800)"]


def test_the_worker_help_documents_the_setting() -> None:
    result = stl("worker", "--help")
    assert result.returncode == 0, result.stderr
    assert "STL_PREEMPT_AFTER" in result.stdout and "never" in result.stdout


# --- reading Redis and setting the flag -------------------------------------------------------------------------

def put_running(conn: redis.Redis, stage_id: str, user: str, *, started_at: float, kind: str = "mtl") -> None:
    conn.hset(keys.stage(stage_id), mapping={"user": user, "kind": kind, "status": "running",
                                             "started_at": started_at, "heartbeat": time.time(), "preempt": ""})
    conn.sadd(keys.RUNNING_STAGES, stage_id)
    conn.sadd(keys.USERS, user)


def put_waiting(conn: redis.Redis, user: str, stage_id: str) -> None:
    conn.sadd(keys.USERS, user)
    conn.rpush(f"rq:queue:{keys.queue_name(user, 'normal')}", f"stl-{stage_id}")


def put_worker(conn: redis.Redis, name: str, *, state: str, paused: str = "", heartbeat: float,
               waiting: str = "") -> None:
    conn.sadd(keys.WORKERS, name)
    conn.hset(keys.worker(name), mapping={"state": state, "paused": paused, "heartbeat": heartbeat,
                                          "waiting": waiting})


def test_the_worker_sets_the_flag_on_its_own_stage_only_and_once(conn: redis.Redis) -> None:
    now = time.time()
    put_running(conn, "a" * 20, "heavy", started_at=now - 100)
    put_running(conn, "b" * 20, "heavy", started_at=now - 50)
    put_waiting(conn, "light", "c" * 20)
    put_worker(conn, "w-a", state="busy", heartbeat=now)
    put_worker(conn, "w-b", state="busy", heartbeat=now)
    view = read_queue_view(conn, own_worker="w-b", now=now)
    assert view.waiting_users == ["light"] and view.idle_workers == 0
    assert sorted(s.stage_id for s in view.running) == ["a" * 20, "b" * 20]
    # The longest-running one is a's: b's worker leaves its stage alone.
    assert preempt_if_due(conn, own_worker="w-b", own_stage="b" * 20, preempt_after_s=30, now=now) is None
    assert not text(conn.hget(keys.stage("b" * 20), "preempt"))
    chosen = preempt_if_due(conn, own_worker="w-a", own_stage="a" * 20, preempt_after_s=30, now=now)
    assert chosen is not None and (chosen.user, chosen.for_user) == ("heavy", "light")
    assert [text(v) for v in conn.hmget(keys.stage("a" * 20), "preempt", "preempted_for")] == ["1", "light"]
    # a yields: b does not also yield for the same waiting stage.
    assert preempt_if_due(conn, own_worker="w-b", own_stage="b" * 20, preempt_after_s=30, now=now + 60) is None


def test_an_idle_worker_means_no_preemption_unless_paused_gone_or_waiting_for_memory(conn: redis.Redis) -> None:
    now = time.time()
    sid = "a" * 20
    put_running(conn, sid, "heavy", started_at=now - 100)
    put_waiting(conn, "light", "c" * 20)
    put_worker(conn, "w-a", state="busy", heartbeat=now)
    put_worker(conn, "w-idle", state="idle", heartbeat=now - 1)
    assert preempt_if_due(conn, own_worker="w-a", own_stage=sid, preempt_after_s=30, now=now) is None
    put_worker(conn, "w-idle", state="idle", heartbeat=now - 1, paused="the disk under STL_HOME is full")
    put_worker(conn, "w-gone", state="idle", heartbeat=now - 600)
    put_worker(conn, "w-slot", state="idle", heartbeat=now - 1, waiting="stage cccc needs 8.7 GiB, 2.0 GiB free")
    assert read_queue_view(conn, own_worker="w-a", now=now).idle_workers == 0
    assert preempt_if_due(conn, own_worker="w-a", own_stage=sid, preempt_after_s=30, now=now) is not None


def test_a_stage_that_restarted_since_it_was_read_is_not_flagged(conn: redis.Redis) -> None:
    now = time.time()
    sid = "a" * 20
    put_running(conn, sid, "heavy", started_at=now - 100)
    put_waiting(conn, "light", "c" * 20)
    assert preempt_if_due(conn, own_worker="w", own_stage=sid, preempt_after_s=30, now=now) is not None
    conn.hset(keys.stage(sid), mapping={"preempt": "", "preempted_for": "", "started_at": now - 10})  # resumed
    assert preempt_if_due(conn, own_worker="w", own_stage=sid, preempt_after_s=30, now=now) is None
    assert preempt_if_due(conn, own_worker="w", own_stage=sid, preempt_after_s=30, now=now + 20) is not None


def test_the_log_line_names_the_user_the_stage_yielded_for(conn: redis.Redis) -> None:
    sid = "a" * 20
    error = StagePreempted(f"stage {sid} checkpointed at step 40 and will resume there")
    assert preempted_line(conn, sid, error, 12.4) == (
        f"preempted: stage {sid} checkpointed at step 40 and will resume there; back to the head of the queue")
    conn.hset(keys.stage(sid), "preempted_for", "light")
    assert preempted_line(conn, sid, error, 16.6).startswith("preempted for light's stage after 17 s: stage ")


def test_status_shows_a_stage_that_is_yielding_and_to_whom(conn: redis.Redis) -> None:
    from stl.cli.render import running_rows
    from stl.jobs.queue.records import run_rows

    now = time.time()
    sid = "a" * 20
    put_running(conn, sid, "heavy", started_at=now - 100)
    conn.hset(keys.run("0123456789ab"), mapping={"id": "0123456789ab", "grid": "g", "user": "heavy",
                                                 "status": "running", "current_stage": sid, "n_stages": 2})
    put_waiting(conn, "light", "c" * 20)
    put_worker(conn, "w-a", state="busy", heartbeat=now)
    (row,) = run_rows(conn, ["0123456789ab"])
    assert (row.yielding, running_rows([row])[0]["stage"]) == ("", "mtl")
    assert preempt_if_due(conn, own_worker="w-a", own_stage=sid, preempt_after_s=30, now=now) is not None
    (row,) = run_rows(conn, ["0123456789ab"])
    assert (row.yielding, running_rows([row])[0]["stage"]) == ("yielding to light", "mtl, yielding to light")
    conn.hset(keys.stage(sid), "preempted_for", "")  # the flag a worker told to stop sets
    (row,) = run_rows(conn, ["0123456789ab"])
    assert row.yielding == "stopping"


def test_the_min_step_fault_makes_each_step_take_at_least_that_long() -> None:
    """The test aid that keeps the heavy stage below running long enough on a fast machine."""
    from types import SimpleNamespace

    seen: list[int] = []
    report = parse_faults("min_step_s=0.02").paced(lambda progress: seen.append(progress.step))
    started = time.monotonic()
    report(SimpleNamespace(step=40))  # the first report only sets the count going (a resumed stage's step)
    assert time.monotonic() - started < 0.2
    report(SimpleNamespace(step=50))  # 10 steps: at least 0.2 s since the last report
    assert time.monotonic() - started >= 0.2
    assert seen == [40, 50]
    plain = seen.append
    assert parse_faults("").paced(plain) is plain


# --- a real worker ----------------------------------------------------------------------------------------------

PREEMPT_AFTER_S = 15
CHECK_EVERY_S = 5  # the worker's monitor tick
SLACK_S = 10  # the horse's exit, the next one's fork and lease, on two loaded cores


@pytest.mark.slow
def test_a_light_users_stage_starts_within_the_bound_and_the_heavy_stage_resumes_and_finishes(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    heavy_env, light_env = child_env(STL_USER="heavy"), child_env(STL_USER="light")
    # One long fine-tuning stage (then its eval), a checkpoint every 25 steps: at least 50 s whatever the
    # machine (an idle one trains these 1000 steps in 20 s), so it still runs when the light user comes.
    enqueue(small_grid(tmp_path, demo_data, "heavy-grid", shots=[4],
                       train={"max_steps": 1000, "checkpoint_every": 25}), env=heavy_env)
    workers.start(env=child_env(STL_PREEMPT_AFTER=str(PREEMPT_AFTER_S), STL_FAULT_INJECT="min_step_s=0.05"))

    def heavy_training() -> str | None:
        for sid in (text(s) for s in conn.smembers(keys.RUNNING_STAGES)):
            kind, status, started = (text(v) for v in conn.hmget(keys.stage(sid), "kind", "status", "started_at"))
            if kind == "finetune" and status == "running" and time.time() - float(started) >= PREEMPT_AFTER_S:
                return sid
        return None

    heavy = wait_for(heavy_training, timeout=90, interval=0.2, what=f"the heavy stage to run {PREEMPT_AFTER_S} s",
                     diagnostics=workers.logs)
    enqueue(small_grid(tmp_path, demo_data, "light-grid", shots=[0]), env=light_env)

    def light_started() -> tuple[float, float] | None:
        for sid in _stages_of_grid(conn, "light-grid"):
            created, started = (text(v) for v in conn.hmget(keys.stage(sid), "created_at", "started_at"))
            if started:
                return float(created), float(started)
        return None

    bound = PREEMPT_AFTER_S + SLACK_S
    created, started = wait_for(light_started, timeout=bound + 30, interval=0.2,
                                what="the light user's first stage to start", diagnostics=workers.logs)
    waited = started - created
    print(f"\nthe light user's stage started {waited:.1f} s after it was queued")
    log = stage_log(conn, heavy)
    yielded = [m for line in log if (m := re.search(r"preempted for light's stage after (\d+) s: stage \w+ "
                                                    r"checkpointed at step (\d+)", line))]
    assert len(yielded) == 1, log
    assert int(yielded[0].group(1)) >= PREEMPT_AFTER_S
    checkpointed = int(yielded[0].group(2))
    assert waited <= bound, f"waited {waited:.1f} s, more than {bound} s"

    wait_for(lambda: grid_done(conn, "light-grid") and grid_done(conn, "heavy-grid"), timeout=240,
             what="both grids to finish", diagnostics=workers.logs)
    assert set(run_statuses(conn, "light-grid").values()) == {"finished"}
    assert set(run_statuses(conn, "heavy-grid").values()) == {"finished"}
    log = stage_log(conn, heavy)
    resumed = [int(m.group(1)) for line in log if (m := re.search(r"resumed from step (\d+)", line))]
    assert resumed == [checkpointed] and checkpointed > 0, log
    heavy_run = next(iter(run_statuses(conn, "heavy-grid")))
    shown = stl("logs", heavy_run, env=heavy_env).stdout
    assert "preempted for light's stage after" in shown and f"resumed from step {checkpointed}" in shown, shown


def _stages_of_grid(conn: redis.Redis, grid: str) -> list[str]:
    return [sid for run_id in run_statuses(conn, grid)
            for sid in json.loads(text(conn.hget(keys.run(run_id), "stages")))]
