"""Reading runs, stages and workers back out of Redis, as plain rows for the CLI, and reading what another tool
(or a hand) may have written there without failing on it (`read_or_report`, `Fields`)."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from stl.jobs import keys
from stl.jobs.codec import printable, text
from stl.jobs.errors import NotFound, UsageError
from stl.jobs.states import RunStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{6,16}$")
RUN_FIELDS = ("id", "grid", "user", "priority", "status", "cell", "n_stages", "stages_done", "created_at",
              "started_at", "ended_at", "error", "current_stage", "work_total", "work_done")
STAGE_PROGRESS_FIELDS = (
    "kind", "step", "total", "loss", "samples_per_s", "elapsed_s", "started_at", "status", "mfu", "eta_s", "eta_at",
    "work", "preempt", "preempted_for",
)
WORKER_STALE_S = 60

# Read-only: counts per grid/user/status, each grid's first creation and last end, and the running
# run ids, for the runs in the zset KEYS[1] (ARGV[1]: run key prefix; ARGV[2]: only this user, or "").
RECENT_FAILURES = 5  # failed runs `stl status` lists, with their errors
_STATUS_COUNTS = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local counts, created, ended, running, failed, damaged = {}, {}, {}, {}, {}, {}
for _, id in ipairs(ids) do
  local v = redis.pcall('HMGET', ARGV[1] .. id, 'grid', 'user', 'status', 'created_at', 'ended_at')
  if v.err then
    damaged[#damaged + 1] = id  -- not a hash: reported by the caller, not counted
  elseif ARGV[2] == '' or (v[2] or '') == ARGV[2] then
    local grid, user, status = v[1] or '', v[2] or '', v[3] or ''
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
return cjson.encode({counts = counts, created = created, ended = ended, running = running, failed = recent,
                     damaged = damaged})
"""

