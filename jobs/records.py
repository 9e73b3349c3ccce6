"""Reading runs, stages, workers and results back out of Redis, as plain rows for the CLI."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from jobs import keys
from jobs.codec import text
from jobs.errors import NotFound, UsageError
from jobs.states import RunStatus, StageKind

if TYPE_CHECKING:
    import redis

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{6,16}$")
RUN_FIELDS = ("id", "grid", "user", "priority", "status", "cell", "n_stages", "stages_done", "created_at",
              "started_at", "ended_at", "error", "current_stage", "work_total", "work_done")
STAGE_PROGRESS_FIELDS = (
    "kind", "step", "total", "loss", "samples_per_s", "elapsed_s", "started_at", "status", "mfu", "eta_s", "eta_at",
    "work",
)
WORKER_STALE_S = 60

# Read-only: counts per grid/user/status, each grid's first creation and last end, and the running
# run ids, for the runs in the zset KEYS[1] (ARGV[1]: run key prefix; ARGV[2]: only this user, or "").
RECENT_FAILURES = 5  # failed runs `stl status` lists, with their errors
_STATUS_COUNTS = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local counts, created, ended, running, failed = {}, {}, {}, {}, {}
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'grid', 'user', 'status', 'created_at', 'ended_at')
  local grid, user, status = v[1] or '', v[2] or '', v[3] or ''
  if ARGV[2] == '' or user == ARGV[2] then
    local key = grid .. '\t' .. user .. '\t' .. status
    counts[key] = (counts[key] or 0) + 1
    local c, e = tonumber(v[4]), tonumber(v[5])
    if c and (not created[grid] or c < created[grid]) then created[grid] = c end
    if e and (not ended[grid] or e > ended[grid]) then ended[grid] = e end
    if status == 'running' then running[#running + 1] = id end
    if status == 'failed' then failed[#failed + 1] = {e or 0, id} end
  end
end
table.sort(failed, function(a, b) return a[1] > b[1] end)
local recent = {}
for i = 1, math.min(#failed, tonumber(ARGV[3])) do recent[i] = failed[i][2] end
return cjson.encode({counts = counts, created = created, ended = ended, running = running, failed = recent})
"""

# Read-only: the fields ARGV[2..] of every run hash named in the zset KEYS[1] (ARGV[1] is the key prefix).
_BULK_HMGET = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local out = {}
for _, id in ipairs(ids) do
  local values = redis.call('HMGET', ARGV[1] .. id, unpack(fields))
  for j = 1, #fields do out[#out + 1] = values[j] or '' end
