"""Workers and work horses that die: kill -9 at random points, and SIGTERM as `docker stop` sends it.

The grid must still finish, each interrupted stage must resume from its last checkpoint, and the
results must be identical to those of a grid nobody interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from stl.jobs import keys
from stl.jobs.codec import text
from tests.helpers import (
    Workers,
    child_env,
    enqueue,
    grid_done,
    kill_horse,
    newest_checkpoint,
    parent_pid,
    run_statuses,
    small_grid,
    stage_log,
    stl,
    wait_for,
)

if TYPE_CHECKING:

    import redis

    from tests.conftest import RedisServer

SEED = 20_240_611
KILLS = 12  # 11 of the worker and its horse together, 1 of the horse alone
KILLS_OF_MTL = 6  # the rest go to the fine-tuning stage that starts from the MTL model
ORPHAN_DEADLINE_S = 60
RESUMED = re.compile(r"resumed from step (\d+)")
ORPHANED = "orphaned:"
# Two training stages (MTL, then fine-tuning from it), each with a checkpoint every second step.
KILL_TRAIN = {"max_steps": 40, "checkpoint_every": 2}



@dataclass
class Kill:
    stage: str
    kind: str  # "worker+horse", "horse", or "worker+horse, remote lease"
    checkpoint: int  # the checkpoint on disk when the horse was stopped
    kind_of_stage: str = ""
    requeued_after_s: float = 0.0


def process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat ("T" once stopped), or "" when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def checkpoint_step(home: Path, stage_id: str) -> int:
    for _ in range(3):  # a checkpoint written or dropped as it is read: look again
        newest = newest_checkpoint(home / "stages" / stage_id)
        if newest is None:
            return 0
        try:
            return int(json.loads((newest / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            continue
    return 0


def resumed_steps(conn: redis.Redis, stage_id: str) -> list[int]:
    return [int(m.group(1)) for line in stage_log(conn, stage_id) if (m := RESUMED.search(line))]


def orphanings(conn: redis.Redis, stage_id: str) -> int:
    return sum(ORPHANED in line for line in stage_log(conn, stage_id))


def running_training_stage(conn: redis.Redis) -> tuple[str, int] | None:
    """A training stage that a live horse is working on, and that horse's pid."""
    for sid in sorted(text(s) for s in conn.smembers(keys.RUNNING_STAGES)):
        kind, status = (text(v) for v in conn.hmget(keys.stage(sid), "kind", "status"))
        holder = text(conn.get(keys.stage_lease(sid)))
        if kind in ("mtl", "finetune") and status == "running" and holder:
            pid = int(holder.rpartition(":")[2])
            if Path(f"/proc/{pid}").exists():
                return sid, pid
    return None


def horse_resumed_from(conn: redis.Redis, stage_id: str, horse: int) -> int | None:
    """The step this horse resumed training from (0: from scratch); None while it is still starting."""
    lines = stage_log(conn, stage_id)
    starts = [i for i, line in enumerate(lines) if re.search(rf"started on \S+:{horse} ", line)]
    if not starts:
        return None
    resumed = 0
    for line in lines[starts[-1] + 1:]:
        if m := RESUMED.search(line):
            resumed = int(m.group(1))
        if "training " in line:
            return resumed
    return None


