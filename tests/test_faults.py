"""Faults inside a stage: out of memory, time limits, a full disk, models that do not exist.

Every test here runs real redis-server and real `stl worker` processes; nothing is mocked.
"""

from __future__ import annotations

import json
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from tests.helpers import (
    Workers,
    child_env,
    enqueue,
    grid_done,
    run_statuses,
    runs_by_model,
    small_grid,
    status_json,
    stl,
    wait_for,
)

if TYPE_CHECKING:

    from pathlib import Path

    import redis

# --- scenario 4: out of memory ----------------------------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_halves_the_micro_batch_then_fails_clearly_at_one(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    # Queued first: batch 1 cannot be halved, so this stage fails; the worker must go on to the next run.
    at_one = small_grid(tmp_path, demo_data, "oom-at-one", train={"batch_size": 1})
    halves = small_grid(tmp_path, demo_data, "oom-halves")
    enqueue(at_one)
    enqueue(halves)
    worker = workers.start(env=child_env(STL_FAULT_INJECT="oom_at_step=3"))
    wait_for(lambda: grid_done(conn, "oom-halves") and grid_done(conn, "oom-at-one"), timeout=150,
             what="both grids to end", diagnostics=workers.logs)
    assert worker.alive(), workers.logs()

    payload = status_json()
    (failed,) = [r for r in payload["runs"] if r["grid"] == "oom-at-one"]
    assert failed["status"] == "failed"
    assert ": OutOfMemory: " in failed["error"] and "micro-batch 1 " in failed["error"], failed["error"]
    assert "\n" not in failed["error"]
    (finished,) = [r for r in payload["runs"] if r["grid"] == "oom-halves"]
    assert finished["status"] == "finished", finished

    # The halving is on the stage record, in its outcome, and in `stl logs`.
    train_stage = next(s for s in json.loads(text(conn.hget(keys.run(finished["id"]), "stages")))
                       if text(conn.hget(keys.stage(s), "kind")) == "finetune")
    record = {text(k): text(v) for k, v in conn.hgetall(keys.stage(train_stage)).items()}
    retries = json.loads(record["oom_retries"])
    assert retries == [{"step": 3, "micro_batch": 4, "new_micro_batch": 2, "new_grad_accum": 2,
                        "restarted_from": 2}]
    assert (record["micro_batch"], record["grad_accum"]) == ("2", "2")
    assert json.loads(record["outcome"])["train"]["oom_retries"] == retries
    logs = stl("logs", finished["id"])
    assert logs.returncode == 0, logs.stderr
    assert any("step 3" in line and "micro-batch 4" in line and "micro-batch 2 x 2" in line
               for line in logs.stdout.splitlines()), logs.stdout
    assert "1 out-of-memory retry " in logs.stdout, logs.stdout
    assert "resumed from step 2" in logs.stdout
    failed_logs = stl("logs", failed["id"]).stdout
    assert "failed: OutOfMemory" in failed_logs
    worker.kill()


# --- scenario 5: time limit, full disk, models that do not exist -----------------------------------


