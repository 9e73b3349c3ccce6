"""Finding stages whose work horse died, and putting them back at the head of their queue.

Two ways a stage is found orphaned:
- it is in the running set and its lease is gone (expired: the horse stopped renewing it) or held by a
  process of this host that no longer exists (found at once, no need to wait for the lease to expire);
- RQ holds its job as started by a dead worker of this host, or as failed, while the stage itself is
  still live: the horse died before it took the lease, or after the stage finished but before RQ heard.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.codec import text
from jobs.queueing import job_id_for, stage_id_for
from jobs.specs import RunStatus

if TYPE_CHECKING:
    import redis

    from jobs.settings import Settings

# A stage whose horse died this many times is failed rather than retried forever.
MAX_ORPHANINGS = 20
REAP_LOCK_TTL_S = 30
_LIVE = (RunStatus.queued.value, RunStatus.running.value)
# Release the reap lock only if it is still ours.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _pid_is_dead(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def holder_is_dead(holder: str) -> bool:
    """A lease held by a process of this host that no longer exists (no need to wait for expiry)."""
    host, _, pid = holder.rpartition(":")
    return host == socket.gethostname() and _pid_is_dead(pid)


def worker_is_dead(name: str) -> bool:
    """An stl worker of this host (named `<host>.<device>.<pid>`) whose process no longer exists."""
    prefix, _, pid = name.rpartition(".")
    host = prefix.rpartition(".")[0]
    return host == socket.gethostname() and _pid_is_dead(pid)


def find_orphans(conn: redis.Redis) -> list[str]:
    """Running stages whose work horse is gone: lease expired, or held by a dead local process."""
    running = sorted(text(s) for s in conn.smembers(keys.RUNNING_STAGES))
    if not running:
        return []
    pipe = conn.pipeline(transaction=False)
    for sid in running:
        pipe.get(keys.stage_lease(sid))
    return [sid for sid, holder in zip(running, pipe.execute(), strict=True)
            if holder is None or holder_is_dead(text(holder))]


def _stl_queues(conn: redis.Redis) -> list[Queue]:
    prefix = Queue.redis_queue_namespace_prefix + keys.PREFIX + "."
    names = sorted(text(k).removeprefix(Queue.redis_queue_namespace_prefix)
                   for k in conn.smembers(Queue.redis_queues_keys) if text(k).startswith(prefix))
    return [Queue(name, connection=conn, serializer=JSONSerializer) for name in names]


def find_lost_jobs(conn: redis.Redis) -> list[str]:
    """Stages that RQ holds as started by a dead local worker, or as failed, while the stage is still live.

    A horse that dies before taking its stage's lease, or after finishing it but before RQ recorded that,
    leaves no trace in the running set; RQ's registries still know the job.
    """
    now = time.time()
    started: list[tuple[str, float]] = []
    failed: list[str] = []
    for queue in _stl_queues(conn):
        entries = conn.zrange(queue.started_job_registry.key, 0, -1, withscores=True)
        started += [(text(entry[0]).split(":")[0], float(entry[1])) for entry in entries]
        failed += [text(j) for j in conn.zrange(queue.failed_job_registry.key, 0, -1)]
    candidates = set(failed)
    if started:
        pipe = conn.pipeline(transaction=False)
        for job_id, _ in started:
            pipe.hget(Job.key_for(job_id), "worker_name")
        for (job_id, score), worker_name in zip(started, pipe.execute(), strict=True):
            # Expired: no worker renewed it for a minute. A dead local worker: no need to wait for that.
            if score < now or (worker_name and worker_is_dead(text(worker_name))):
                candidates.add(job_id)
    ordered = sorted(candidates)
    if not ordered:
        return []
    pipe = conn.pipeline(transaction=False)
    for job_id in ordered:
        sid = stage_id_for(job_id)
        pipe.hget(keys.stage(sid), "status")
        pipe.get(keys.stage_lease(sid))
        pipe.hget(Job.key_for(job_id), "status")
    answers = pipe.execute()
    lost = []
    for index, job_id in enumerate(ordered):
        status, holder, job_status = (text(a) for a in answers[3 * index:3 * index + 3])
        if holder and not holder_is_dead(holder):
            continue  # a live horse has it
        if status in _LIVE or (status == RunStatus.finished.value and job_status != JobStatus.FINISHED.value):
            lost.append(stage_id_for(job_id))
    return lost


def requeue_orphan(conn: redis.Redis, settings: Settings, stage_id: str, *, reason: str,
                   horse_dead: bool = False) -> bool:
    """Put one orphaned stage back at the head of its queue. Returns False if there was nothing to do.

    `horse_dead`: the caller saw the horse die (its worker, or RQ's registries), so the stage is requeued
    even if it never reached the running set. A stage whose failure or cancellation was already recorded
    stays as it is; one that finished is only handed back to RQ, which then releases its dependents.
    """
    token = uuid.uuid4().hex
    lock = keys.stage_reap_lock(stage_id)
    if not conn.set(lock, token, nx=True, ex=REAP_LOCK_TTL_S):
        return False
    try:
        return _requeue(conn, settings, stage_id, reason=reason, horse_dead=horse_dead)
    finally:
        # Released at once, not left to expire: the same stage may be orphaned again within seconds.
        conn.eval(_RELEASE_LOCK, 1, lock, token)


def _requeue(conn: redis.Redis, settings: Settings, stage_id: str, *, reason: str, horse_dead: bool) -> bool:
    stage_key = keys.stage(stage_id)
    holder = conn.get(keys.stage_lease(stage_id))
    if holder is not None and not holder_is_dead(text(holder)):
        return False
    running = bool(conn.sismember(keys.RUNNING_STAGES, stage_id))
    if not running and not horse_dead:
        return False
    status = text(conn.hget(stage_key, "status"))
    if status not in (*_LIVE, RunStatus.finished.value):
        # Its failure or cancellation is on record already; only the bookkeeping is left.
        conn.srem(keys.RUNNING_STAGES, stage_id)
        conn.delete(keys.stage_lease(stage_id))
        return False
    try:
        job = Job.fetch(job_id_for(stage_id), connection=conn, serializer=JSONSerializer)
    except Exception:  # noqa: BLE001 - no RQ job (expired or removed): nothing can run it again
        return False
    job_status = job.get_status()
    if job_status == JobStatus.QUEUED and conn.lpos(Queue(job.origin, connection=conn).key, job.id) is not None:
        # Someone put it back already (another reaper, or its own worker): only the bookkeeping is left.
        conn.srem(keys.RUNNING_STAGES, stage_id)
        return False
    if status == RunStatus.finished.value:
        if job_status == JobStatus.FINISHED:
            conn.srem(keys.RUNNING_STAGES, stage_id)
            return False
        # The stage's results are recorded; RQ must still see the job finish to release its dependents.
        _enqueue_at_front(conn, job, stage_id, line=None)
        return True
    conn.delete(keys.stage_lease(stage_id))
    orphanings = conn.hincrby(stage_key, "orphaned", 1)
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} orphaned: {reason}; back to the head of the queue"
    if orphanings > MAX_ORPHANINGS:
        fail_stage(conn, settings, stage_id, f"its work horse died {orphanings} times ({reason}); see `stl logs`")
        return True
    _enqueue_at_front(conn, job, stage_id, line=line)
    for run_id in (text(r) for r in conn.smembers(keys.stage_runs(stage_id))):
        if text(conn.hget(keys.run(run_id), "status")) == RunStatus.running.value:
            conn.hset(keys.run(run_id), mapping={"status": RunStatus.queued.value, "current_stage": ""})
    workdir = settings.stages_dir / stage_id
    if workdir.is_dir():
        try:
            with (workdir / "log.txt").open("a") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the line is in Redis
    return True


def fail_stage(conn: redis.Redis, settings: Settings, stage_id: str, message: str) -> None:
    """Record a stage whose horse cannot be trusted to finish it as failed, on it and on its runs."""
    from jobs.entry import finish_stage
    from jobs.specs import StageSpec

    stage_key = keys.stage(stage_id)
    raw_spec, raw_started, user = conn.hmget(stage_key, "spec", "started_at", "user")
    if not raw_spec:
        return
    conn.rpush(keys.stage_log(stage_id), f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: {message}")
    finish_stage(conn, settings, stage_id, StageSpec.model_validate_json(text(raw_spec)), status=RunStatus.failed,
                 error=message, started=float(text(raw_started) or time.time()), user=text(user) or "unknown")
    conn.delete(keys.stage_lease(stage_id))


def _enqueue_at_front(conn: redis.Redis, job: Job, stage_id: str, *, line: str | None) -> None:
    """The job leaves RQ's started and failed registries and goes to the head of its queue, in one step."""
    queue = Queue(job.origin, connection=conn, serializer=JSONSerializer)
    started_registry = queue.started_job_registry
    stale_entries = [text(e) for e in conn.zrange(started_registry.key, 0, -1) if text(e).split(":")[0] == job.id]
    with conn.pipeline() as pipe:
        if stale_entries:
            pipe.zrem(started_registry.key, *stale_entries)
        pipe.zrem(queue.failed_job_registry.key, job.id)
        pipe.lrem(queue.key, 0, job.id)  # never twice in the queue
        job.set_status(JobStatus.QUEUED, pipeline=pipe)
        queue._enqueue_job(job, pipeline=pipe, at_front=True)  # noqa: SLF001 - no dependency checks needed
        if line is not None:
            pipe.hset(keys.stage(stage_id), mapping={"status": RunStatus.queued.value, "worker": "",
                                                     "preempt": ""})
            pipe.rpush(keys.stage_log(stage_id), line)
        pipe.srem(keys.RUNNING_STAGES, stage_id)
        pipe.execute()


def reap_orphans(conn: redis.Redis, settings: Settings) -> list[str]:
    requeued = []
    for stage_id in find_orphans(conn):
        if requeue_orphan(conn, settings, stage_id, reason="its work horse stopped answering"):
            requeued.append(stage_id)
    for stage_id in find_lost_jobs(conn):
        if requeue_orphan(conn, settings, stage_id, reason="its worker died", horse_dead=True):
            requeued.append(stage_id)
    return requeued