# Read-only: the fields ARGV[2..] of every run hash named in the zset KEYS[1] (ARGV[1] is the key prefix).
_BULK_HMGET = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local out, damaged = {}, {}
for _, id in ipairs(ids) do
  local values = redis.pcall('HMGET', ARGV[1] .. id, unpack(fields))
  if values.err then
    damaged[#damaged + 1] = id  -- not a hash: reported by the caller, and the other runs still read
  else
    for j = 1, #fields do out[#out + 1] = values[j] or '' end
  end
end
return {out, damaged}
"""

# --- reading what another tool (or a hand) may have written -----------------------------------------

_T = TypeVar("_T")
_damage_log = logging.getLogger("stl.records")
# What a record that is not what stl wrote raises as it is read: not JSON, a missing key, the wrong Redis type.
UNREADABLE = (ValueError, TypeError, KeyError, redis.ResponseError)
_reporters: list[Callable[[str], None]] = []  # the innermost `damaged_records_reported` says each line


def report_damaged(key: str, problem: str) -> None:
    """A record stl cannot read, said in one line (see `damaged_records_reported`); the caller goes on."""
    line = printable(f"damaged record {key}: {problem}")  # the key and value may hold anything: a worker's log too
    if _reporters:
        _reporters[-1](line)
    else:
        _damage_log.warning("%s", line)


def read_or_report(key: str, what: str, read: Callable[[], _T], fallback: _T, *, then: str = "left out") -> _T:
    """`read()`; or, where the record at `key` cannot be read, `fallback`, and one line: `damaged record KEY:
    WHAT (why); THEN`. One damaged record costs the view its own part, never the whole view."""
    try:
        return read()
    except UNREADABLE as e:
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is its key's repr
        why = " ".join(str(detail).split()) or type(e).__name__
        report_damaged(key, f"{what} ({why[:120]}); {then}")
        return fallback


def json_or_report(key: str, what: str, raw: str, kind: type[_T], fallback: _T, *, then: str = "left out") -> _T:
    """JSON text `raw` (`what` of the record at `key`) as a `kind`; or `fallback`, reported."""
    def parse() -> _T:
        value = json.loads(raw)
        if not isinstance(value, kind):
            raise TypeError(f"a JSON {type(value).__name__}, not a {kind.__name__}")
        return value

    return read_or_report(key, f"{what} is not what stl writes", parse, fallback, then=then)


def answers_or_report(pipe: redis.client.Pipeline, keys_read: list[str], fallback: Any) -> list[Any]:
    """A pipeline's answers, one per key in `keys_read`; an answer Redis refused (a string where a hash or a
    list belongs) is reported and replaced by `fallback`."""
    answers = []
    for key, answer in zip(keys_read, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(answer, redis.ResponseError):
            report_damaged(key, f"cannot be read ({answer}); left out")
            answer = fallback
        answers.append(answer)
    return answers


@contextmanager
def damaged_records_reported(say: Callable[[str], None]) -> Iterator[None]:
    """While inside, each damaged record read is passed to `say`, once (a live view reads it every second, a
    worker all day); an inner one (the worker's log, inside the CLI's) takes over from an outer one."""
    said: set[str] = set()

    def once(line: str) -> None:
        if line not in said:
            said.add(line)
            say(line)

    _reporters.append(once)
    try:
        yield
    finally:
        _reporters.remove(once)


@dataclass(frozen=True)
class Fields:
    """One Redis hash as read (field -> text) and its key: a field that cannot be read is reported and taken
    as missing."""

    key: str
    values: Mapping[str, str]

    def get(self, name: str) -> str:
        return self.values.get(name, "")

    def number(self, name: str, *, finite: bool = True) -> float | None:
        raw = self.get(name)
        if raw == "":
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isnan(value) or (finite and math.isinf(value)):
            report_damaged(self.key, f"field {name} holds {raw[:40]!r}, not a number; shown as unknown")
            return None
        return value

    def json(self, name: str, kind: type[_T], fallback: _T, *, then: str) -> _T:
        raw = self.get(name)
        return fallback if raw == "" else json_or_report(self.key, f"field {name}", raw, kind, fallback, then=then)


def _f(value: str) -> float | None:
    """A number stl wrote, or None ("" or anything else; see Fields.number for one that reports it)."""
    try:
        number = float(value) if value != "" else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


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
    # Its stage checkpoints to give the device up: "yielding to <user>" (preempted for their waiting stage) or
    # "stopping" (its worker was told to stop); "" while it runs on.
    yielding: str = ""

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
    paused: str = ""  # why it takes no work: a fault of its machine (stl.jobs.health)
    sharing: str = ""  # how stages share its GPU: "MPS", "time-slicing" or "cpu" (stl.worker.device_memory)
    device: str = ""  # "<host>:gpu0": its slots share it (stl.worker.slots); "" from an older stl
    slot: int = 1  # which of the device's `slots` this worker is
    slots: int = 1
    waiting: str = ""  # why its next stage waits: "stage <id> needs 9.0 GiB, 6.1 GiB free" (admission by memory)

    @property
    def disk_low(self) -> bool:
        from stl.jobs.disk_space import disk_is_low

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
    flat, damaged = conn.eval(_BULK_HMGET, 1, index, keys.run(""), *RUN_FIELDS)
    for run_id in damaged:
        report_damaged(keys.run(text(run_id)), "not a hash, so not a run record; left out")
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
        answers = answers_or_report(pipe, [keys.stage(sid) for sid in running_stages], None)
        for sid, raw in zip(running_stages, answers, strict=True):
            if raw is not None:
                stage_info[sid] = dict(zip(STAGE_PROGRESS_FIELDS, map(text, raw), strict=True))
    now = time.time()
    return [row for r in records
            if r["id"] and (row := _run_row_or_report(r, stage_info.get(r["current_stage"]), now)) is not None]


def _run_row_or_report(record: dict[str, str], stage: dict[str, str] | None, now: float) -> RunRow | None:
    return read_or_report(keys.run(record["id"]), "cannot be read", lambda: _run_row(record, stage, now), None,
                          then="the run is left out")


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
    for run_id in answer.get("damaged") or []:
        report_damaged(keys.run(str(run_id)), "not a hash, so not a run record; left out")
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
        if key.count("\t") != 2:  # a grid or user name with a tab in it: not one stl wrote
            report_damaged(keys.RUNS, f"{n} run(s) name a grid or user with a tab in it; not counted")
            continue
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


def _run_row(raw_record: dict[str, str], raw_stage: dict[str, str] | None, now: float) -> RunRow:
    record = Fields(keys.run(raw_record["id"]), raw_record)
    stage = Fields(keys.stage(record.get("current_stage")), raw_stage) if raw_stage else None
    n_stages = int(record.number("n_stages") or 1)
    done = int(record.number("stages_done") or 0)
    row = RunRow(
        id=record.get("id"), grid=record.get("grid"), user=record.get("user"), priority=record.get("priority"),
        status=record.get("status"), progress=0.0,
        cell=record.json("cell", dict, {}, then="the run is shown without its cell"),
        created_at=record.number("created_at"), started_at=record.number("started_at"),
        ended_at=record.number("ended_at"), error=record.get("error"),
    )
    fraction = 0.0
    if stage and row.status == RunStatus.running.value:
        row.stage = stage.get("kind")
        step, total = int(stage.number("step") or 0), int(stage.number("total") or 0)
        row.step, row.total = step, total or None
        row.loss = stage.number("loss", finite=False)  # a loss that overflowed is shown as inf
        row.samples_per_s = stage.number("samples_per_s")
        row.mfu = stage.number("mfu")
        if stage.get("preempt"):
            for_user = stage.get("preempted_for")
            row.yielding = f"yielding to {for_user}" if for_user else "stopping"
        started = stage.number("started_at")
        row.elapsed_s = now - started if started else None
        if total and step:
            fraction = min(step / total, 1.0)
        eta, eta_at = stage.number("eta_s"), stage.number("eta_at")
        if eta is not None and eta_at is not None:
            # The work horse's estimate from its pace since its first report (load and compile left out),
            # counted down since it was written.
            row.eta_s = max(eta - (now - eta_at), 0.0)
        elif total and step and row.elapsed_s:
            row.eta_s = row.elapsed_s * (total - step) / step
    work_total, work_done = record.number("work_total"), record.number("work_done")
    work = stage.number("work") if stage else None
    if row.status == RunStatus.finished.value:
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
    for name, raw in zip(names, answers_or_report(pipe, [keys.worker(n) for n in names], {}), strict=True):
        record = Fields(keys.worker(name), {text(k): text(v) for k, v in raw.items()})
        if not record.values:
            continue  # its record expired: the worker is gone
        last_seen = record.number("heartbeat")
        state = record.get("state") or "?"
        if last_seen is not None and now - last_seen > WORKER_STALE_S:
            state = "lost"
        rows.append(WorkerRow(
            name=name, host=record.get("host"), gpu=record.get("gpu") or "cpu",
            gpu_util=record.number("gpu_util"), gpu_mem_used_mb=record.number("gpu_mem_used_mb"),
            gpu_mem_total_mb=record.number("gpu_mem_total_mb"), state=state,
            stage=record.get("stage"), last_seen=last_seen,
            disk_free_bytes=record.number("home_free_bytes"),
            disk_total_bytes=record.number("home_total_bytes"),
            paused=record.get("paused") if state == "paused" else "",
            sharing=record.get("sharing"), device=record.get("device"), slot=int(record.number("slot") or 1),
            slots=int(record.number("slots") or 1), waiting=record.get("waiting"),
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


def run_rows(conn: redis.Redis, run_ids: list[str]) -> list[RunRow]:
    """These runs as `stl status --json` shows them (typed, with progress); unknown ids are left out."""
    if not run_ids:
        return []
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hmget(keys.run(run_id), *RUN_FIELDS)
    answers = answers_or_report(pipe, [keys.run(run_id) for run_id in run_ids], None)
    records = [dict(zip(RUN_FIELDS, map(text, raw), strict=True)) for raw in answers if raw is not None]
    return _with_progress(conn, records)


def run_status(conn: redis.Redis, run_id: str) -> str:
    return text(conn.hget(keys.run(run_id), "status"))