@pytest.mark.slow
def test_time_limit_and_missing_models_fail_clearly_and_the_worker_goes_on(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    missing_dir = tmp_path / "no-such-dir" / "model"
    slow = small_grid(tmp_path, demo_data, "too-slow", train={"max_steps": 2000, "checkpoint_every": 1000},
                      stage_timeout=2)
    missing = small_grid(tmp_path, demo_data, "missing-models", shots=[0],
                         models=["no-such-org/no-such-model", str(missing_dir)])
    fine = small_grid(tmp_path, demo_data, "after-failures", shots=[0])
    missing_dir.mkdir(parents=True)
    (missing_dir / "config.json").write_text("{}")  # there at enqueue time, gone when the worker looks
    for path in (slow, missing, fine):
        enqueue(path)
    (missing_dir / "config.json").unlink()
    missing_dir.rmdir()
    worker = workers.start(env=child_env(HF_HUB_OFFLINE="1"))
    wait_for(lambda: all(grid_done(conn, g) for g in ("too-slow", "missing-models", "after-failures")),
             timeout=150, what="the three grids to end", diagnostics=workers.logs)
    assert worker.alive(), workers.logs()

    payload = status_json()
    (timed_out,) = [r for r in payload["runs"] if r["grid"] == "too-slow"]
    assert timed_out["status"] == "failed"
    assert "ran past its time limit" in timed_out["error"] and "raise stage_timeout" in timed_out["error"]
    by_model = runs_by_model(payload, "missing-models")
    run = by_model["no-such-org/no-such-model"]
    assert run["status"] == "failed", run
    assert run["error"].endswith(": ModelError: model no-such-org/no-such-model is not in the Hugging Face cache and "
                                 "HF_HUB_OFFLINE is set"), run["error"]
    run = by_model[str(missing_dir)]
    assert run["status"] == "failed", run
    assert f"model folder {missing_dir} does not exist on the worker's machine" in run["error"], run["error"]
    (after,) = [r for r in payload["runs"] if r["grid"] == "after-failures"]
    assert after["status"] == "finished", after
    for run in payload["runs"]:
        assert "\n" not in run["error"] and "Traceback" not in run["error"]
    assert "Traceback" not in stl("status", "--once").stdout
    worker.kill()


@pytest.mark.slow
def test_a_stage_that_keeps_meeting_a_full_disk_fails_clearly_and_the_worker_goes_on(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    # disk_full=1: every stage meets a full disk, while the worker's health check finds the disk fine (as if
    # each stage filled the disk itself): each is tried MAX_MACHINE_FAULTS times, then fails its runs.
    from stl.jobs.health import MAX_MACHINE_FAULTS

    enqueue(small_grid(tmp_path, demo_data, "disk-full", shots=[0, 4]))
    worker = workers.start(env=child_env(STL_FAULT_INJECT="disk_full=1"))
    wait_for(lambda: grid_done(conn, "disk-full"), timeout=120, what="the grid to end", diagnostics=workers.logs)
    assert worker.alive(), workers.logs()
    runs = [r for r in status_json()["runs"] if r["grid"] == "disk-full"]
    assert len(runs) == 2
    for run in runs:
        assert run["status"] == "failed"
        assert "no space left" in run["error"] and "\n" not in run["error"]
        assert "stl disk --prune finetune" in run["error"]
        assert f"the machine failed this stage {MAX_MACHINE_FAULTS} times" in run["error"]
    # Nothing was left holding a lease or marked running.
    assert conn.scard(keys.RUNNING_STAGES) == 0
    assert not list(conn.scan_iter(match=keys.stage_lease("*")))
    # each attempt pauses the worker until its health check passes, the last one too
    assert worker.output().count("was stopped by a fault of this machine") == 2 * MAX_MACHINE_FAULTS
    worker.kill()


@pytest.mark.slow
def test_a_full_disk_pauses_the_worker_with_every_run_kept_queued_until_it_has_room(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    flag = tmp_path / "disk-is-full"
    flag.write_text("")
    enqueue(small_grid(tmp_path, demo_data, "full-then-freed", shots=[0]))  # one stage, so both workers want it
    broken = child_env(STL_FAULT_INJECT=f"disk_full_while={flag}")
    # --burst on a broken machine stops, and says so with a non-zero exit: the queue is not done
    burst = stl("worker", "--burst", env=broken)
    assert burst.returncode == 1, burst.stderr
    assert "still queued" in burst.stderr and "Traceback" not in burst.stderr, burst.stderr
    conn.delete(keys.host_fault(socket.gethostname()))  # forget its announcement: the two below start unwarned
    # Two workers of one host: the one that meets the fault tells the other, which checks before it takes a stage
    first, second = workers.start(env=broken), workers.start(env=broken)

    def paused_workers() -> list[dict[str, Any]] | None:
        rows = [w for w in status_json()["workers"] if w["state"] == "paused"]
        return rows if len(rows) == 2 else None

    rows = wait_for(paused_workers, timeout=60, interval=0.5, what="both workers to pause", diagnostics=workers.logs)
    assert all("no space left" in row["paused"] and "STL_HOME" in row["paused"] for row in rows)
    assert any("another worker of this host met a machine fault" in w.output()
               for w in (first, second)), workers.logs()
    time.sleep(3)  # long enough for a worker that ignored the pause to take the next stage
    assert set(run_statuses(conn, "full-then-freed").values()) == {"queued"}, workers.logs()
    assert conn.scard(keys.RUNNING_STAGES) == 0
    assert not list(conn.scan_iter(match=keys.stage_lease("*")))
    stages = {sid for run_id in run_statuses(conn, "full-then-freed")
              for sid in json.loads(text(conn.hget(keys.run(run_id), "stages")))}
    tried = [sid for sid in stages if conn.hget(keys.stage(sid), "machine_faults")]
    assert len(tried) == 1, "one stage met the fault, and no other was taken"
    # the burst worker met it once, then one of the two, which announced it: the other checked the machine
    # instead of meeting the fault a third time (which would have failed the stage's runs)
    assert int(conn.hget(keys.stage(tried[0]), "machine_faults")) == 2
    assert "stopped by a fault of this machine" in "\n".join(
        text(line) for line in conn.lrange(keys.stage_log(tried[0]), 0, -1))
    status = stl("status", "--once", env=child_env(COLUMNS="250"))
    assert "takes no work" in status.stdout and "no space left" in status.stdout, status.stdout
    flag.unlink()  # room again: the worker's next health check (every 30 s) lets it go on
    wait_for(lambda: grid_done(conn, "full-then-freed"), timeout=150, what="the grid to end", diagnostics=workers.logs)
    assert set(run_statuses(conn, "full-then-freed").values()) == {"finished"}, workers.logs()
    wait_for(lambda: not any(w["state"] == "paused" for w in status_json()["workers"]), timeout=60, interval=1,
             what="both workers to take work again", diagnostics=workers.logs)
    assert first.alive() and second.alive()


def test_machine_faults_are_told_from_a_stages_own_errors() -> None:
    import errno

    from stl.jobs.errors import ModelError
    from stl.jobs.health import machine_fault

    assert machine_fault(OSError(errno.ENOSPC, "No space left on device", "/stl/x")) == \
        "No space left on device (/stl/x)"
    assert machine_fault(OSError(errno.EROFS, "Read-only file system"))
    # safetensors (Rust) words the errno in its text; torch's "unexpected pos" alone is not enough (it is only
    # a full disk where the disk says so: stl.jobs.durable.disk_write_fault, given the file it was writing)
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert (machine_fault(rust) or "").startswith("No space left on device")
    assert machine_fault(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")) is None
    driver = RuntimeError("Found no NVIDIA driver on your system. CUDA driver initialization failed")
    assert machine_fault(driver) and machine_fault(driver).startswith("RuntimeError: ")  # type: ignore[union-attr]
    try:  # a loader wraps what the driver said
        try:
            raise RuntimeError("CUDA error: unknown error")
        except RuntimeError as e:
            raise ModelError("model x could not be loaded") from e
    except ModelError as wrapped:
        assert machine_fault(wrapped) == "RuntimeError: CUDA error: unknown error"
    for own in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("CUDA error: device-side assert triggered"),
                OSError(errno.ENOENT, "No such file or directory"), ValueError("bad shape"),
                KeyError("CUDA")):
        assert machine_fault(own) is None, own
