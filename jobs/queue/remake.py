"""A parent stage whose model is missing is made again, and the stage that needs it waits for it.

A finished training stage's model can go missing from STL_HOME: `stl disk --prune` deleted it while a stage
that starts from it waited, someone deleted it by hand, or STL_HOME was wiped and adopted again. This is the
case `stl enqueue` already handles for pruned models (their stage is queued again before the stages that start
from it), met later, by the stage itself when it starts: the parent is queued again, at the head of its
owner's queue, and this stage waits for it as an RQ dependent, as an enqueue makes a stage wait.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import ModelError
from stl.jobs.layout import LOG_FILE, MODEL_DIR
from stl.jobs.queue.queueing import REMADE_STAGE_FIELDS, job_description, job_id_for, job_template

if TYPE_CHECKING:
    import redis

    from stl.jobs.errors import ParentModelMissing
    from stl.jobs.settings import Settings
    from stl.jobs.specs import StageSpec

# A stage waits for its parent to be made again at most this often; then something keeps deleting the
# model (or a worker writes elsewhere), and the stage fails saying so.
MAX_PARENT_REMAKES = 3
DEFAULT_TIMEOUT_S = 86400

# What to do about a missing parent model, decided and done inside Redis in one step: two stages that find
# the same parent missing at once make it again once. ARGV[1]: JSON, see wait_for_parent. Returns "remade"
# (the parent is queued again and this stage waits for it), "waits" (it was being made already, or is just
# ending: this stage waits for it), "look_again" (it finished since this stage looked), "too_many", or
# "ended:<status>" (the parent failed or was canceled: nothing to wait for).
_WAIT_FOR_PARENT = """
local p = cjson.decode(ARGV[1])
local parent_status = redis.call('HGET', p.parent_stage, 'status') or ''
local remake = false
if parent_status == 'finished' then
  if p.seen ~= 'finished' then return 'look_again' end
  remake = redis.call('HGET', p.parent_job, 'status') ~= 'started'  -- started: RQ has yet to hear it finish
elseif parent_status ~= 'queued' and parent_status ~= 'running' then
  return 'ended:' .. parent_status
end
local waits = (tonumber(redis.call('HGET', p.stage, 'parent_remakes') or '0') or 0) + 1
if waits > p.max then return 'too_many' end
redis.call('HSET', p.stage, 'parent_remakes', waits)
if remake then
  redis.call('HDEL', p.parent_stage, unpack(p.reset_fields))
  redis.call('HSET', p.parent_stage, 'status', 'queued', 'step', 0, 'remade_at', p.now)
  redis.call('HINCRBY', p.parent_stage, 'remade', 1)
  -- A new job for it, as an enqueue writes one, at the head of its owner's queue.
  redis.call('DEL', p.parent_job, p.parent_job .. ':dependencies')
  for _, registry in ipairs(p.parent_registries) do redis.call('ZREM', registry, p.parent_job_id) end
  redis.call('HSET', p.parent_job, unpack(p.parent_job_fields))
  redis.call('LREM', p.parent_queue, 0, p.parent_job_id)
  redis.call('LPUSH', p.parent_queue, p.parent_job_id)
  redis.call('SADD', p.queues, p.parent_queue)
  -- Its live runs counted it done: no longer, until it finishes again.
  local work = tonumber(redis.call('HGET', p.parent_stage, 'work') or '0') or 0
  for _, run_id in ipairs(redis.call('SMEMBERS', p.parent_runs)) do
    local rkey = p.run_prefix .. run_id
    local status = redis.call('HGET', rkey, 'status')
    if status == 'queued' or status == 'running' then
      redis.call('HINCRBY', rkey, 'stages_done', -1)
      redis.call('HINCRBY', rkey, 'work_done', -work)
    end
  end
end
-- This stage waits for the parent's job, as a stage enqueued after an unfinished parent does.
redis.call('LREM', p.queue, 0, p.job_id)
redis.call('HSET', p.job, 'status', 'deferred', 'enqueue_at_front', '1', 'dependency_id', p.parent_job_id,
  'dependency_ids', cjson.encode({p.parent_job_id}))
redis.call('SADD', p.parent_job .. ':dependents', p.job_id)
redis.call('SADD', p.job .. ':dependencies', p.parent_job_id)
redis.call('ZADD', p.deferred, p.now, p.job_id)
redis.call('HSET', p.stage, 'status', 'queued', 'worker', '', 'preempt', '')
redis.call('SREM', p.running, p.stage_id)
for _, run_id in ipairs(redis.call('SMEMBERS', p.stage_runs)) do
  local rkey = p.run_prefix .. run_id
  local status = redis.call('HGET', rkey, 'status')
  if status == 'queued' or status == 'running' then
    redis.call('HSET', rkey, 'status', 'queued', 'current_stage', '')
  end
