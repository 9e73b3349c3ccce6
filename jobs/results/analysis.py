"""Turn result rows into the study's tables: a pivot over grid axes, and effect sizes of one axis.

Everything here is a pure function over plain dicts (the result rows and run summaries the store
returns), so `stl results` needs neither torch nor matplotlib. cli/render_analysis.py renders what
these functions return as rich tables and Markdown / CSV / JSON text.

Result row: {"grid", "run", "cell": {axis: value}, "task", "task_type", "metric", "value"}.
Run summary: {"grid", "run", "cell", "status"}.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from stl.jobs.axes import render_value
from stl.jobs.errors import UsageError
from stl.jobs.metrics import TYPE_METRICS, metric_label
from stl.jobs.results.resampling import ComparedGroup, bootstrap_interval
from stl.jobs.states import LIVE

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

AxisValue = str | int | float | bool | None

GRID_AXIS = "grid"
SEED_AXIS = "seed"

RunKey = tuple[str, str]  # (grid, run id)


# ----------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class CellStat:
    """Mean ± sample std over the runs (seeds) of one pivot row that have a result for a column."""

    mean: float
    std: float
    n: int
    expected: int  # runs in the row, finished or not: n < expected means the grid is still going

    @property
    def complete(self) -> bool:
        return self.n >= self.expected


@dataclass(frozen=True)
class Column:
    name: str
    kind: Literal["type", "task"]
    metric: str
    task_type: str
    task: str | None = None  # the eval task of a "task" column


@dataclass(frozen=True)
class PivotRow:
    key: tuple[AxisValue, ...]
    cells: Mapping[str, CellStat | None]  # column name -> stat, None when no run has that result
    expected: int
    pending: int = 0  # runs of the row still queued or running


@dataclass(frozen=True)
class Pivot:
    row_axes: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: tuple[PivotRow, ...]
    folded: tuple[str, ...] = ("seed",)  # the axes a row's runs differ in (its samples)

    def type_columns(self) -> tuple[Column, ...]:
        return tuple(column for column in self.columns if column.kind == "type")


class EffectSpec(NamedTuple):
    axis: str
    a: str
    b: str


@dataclass(frozen=True)
class Comparison:
    """B against A for one combination of the other axes and one task type."""

    combo: tuple[tuple[str, AxisValue], ...]
    task_type: str
    a_mean: float | None
    b_mean: float | None
    n_a: int
    n_b: int
    relative: float | None  # (B - A) / A as a fraction; None when skipped
    skipped: str | None  # why there is no relative improvement


@dataclass(frozen=True)
class EffectReport:
    axis: str
    a: str
    b: str
    comparisons: tuple[Comparison, ...]
    overall: float | None  # plain mean of every compared relative improvement, as a fraction
    by_type: Mapping[str, float | None]
    # 95 % bootstrap interval of `overall`, over seeds and tasks (jobs/results/resampling.py); None: nothing to draw
    interval: tuple[float, float] | None = None

    @property
    def n_compared(self) -> int:
        return sum(1 for comparison in self.comparisons if comparison.relative is not None)

    @property
    def skipped_zero_baseline(self) -> int:
        return sum(1 for comparison in self.comparisons if comparison.skipped == ZERO_BASELINE)

    @property
    def skipped_missing(self) -> int:
        return sum(1 for comparison in self.comparisons if comparison.skipped not in (None, ZERO_BASELINE))


ZERO_BASELINE = "A is 0"


# ----------------------------------------------------------------------------------------------
# Values and axes


def _axis_value(grid: str, cell: Mapping[str, Any], axis: str) -> AxisValue:
    if axis == GRID_AXIS:
        return grid
    value = cell.get(axis)
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _cell_axes(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every axis named in the records' cells, in order of first appearance."""
    axes: dict[str, None] = {}
    for record in records:
        for axis in record.get("cell", {}):
            axes.setdefault(axis, None)
    return list(axes)


