"""Reading the results of finished runs out of Redis: one row per run and eval task, for `stl results`."""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.records import answers_or_report, list_runs, read_or_report

if TYPE_CHECKING:
    import redis


def result_rows(conn: redis.Redis, grid: str) -> list[dict[str, Any]]:
    """One row per run x eval task: {grid, run, cell, task, task_type, metric, value, metrics}: the primary
    metric and its value, and every metric the stage recorded."""
    runs = list_runs(conn, grid=grid)
    rows: list[dict[str, Any]] = []
    for run, results in zip(runs, read_results(conn, [run.id for run in runs]), strict=True):
        for task, result in results.items():
            rows.append({"grid": grid, "run": run.id, "cell": run.cell, "task": task,
                         "task_type": result["task_type"], "metric": result["metric"],
                         "value": result["value"],
                         "metrics": result.get("metrics") or {result["metric"]: result["value"]}})
    return rows


def read_results(conn: redis.Redis, run_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
    """Each run's results, task -> {task_type, metric, value, ...}, tasks in order; a result that is not
    what stl writes is reported and left out."""
    if not run_ids:
        return []
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hgetall(keys.run_results(run_id))
    keys_read = [keys.run_results(run_id) for run_id in run_ids]
    out = []
    for key, raw in zip(keys_read, answers_or_report(pipe, keys_read, {}), strict=True):
        results = {}
        for task, value in sorted((text(k), text(v)) for k, v in raw.items()):
            result = read_or_report(key, f"the result of task {task} is not what stl writes",
                                    functools.partial(_result, value), None)
            if result is not None:
                results[task] = result
        out.append(results)
    return out


def _result(raw: str) -> dict[str, Any]:
    result = json.loads(raw)
    if not isinstance(result, dict):
        raise TypeError(f"a JSON {type(result).__name__}, not an object")
    missing = [name for name in ("task_type", "metric", "value") if name not in result]
    if missing:
        raise ValueError(f"it has no {' and no '.join(missing)}")
    value = result["value"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"its value {value!r} is not a number")
    if not isinstance(result["task_type"], str) or not isinstance(result["metric"], str):
        raise TypeError("its task_type or metric is not text")
    metrics = result.get("metrics")
    if metrics is not None and not (isinstance(metrics, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in metrics.values())):
        raise ValueError("its metrics are not numbers")
    return result
