"""Putting runs on the queue, taking them off, and putting failed ones back.

Runs are stl records; the GPU work is done by stage jobs, which are RQ jobs linked by RQ
dependencies and executed through one registered entry point. A stage shared by several runs
(for example one MTL model serving every shots value) is one RQ job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import DamagedRecord, GridChanged, NotFound, PermissionDenied, RedisUnavailable, UsageError
from stl.jobs.queue.runstate import update_runs_if
from stl.jobs.specs import RunSpec, RunStatus, StageSpec
from stl.jobs.states import LIVE, Priority

if TYPE_CHECKING:
    from collections.abc import Iterable


ENTRY_POINT = "stl.jobs.queue.entry.run_stage"
# What jobs queued before stl installed under the stl.* namespace name; the worker renames them as it takes them.
LEGACY_ENTRY_POINTS = frozenset({"jobs.entry.run_stage"})
# RQ's defaults would kill a job after 180 s and drop its record after 500 s.
RESULT_TTL_S = 90 * 86400
FAILURE_TTL_S = 90 * 86400
SKIPPED_ON_ENQUEUE = (*LIVE, RunStatus.finished.value)  # a twin run in these states is not queued again
# What a stage queued again (failed, canceled, pruned, or a parent whose model went missing) forgets of its
# last attempt.
REMADE_STAGE_FIELDS = ("started_at", "ended_at", "error", "loss", "cancel", "preempt", "heartbeat", "worker",
                       "orphaned", "metrics", "outcome", "pruned", "machine_fault", "machine_faults",
                       "disk_needed_bytes", "parent_remakes")


def job_id_for(stage_id: str) -> str:
    return f"{keys.JOB_ID_PREFIX}{stage_id}"


def stage_id_for(job_id: str) -> str:
    return job_id.removeprefix(keys.JOB_ID_PREFIX)


def make_queue(conn: redis.Redis, user: str, priority: str) -> Queue:
    return Queue(keys.queue_name(user, priority), connection=conn, serializer=JSONSerializer)


@dataclass
class SubmitReport:
    grid: str
    queued: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stages_created: int = 0
    stages_reused: int = 0
    stages_retrained: int = 0  # of those created: finished stages whose model was pruned, trained again
    finished_at_once: int = 0  # of the queued runs: every stage already finished, so they ended as queued
    left_to_others: list[str] = field(default_factory=list)  # other users' failed or canceled runs, left as they are



# Everything `submit_runs` writes, decided and written inside Redis in one atomic script: the
# dedupe reads and the writes cannot interleave with another enqueue or with a worker, and a grid
# of 10,000 runs costs one round trip. RQ's job hashes come from a template RQ itself built.
_SUBMIT = """
local p = cjson.decode(ARGV[1])
local K = p.keys
local function present(v) return v ~= nil and v ~= cjson.null end
if p.owner_only then  -- checked here too: two users enqueueing one new name at once must not both get it
  local owner = redis.call('HGET', K.grid, 'user')
  if owner and owner ~= p.user then return cjson.encode({owner = owner}) end
