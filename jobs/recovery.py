"""Finding stages whose work horse died, and putting them back at the head of their queue."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.codec import text
from jobs.queueing import job_id_for
from jobs.specs import RunStatus

if TYPE_CHECKING:
    import redis

    from jobs.settings import Settings

# A stage whose horse died this many times is failed rather than retried forever.
MAX_ORPHANINGS = 20



def holder_is_dead(holder: str) -> bool:
    """A lease held by a process of this host that no longer exists (no need to wait for expiry)."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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


def requeue_orphan(conn: redis.Redis, settings: Settings, stage_id: str, *, reason: str) -> bool:
    """Put one orphaned stage back at the head of its queue. Returns False if someone else did."""
    if not conn.set(keys.stage_reap_lock(stage_id), "1", nx=True, ex=30):
        return False
    holder = conn.get(keys.stage_lease(stage_id))
    if (holder is not None and not holder_is_dead(text(holder))) or not conn.sismember(keys.RUNNING_STAGES, stage_id):
        return False
    conn.delete(keys.stage_lease(stage_id))
    stage_key = keys.stage(stage_id)
    orphanings = conn.hincrby(stage_key, "orphaned", 1)
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} orphaned: {reason}; back to the head of the queue"
    if orphanings > MAX_ORPHANINGS:
        from jobs.entry import finish_stage
        from jobs.specs import StageSpec

        spec = StageSpec.model_validate_json(text(conn.hget(stage_key, "spec")))
        started = float(text(conn.hget(stage_key, "started_at")) or time.time())
        message = f"its work horse died {orphanings} times ({reason}); see `stl logs`"
        finish_stage(conn, settings, stage_id, spec, status=RunStatus.failed, error=message, started=started,
                     user=text(conn.hget(stage_key, "user")) or "unknown")
        return True
    job = Job.fetch(job_id_for(stage_id), connection=conn, serializer=JSONSerializer)
    queue = Queue(job.origin, connection=conn, serializer=JSONSerializer)
    started_registry = queue.started_job_registry
    stale_entries = [text(e) for e in conn.zrange(started_registry.key, 0, -1) if text(e).split(":")[0] == job.id]
    with conn.pipeline() as pipe:
        if stale_entries:
            pipe.zrem(started_registry.key, *stale_entries)
        pipe.zrem(queue.failed_job_registry.key, job.id)
        job.set_status(JobStatus.QUEUED, pipeline=pipe)
        queue._enqueue_job(job, pipeline=pipe, at_front=True)  # noqa: SLF001 - no dependency checks needed
        pipe.hset(stage_key, mapping={"status": RunStatus.queued.value, "worker": "", "preempt": ""})
        pipe.srem(keys.RUNNING_STAGES, stage_id)
        pipe.rpush(keys.stage_log(stage_id), line)
        pipe.execute()
    for run_id in (text(r) for r in conn.smembers(keys.stage_runs(stage_id))):
        if text(conn.hget(keys.run(run_id), "status")) == RunStatus.running.value:
            conn.hset(keys.run(run_id), mapping={"status": RunStatus.queued.value, "current_stage": ""})
    workdir = settings.stages_dir / stage_id
    if workdir.is_dir():
        with (workdir / "log.txt").open("a") as f:
            f.write(line + "\n")
    return True


def reap_orphans(conn: redis.Redis, settings: Settings) -> list[str]:
    requeued = []
    for stage_id in find_orphans(conn):
        if requeue_orphan(conn, settings, stage_id, reason="its work horse stopped answering"):
            requeued.append(stage_id)
    return requeued

