"""Changes of a run's status, each checked and written inside Redis in one step.

A user's `stl cancel` and the worker ending a stage race for the same run records: read-then-write from
Python would let the worker put a canceled run back in the queue (where it waits forever on stages the
cancel removed), or a cancel turn a finished run into a canceled one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.fence import eval_fenced

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import redis

    from stl.jobs.queue.fence import StageFence
    from stl.jobs.states import RunStatus


# KEYS: run hashes. ARGV[1]: statuses a run must be in; ARGV[2]: fields to set; ARGV[3]: fields to set only
# where empty. Returns 1 or 0 per run: whether it was in one of those statuses (and was written).
_UPDATE_IF = """
local allowed, fields, if_unset = cjson.decode(ARGV[1]), cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local written = {}
for i, key in ipairs(KEYS) do
  local status = redis.call('HGET', key, 'status')
  local ok = 0
  for _, s in ipairs(allowed) do if status == s then ok = 1 end end
  if ok == 1 then
    if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
    for j = 1, #if_unset, 2 do
      local current = redis.call('HGET', key, if_unset[j])
      if not current or current == '' then redis.call('HSET', key, if_unset[j], if_unset[j + 1]) end
    end
  end
  written[i] = ok
end
return written
"""

# The end of a stage, on the stage and on every live run that needs it, in one step (a horse that dies
# half-way must not leave the stage finished and its runs waiting). KEYS: the stage hash, the running-stages
# set, the stage's runs set. ARGV[1]: JSON, see finish_stage_records. Returns JSON {runs, grids, finished,
# incomplete}, or {already = true} for a stage that finished before: ending it again changes nothing (its runs
# counted it once). A run whose stages are all done but that lacks a result its eval stages should have given
# fails, naming them: "finished" means every result is there.
_FINISH = """
local p = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'status') == 'finished' then return cjson.encode({already = true}) end
redis.call('HSET', KEYS[1], unpack(p.stage_fields))
local expected = {}  -- eval stage id -> its tasks (many runs may share one eval stage)
local function missing_results(rkey, evals)
  local missing = {}
  for _, e in ipairs(evals) do
    if not expected[e] then
      local ok, spec = pcall(cjson.decode, redis.call('HGET', p.stage_prefix .. e, 'spec') or '')
      expected[e] = (ok and type(spec) == 'table' and type(spec.tasks) == 'table') and spec.tasks or {}
    end
    for _, task in ipairs(expected[e]) do
      if redis.call('HEXISTS', rkey .. p.results_suffix, task) == 0 then missing[#missing + 1] = task end
    end
  end
  return missing
end
redis.call('SREM', KEYS[2], p.stage)
local runs, grids, finished, incomplete, seen_grid = {}, {}, {}, {}, {}
for _, run_id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  runs[#runs + 1] = run_id
  local rkey = p.run_prefix .. run_id
  local status = redis.call('HGET', rkey, 'status')
  if status == 'queued' or status == 'running' then
    local grid = redis.call('HGET', rkey, 'grid') or ''
    if not seen_grid[grid] then seen_grid[grid] = true; grids[#grids + 1] = grid end
    if p.status == 'finished' then
      local ok, evals = pcall(cjson.decode, redis.call('HGET', rkey, 'eval_stages') or '[]')
      if not ok or type(evals) ~= 'table' then evals = {} end  -- a damaged record must not stop the script half-way
      for _, e in ipairs(evals) do
        if e == p.stage then
          for i = 1, #p.results, 2 do redis.call('HSET', rkey .. p.results_suffix, p.results[i], p.results[i + 1]) end
        end
      end
      redis.call('HINCRBY', rkey, 'work_done', p.work)
      local done = redis.call('HINCRBY', rkey, 'stages_done', 1)
      if done >= (tonumber(redis.call('HGET', rkey, 'n_stages') or '0') or 0) then
        local missing = missing_results(rkey, evals)
        if #missing == 0 then
          redis.call('HSET', rkey, 'status', 'finished', 'ended_at', p.now, 'current_stage', '')
          finished[#finished + 1] = run_id
        else
          redis.call('HSET', rkey, 'status', 'failed', 'ended_at', p.now, 'current_stage', '', 'error',
            'its stages ended, but the results of ' .. table.concat(missing, ', ') .. ' are missing; ' ..
            '`stl retry` runs it again')
          incomplete[#incomplete + 1] = run_id
        end
      else
        redis.call('HSET', rkey, 'status', 'queued', 'current_stage', '')
      end
    else
      redis.call('HSET', rkey, 'status', p.status, 'ended_at', p.now, 'current_stage', '', 'error', p.run_error)
    end
  end
end
return cjson.encode({runs = runs, grids = grids, finished = finished, incomplete = incomplete})
"""


# A stage starts only while it is live: a cancel written since its status was read stands. KEYS: the stage
# hash, the running-stages set. ARGV: the stage id, then the fields to set. "started", or the status that
# kept the stage from starting.
_START_IF_LIVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return status or '' end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 'started'
"""


def _flat(mapping: Mapping[str, Any]) -> list[str]:
    return [str(part) for item in mapping.items() for part in item]


def update_runs_if(conn: redis.Redis, run_ids: Iterable[str], *, allowed: Iterable[str],
                   fields: Mapping[str, Any], fields_if_unset: Mapping[str, Any] | None = None,
                   fence: StageFence | None = None) -> list[str]:
    """Write `fields` on each run whose status is one of `allowed` at that moment; returns those runs. With a
    work horse's `fence`, only while no other horse has taken its stage since (else StageLeaseLost)."""
    ids = list(run_ids)
    if not ids:
        return []
    args = [json.dumps(list(allowed)), json.dumps(_flat(fields)), json.dumps(_flat(fields_if_unset or {}))]
    written = eval_fenced(conn, fence, _UPDATE_IF, [keys.run(run_id) for run_id in ids], args)
    return [run_id for run_id, ok in zip(ids, written, strict=True) if int(ok)]


def start_stage_record(conn: redis.Redis, stage_id: str, fields: Mapping[str, Any], *,
                       fence: StageFence | None = None) -> str:
    """Mark a stage running (with `fields`) if it is still queued or running: "started", else its status
    ("" when it has no record)."""
    return text(eval_fenced(conn, fence, _START_IF_LIVE, [keys.stage(stage_id), keys.RUNNING_STAGES],
                            [stage_id, *_flat(fields)]))


@dataclass(frozen=True)
class StageEnd:
    """What recording a stage's end did."""

    runs: list[str] = field(default_factory=list)  # every run of the stage
    grids: list[str] = field(default_factory=list)  # the grids of its live runs
    finished: list[str] = field(default_factory=list)  # the runs it finished, every result there
    incomplete: list[str] = field(default_factory=list)  # runs it ended that lack results: failed, naming them
    already: bool = False  # the stage had finished before: nothing was written


def finish_stage_records(conn: redis.Redis, stage_id: str, *, status: RunStatus, stage_fields: Mapping[str, Any],
                         work: int, metrics: list[dict[str, Any]], now: float, run_error: str,
                         fence: StageFence | None = None) -> StageEnd:
    """Record a stage's end on it and its live runs, once: a stage that finished already is left as it is.
    With a work horse's `fence`, only while no other horse has taken the stage since (else StageLeaseLost)."""
    # Each task's result as Python writes it (cjson would round the floats to 14 digits).
    results = [part for metric in metrics for part in (metric["task"], json.dumps({**metric, "stage": stage_id}))]
    payload = {"stage": stage_id, "status": status.value, "stage_fields": _flat(stage_fields), "work": int(work),
               "results": results, "now": repr(now), "run_error": run_error, "run_prefix": keys.run(""),
               "results_suffix": keys.run_results("").removeprefix(keys.run("")), "stage_prefix": keys.stage("")}
    raw = eval_fenced(conn, fence, _FINISH, [keys.stage(stage_id), keys.RUNNING_STAGES, keys.stage_runs(stage_id)],
                      [json.dumps(payload)])
    answer = json.loads(text(raw))

    def listed(name: str) -> list[str]:  # cjson writes an empty list as {}
        value = answer.get(name) or []
        return [str(v) for v in value] if isinstance(value, list) else []

    return StageEnd(runs=listed("runs"), grids=listed("grids"), finished=listed("finished"),
                    incomplete=listed("incomplete"), already=bool(answer.get("already")))