def results_and_models(home: Path, env: dict[str, str], grid: str) -> tuple[list[dict], dict[str, str]]:
    result = stl("results", grid, "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = sorted(json.loads(result.stdout)["rows"], key=lambda r: (r["run"], r["task"]))
    models = {path.parent.parent.name: hashlib.sha256(path.read_bytes()).hexdigest()
              for path in (home / "stages").glob("*/model/model.safetensors")}
    return rows, models


def kill_plan(rng: random.Random) -> list[tuple[int, float, str]]:
    """For each kill: checkpoints past the resumed one to wait for, delay after that, and what is killed."""
    kinds = ["worker+horse"] * (KILLS - 1) + ["horse"]
    rng.shuffle(kinds)
    # One worker+horse kill leaves a lease that looks held by another machine: the lease-expiry path.
    kinds[rng.choice([i for i, k in enumerate(kinds) if k == "worker+horse"])] = "worker+horse, remote lease"
    return [(rng.choice([1, 1, 2]), rng.uniform(0.0, 0.05), kind) for kind in kinds]


@pytest.mark.slow
def test_kill_9_of_worker_and_horse_at_random_points_loses_nothing(
        stl_env: Path, conn: redis.Redis, redis_server: RedisServer, tmp_path: Path, demo_data: Path) -> None:
    rng = random.Random(SEED)
    grid_path = small_grid(tmp_path, demo_data, "kill-grid", mtl=["in-domain"], shots=[0, 4], train=KILL_TRAIN)
    every = KILL_TRAIN["checkpoint_every"]

    # The reference, alongside: the same grid, nobody interrupting it, in another STL_HOME and db.
    reference_home = tmp_path / "reference-home"
    reference_env = child_env(STL_HOME=str(reference_home), STL_REDIS_URL=redis_server.url.replace("/0", "/1"))
    reference_db = redis_server.client()
    reference_db.execute_command("SELECT", 1)
    reference_db.flushdb()
    (tmp_path / "reference").mkdir()
    reference = Workers(tmp_path / "reference")
    pool = Workers(tmp_path)
    kills: list[Kill] = []
    try:
        enqueue(grid_path, env=reference_env)
        reference_worker = reference.start(burst=True, env=reference_env)
        enqueue(grid_path)
        pool.start()
        pool.start()
        for checkpoints, delay, kind in kill_plan(rng):
            target = "mtl" if sum(k.kind_of_stage == "mtl" for k in kills) < KILLS_OF_MTL else "finetune"

            def ready(target: str = target, checkpoints: int = checkpoints) -> tuple[str, int, int] | None:
                found = running_training_stage(conn)
                if found is None or text(conn.hget(keys.stage(found[0]), "kind")) != target:
                    return None
                sid, horse = found
                step, resumed = checkpoint_step(stl_env, sid), horse_resumed_from(conn, sid, horse)
                # Only once this horse has itself written a checkpoint past the one it resumed from.
                if resumed is not None and step >= resumed + checkpoints * every:
                    return sid, horse, step
                return None

            sid, horse, _ = wait_for(ready, timeout=120, interval=0.02, what=f"kill point {len(kills) + 1}",
                                     diagnostics=pool.logs)
            time.sleep(delay)  # somewhere inside the next step, or its checkpoint
            os.kill(horse, signal.SIGSTOP)  # frozen where it is: what is on disk now is what the next horse sees
            wait_for(lambda horse=horse: process_state(horse) in ("T", "t", ""), timeout=5, interval=0.005,
                     what="the horse to stop")  # kill() returns before the signal has taken effect
            step = checkpoint_step(stl_env, sid)
            before = orphanings(conn, sid)
            worker_pid = parent_pid(horse)
            killed_at = time.monotonic()
            if kind == "horse":
                kill_horse(horse)
            else:
                if kind.endswith("remote lease"):
                    conn.set(keys.stage_lease(sid), "another-host:4242", ex=60)
                next(w for w in pool.started if w.pid == worker_pid).kill()
                kill_horse(horse)
                pool.start()  # the replacement, as a supervisor would start it
            kills.append(Kill(stage=sid, kind=kind, checkpoint=step, kind_of_stage=target))
            if kind.endswith("remote lease"):
                # A lease held elsewhere is not taken while it lasts (live workers reap every 2 s).
                time.sleep(5)
                assert orphanings(conn, sid) == before, "a stage held by another machine was taken over"
                assert conn.sismember(keys.RUNNING_STAGES, sid)
                conn.expire(keys.stage_lease(sid), 2)  # that machine stopped renewing 28 s ago
                killed_at = time.monotonic()
            def requeued(sid: str = sid, before: int = before) -> bool:
                return orphanings(conn, sid) > before

            wait_for(requeued, timeout=ORPHAN_DEADLINE_S, diagnostics=pool.logs,
                     what=f"stage {sid} to be requeued after kill {len(kills)} ({kind})")
            kills[-1].requeued_after_s = time.monotonic() - killed_at
        wait_for(lambda: grid_done(conn, "kill-grid"), timeout=180, what="the grid to finish",
                 diagnostics=pool.logs)
        assert reference_worker.wait(timeout=180) == 0, reference.logs()
    finally:
        pool.stop_all()
        reference.stop_all()

    print("\nkills:", *(f"{k.kind} of {k.kind_of_stage} stage {k.stage} at checkpoint {k.checkpoint}, requeued in "
                       f"{k.requeued_after_s:.1f} s" for k in kills), sep="\n  ")
    assert set(run_statuses(conn, "kill-grid").values()) == {"finished"}, pool.logs()
    assert set(run_statuses(reference_db, "kill-grid").values()) == {"finished"}, reference.logs()
    assert sum("worker+horse" in k.kind for k in kills) >= 10
    rows, models = results_and_models(stl_env, child_env(), "kill-grid")
    reference_rows, reference_models = results_and_models(reference_home, reference_env, "kill-grid")
    assert {k.stage for k in kills} == set(models), "both training stages were interrupted"
    for sid in {k.stage for k in kills}:
        on_stage = [k for k in kills if k.stage == sid]
        steps = resumed_steps(conn, sid)
        # Every kill is followed by one resumption, from the checkpoint the killed horse had written: never an
        # older one, never step 0. (Rarely, on a quiet machine, the test reads the checkpoint just before the
        # frozen horse's newer one shows; so "at least", and the identical weights below settle the rest.)
        assert len(steps) == len(on_stage), (sid, steps, on_stage)
        assert all(step >= k.checkpoint > 0 for step, k in zip(steps, on_stage, strict=True)), (sid, steps, on_stage)
        log = (stl_env / "stages" / sid / "log.txt").read_text()
        assert RESUMED.findall(log) == [str(step) for step in steps]
    assert all(k.requeued_after_s < ORPHAN_DEADLINE_S for k in kills)
    run_id = next(iter(run_statuses(conn, "kill-grid")))
    assert "resumed from step" in stl("logs", run_id).stdout

    assert len(reference_rows) == 2 and len(reference_models) == 2
    assert rows == reference_rows
    assert models == reference_models, "resumed training must give bit-identical weights"
    assert conn.scard(keys.RUNNING_STAGES) == 0
    rq_queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    assert rq_queue.failed_job_registry.count == 0, "no stage job may end up failed"


@pytest.mark.slow
def test_sigterm_checkpoints_requeues_at_the_head_and_the_next_worker_resumes(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    enqueue(small_grid(tmp_path, demo_data, "sigterm-grid", shots=[4],
                       train={"max_steps": 300, "checkpoint_every": 10}))
    # Queued behind it: it must not overtake the preempted stage.
    enqueue(small_grid(tmp_path, demo_data, "queued-later", shots=[0], seeds=[7]))
    first = workers.start()

    def training() -> tuple[str, int] | None:
        found = running_training_stage(conn)
        return found if found and checkpoint_step(stl_env, found[0]) >= 10 else None

    sid, horse = wait_for(training, timeout=90, interval=0.02, what="training to pass a checkpoint",
                          diagnostics=workers.logs)
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]  # the worker only, as docker stop does
    # docker stop gives 10 s by default and docker-compose.yml 5 min; a loaded 2-core machine needs more than 10
    grace_s = 30
    assert first.wait(timeout=grace_s) == 0, workers.logs()
    print(f"\nthe worker exited {time.monotonic() - signalled:.1f} s after SIGTERM")
    wait_for(lambda: not Path(f"/proc/{horse}").exists(), timeout=5, what="the horse to exit")
    log = stage_log(conn, sid)
    assert any(re.search(r"preempted: stage \w+ checkpointed at step \d+ and will resume there; back to the head",
                         line) for line in log), log
    assert text(conn.hget(keys.stage(sid), "status")) == "queued"
    queue = f"rq:queue:{keys.queue_name('alice', 'normal')}"
    assert text(conn.lindex(queue, 0)) == f"stl-{sid}", "the preempted stage is at the head of its queue"
    assert set(run_statuses(conn, "sigterm-grid").values()) == {"queued"}
    assert conn.scard(keys.RUNNING_STAGES) == 0 and not conn.exists(keys.stage_lease(sid))
    rq_queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    job = Job.fetch(f"stl-{sid}", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED, "RQ must not count a preempted stage as failed"
    assert rq_queue.failed_job_registry.count == 0 and rq_queue.started_job_registry.count == 0
    saved = checkpoint_step(stl_env, sid)
    assert 10 <= saved < 300

    second = workers.start()
    wait_for(lambda: grid_done(conn, "sigterm-grid") and grid_done(conn, "queued-later"), timeout=120,
             what="both grids to finish", diagnostics=workers.logs)
    assert set(run_statuses(conn, "sigterm-grid").values()) == {"finished"}
    assert resumed_steps(conn, sid) == [saved]
    run_id = next(iter(run_statuses(conn, "sigterm-grid")))
    assert f"resumed from step {saved}" in stl("logs", run_id).stdout
    assert second.alive()
    # An idle worker stops at once.
    second.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert second.wait(timeout=grace_s) == 0, workers.logs()


@pytest.mark.slow
def test_a_checkpoint_damaged_while_its_stage_waited_falls_back_to_the_previous_one(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    # A stage preempted (docker stop), then its newest checkpoint truncated (a crash of the disk, a careless
    # hand): the next worker resumes from the checkpoint before it, says so in `stl logs`, and the run finishes.
    enqueue(small_grid(tmp_path, demo_data, "damaged", shots=[4], train={"max_steps": 300, "checkpoint_every": 10}))
    first = workers.start()

    def two_checkpoints() -> tuple[str, int] | None:
        found = running_training_stage(conn)
        return found if found and checkpoint_step(stl_env, found[0]) >= 20 else None

    sid, horse = wait_for(two_checkpoints, timeout=120, interval=0.02, what="training to pass two checkpoints",
                          diagnostics=workers.logs)
    first.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert first.wait(timeout=30) == 0, workers.logs()
    wait_for(lambda: not Path(f"/proc/{horse}").exists(), timeout=5, what="the horse to exit")
    newest = newest_checkpoint(stl_env / "stages" / sid)
    assert newest is not None
    saved = checkpoint_step(stl_env, sid)
    trainer = newest / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[: trainer.stat().st_size // 2])

    workers.start()
    wait_for(lambda: grid_done(conn, "damaged"), timeout=120, what="the run to finish", diagnostics=workers.logs)
    assert set(run_statuses(conn, "damaged").values()) == {"finished"}, workers.logs()
    run_id = next(iter(run_statuses(conn, "damaged")))
    logs = stl("logs", run_id).stdout
    assert f"checkpoint/{newest.name} cannot be used: trainer.pt cannot be read" in logs, logs
    previous = resumed_steps(conn, sid)[-1]
    # At or before the damaged one: a stop that lands on a regular checkpoint's step saves a second one of it.
    assert 10 <= previous <= saved, (previous, saved)
    assert any("falling back" in line and f"checkpoint/step-{previous:08d}" in line for line in logs.splitlines())
    assert f"resumed from step {previous}" in logs


def test_a_job_a_live_worker_is_taking_is_not_requeued_beside_it(stl_env: Path, conn: redis.Redis, tmp_path: Path,
                                                                  demo_data: Path) -> None:
    """A stale started-registry entry of a dead worker makes the reaper look at a stage; if a live worker has
    just popped its job (RQ's intermediate queue, not yet marked started), a second copy at the head of the
    queue would run it twice (seen under load in CI: both copies met the same machine fault)."""
    import socket
    import subprocess

    from rq.queue import IntermediateQueue

    from stl.jobs.queue.recovery import reap_orphans
    from stl.jobs.settings import load_settings

    enqueue(small_grid(tmp_path, demo_data, "taken", shots=[0]))
    queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    (job_id,) = (text(j) for j in conn.lrange(queue.key, 0, -1))
    intermediate = IntermediateQueue(queue.key, conn).key
    dead = subprocess.Popen(["true"])
    dead.wait()
    conn.hset(f"rq:job:{job_id}", "worker_name", f"{socket.gethostname()}.gpu.{dead.pid}")
    conn.zadd(queue.started_job_registry.key, {f"{job_id}:0123abcd": time.time() + 600})
    conn.lmove(queue.key, intermediate, "LEFT", "RIGHT")  # what a live worker's dequeue does first

    settings = load_settings()
    assert reap_orphans(conn, settings) == []
    assert conn.llen(queue.key) == 0 and conn.lrange(intermediate, 0, -1) == [job_id.encode()]
    # The worker that popped it died there: nothing takes it, and the reaper puts it back.
    conn.lrem(intermediate, 0, job_id)
    assert reap_orphans(conn, settings) == [job_id.removeprefix("stl-")]
    assert [text(j) for j in conn.lrange(queue.key, 0, -1)] == [job_id]


@pytest.mark.slow
def test_jobs_of_a_worker_that_died_before_its_horse_took_the_lease_are_requeued(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    """The states a worker leaves when it dies between taking a job and its horse taking the stage's lease:
    the job taken off its queue but not yet recorded as started; recorded as started by a worker that is
    gone; or, after RQ's own clean-up, failed, while the stage is still queued. No lease and no running set
    point at them; the worker must still find them."""
    import socket
    import subprocess

    enqueue(small_grid(tmp_path, demo_data, "lost-jobs", shots=[0], seeds=[0, 1, 2]))
    queue = Queue(keys.queue_name("alice", "normal"), connection=conn, serializer=JSONSerializer)
    dropped_job, started_job, failed_job = (text(j) for j in conn.lrange(queue.key, 0, 2))
    dead = subprocess.Popen(["true"])
    dead.wait()
    pipe = conn.pipeline()
    for job_id in (dropped_job, started_job, failed_job):
        pipe.lrem(queue.key, 0, job_id)
    pipe.hset(f"rq:job:{started_job}", mapping={"status": "started",
                                                 "worker_name": f"{socket.gethostname()}.gpu.{dead.pid}"})
    pipe.zadd(queue.started_job_registry.key, {f"{started_job}:0123abcd": time.time() + 600})
    pipe.hset(f"rq:job:{failed_job}", mapping={"status": "failed"})
    pipe.zadd(queue.failed_job_registry.key, {failed_job: time.time() + 600})
    pipe.execute()
    assert conn.llen(queue.key) == 0

    workers.start()
    wait_for(lambda: grid_done(conn, "lost-jobs"), timeout=90, what="the runs to finish", diagnostics=workers.logs)
    assert set(run_statuses(conn, "lost-jobs").values()) == {"finished"}
    for job_id, reason in ((dropped_job, "its worker died after taking it off the queue"),
                           (started_job, "its worker died"), (failed_job, "its worker died")):
        assert any(f"orphaned: {reason};" in line for line in stage_log(conn, job_id.removeprefix("stl-")))