end
return out
"""



def _f(value: str) -> float | None:
    try:
        return float(value) if value != "" else None
    except ValueError:
        return None


def check_run_id(run_id: str) -> str:
    """Run ids become paths and keys: accept only what stl itself makes."""
    if not RUN_ID_PATTERN.match(run_id):
        shown = run_id if len(run_id) <= 40 else f"{run_id[:40]}…"  # a pasted log line is not echoed whole
        raise UsageError(f'"{shown}" is not a run id (16 hex digits, or a unique prefix of at least 6); '
                         "`stl status --json` lists them")
    return run_id


def resolve_run_ids(conn: redis.Redis, given: list[str]) -> list[str]:
    """Full run ids for ids or unique prefixes."""
    resolved: list[str] = []
    all_ids: list[str] | None = None
    for run_id in given:
        check_run_id(run_id)
        if len(run_id) == 16:
            resolved.append(run_id)
            continue
        if all_ids is None:
            all_ids = [text(m) for m in conn.zrange(keys.RUNS, 0, -1)]
        matches = [m for m in all_ids if m.startswith(run_id)]
        if not matches:
            raise NotFound(f'no run id starts with "{run_id}" (a run `stl enqueue --replace` dropped is gone); '
                           "`stl status --json` lists them")
        if len(matches) > 1:
            listed = ", ".join(matches[:5]) + (f" and {len(matches) - 5} more" if len(matches) > 5 else "")
            raise UsageError(f'"{run_id}" matches {len(matches)} runs ({listed}); give more digits')
        resolved.append(matches[0])
    return list(dict.fromkeys(resolved))  # a run named twice (an id and its prefix) is one run


@dataclass
class RunRow:
    id: str
    grid: str
    user: str
    priority: str
    status: str
    progress: float
    cell: dict[str, Any]
    created_at: float | None
    started_at: float | None
    ended_at: float | None
    error: str
    stage: str = ""
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    mfu: float | None = None  # model FLOPs utilisation of the running stage, on a GPU with a known peak
    elapsed_s: float | None = None
    eta_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkerRow:
    name: str
    host: str
    gpu: str
    gpu_util: float | None
    gpu_mem_used_mb: float | None
    gpu_mem_total_mb: float | None
    state: str
    stage: str
    last_seen: float | None
    disk_free_bytes: float | None = None  # of the file system holding the worker's STL_HOME
    disk_total_bytes: float | None = None
    paused: str = ""  # why it takes no work: a fault of its machine (jobs.health)

    @property
    def disk_low(self) -> bool:
        from jobs.disk import disk_is_low

        return disk_is_low(self.disk_free_bytes, self.disk_total_bytes)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "disk_low": self.disk_low}


@dataclass
class GridRow:
    grid: str
    total: int
    counts: dict[str, int] = field(default_factory=dict)
    created_at: float | None = None
    ended_at: float | None = None

    @property
    def done(self) -> bool:
        return self.total > 0 and sum(self.counts.get(s.value, 0) for s in RunStatus if s.is_done) == self.total


def list_runs(conn: redis.Redis, *, user: str | None = None, grid: str | None = None) -> list[RunRow]:
    """Every run (optionally one user's or one grid's), oldest first, with live progress."""
    index = keys.grid_runs(grid) if grid is not None else keys.RUNS  # "": no grid, not every grid
    # One server-side pass instead of one HMGET per run: this stays fast with 10,000 runs.
    flat = conn.eval(_BULK_HMGET, 1, index, keys.run(""), *RUN_FIELDS)
    width = len(RUN_FIELDS)
    records = [dict(zip(RUN_FIELDS, map(text, flat[i:i + width]), strict=True)) for i in range(0, len(flat), width)]
    if grid is not None and not records:
        raise NotFound(f'no grid named "{grid}"; `stl status` lists the grids')
    if user:
        records = [r for r in records if r["user"] == user]
    return _with_progress(conn, records)


def _with_progress(conn: redis.Redis, records: list[dict[str, str]]) -> list[RunRow]:
    """Run rows, with step, loss and ETA read from the stage each running run is in."""
    running_stages = sorted({r["current_stage"] for r in records
                             if r["status"] == RunStatus.running.value and r["current_stage"]})
    stage_info: dict[str, dict[str, str]] = {}
    if running_stages:
        pipe = conn.pipeline(transaction=False)
        for sid in running_stages:
            pipe.hmget(keys.stage(sid), *STAGE_PROGRESS_FIELDS)
        for sid, raw in zip(running_stages, pipe.execute(), strict=True):
            stage_info[sid] = dict(zip(STAGE_PROGRESS_FIELDS, map(text, raw), strict=True))
    now = time.time()
    return [_run_row(r, stage_info.get(r["current_stage"]), now) for r in records if r["id"]]


@dataclass
class StatusSummary:
    """What the status view shows: counts per (grid, user, status), grids, and the running runs."""

    counts: dict[tuple[str, str, str], int]
    grids: list[GridRow]
    running: list[RunRow]
    failed: list[RunRow] = field(default_factory=list)  # the latest RECENT_FAILURES failed runs, latest first


def status_summary(conn: redis.Redis, *, user: str | None = None, grid: str | None = None) -> StatusSummary:
    """Counted inside Redis: only the counts and the running runs travel, whatever the queue holds."""
    index = keys.grid_runs(grid) if grid is not None else keys.RUNS  # "": no grid, not every grid
    answer = json.loads(conn.eval(_STATUS_COUNTS, 1, index, keys.run(""), user or "", RECENT_FAILURES))
    if grid is not None and not answer["counts"]:
        if user and conn.zcard(keys.grid_runs(grid)):
            raise NotFound(f'user "{user}" has no runs in grid "{grid}"; leave out --user to see all of its runs')
        raise NotFound(f'no grid named "{grid}"; `stl status` lists the grids')
    if user and not answer["counts"] and not conn.sismember(keys.USERS, user):
        known = sorted(text(u) for u in conn.smembers(keys.USERS))
        raise NotFound(f'no runs by user "{user}"; users with runs: {", ".join(known) or "none yet"}')
    counts: dict[tuple[str, str, str], int] = {}
    grids: dict[str, GridRow] = {}
    for key, n in (answer["counts"] or {}).items():
        grid_name, user_name, status = key.split("\t")
        counts[(grid_name, user_name, status)] = int(n)
        row = grids.setdefault(grid_name, GridRow(grid=grid_name, total=0))
        row.total += int(n)
        row.counts[status] = row.counts.get(status, 0) + int(n)
    for grid_name, row in grids.items():
        row.created_at = _f(str((answer["created"] or {}).get(grid_name, "")))
        row.ended_at = _f(str((answer["ended"] or {}).get(grid_name, "")))
    return StatusSummary(counts=counts, grids=list(grids.values()),
                         running=run_rows(conn, list(answer["running"] or [])),
                         failed=run_rows(conn, list(answer["failed"] or [])))


def _run_row(record: dict[str, str], stage: dict[str, str] | None, now: float) -> RunRow:
    n_stages = int(record["n_stages"] or 1)
    done = int(record["stages_done"] or 0)
    row = RunRow(
        id=record["id"], grid=record["grid"], user=record["user"], priority=record["priority"],
        status=record["status"], progress=0.0, cell=json.loads(record["cell"]) if record["cell"] else {},
        created_at=_f(record["created_at"]), started_at=_f(record["started_at"]),
        ended_at=_f(record["ended_at"]), error=record["error"],
    )
    fraction = 0.0
    if stage and record["status"] == RunStatus.running.value:
        row.stage = stage["kind"]
        step, total = int(_f(stage["step"]) or 0), int(_f(stage["total"]) or 0)
        row.step, row.total = step, total or None
        row.loss = _f(stage["loss"])
        row.samples_per_s = _f(stage["samples_per_s"])
        row.mfu = _f(stage["mfu"])
        started = _f(stage["started_at"])
        row.elapsed_s = now - started if started else None
        if total and step:
            fraction = min(step / total, 1.0)
        eta, eta_at = _f(stage.get("eta_s", "")), _f(stage.get("eta_at", ""))
        if eta is not None and eta_at is not None:
            # The work horse's estimate from its pace since its first report (load and compile left out),
            # counted down since it was written.
            row.eta_s = max(eta - (now - eta_at), 0.0)
        elif total and step and row.elapsed_s:
            row.eta_s = row.elapsed_s * (total - step) / step
    work_total, work_done = _f(record.get("work_total", "")), _f(record.get("work_done", ""))
    work = _f(stage.get("work", "")) if stage else None
    if record["status"] == RunStatus.finished.value:
        row.progress = 1.0
    elif work_total and work_done is not None and (work is not None or not fraction):
        # Each stage weighs the examples it puts through the model: a long MTL stage outweighs an evaluation.
        row.progress = min((work_done + fraction * (work or 0.0)) / work_total, 1.0)
    else:  # runs queued by an stl that did not record work: every stage counts the same
        row.progress = min((done + fraction) / n_stages, 1.0)
    return row


def list_workers(conn: redis.Redis) -> list[WorkerRow]:
    names = sorted(text(n) for n in conn.smembers(keys.WORKERS))
    pipe = conn.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.worker(name))
    rows: list[WorkerRow] = []
    now = time.time()
    for name, raw in zip(names, pipe.execute(), strict=True):
        record = {text(k): text(v) for k, v in raw.items()}
        if not record:
            continue  # its record expired: the worker is gone
        last_seen = _f(record.get("heartbeat", ""))
        state = record.get("state", "?")
        if last_seen is not None and now - last_seen > WORKER_STALE_S:
            state = "lost"
        rows.append(WorkerRow(
            name=name, host=record.get("host", ""), gpu=record.get("gpu", "cpu"),
            gpu_util=_f(record.get("gpu_util", "")), gpu_mem_used_mb=_f(record.get("gpu_mem_used_mb", "")),
            gpu_mem_total_mb=_f(record.get("gpu_mem_total_mb", "")), state=state,
            stage=record.get("stage", ""), last_seen=last_seen,
            disk_free_bytes=_f(record.get("home_free_bytes", "")),
            disk_total_bytes=_f(record.get("home_total_bytes", "")),
            paused=record.get("paused", "") if state == "paused" else "",
        ))
    return rows


def grid_summary(conn: redis.Redis, grid: str) -> dict[str, Any]:
    """Counts and wall time of one grid: what a notification says."""
    runs = list_runs(conn, grid=grid)
    counts = {s.value: 0 for s in RunStatus}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    created = min((r.created_at for r in runs if r.created_at), default=None)
    ended = max((r.ended_at for r in runs if r.ended_at), default=None)
    return {
        "grid": grid, "total": len(runs), **counts,
        "live": counts[RunStatus.queued.value] + counts[RunStatus.running.value],
        "wall_s": (ended - created) if created and ended else None,
    }


def result_rows(conn: redis.Redis, grid: str) -> list[dict[str, Any]]:
    """One row per run x eval task: {grid, run, cell, task, task_type, metric, value, metrics}: the primary
    metric and its value, and every metric the stage recorded."""
    runs = list_runs(conn, grid=grid)
    pipe = conn.pipeline(transaction=False)
    for run in runs:
        pipe.hgetall(keys.run_results(run.id))
    rows: list[dict[str, Any]] = []
    for run, raw in zip(runs, pipe.execute(), strict=True):
        results = {text(k): json.loads(text(v)) for k, v in raw.items()}
        for task, result in sorted(results.items()):
            rows.append({"grid": grid, "run": run.id, "cell": run.cell, "task": task,
                         "task_type": result["task_type"], "metric": result["metric"],
                         "value": result["value"],
                         "metrics": result.get("metrics") or {result["metric"]: result["value"]}})
    return rows


def run_log(conn: redis.Redis, run_id: str, *, start: dict[str, int] | None = None) -> tuple[list[str], dict[str, int]]:
    """New log lines of every stage of a run, and where to continue from (for `stl logs -f`)."""
    raw_stages = conn.hget(keys.run(run_id), "stages")
    if raw_stages is None:
        raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
    positions = dict(start or {})
    lines: list[str] = []
    for sid in json.loads(text(raw_stages)):
        offset = positions.get(sid, 0)
        new = [text(x) for x in conn.lrange(keys.stage_log(sid), offset, -1)]
        lines += new
        positions[sid] = offset + len(new)
    return lines, positions


def run_rows(conn: redis.Redis, run_ids: list[str]) -> list[RunRow]:
    """These runs as `stl status --json` shows them (typed, with progress); unknown ids are left out."""
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hmget(keys.run(run_id), *RUN_FIELDS)
    records = [dict(zip(RUN_FIELDS, map(text, raw), strict=True)) for raw in (pipe.execute() if run_ids else [])]
    return _with_progress(conn, records)


def run_status(conn: redis.Redis, run_id: str) -> str:
    return text(conn.hget(keys.run(run_id), "status"))


def run_cell(conn: redis.Redis, run_id: str) -> dict[str, Any]:
    raw = conn.hget(keys.run(run_id), "cell")
    if raw is None:
        raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
    return dict(json.loads(text(raw)))


def loss_curve(conn: redis.Redis, run_id: str) -> tuple[list[tuple[int, float]], list[str]]:
    """The training-loss curve of a run: each training stage's steps counted on from where the stage it
    starts from ended (a few-shot stage after MTL step 1000 starts at 1001; two few-shot stages of the same
    MTL model both do, as branches), with a NaN loss between two stages (where a line must not join them).
    Also a name for each stage drawn, in order: its task for a few-shot stage (branches look alike), "" for MTL."""
    raw_stages = conn.hget(keys.run(run_id), "stages")
    if raw_stages is None:
        raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
    stage_ids = json.loads(text(raw_stages))
    pipe = conn.pipeline(transaction=False)
    for sid in stage_ids:
        pipe.hget(keys.stage(sid), "spec")
        pipe.lrange(keys.stage_steps(sid), 0, -1)
    answers = pipe.execute()
    points: list[tuple[int, float]] = []
    names: list[str] = []
    ends: dict[str, int] = {}  # the x where each stage's model was left: its children start there
    for index, sid in enumerate(stage_ids):
        spec, raw_steps = answers[2 * index], answers[2 * index + 1]
        fields = json.loads(text(spec)) if spec else {}
        parent = fields.get("parent")
        offset = ends.get(parent, 0) if parent else 0
        records = [json.loads(text(x)) for x in raw_steps]
        # Evaluation reports progress without a loss (None or NaN): only training steps make the curve.
        steps = [s for s in records if isinstance(s.get("loss"), int | float) and s["loss"] == s["loss"]]
        # A stage resumed from its checkpoint reports the steps after it again: the last report of each counts.
        steps = sorted({int(s["step"]): s for s in steps}.values(), key=lambda s: int(s["step"]))
        ends[sid] = offset + max((int(s["step"]) for s in steps), default=0)
        if not steps:
            continue
        if points:  # a new stage (another task, or fine-tuning after MTL): the plot breaks the line here
            points.append((offset, math.nan))
        names.append(", ".join(fields.get("tasks") or ()) if fields.get("kind") == StageKind.finetune.value else "")
        for step in steps:
            points.append((offset + int(step["step"]), float(step["loss"])))
    return points, names