end
return remake and 'remade' or 'waits'
"""


def wait_for_parent(conn: redis.Redis, settings: Settings, stage_id: str, spec: StageSpec, *, seen: str,
                    missing: ParentModelMissing) -> tuple[str, str]:
    """The stage `stage_id` found its parent's model missing, with the parent's status `seen` just before it
    looked. Returns (the outcome, see _WAIT_FOR_PARENT, a line for the stage's log). Raises ModelError when
    there is nothing to wait for."""
    parent = spec.parent
    if parent is None:
        raise ValueError(f"stage {stage_id} has no parent")
    parent_spec_raw, parent_queue_name, parent_job_timeout = (
        *conn.hmget(keys.stage(parent), "spec", "queue"), conn.hget(Job.key_for(job_id_for(parent)), "timeout"))
    own_origin = text(conn.hget(Job.key_for(job_id_for(stage_id)), "origin"))
    parent_queue = Queue(text(parent_queue_name) or own_origin, connection=conn, serializer=JSONSerializer)
    own_queue = Queue(own_origin or parent_queue.name, connection=conn, serializer=JSONSerializer)
    payload = {
        "seen": seen, "max": MAX_PARENT_REMAKES, "now": f"{time.time():.6f}",
        "stage": keys.stage(stage_id), "stage_id": stage_id, "stage_runs": keys.stage_runs(stage_id),
        "job": Job.key_for(job_id_for(stage_id)), "job_id": job_id_for(stage_id), "queue": own_queue.key,
        "deferred": own_queue.deferred_job_registry.key, "running": keys.RUNNING_STAGES, "run_prefix": keys.run(""),
        "parent_stage": keys.stage(parent), "parent_runs": keys.stage_runs(parent),
        "parent_job": Job.key_for(job_id_for(parent)), "parent_job_id": job_id_for(parent),
        "parent_queue": parent_queue.key, "queues": parent_queue.redis_queues_keys,
        "parent_registries": [parent_queue.finished_job_registry.key, parent_queue.failed_job_registry.key,
                              parent_queue.canceled_job_registry.key],
        "parent_job_fields": _parent_job_fields(parent_queue, parent, parent_spec_raw, parent_job_timeout),
        "reset_fields": list(REMADE_STAGE_FIELDS),
    }
    outcome = text(conn.eval(_WAIT_FOR_PARENT, 0, json.dumps(payload)))
    where = missing.parent_dir / MODEL_DIR
    if outcome == "too_many":
        raise ModelError(
            f"the model of its parent stage {parent} was made again {MAX_PARENT_REMAKES} times and went missing "
            f"each time (from {where}): something deletes it, or a worker of this queue writes to another "
            "STL_HOME; stop that, then `stl retry` this run") from missing
    if outcome.startswith("ended:"):
        raise ModelError(
            f"the model of its parent stage {parent} is missing from {where}, and that stage is "
            f"{outcome.removeprefix('ended:') or 'gone'}; `stl retry` this run: its parent is made again first"
        ) from missing
    if outcome == "remade":
        _log_to_parent(conn, settings, parent, f"to be made again: its model is missing from {where} "
                       f"({missing.why}); stage {stage_id} found it so and waits for it; back at the head of "
                       f"{parent_queue.name}")
        return outcome, (f"the model of its parent stage {parent} is missing from {where} ({missing.why}); "
                         f"{parent} is made again first, at the head of its queue, and this stage waits for it")
    return outcome, (f"the model of its parent stage {parent} is missing from {where} ({missing.why}); {parent} "
                     "is being made again, and this stage waits for it")


def _parent_job_fields(queue: Queue, parent: str, spec_raw: bytes | str | None, timeout: bytes | str | None
                       ) -> list[str]:
    """The RQ job hash of the parent's new job, as `stl enqueue` writes one, flattened for HSET."""
    from stl.jobs.specs import StageSpec

    seconds = DEFAULT_TIMEOUT_S
    with contextlib.suppress(ValueError):
        seconds = int(float(text(timeout) or DEFAULT_TIMEOUT_S))
    fields, data_prefix, data_suffix = job_template(queue, timeout=seconds)
    description = job_description(StageSpec.model_validate_json(spec_raw)) if spec_raw else parent
    fields = {**fields, "data": f"{data_prefix}{parent}{data_suffix}", "description": description,
              "status": "queued", "enqueued_at": fields.get("created_at", "")}
    return [str(part) for item in fields.items() for part in item]


def _log_to_parent(conn: redis.Redis, settings: Settings, parent: str, line: str) -> None:
    """A line in the parent's log (`stl logs` of every run that needs it), in Redis and in its folder."""
    stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
    conn.rpush(keys.stage_log(parent), stamped)
    with contextlib.suppress(OSError), (settings.stages_dir / parent / LOG_FILE).open("a") as f:
        f.write(stamped + "\n")
