"""A work horse frozen past its lease (SIGSTOP, as a paused VM or a network partition between hosts would
leave it) wakes up after another horse took its stage over and finished it.

Before fencing, the woken horse took its lease back, trained to the end again, replaced the new horse's model
and finished the stage a second time: every run depending on it counted the stage twice and ended "finished"
before its evaluations ran, with missing results. Now each take of a stage gets a token (its generation) and
every write of a horse checks it: the stale horse stops at its next step and writes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.stage_lease import LEASE_TTL_S
from tests.helpers import (
    EVAL,
    TRAIN,
    Workers,
    enqueue,
    grid_done,
    parent_pid,
    run_statuses,
    stage_log,
    stl,
    wait_for,
    write_grid,
)
from tests.test_fault_kill import checkpoint_step, orphanings, process_state, resumed_steps, running_training_stage

if TYPE_CHECKING:
    from pathlib import Path

    import redis

# One MTL stage that several runs start from: a zero-shot run (one eval stage of both tasks) and a few-shot run
# (a fine-tuning and an eval stage per task); each run expects a result for both eval tasks.
EVAL_TASKS = ["emotion_classification", "summarization"]
FROZEN_TRAIN = {**TRAIN, "max_steps": 60, "checkpoint_every": 4}



def stage_snapshot(conn: redis.Redis, home: Path, stage_id: str) -> dict[str, Any]:
    """Everything a horse of this stage writes: its record, log, loss curve, lease, model and done.json."""
    model = home / "stages" / stage_id / "model" / "model.safetensors"
    done = home / "stages" / stage_id / "done.json"
    return {
        "record": {text(k): text(v) for k, v in conn.hgetall(keys.stage(stage_id)).items()},
        "log": stage_log(conn, stage_id),
        "steps": conn.llen(keys.stage_steps(stage_id)),
        "lease": text(conn.get(keys.stage_lease(stage_id))),
        "running": bool(conn.sismember(keys.RUNNING_STAGES, stage_id)),
        "model": (model.stat().st_ino, model.stat().st_mtime_ns, model.read_bytes()),
        "done": done.read_text(),
        "files": sorted(p.name for p in (home / "stages" / stage_id).iterdir()),
    }


@pytest.mark.slow
def test_a_horse_frozen_past_its_lease_wakes_up_and_writes_nothing(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    grid = write_grid(tmp_path, demo_data, "frozen.yaml", name="frozen",
                      tasks={"train": ["sentiment_classification"], "eval": EVAL_TASKS},
                      grid={"model": ["tiny:bart"], "mtl": ["in-domain"], "instructions": [True], "shots": [0, 4],
                            "seed": [0]},
                      train=FROZEN_TRAIN, eval=EVAL)
    enqueue(grid)
    # Two workers on one STL_HOME; whichever takes the MTL stage first is frozen, the other takes it over.
    workers.start()
    workers.start()

    def training_past_a_checkpoint() -> tuple[str, int] | None:
        found = running_training_stage(conn)
        return found if found and checkpoint_step(stl_env, found[0]) >= 4 else None

    mtl, horse = wait_for(training_past_a_checkpoint, timeout=120, interval=0.02, diagnostics=workers.logs,
                          what="the MTL stage to pass a checkpoint")
    assert text(conn.hget(keys.stage(mtl), "kind")) == "mtl"
    frozen_worker = parent_pid(horse)
    os.kill(horse, signal.SIGSTOP)
    wait_for(lambda: process_state(horse) in ("T", "t"), timeout=5, interval=0.005, what="the horse to stop")
    frozen_at = checkpoint_step(stl_env, mtl)
    frozen_since = time.monotonic()
    try:
        # No shortcut: the horse's pid is alive, so only its lease expiring (30 s) lets the other worker in.
        wait_for(lambda: orphanings(conn, mtl) == 1, timeout=LEASE_TTL_S + 90, diagnostics=workers.logs,
                 what="the frozen horse's stage to be requeued once its lease expired")
        assert time.monotonic() - frozen_since > LEASE_TTL_S - 5, "a live horse's lease was taken early"
        wait_for(lambda: text(conn.hget(keys.stage(mtl), "status")) == "finished", timeout=180,
                 diagnostics=workers.logs, what="the other worker to finish the MTL stage")
        [resumed] = resumed_steps(conn, mtl)
        assert resumed >= frozen_at > 0
        # The new horse records the finish, then lets its lease go: the snapshot is taken after both.
        wait_for(lambda: conn.get(keys.stage_lease(mtl)) is None, timeout=30, diagnostics=workers.logs,
                 what="the new horse to let the finished stage's lease go")
        before = stage_snapshot(conn, stl_env, mtl)
        # The runs that depend on it are still waiting for their fine-tuning and eval stages.
        assert set(run_statuses(conn, "frozen").values()) <= {"queued", "running"}
    finally:
        os.kill(horse, signal.SIGCONT)
    wait_for(lambda: process_state(horse) in ("", "Z"), timeout=60, diagnostics=workers.logs,
             what="the woken horse to stop")
    assert stage_snapshot(conn, stl_env, mtl) == before, "the stale horse wrote after it woke up"
    assert sum("finished in" in line for line in before["log"]) == 1

    wait_for(lambda: grid_done(conn, "frozen"), timeout=240, what="the grid to finish", diagnostics=workers.logs)
    assert stage_snapshot(conn, stl_env, mtl) == before
    statuses = run_statuses(conn, "frozen")
    assert len(statuses) == 2 and set(statuses.values()) == {"finished"}, (statuses, workers.logs())
    results = stl("results", "frozen", "--json")
    assert results.returncode == 0, results.stderr
    assert results.stderr == "", "`stl results` warns of runs without all their results"
    rows = json.loads(results.stdout)["rows"]
    for run_id in statuses:
        assert sorted(r["task"] for r in rows if r["run"] == run_id) == EVAL_TASKS, (run_id, rows)
    woken = next(w for w in workers.started if w.pid == frozen_worker)
    assert woken.alive(), workers.logs()
    assert f"stage {mtl} was taken over by another work horse" in woken.output(), woken.output()[-3000:]