def _value_order(values: Sequence[AxisValue]) -> dict[AxisValue, int]:
    """Numbers sort numerically; anything else (model names, true/false) keeps first-seen order, which is
    the grid file's: runs are listed in the order the grid expands them."""
    distinct: list[AxisValue] = list(dict.fromkeys(values))
    numbers: list[int | float] = [
        value for value in distinct if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    if numbers and len(numbers) == len(distinct):
        distinct = [*sorted(numbers)]
    return {value: index for index, value in enumerate(distinct)}


def _sort_keys(keys: Iterable[tuple[AxisValue, ...]], width: int) -> list[tuple[AxisValue, ...]]:
    keys = list(dict.fromkeys(keys))
    orders = [_value_order([key[position] for key in keys]) for position in range(width)]
    return sorted(keys, key=lambda key: tuple(orders[i][value] for i, value in enumerate(key)))


# ----------------------------------------------------------------------------------------------
# Per-run scores


@dataclass(frozen=True)
class _RunScores:
    grid: str
    run: str
    cell: Mapping[str, Any]
    task_values: Mapping[tuple[str, str], float]  # (task, metric) -> value
    type_scores: Mapping[str, float]  # task type -> mean primary metric over its tasks
    type_tasks: Mapping[str, Mapping[str, float]]  # task type -> task -> primary metric


def _scores_by_run(rows: Iterable[Mapping[str, Any]]) -> dict[RunKey, _RunScores]:
    cells: dict[RunKey, Mapping[str, Any]] = {}
    values: dict[RunKey, dict[tuple[str, str], float]] = defaultdict(dict)
    typed: dict[RunKey, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        key = (str(row["grid"]), str(row["run"]))
        cells.setdefault(key, row.get("cell", {}))
        task, metric, value = str(row["task"]), str(row["metric"]), float(row["value"])
        values[key][(task, metric)] = value  # a re-evaluated task replaces the older value
        task_type = str(row["task_type"])
        if metric in TYPE_METRICS.get(task_type, ()):
            typed[key][task_type][task] = value
    return {
        key: _RunScores(
            grid=key[0],
            run=key[1],
            cell=cells[key],
            task_values=values[key],
            type_scores={
                task_type: statistics.fmean(by_task.values()) for task_type, by_task in typed[key].items()
            },
            type_tasks={task_type: dict(by_task) for task_type, by_task in typed[key].items()},
        )
        for key in cells
    }


def _columns(rows: Sequence[Mapping[str, Any]]) -> tuple[Column, ...]:
    present = {(str(row["task_type"]), str(row["task"]), str(row["metric"])) for row in rows}
    type_columns = []
    for task_type, metrics in TYPE_METRICS.items():
        found = [metric for metric in metrics if any(t == task_type and m == metric for t, _, m in present)]
        if found:  # several only where runs chose different ones: the label names each
            type_columns.append(Column(name=task_type, kind="type", metric="/".join(found), task_type=task_type))
    type_rank = {task_type: index for index, task_type in enumerate(TYPE_METRICS)}
    ordered = sorted(
        present, key=lambda item: (type_rank.get(item[0], len(type_rank)), item[0], item[1], item[2])
    )
    metrics_per_task: dict[str, int] = defaultdict(int)
    for _, task, _ in present:
        metrics_per_task[task] += 1
    taken = {column.name for column in type_columns}
    task_columns = []
    for task_type, task, metric in ordered:
        # A task with several metrics (or named like a task type) needs the metric in its name.
        clashes = metrics_per_task[task] > 1 or task in taken
        name = f"{task} ({metric_label(metric)})" if clashes else task
        task_columns.append(Column(name=name, kind="task", metric=metric, task_type=task_type, task=task))
    return (*type_columns, *task_columns)


def _column_value(scores: _RunScores, column: Column) -> float | None:
    if column.kind == "type":
        return scores.type_scores.get(column.task_type)
    return scores.task_values.get((str(column.task), column.metric))


def _stat(samples: Sequence[float], expected: int) -> CellStat | None:
    if not samples:
        return None
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return CellStat(
        mean=statistics.fmean(samples), std=std, n=len(samples), expected=max(expected, len(samples))
    )


# ----------------------------------------------------------------------------------------------
# Pivot


def pivot_axes(rows: Iterable[Mapping[str, Any]], runs: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Every axis `by` may name: "grid", then the cells' axes (seed included) in grid order."""
    return [GRID_AXIS, *(axis for axis in _cell_axes([*runs, *rows]) if axis != GRID_AXIS)]


def parse_where(texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """`--where AXIS=V[,V...]`, repeatable: which values of each named axis to keep. The axis and every value
    must occur in `records` (result rows and run summaries), so a typo is refused rather than empty."""
    usage = "write --where AXIS=VALUE[,VALUE...], e.g. --where shots=0 --where model=tiny:bart,tiny:t5"
    axes = pivot_axes(records)
    where: dict[str, frozenset[str]] = {}
    for text in texts:
        axis, equals, listed = text.partition("=")
        axis = axis.strip()
        values = [value.strip() for value in listed.split(",") if value.strip()]
        if not equals or not axis or not values:
            raise UsageError(f"malformed --where {text!r}: {usage}")
        if axis not in axes:
            raise UsageError(f"unknown axis {axis!r} in --where; valid axes: {', '.join(axes)}")
        known = {render_value(_axis_value(str(r.get("grid", "")), r.get("cell", {}), axis)) for r in records}
        missing = [value for value in values if value not in known]
        if missing:
            raise UsageError(f"--where {text!r}: {axis} has no value {', '.join(map(repr, missing))}; "
                             f"values in these results: {', '.join(sorted(known))}")
        where[axis] = where.get(axis, frozenset(values)) & frozenset(values)  # a repeated axis keeps both conditions
    return where


def filter_where(records: Iterable[Mapping[str, Any]], where: Mapping[str, frozenset[str]]) -> list[Any]:
    """The records (result rows or run summaries) whose cell has one of the kept values on every named axis."""
    return [
        record for record in records
        if all(render_value(_axis_value(str(record.get("grid", "")), record.get("cell", {}), axis)) in values
               for axis, values in where.items())
    ]


def build_pivot(
    rows: Iterable[Mapping[str, Any]],
    runs: Iterable[Mapping[str, Any]] = (),
    *,
    by: list[str] | None = None,
) -> Pivot:
    """One pivot row per combination of the row axes; mean ± std over the seeds in each.

    Default row axes: every cell axis except seed, in grid order, led by "grid" when the rows
    span several grids. An empty `by` means the default too. When `by` folds axes away, every run
    in a row counts as one sample.
    """
    rows, runs = list(rows), list(runs)
    valid_axes = pivot_axes(rows, runs)
    if by:
        unknown = [axis for axis in by if axis not in valid_axes]
        if unknown:
            raise UsageError(
                f"unknown axis {', '.join(map(repr, unknown))} in --by; valid axes: {', '.join(valid_axes)}"
            )
        if len(set(by)) != len(by):
            raise UsageError(f"--by names an axis twice: {', '.join(by)}; name each axis once")
        row_axes = tuple(by)
    else:
        grids = {str(record["grid"]) for record in [*runs, *rows]}
        cell_axes = [axis for axis in valid_axes if axis not in (GRID_AXIS, SEED_AXIS)]
        row_axes = tuple([GRID_AXIS, *cell_axes] if len(grids) > 1 else cell_axes)

    scores = _scores_by_run(rows)
    columns = _columns(rows)

    def row_key(grid: str, cell: Mapping[str, Any]) -> tuple[AxisValue, ...]:
        return tuple(_axis_value(grid, cell, axis) for axis in row_axes)

    runs_per_key: dict[tuple[AxisValue, ...], set[RunKey]] = defaultdict(set)
    for record in runs:
        runs_per_key[row_key(str(record["grid"]), record.get("cell", {}))].add(
            (str(record["grid"]), str(record["run"]))
        )
    for run_key, run_scores in scores.items():
        runs_per_key[row_key(run_scores.grid, run_scores.cell)].add(run_key)

    live = {(str(r["grid"]), str(r["run"])) for r in runs if r.get("status") in LIVE}
    pivot_rows = []
    for key in _sort_keys(runs_per_key, len(row_axes)):
        members = sorted(runs_per_key[key])
        expected = len(members)
        cells: dict[str, CellStat | None] = {}
        for column in columns:
            samples = [
                value
                for member in members
                if member in scores and (value := _column_value(scores[member], column)) is not None
            ]
            cells[column.name] = _stat(samples, expected)
        pending = sum(member in live for member in members)
        pivot_rows.append(PivotRow(key=key, cells=cells, expected=expected, pending=pending))
    records = [*runs, *rows]
    folded = tuple(axis for axis in valid_axes if axis not in row_axes and axis != GRID_AXIS and len(
        {_axis_value(str(r["grid"]), r.get("cell", {}), axis) for r in records}) > 1)
    return Pivot(row_axes=row_axes, columns=columns, rows=tuple(pivot_rows), folded=folded)


# ----------------------------------------------------------------------------------------------
# Effect sizes


def parse_effect(text: str, rows: Iterable[Mapping[str, Any]] | None = None) -> EffectSpec:
    """Parse `AXIS=A:B` ("B compared with A"). With `rows`, check the axis and both values exist.

    Values may contain ':' (model names like tiny:bart); `rows` then decide where A ends.
    """
    axis, values, splits = _effect_parts(text)
    if rows is None:
        if len(splits) > 1:
            raise UsageError(
                f"--effect {text!r} is ambiguous: more than one ':' and no results to tell A from B"
            )
        return _checked_effect(axis, *splits[0])
    rows = list(rows)
    known = _effect_values(rows, axis)
    matching = [(a, b) for a, b in splits if a in known and b in known]
    if len(matching) == 1:
        return _checked_effect(axis, *matching[0])
    if len(matching) > 1:
        options = " or ".join(f"{a} vs {b}" for a, b in matching)
        raise UsageError(f"--effect {text!r} is ambiguous: {options}")
    if len(splits) > 1:
        raise UsageError(f"--effect {text!r}: {values!r} does not split into two values of {axis} at any ':'; "
                         f"values in these results: {', '.join(sorted(known)) or 'none'}")
    a, b = splits[0]
    missing = [value for value in (a, b) if value not in known]
    raise UsageError(
        f"--effect {text!r}: {axis} has no value {', '.join(map(repr, missing))}; "
        f"values in these results: {', '.join(sorted(known)) or 'none'}"
    )


def check_effect_syntax(text: str) -> None:
    """What can be checked of `--effect` before there are results: its form, and that it compares two values
    of an axis the study varies (whether they exist needs results)."""
    axis, _, splits = _effect_parts(text)
    if axis == SEED_AXIS or len(splits) == 1:
        _checked_effect(axis, *splits[0])


def _effect_parts(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(axis, the values as written, every way to split them into A:B at a ':')."""
    usage = "write --effect AXIS=A:B, e.g. --effect mtl=none:in-domain (B is compared with A)"
    axis, equals, values = text.strip().partition("=")
    axis = axis.strip()
    if not equals or not axis:
        raise UsageError(f"malformed --effect {text!r}: {usage}")
    if "=" in values:
        raise UsageError(f"--effect {text!r} names more than one axis: one effect at a time; {usage}")
    splits = [
        (values[:index].strip(), values[index + 1 :].strip())
        for index, char in enumerate(values)
        if char == ":" and values[:index].strip() and values[index + 1 :].strip()
    ]
    if not splits:
        raise UsageError(f"malformed --effect {text!r}: {usage}")
    return axis, values, splits


def _checked_effect(axis: str, a: str, b: str) -> EffectSpec:
    if axis == SEED_AXIS:
        raise UsageError("--effect compares the values of an axis the study varies; seeds are what each mean is "
                         "taken over (e.g. --effect mtl=none:in-domain)")
    if a == b:
        raise UsageError(f"--effect {axis}={a}:{b} compares a value with itself; name two different values")
    return EffectSpec(axis, a, b)


def _effect_values(rows: Sequence[Mapping[str, Any]], axis: str) -> set[str]:
    axes = pivot_axes(rows)
    if axis not in axes:
        raise UsageError(f"unknown axis {axis!r} in --effect; valid axes: {', '.join(axes)}")
    return {render_value(_axis_value(str(row["grid"]), row.get("cell", {}), axis)) for row in rows}


def effect_sizes(rows: Iterable[Mapping[str, Any]], *, axis: str, a: str, b: str) -> EffectReport:
    """Relative improvement (B − A) / A of each task type's score, per combination of the other axes.

    A and B are means over seeds of the per-type score (mean primary metric over that type's tasks).
    Combinations are keyed by every cell axis except seed and `axis`, so grids that differ only in
    `axis` compare with each other. Reports the plain mean over all compared (combination, type)
    pairs, and per type; pairs with A = 0 or a missing side are listed but not averaged.
    """
    rows = list(rows)
    known = _effect_values(rows, axis)
    for value in (a, b):
        if value not in known:
            raise UsageError(
                f"{axis} has no value {value!r}; values in these results: {', '.join(sorted(known))}"
            )
    _checked_effect(axis, a, b)

    combo_axes = [name for name in _cell_axes(rows) if name not in (SEED_AXIS, axis, GRID_AXIS)]
    samples: dict[tuple[tuple[AxisValue, ...], str], dict[str, list[float]]] = defaultdict(
        lambda: {"a": [], "b": []}
    )
    run_tasks: dict[tuple[tuple[AxisValue, ...], str], dict[str, list[Mapping[str, float]]]] = defaultdict(
        lambda: {"a": [], "b": []}
    )
    for scores in _scores_by_run(rows).values():
        side_value = render_value(_axis_value(scores.grid, scores.cell, axis))
        side = "a" if side_value == a else "b" if side_value == b else None
        if side is None:
            continue
        combo = tuple(_axis_value(scores.grid, scores.cell, name) for name in combo_axes)
        for task_type, score in scores.type_scores.items():
            samples[(combo, task_type)][side].append(score)
            run_tasks[(combo, task_type)][side].append(scores.type_tasks[task_type])

    type_rank = {task_type: index for index, task_type in enumerate(TYPE_METRICS)}
    combo_order = {
        combo: index for index, combo in enumerate(_sort_keys((c for c, _ in samples), len(combo_axes)))
    }
    comparisons = []
    for combo, task_type in sorted(
        samples, key=lambda item: (combo_order[item[0]], type_rank.get(item[1], 99), item[1])
    ):
        sides = samples[(combo, task_type)]
        a_mean = statistics.fmean(sides["a"]) if sides["a"] else None
        b_mean = statistics.fmean(sides["b"]) if sides["b"] else None
        relative: float | None = None
        if a_mean is None:
            skipped: str | None = f"no {axis}={a} results"
        elif b_mean is None:
            skipped = f"no {axis}={b} results"
        elif a_mean == 0:
            skipped = ZERO_BASELINE  # a relative gain over nothing is undefined
        else:
            skipped, relative = None, (b_mean - a_mean) / a_mean
        comparisons.append(
            Comparison(
                combo=tuple(zip(combo_axes, combo, strict=True)),
                task_type=task_type,
                a_mean=a_mean,
                b_mean=b_mean,
                n_a=len(sides["a"]),
                n_b=len(sides["b"]),
                relative=relative,
                skipped=skipped,
            )
        )

    def mean_of(selected: Iterable[Comparison]) -> float | None:
        relatives = [comparison.relative for comparison in selected if comparison.relative is not None]
        return statistics.fmean(relatives) if relatives else None

    task_types = list(dict.fromkeys(comparison.task_type for comparison in comparisons))
    compared = {(tuple(value for _, value in c.combo), c.task_type) for c in comparisons if c.relative is not None}
    return EffectReport(
        axis=axis,
        a=a,
        b=b,
        comparisons=tuple(comparisons),
        overall=mean_of(comparisons),
        interval=bootstrap_interval([
            ComparedGroup(task_type, sides["a"], sides["b"])
            for (combo, task_type), sides in run_tasks.items()
            if (combo, task_type) in compared
        ]),
        by_type={
            task_type: mean_of(c for c in comparisons if c.task_type == task_type) for task_type in task_types
        },
    )