end
local requeue = {}
for _, id in ipairs(p.requeue) do requeue[id] = true end
local keep = {queued = true, running = true, finished = true}  -- SKIPPED_ON_ENQUEUE
local to_write, skipped, foreign = {}, {}, {}
for _, run in ipairs(p.runs) do
  local st = redis.call('HGET', K.run .. run.id, 'status')
  if st and keep[st] and not requeue[run.id] then skipped[#skipped + 1] = run.id
  -- another user's failed or canceled run (added to this grid with --force) is theirs to queue again
  elseif st and p.owner_only and redis.call('HGET', K.run .. run.id, 'user') ~= p.user then
    foreign[#foreign + 1] = run.id
  else run.existed = st ~= false; to_write[#to_write + 1] = run end
end
local status_cache = {}
local function status_of(sid)
  if status_cache[sid] == nil then
    local st = redis.call('HGET', K.stage .. sid, 'status') or ''
    if st == 'finished' and redis.call('HEXISTS', K.stage .. sid, 'pruned') == 1 then st = 'pruned' end
    status_cache[sid] = st
  end
  return status_cache[sid]
end
local function reusable(st) return st == 'finished' or st == 'queued' or st == 'running' or st == 'pruned' end
-- A pruned stage (finished; `stl disk --prune` deleted its model) counts as finished unless a stage
-- created here starts from it: then it trains again. Parents precede children in every run, so the
-- stages in reverse order of first appearance come children first.
local order, first_seen, needed, retrain = {}, {}, {}, {}
local any_pruned = false
for _, run in ipairs(to_write) do
  for _, sid in ipairs(run.stages) do
    if not first_seen[sid] then
      first_seen[sid] = true; order[#order + 1] = sid
      if status_of(sid) == 'pruned' then any_pruned = true end
    end
  end
end
if any_pruned then
  for i = #order, 1, -1 do
    local sid = order[i]
    local st = status_of(sid)
    if st == 'pruned' and needed[sid] then retrain[sid] = true end
    if (not reusable(st)) or retrain[sid] then
      local parent = p.stages[sid].parent
      if present(parent) then needed[parent] = true end
    end
  end
end
local created, seen = {}, {}
local n_created, n_reused, n_retrained = 0, 0, 0
for _, run in ipairs(to_write) do
  for _, sid in ipairs(run.stages) do
    if not seen[sid] then
      seen[sid] = true
      local st = status_of(sid)
      if reusable(st) and not retrain[sid] then
        n_reused = n_reused + 1
        -- A run needs it again: a cancel asked of it (when no run needed it) no longer holds.
        if st == 'running' then redis.call('HDEL', K.stage .. sid, 'cancel') end
      else
        local spec = p.stages[sid]
        local jid = K.job_id_prefix .. sid
        local jkey = K.rq_job .. jid
        if st ~= '' then
          redis.call('DEL', jkey, jkey .. ':dependencies')
          redis.call('ZREM', K.failed, jid)
          redis.call('ZREM', K.canceled, jid)
        end
        local fields = {}
        for k, v in pairs(p.job_template) do fields[#fields + 1] = k; fields[#fields + 1] = v end
        fields[#fields + 1] = 'data'; fields[#fields + 1] = p.data_prefix .. sid .. p.data_suffix
        fields[#fields + 1] = 'description'; fields[#fields + 1] = spec.description
        local parent = spec.parent
        local parent_st = present(parent) and status_of(parent) or ''
        if present(parent) and (created[parent] or not (parent_st == 'finished' or parent_st == 'pruned')) then
          local pjid = K.job_id_prefix .. parent
          fields[#fields + 1] = 'status'; fields[#fields + 1] = 'deferred'
          -- RQ puts it at the head of its queue when the parent finishes: a run's stages follow each other,
          -- so its results come early (and a broken eval shows after one MTL stage, not after all of them).
          fields[#fields + 1] = 'enqueue_at_front'; fields[#fields + 1] = '1'
          fields[#fields + 1] = 'dependency_id'; fields[#fields + 1] = pjid
          fields[#fields + 1] = 'dependency_ids'; fields[#fields + 1] = cjson.encode({pjid})
          redis.call('HSET', jkey, unpack(fields))
          redis.call('SADD', K.rq_job .. pjid .. ':dependents', jid)
          redis.call('SADD', jkey .. ':dependencies', pjid)
          redis.call('ZADD', K.deferred, p.now, jid)
        else
          fields[#fields + 1] = 'status'; fields[#fields + 1] = 'queued'
          fields[#fields + 1] = 'enqueued_at'; fields[#fields + 1] = p.enqueued_at
          redis.call('HSET', jkey, unpack(fields))
          redis.call('RPUSH', K.queue, jid)
        end
        if st ~= '' then redis.call('HDEL', K.stage .. sid, unpack(p.reset_fields)) end
        redis.call('HSET', K.stage .. sid, 'id', sid, 'kind', spec.kind, 'model', spec.model, 'spec', ARGV[spec.arg],
          'status', 'queued', 'user', p.user, 'queue', K.queue_name, 'created_at', p.now, 'step', 0,
          'total', spec.total, 'work', spec.work)
        created[sid] = true
        n_created = n_created + 1
        if retrain[sid] then n_retrained = n_retrained + 1 end
      end
    end
  end
end
local queued, scores = {}, {}
local n_done = 0  -- runs whose every stage was already finished: done as they are queued
for _, run in ipairs(to_write) do
  local finished = {}
  local n_finished, work_done, work_total = 0, 0, 0
  for _, sid in ipairs(run.stages) do
    local st = status_of(sid)
    work_total = work_total + p.stages[sid].work
    if not created[sid] and (st == 'finished' or st == 'pruned') then
      finished[sid] = true; n_finished = n_finished + 1
      work_done = work_done + p.stages[sid].work
    end
  end
  local done = n_finished == #run.stages
  local rkey = K.run .. run.id
  if run.existed then
    redis.call('DEL', rkey .. ':results')
    redis.call('HDEL', rkey, 'started_at', 'ended_at', 'error', 'current_stage')
  end
  redis.call('HSET', rkey, 'id', run.id, 'grid', p.grid, 'user', p.user, 'priority', p.priority,
    'status', done and 'finished' or 'queued', 'cell', run.cell, 'stages', run.stages_json,
    'eval_stages', run.eval_stages_json, 'n_stages', #run.stages, 'stages_done', n_finished,
    'work_total', work_total, 'work_done', work_done, 'created_at', p.now)
  if done then
    redis.call('HSET', rkey, 'started_at', p.now, 'ended_at', p.now)
    n_done = n_done + 1
  end
  for _, sid in ipairs(run.stages) do redis.call('SADD', K.stage .. sid .. ':runs', run.id) end
  for _, sid in ipairs(run.eval_stages) do
    if finished[sid] then
      local metrics = redis.call('HGET', K.stage .. sid, 'metrics')
      if metrics then
        for _, m in ipairs(cjson.decode(metrics)) do
          m.stage = sid
          redis.call('HSET', rkey .. ':results', m.task, cjson.encode(m))
        end
      end
    end
  end
  queued[#queued + 1] = run.id
  -- A microsecond apart, in the grid file's order: runs list (and results pivot) as the grid lists its axes,
  -- not in the order of their hashes. %.6f: Lua's own number format would round the microseconds away.
  scores[#scores + 1] = string.format('%.6f', tonumber(p.now) + #queued * 1e-6)
  scores[#scores + 1] = run.id
end
for i = 1, #scores, 4000 do  -- unpack() has a stack limit: add members in chunks
  local last = math.min(i + 3999, #scores)
  redis.call('ZADD', K.runs, unpack(scores, i, last))
  redis.call('ZADD', K.grid_runs, unpack(scores, i, last))
end
if #to_write > 0 then
  redis.call('ZADD', K.grids, 'NX', p.now, p.grid)
  redis.call('HSETNX', K.grid, 'created_at', p.now)
  redis.call('HSETNX', K.grid, 'user', p.user)
  redis.call('HDEL', K.grid, 'notified_at', 'ended_at')
  redis.call('SADD', K.users, p.user)
  if n_created > 0 then redis.call('SADD', K.queues, K.queue) end
end
return cjson.encode({queued = queued, skipped = skipped, foreign = foreign, created = n_created, reused = n_reused,
  retrained = n_retrained, done = n_done})
"""


def job_template(queue: Queue, *, timeout: int) -> tuple[dict[str, Any], str, str]:
    """The hash RQ itself writes for a stage job, with the stage id left as a hole in `data`."""
    hole = "STAGEHOLE"
    job = queue.create_job(ENTRY_POINT, args=(hole,), job_id=job_id_for(hole), timeout=timeout,
                           result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, status=JobStatus.QUEUED)
    job.origin = queue.name
    fields = job.to_dict()
    data = job.data.decode()  # RQ reads uncompressed data as well as zlib-compressed
    prefix, _, suffix = data.partition(hole)
    for name in ("data", "description", "status", "enqueued_at", "dependency_id", "dependency_ids"):
        fields.pop(name, None)
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fields.items()}, prefix, suffix


def job_description(spec: StageSpec) -> str:
    """What RQ (and rq-dashboard) shows for a stage's job."""
    return f"{spec.kind.value} {spec.model} {','.join(spec.tasks)[:80]}"


def submit_runs(
    conn: redis.Redis,
    runs: list[RunSpec],
    stages: dict[str, StageSpec],
    *,
    user: str,
    priority: str,
    stage_timeout: int,
    requeue: Iterable[str] = (),
    owner_only: bool = False,
) -> SubmitReport:
    """Write runs and the stage jobs they need, atomically (one Redis script: all or nothing).

    A run whose identical twin is queued, running or finished is skipped, unless its id is in
    `requeue` (used by retry). Stages already finished are reused; stages queued or running are
    shared; failed or canceled ones are queued again, and so are pruned ones (finished, model deleted)
    that a stage queued here starts from. With `owner_only`, a grid another user owns is refused, and other
    users' failed or canceled runs in it are left as they are.
    """
    if not runs:
        return SubmitReport(grid="")
    grid = runs[0].grid
    queue = make_queue(conn, user, priority)
    template, data_prefix, data_suffix = job_template(queue, timeout=stage_timeout)
    now = time.time()
    payload: dict[str, Any] = {
        "keys": {
            "run": keys.run(""), "stage": keys.stage(""), "rq_job": Job.redis_job_namespace_prefix,
            "job_id_prefix": job_id_for(""), "queue": queue.key, "queue_name": queue.name,
            "queues": queue.redis_queues_keys, "deferred": queue.deferred_job_registry.key,
            "failed": queue.failed_job_registry.key, "canceled": queue.canceled_job_registry.key,
            "runs": keys.RUNS, "grid_runs": keys.grid_runs(grid), "grids": keys.GRIDS, "grid": keys.grid(grid),
            "users": keys.USERS,
        },
        "now": f"{now:.6f}", "enqueued_at": template.get("created_at", ""), "user": user, "priority": priority,
        "grid": grid, "requeue": list(requeue), "job_template": template, "owner_only": owner_only,
        "data_prefix": data_prefix, "data_suffix": data_suffix, "reset_fields": list(REMADE_STAGE_FIELDS),
        "runs": [{"id": run.run_id, "stages": list(run.stages), "eval_stages": list(run.eval_stages),
                  "stages_json": json.dumps(list(run.stages)), "eval_stages_json": json.dumps(list(run.eval_stages)),
                  "cell": json.dumps(run.cell)} for run in runs],
        "stages": {sid: {"parent": spec.parent, "kind": spec.kind.value, "model": spec.model, "arg": index + 2,
                         "total": spec.train.max_steps if spec.train else 0, "work": spec.work,
                         "description": job_description(spec)}
                   for index, (sid, spec) in enumerate(stages.items())},
    }
    # Specs travel as plain arguments, not inside the JSON: decoding JSON-in-JSON costs Lua dearly.
    spec_texts = [spec.model_dump_json() for spec in stages.values()]
    try:
        answer = json.loads(conn.eval(_SUBMIT, 0, json.dumps(payload), *spec_texts))
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RedisUnavailable(f"lost the connection to Redis while enqueueing ({e}); "
                               "nothing was written; try again") from e
    if "owner" in answer:
        raise GridChanged(owned_by_another(grid, str(answer["owner"])))
    return SubmitReport(grid=grid, queued=list(answer["queued"] or []), skipped=list(answer["skipped"] or []),
                        left_to_others=list(answer["foreign"] or []),
                        stages_created=int(answer["created"]), stages_reused=int(answer["reused"]),
                        stages_retrained=int(answer["retrained"]), finished_at_once=int(answer["done"]))


def owned_by_another(grid: str, owner: str) -> str:
    return (f'grid "{grid}" belongs to {owner}; give yours another name (the `name:` in the grid file), or pass '
            "--force to add your runs to it")


# --- cancel and retry -------------------------------------------------------------------------


def runs_of_grid(conn: redis.Redis, grid: str) -> list[str]:
    ids = [text(r) for r in conn.zrange(keys.grid_runs(grid), 0, -1)]
    if not ids:
        raise NotFound(f'no grid named "{grid}"; `stl status` lists the grids')
    return ids


def load_runs(conn: redis.Redis, run_ids: list[str]) -> list[dict[str, str]]:
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hgetall(keys.run(run_id))
    records = []
    for run_id, raw in zip(run_ids, pipe.execute(), strict=True):
        if not raw:
            raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
        records.append({text(k): text(v) for k, v in raw.items()})
    return records


def _check_owner(records: list[dict[str, str]], user: str, force: bool, verb: str) -> None:
    foreign = [r["id"] for r in records if r["user"] != user]
    if foreign and not force:
        owners = sorted({r["user"] for r in records if r["user"] != user})
        raise PermissionDenied(f"refusing to {verb} {len(foreign)} run(s) owned by {', '.join(owners)} "
                               f"(e.g. {foreign[0]}); only the owner may, unless you pass --force")


def _others(records: list[dict[str, str]], user: str, force: bool, *, skip_foreign: bool,
            verb: str) -> tuple[list[dict[str, str]], list[str]]:
    """(the records `user` may act on, the ids of other users' runs left alone). Other users' runs need
    --force: named one by one they are refused; picked by --grid (`skip_foreign`) they are skipped."""
    if force:
        return records, []
    foreign = [r["id"] for r in records if r["user"] != user]
    if foreign and not skip_foreign:
        _check_owner(records, user, force, verb)
    return [r for r in records if r["user"] == user], foreign


def cancel_runs(conn: redis.Redis, run_ids: list[str], *, user: str, force: bool,
                skip_foreign: bool = False) -> tuple[list[str], list[str], list[str]]:
    """Cancel the live runs among `run_ids`. Returns (canceled, already ended, other users' runs left
    alone). Stages other live runs still need keep going."""
    records = load_runs(conn, run_ids)
    already = [r["id"] for r in records if r["status"] not in LIVE]
    mine, foreign = _others([r for r in records if r["status"] in LIVE], user, force,
                            skip_foreign=skip_foreign, verb="cancel")
    # Only runs still live when the write happens: the worker may have just finished one.
    canceled = update_runs_if(conn, [r["id"] for r in mine], allowed=LIVE, fields={
        "status": RunStatus.canceled.value, "ended_at": time.time(), "error": f"canceled by {user}"})
    already += [r["id"] for r in mine if r["id"] not in canceled]
    done = set(canceled)
    # Each stage once, however many of these runs share it (one MTL stage serves a whole grid).
    stage_ids = dict.fromkeys(sid for r in mine if r["id"] in done for sid in json.loads(r["stages"]))
    for sid in stage_ids:
        _cancel_stage_if_unneeded(conn, sid, user=user)
    return canceled, already, foreign


# Whether a stage is still needed, and if not its cancellation, decided in one step: an enqueue that starts
# sharing the stage in between would otherwise leave its new run waiting on a canceled stage.
_CANCEL_IF_UNNEEDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 'ended' end
for _, run_id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local st = redis.call('HGET', ARGV[1] .. run_id, 'status')
  if st == 'queued' or st == 'running' then return 'needed' end
end
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel', ARGV[2]); return 'running' end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', ARGV[3], 'error', 'canceled (' .. ARGV[2] .. ')')
return 'canceled'
"""


def _cancel_stage_if_unneeded(conn: redis.Redis, stage_id: str, *, user: str) -> None:
    # A running stage gets a flag its work horse checks between steps; it stops within seconds.
    outcome = text(conn.eval(_CANCEL_IF_UNNEEDED, 2, keys.stage(stage_id), keys.stage_runs(stage_id), keys.run(""),
                             user or "cancel", repr(time.time())))
    if outcome != "canceled":
        return
    try:
        job = Job.fetch(job_id_for(stage_id), connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return  # the RQ record expired; the stage record is what counts
    # An enqueue since the line above may have queued the stage afresh (a new job of the same id): leave that.
    if text(conn.hget(keys.stage(stage_id), "status")) == RunStatus.canceled.value and not job.is_canceled:
        job.cancel()


def cancel_stage_jobs(conn: redis.Redis, run_ids: list[str], *, reason: str) -> None:
    """After runs failed or were canceled, cancel the stages that no live run needs any more."""
    records = load_runs(conn, run_ids)
    for sid in dict.fromkeys(sid for record in records for sid in json.loads(record["stages"])):
        _cancel_stage_if_unneeded(conn, sid, user=reason)


def load_run_specs(conn: redis.Redis, records: list[dict[str, str]]) -> tuple[list[RunSpec], dict[str, StageSpec]]:
    """Rebuild run and stage specs from their records, for retry."""
    runs = [RunSpec(grid=r["grid"], cell=json.loads(r["cell"]), stages=tuple(json.loads(r["stages"])),
                    eval_stages=tuple(json.loads(r["eval_stages"]))) for r in records]
    stage_ids = sorted({sid for run in runs for sid in run.stages})
    pipe = conn.pipeline(transaction=False)
    for sid in stage_ids:
        pipe.hget(keys.stage(sid), "spec")
    stages: dict[str, StageSpec] = {}
    for sid, raw in zip(stage_ids, pipe.execute(), strict=True):
        if not raw:
            raise NotFound(f"stage {sid} has no record in Redis; enqueue the grid file again instead")
        try:
            stages[sid] = StageSpec.model_validate_json(raw)
        except ValueError as e:
            raise DamagedRecord(f"damaged record {keys.stage(sid)}: its spec is not what stl writes; enqueue the "
                                "grid file again instead, which writes it anew") from e
    return runs, stages


def retry_runs(conn: redis.Redis, run_ids: list[str], *, user: str, force: bool, priority: str | None = None,
               skip_foreign: bool = False) -> tuple[list[str], list[str], list[str]]:
    """Queue failed or canceled runs again. Returns (requeued, not retryable, other users' runs left
    alone)."""
    records = load_runs(conn, run_ids)
    ended = (RunStatus.failed.value, RunStatus.canceled.value)
    skipped = [r["id"] for r in records if r["status"] not in ended]
    retryable, foreign = _others([r for r in records if r["status"] in ended], user, force,
                                 skip_foreign=skip_foreign, verb="retry")
    if not retryable:
        return [], skipped, foreign
    by_owner: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for record in retryable:
        key = (record["user"], priority or record.get("priority") or "normal", record["grid"])
        by_owner.setdefault(key, []).append(record)
    requeued: list[str] = []
    for (owner, prio, _grid), group in by_owner.items():
        runs, stages = load_run_specs(conn, group)
        timeout = _stage_timeout_of(conn, runs)
        report = submit_runs(conn, runs, stages, user=owner, priority=prio, stage_timeout=timeout,
                             requeue=[r.run_id for r in runs])
        requeued += report.queued
    return requeued, skipped, foreign


def _stage_timeout_of(conn: redis.Redis, runs: list[RunSpec]) -> int:
    job_ids = [job_id_for(sid) for run in runs for sid in run.stages]
    for job_id in job_ids:
        raw = conn.hget(Job.key_for(job_id), "timeout")
        if raw:
            return int(float(text(raw)))
    return 86400


def check_priority(value: str) -> str:
    if value not in {p.value for p in Priority}:
        raise UsageError(f'unknown priority "{value}"; use one of: {", ".join(p.value for p in Priority)}')
    return value
