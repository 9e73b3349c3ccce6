"""One run beyond its status row: its log (`stl logs`), its cell and its training-loss curve (`stl plot`)."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import DamagedRecord, NotFound
from stl.jobs.queue.records import Fields, answers_or_report, json_or_report, read_or_report, report_damaged
from stl.jobs.states import StageKind


def _run_field(conn: redis.Redis, run_id: str, name: str) -> str | None:
    """One field of a run's record (None: no such run); DamagedRecord where the key is not a hash."""
    key = keys.run(run_id)
    try:
        raw = conn.hget(key, name)
    except redis.ResponseError as e:
        raise DamagedRecord(f"damaged record {key}: not a hash, so not a run record ({e})") from e
    return None if raw is None else text(raw)


def _stage_ids(conn: redis.Redis, run_id: str) -> list[str]:
    """The stages a run needs, in order; NotFound for no such run, DamagedRecord where they cannot be read."""
    raw = _run_field(conn, run_id, "stages")
    if raw is None:
        raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
    try:
        stage_ids = json.loads(raw)
        if not isinstance(stage_ids, list) or not all(isinstance(sid, str) for sid in stage_ids):
            raise TypeError("not a list of stage ids")
    except (ValueError, TypeError) as e:
        raise DamagedRecord(f"damaged record {keys.run(run_id)}: field stages is not what stl writes ({e}); "
                            "the run's stages cannot be found") from e
    return stage_ids


def _log_line(key: str, raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        report_damaged(key, "a line is not UTF-8; it is shown with \\x escapes for the bytes that are not")
        return text(raw)


def run_log(conn: redis.Redis, run_id: str, *, start: dict[str, int] | None = None) -> tuple[list[str], dict[str, int]]:
    """New log lines of every stage of a run, and where to continue from (for `stl logs -f`)."""
    positions = dict(start or {})
    lines: list[str] = []
    for sid in _stage_ids(conn, run_id):
        offset, key = positions.get(sid, 0), keys.stage_log(sid)
        nothing: list[bytes | str] = []
        raw = read_or_report(key, "not a list of log lines",
                             functools.partial(conn.lrange, key, offset, -1), nothing)
        new = [_log_line(key, line) for line in raw]
        lines += new
        positions[sid] = offset + len(new)
    return lines, positions


def run_cell(conn: redis.Redis, run_id: str) -> dict[str, Any]:
    raw = _run_field(conn, run_id, "cell")
    if raw is None:
        raise NotFound(f'no run with id "{run_id}"; `stl status --json` lists run ids')
    return Fields(keys.run(run_id), {"cell": raw}).json("cell", dict, {}, then="the run is shown without its cell")


def loss_curve(conn: redis.Redis, run_id: str) -> tuple[list[tuple[int, float]], list[str]]:
    """The training-loss curve of a run: each training stage's steps counted on from where the stage it
    starts from ended (a few-shot stage after MTL step 1000 starts at 1001; two few-shot stages of the same
    MTL model both do, as branches), with a NaN loss between two stages (where a line must not join them).
    Also a name for each stage drawn, in order: its task for a few-shot stage (branches look alike), "" for MTL."""
    stage_ids = _stage_ids(conn, run_id)
    pipe = conn.pipeline(transaction=False)
    keys_read = []
    for sid in stage_ids:
        pipe.hget(keys.stage(sid), "spec")
        pipe.lrange(keys.stage_steps(sid), 0, -1)
        keys_read += [keys.stage(sid), keys.stage_steps(sid)]
    answers = answers_or_report(pipe, keys_read, None) if stage_ids else []
    points: list[tuple[int, float]] = []
    names: list[str] = []
    ends: dict[str, int] = {}  # the x where each stage's model was left: its children start there
    for index, sid in enumerate(stage_ids):
        spec, raw_steps = answers[2 * index], answers[2 * index + 1] or []
        fields = json_or_report(keys.stage(sid), "field spec", text(spec), dict, {},
                                then="its steps are drawn from step 0") if spec else {}
        parent = fields.get("parent")
        offset = ends.get(parent, 0) if isinstance(parent, str) else 0
        steps = _training_steps(keys.stage_steps(sid), raw_steps)
        ends[sid] = offset + max((step for step, _ in steps), default=0)
        if not steps:
            continue
        if points:  # a new stage (another task, or fine-tuning after MTL): the plot breaks the line here
            points.append((offset, math.nan))
        tasks = fields.get("tasks")
        tasks = tasks if isinstance(tasks, list) else []
        names.append(", ".join(map(str, tasks)) if fields.get("kind") == StageKind.finetune.value else "")
        points += [(offset + step, loss) for step, loss in steps]
    return points, names


def _training_steps(key: str, raw_steps: list[bytes]) -> list[tuple[int, float]]:
    """(step, loss) of a stage's step records, by step; a record that is not what stl writes is reported."""
    by_step: dict[int, float] = {}
    for raw in raw_steps:
        record = json_or_report(key, "a step record", text(raw), dict, {})
        step, loss = record.get("step"), record.get("loss")
        if record and (isinstance(step, bool) or not isinstance(step, int)):
            report_damaged(key, f"a step record has no step number ({text(raw)[:60]!r}); left out")
            continue
        # Evaluation reports progress without a loss (None or NaN): only training steps make the curve.
        if isinstance(step, int) and isinstance(loss, int | float) and not isinstance(loss, bool) and loss == loss:
            by_step[step] = float(loss)  # a stage resumed from its checkpoint reports steps again: the last counts
    return sorted(by_step.items())
