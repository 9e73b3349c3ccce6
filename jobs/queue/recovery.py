"""Finding stages whose work horse died, and putting them back at the head of their queue.

Two ways a stage is found orphaned:
- it is in the running set and its lease is gone (expired: the horse stopped renewing it) or held by a
  process of this host that no longer exists (found at once, no need to wait for the lease to expire);
- RQ holds its job as started by a dead worker of this host, or as failed, while the stage itself is
  still live: the horse died before it took the lease, or after the stage finished but before RQ heard.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.layout import LOG_FILE
from stl.jobs.queue.devices import DEVICE
from stl.jobs.queue.queueing import job_id_for, stage_id_for
from stl.jobs.queue.records import json_or_report
from stl.jobs.queue.runstate import update_runs_if
from stl.jobs.specs import RunStatus
from stl.jobs.states import LIVE

if TYPE_CHECKING:
    import redis

    from stl.jobs.settings import Settings

# A stage whose horse died this many times is failed rather than retried forever.
MAX_ORPHANINGS = 20
REAP_LOCK_TTL_S = 30
# Jobs in the failed registries ARGV[1] (a JSON list) whose stage is still live, or finished while RQ
# does not know it. ARGV[2]: stage key prefix, ARGV[3]: RQ job key prefix, ARGV[4]: stl's job id prefix.
_LIVE_FAILED_JOBS = """
local out = {}
local n = string.len(ARGV[4])
for _, key in ipairs(cjson.decode(ARGV[1])) do
  for _, jid in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(jid, 1, n) == ARGV[4] then
      local st = redis.call('HGET', ARGV[2] .. string.sub(jid, n + 1), 'status')
      if st == 'queued' or st == 'running' then
        out[#out + 1] = jid
      elseif st == 'finished' and redis.call('HGET', ARGV[3] .. jid, 'status') ~= 'finished' then
        out[#out + 1] = jid
      end
    end
  end
end
return out
"""
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
    """An stl worker of this host whose process no longer exists. Named `<host>.<device>.<pid>`, or
    `<host>.<device>.s<slot>.<pid>` for one slot of several (stl.worker.slots.slot_worker_name)."""
    prefix, _, pid = name.rpartition(".")
    before, _, last = prefix.rpartition(".")
    if last[:1] == "s" and last[1:].isdigit():  # a device is gpu<n>, gpu or cpu: never s<n>
        prefix = before
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
    prefix = Queue.redis_queue_namespace_prefix + keys.QUEUE_NAME_PREFIX
    names = sorted(text(k).removeprefix(Queue.redis_queue_namespace_prefix)
                   for k in conn.smembers(Queue.redis_queues_keys) if text(k).startswith(prefix))
    return [Queue(name, connection=conn, serializer=JSONSerializer) for name in names]


def find_lost_jobs(conn: redis.Redis) -> list[str]:
    """Stages that RQ holds as started by a dead local worker, or as failed, while the stage is still live.

    A horse that dies before taking its stage's lease, or after finishing it but before RQ recorded that,
    leaves no trace in the running set; RQ's registries still know the job.
    """
    queues = _stl_queues(conn)
    if not queues:
        return []
    now = time.time()
    started: list[tuple[str, float]] = []
    for queue in queues:
        entries = conn.zrange(queue.started_job_registry.key, 0, -1, withscores=True)
        started += [(text(entry[0]).split(":")[0], float(entry[1])) for entry in entries]
    candidates: set[str] = set()
    if started:
        pipe = conn.pipeline(transaction=False)
        for job_id, _ in started:
            pipe.hget(Job.key_for(job_id), "worker_name")
        for (job_id, score), worker_name in zip(started, pipe.execute(), strict=True):
            # Expired: no worker renewed it for a minute. A dead local worker: no need to wait for that.
            if score < now or (worker_name and worker_is_dead(text(worker_name))):
                candidates.add(job_id)
    # Failed registries keep every failure for months: they are filtered inside Redis, in one call.
    failed = conn.eval(_LIVE_FAILED_JOBS, 0, json.dumps([q.failed_job_registry.key for q in queues]),
                       keys.stage(""), Job.redis_job_namespace_prefix, job_id_for(""))
    candidates.update(text(j) for j in failed)
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
        if status in LIVE or (status == RunStatus.finished.value and job_status != JobStatus.FINISHED.value):
            lost.append(stage_id_for(job_id))
    return lost


def find_dropped_jobs(conn: redis.Redis, *, chunk: int = 2000) -> list[str]:
    """Stages queued in stl and in RQ whose job is in no queue: a worker took it off (LPOP) and died before
    RQ recorded it as started. A job being handed to a live worker looks the same for a few milliseconds,
    so callers requeue only what a second look, seconds later, still finds.

    Reads every live run, in pipelined chunks rather than one long script: Redis keeps serving others.
    """
    run_ids = [text(r) for r in conn.zrange(keys.RUNS, 0, -1)]
    stage_ids: set[str] = set()
    for first in range(0, len(run_ids), chunk):
        pipe = conn.pipeline(transaction=False)
        for run_id in run_ids[first:first + chunk]:
            pipe.hmget(keys.run(run_id), "status", "stages")
        for run_id, (status, stages) in zip(run_ids[first:first + chunk], pipe.execute(), strict=True):
            if text(status) in LIVE and stages:
                stage_ids.update(json_or_report(keys.run(run_id), "field stages", text(stages), list, [],
                                                then="its stages are not checked"))
    ordered = sorted(stage_ids)
    queued: list[tuple[str, str]] = []  # (job id, queue name)
    for first in range(0, len(ordered), chunk):
        pipe = conn.pipeline(transaction=False)
        for sid in ordered[first:first + chunk]:
            pipe.hget(keys.stage(sid), "status")
            pipe.hmget(Job.key_for(job_id_for(sid)), "status", "origin")
        answers = pipe.execute()
        for index, sid in enumerate(ordered[first:first + chunk]):
            stage_status, (job_status, origin) = text(answers[2 * index]), answers[2 * index + 1]
            if stage_status == RunStatus.queued.value and text(job_status) == JobStatus.QUEUED.value and origin:
                queued.append((job_id_for(sid), text(origin)))
    members: dict[str, set[str]] = {}
    for origin in sorted({origin for _, origin in queued}):
        members[origin] = {text(m) for m in conn.lrange(Queue.redis_queue_namespace_prefix + origin, 0, -1)}
    return [stage_id_for(job_id) for job_id, origin in queued if job_id not in members[origin]]


def requeue_orphan(conn: redis.Redis, settings: Settings, stage_id: str, *, reason: str,
                   horse_dead: bool = False, dropped: bool = False) -> bool:
    """Put one orphaned stage back at the head of its queue. Returns False if there was nothing to do.

    `horse_dead`: the caller saw the horse die (its worker, or RQ's registries), so the stage is requeued
    even if it never reached the running set. `dropped`: the caller found its job in no queue twice, seconds
    apart, so a worker that took it died; otherwise a job on its way from its queue to a worker (RQ's
    intermediate queue, not yet marked started) is being taken now and is left alone. A stage whose failure
    or cancellation was already recorded stays as it is; one that finished is only handed back to RQ, which
    then releases its dependents.
    """
    token = uuid.uuid4().hex
    lock = keys.stage_reap_lock(stage_id)
    if not conn.set(lock, token, nx=True, ex=REAP_LOCK_TTL_S):
        return False
    try:
        return _requeue(conn, settings, stage_id, reason=reason, horse_dead=horse_dead, dropped=dropped)
    finally:
        # Released at once, not left to expire: the same stage may be orphaned again within seconds.
        conn.eval(_RELEASE_LOCK, 1, lock, token)


def _requeue(conn: redis.Redis, settings: Settings, stage_id: str, *, reason: str, horse_dead: bool,
             dropped: bool) -> bool:
    stage_key = keys.stage(stage_id)
    holder = conn.get(keys.stage_lease(stage_id))
    if holder is not None and not holder_is_dead(text(holder)):
        return False
    running = bool(conn.sismember(keys.RUNNING_STAGES, stage_id))
    if not running and not horse_dead:
        return False
    status = text(conn.hget(stage_key, "status"))
    if status not in (*LIVE, RunStatus.finished.value):
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
    if job_status == JobStatus.QUEUED and not dropped and _being_taken(conn, job):
        # A live worker popped it a moment ago (RQ marks it started next): a copy at the head would run twice.
        return False
    if job_status == JobStatus.STARTED and not running and not _started_by_a_dead_worker(conn, job):
        return False  # put back and taken again meanwhile: a live worker has it now
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
    update_runs_if(conn, [text(r) for r in conn.smembers(keys.stage_runs(stage_id))],
                   allowed=[RunStatus.running.value], fields={"status": RunStatus.queued.value, "current_stage": ""})
    workdir = settings.stages_dir / stage_id
    if workdir.is_dir():
        try:
            with (workdir / LOG_FILE).open("a") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the line is in Redis
    return True


def _being_taken(conn: redis.Redis, job: Job) -> bool:
    """Whether `job` is in RQ's intermediate queue: popped by a worker that has not marked it started yet."""
    return conn.lpos(Queue(job.origin, connection=conn).intermediate_queue_key, job.id) is not None


def _started_by_a_dead_worker(conn: redis.Redis, job: Job) -> bool:
    if job.worker_name and worker_is_dead(job.worker_name):
        return True
    queue = Queue(job.origin, connection=conn)
    entries = [entry for entry in conn.zrange(queue.started_job_registry.key, 0, -1, withscores=True)
               if text(entry[0]).split(":")[0] == job.id]
    return all(float(entry[1]) < time.time() for entry in entries)


def fail_stage(conn: redis.Redis, settings: Settings, stage_id: str, message: str) -> None:
    """Record a stage whose horse cannot be trusted to finish it as failed, on it and on its runs."""
    from stl.jobs.queue.entry import fail_unreadable_stage, finish_stage
    from stl.jobs.specs import StageSpec

    stage_key = keys.stage(stage_id)
    raw_spec, raw_started, user = conn.hmget(stage_key, "spec", "started_at", "user")
    if not raw_spec:
        return
    try:
        spec = StageSpec.model_validate_json(text(raw_spec))
    except ValueError as e:  # not what stl writes: it fails for that
        fail_unreadable_stage(conn, settings, stage_id, e)
        return
    if finish_stage(conn, settings, stage_id, spec, status=RunStatus.failed, error=message,
                    started=float(text(raw_started) or time.time()), user=text(user) or "unknown"):
        conn.rpush(keys.stage_log(stage_id), f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: {message}")
    conn.delete(keys.stage_lease(stage_id))


def _enqueue_at_front(conn: redis.Redis, job: Job, stage_id: str, *, line: str | None) -> None:
    """The job leaves RQ's started and failed registries and goes to the head of its queue, in one step."""
    queue = Queue(job.origin, connection=conn, serializer=JSONSerializer)
    started_registry = queue.started_job_registry
    stale_entries = [text(e) for e in conn.zrange(started_registry.key, 0, -1) if text(e).split(":")[0] == job.id]
    device = text(conn.hget(keys.stage(stage_id), DEVICE))  # read before it can be taken again, on another
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
        if device:
            pipe.srem(keys.device_stages(device), stage_id)
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
