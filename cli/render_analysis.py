"""What `stl results` prints of jobs/results/analysis.py's pivot and effect sizes: rich tables, and Markdown, CSV and
JSON text. Pure functions of their arguments; rich is imported inside the functions that build tables.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from stl.jobs.axes import EMPTY_VALUE, render_value
from stl.jobs.codec import printable
from stl.jobs.metrics import metric_label

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from rich.table import Table

    from stl.jobs.results.analysis import AxisValue, CellStat, Column, EffectReport, Pivot, PivotRow


def column_header(column: Column) -> str:
    """`classification` over `(mean accuracy)` for a task type's column; a task's names its metric."""
    metric = metric_label(column.metric)
    return f"{column.name}\n(mean {metric})" if column.kind == "type" else f"{column.name}\n({metric})"


def format_stat(stat: CellStat | None, *, digits: int = 3, count: bool = True) -> str:
    """`0.523 ± 0.012 (n=3)`, or `(n=2/3)` while some runs of the row have no result yet. Without
    `count`, a complete cell leaves its n out (the caption says it)."""
    if stat is None:
        return EMPTY_VALUE
    # One run has no spread to report: "± 0.000" would read as zero variance.
    text = f"{stat.mean:.{digits}f}" if stat.n < 2 else f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"
    if not stat.complete:
        return f"{text} (n={stat.n}/{stat.expected})"
    return f"{text} (n={stat.n})" if count else text


def format_row_cell(row: PivotRow, column: Column, *, digits: int = 3, count: bool = True) -> str:
    """`format_stat` of the row's cell; a cell with no result while runs of its row are queued or running
    says so (`— (n=0/2)`) instead of reading as missing data."""
    stat = row.cells[column.name]
    if stat is None and row.pending:
        return f"{EMPTY_VALUE} (n=0/{row.expected})"
    return format_stat(stat, digits=digits, count=count)


def format_percent(fraction: float | None) -> str:
    """+31.1 % — rounded half-up after dropping float noise, so 0.3105 never prints as 31.0."""
    if fraction is None:
        return EMPTY_VALUE
    percent = Decimal(f"{fraction * 100:.9f}").quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{percent:+} %"


def type_columns_only(pivot: Pivot) -> Pivot:
    """The pivot without per-task columns: the compact view when a grid evaluates many tasks."""
    return replace(pivot, columns=pivot.type_columns())


def pivot_headers(pivot: Pivot) -> list[str]:
    return [*pivot.row_axes, *(column_header(column).replace("\n", " ") for column in pivot.columns)]


def pivot_table_rows(pivot: Pivot, *, count: bool = True) -> list[list[str]]:
    """The pivot as rows of display strings: axis values, then one formatted stat per column."""
    return [
        [
            *(render_value(value) for value in row.key),
            *(format_row_cell(row, c, count=count) for c in pivot.columns),
        ]
        for row in pivot.rows
    ]


def constant_axes(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The axes that hold one value in every record (none when there are fewer than two records): a
    terminal table says them once, in its title."""
    if len(records) < 2:
        return {}
    first = records[0]
    return {axis: value for axis, value in first.items() if all(r.get(axis) == value for r in records)}


def without_constant_axes(pivot: Pivot) -> tuple[Pivot, list[tuple[str, AxisValue]]]:
    """The pivot without the row axes that hold one value in every row, and those (axis, value) pairs.
    A one-row pivot keeps its axes."""
    constant = constant_axes([dict(zip(pivot.row_axes, row.key, strict=True)) for row in pivot.rows])
    if not constant:
        return pivot, []
    kept = [i for i, axis in enumerate(pivot.row_axes) if axis not in constant]
    rows = tuple(replace(row, key=tuple(row.key[i] for i in kept)) for row in pivot.rows)
    return replace(pivot, row_axes=tuple(pivot.row_axes[i] for i in kept), rows=rows), list(constant.items())


def uniform_count(pivot: Pivot) -> int | None:
    """The n every cell of the pivot shares when all are complete; None when they differ or some wait."""
    stats = [stat for row in pivot.rows for stat in row.cells.values() if stat is not None]
    counts = {stat.n for stat in stats}
    if not stats or len(counts) != 1 or not all(stat.complete for stat in stats) or any(r.pending for r in pivot.rows):
        return None
    return counts.pop()


def build_pivot_table(pivot: Pivot, *, title: str | None = None, width: int | None = None) -> Table:
    """Rich table; the best mean of each column is bold, rows still waiting for runs are yellow.

    Axes with one value in every row go into the title. Given the terminal's `width`, a table that
    would not fit drops its per-task columns (the per-type means stay) rather than wrap every cell.
    """
    shown, fixed = without_constant_axes(pivot)
    if fixed:
        constant = ", ".join(f"{axis} = {render_value(value)}" for axis, value in fixed)
        title = f"{title}: {constant}" if title else constant
    table = _pivot_table(shown, title=title, hidden_tasks=False)
    if width is not None and len(shown.type_columns()) < len(shown.columns) and table_width(table) > width:
        table = _pivot_table(type_columns_only(shown), title=title, hidden_tasks=True)
    return table


def _pivot_table(pivot: Pivot, *, title: str | None, hidden_tasks: bool) -> Table:
    from rich.text import Text

    from stl.jobs.display import LiteralTable as Table  # task and model names are shown as written, not as markup
    from stl.jobs.display import literal

    n = uniform_count(pivot)
    over = ("" if not pivot.folded else f" (one per {pivot.folded[0]})" if len(pivot.folded) == 1
            else f" (differing in {', '.join(pivot.folded)})")
    caption = ["one run per row: no spread to report" if n == 1
               else f"mean ± sample std over each row's {n} runs{over}" if n is not None
               else f"mean ± sample std over each row's n runs{over}"]
    if any(row.pending or any(stat is not None and not stat.complete for stat in row.cells.values())
           for row in pivot.rows):
        caption.append("n=k/m: k of the row's m runs have this result (the others are queued, running, failed "
                       "or canceled)")
    if hidden_tasks:
        caption.append("per-task columns hidden at this width: widen the terminal, or use --markdown or --csv")
    table = Table(title=title, caption="; ".join(caption), show_lines=False)
    for axis in pivot.row_axes:
        table.add_column(axis, no_wrap=True)
    for column in pivot.columns:
        table.add_column(column_header(column), justify="right", style="bold cyan" if column.kind == "type" else None)
    best = {
        column.name: max(
            (s.mean for row in pivot.rows if (s := row.cells[column.name]) is not None), default=None
        )
        for column in pivot.columns
    }
    for row, strings in zip(pivot.rows, pivot_table_rows(pivot, count=n is None), strict=True):
        cells = [literal(text) for text in strings[: len(pivot.row_axes)]]
        for column, text in zip(pivot.columns, strings[len(pivot.row_axes) :], strict=True):
            stat = row.cells[column.name]
            waiting = row.pending if stat is None else not stat.complete
            style = "yellow" if waiting else "dim" if stat is None else ""
            if stat is not None and stat.mean == best[column.name] and len(pivot.rows) > 1:
                style += " bold"
            cells.append(Text(text, style=style.strip()))
        table.add_row(*cells)
    return table


def table_width(table: Table) -> int:
    """Columns the table needs to print without wrapping a cell."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=100_000)
    return Measurement.get(console, console.options, table).maximum


def effect_summary(report: EffectReport) -> list[tuple[str, str]]:
    """(label, rendered mean) per task type, then overall: the lines a draft quotes."""
    lines = [(f"mean {task_type}", format_percent(value)) for task_type, value in report.by_type.items()]
    overall = format_percent(report.overall)
    if report.overall is not None:
        interval = ""
        if report.interval is not None:
            interval = f"95 % CI {format_percent(report.interval[0])} to {format_percent(report.interval[1])}, "
        overall += f" ({interval}{report.n_compared} compared)"
    lines.append(("mean overall", overall))
    return lines


def effect_table_rows(report: EffectReport) -> list[list[str]]:
    """One row per comparison: combo axis values, task type, A, B, relative improvement (or why not)."""
    return [
        [
            *(render_value(value) for _, value in comparison.combo),
            comparison.task_type,
            _format_side(comparison.a_mean, comparison.n_a),
            _format_side(comparison.b_mean, comparison.n_b),
            format_percent(comparison.relative)
            if comparison.skipped is None
            else f"skipped: {comparison.skipped}",
        ]
        for comparison in report.comparisons
    ]


def _format_side(mean: float | None, n: int) -> str:
    return EMPTY_VALUE if mean is None else f"{mean:.3f} (n={n})"


def build_effect_table(report: EffectReport, *, title: str | None = None) -> Table:
    """Rich table of every comparison, then the mean relative improvement per task type and overall."""
    from rich.text import Text

    from stl.jobs.display import LiteralTable as Table
    from stl.jobs.display import literal

    combo_axes = [name for name, _ in report.comparisons[0].combo] if report.comparisons else []
    # Axes with one value in every comparison are said once, in the title, as in the pivot.
    constant = constant_axes([dict(comparison.combo) for comparison in report.comparisons])
    fixed = ", ".join(f"{axis} = {render_value(value)}" for axis, value in constant.items())
    skipped = []
    if report.skipped_zero_baseline:
        skipped.append(f"{report.skipped_zero_baseline} with A = 0")
    if report.skipped_missing:
        skipped.append(f"{report.skipped_missing} missing A or B")
    caption = f"(B − A) / A, A and B = mean over seeds of the task type's score; {report.n_compared} compared"
    if skipped:
        caption += f"; skipped {', '.join(skipped)}"
    title = title or f"Effect of {report.axis}: {report.b} vs {report.a}"
    table = Table(title=f"{title}\n{fixed}" if fixed else title, caption=caption)
    shown = [i for i, axis in enumerate(combo_axes) if axis not in constant]
    for i in shown:
        table.add_column(combo_axes[i], no_wrap=True)
    table.add_column("task type")
    table.add_column(f"A: {report.axis}={report.a}", justify="right")
    table.add_column(f"B: {report.axis}={report.b}", justify="right")
    table.add_column("(B − A) / A", justify="right")
    rows = effect_table_rows(report)
    for index, (comparison, strings) in enumerate(zip(report.comparisons, rows, strict=True)):
        style = "dim" if comparison.skipped else "green" if (comparison.relative or 0) > 0 else "red"
        last = index == len(rows) - 1
        combo = [strings[i] for i in shown]
        table.add_row(*combo, *strings[len(combo_axes):-1], Text(strings[-1], style=style), end_section=last)
    for label, value in effect_summary(report):
        padding = [""] * len(shown)
        table.add_row(*padding, literal(label, style="bold"), "", "", Text(value, style="bold"))
    return table


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]], n_left: int) -> str:
    """A pipe table; each cell shows its text as written once rendered: `|` and HTML (`<script>`) escaped,
    control characters as escapes."""
    def cell_text(cell: str) -> str:
        return html.escape(printable(cell), quote=False).replace("|", "\\|")

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell_text(cell) for cell in cells) + " |"

    alignment = ["---"] * n_left + ["---:"] * (len(headers) - n_left)
    return "\n".join([line(headers), line(alignment), *(line(row) for row in rows)]) + "\n"


def pivot_to_markdown(pivot: Pivot) -> str:
    """GitHub pipe table, for pasting into a draft."""
    return markdown_table(pivot_headers(pivot), pivot_table_rows(pivot), len(pivot.row_axes))


def effect_to_markdown(report: EffectReport) -> str:
    """Every comparison as a pipe table, then the mean relative improvements."""
    combo_axes = [name for name, _ in report.comparisons[0].combo] if report.comparisons else []
    headers = [*combo_axes, "task type", f"A = {report.a}", f"B = {report.b}", "(B − A) / A"]
    table = markdown_table(headers, effect_table_rows(report), len(combo_axes) + 1)
    means = "\n".join(f"- {label}: **{value}**" for label, value in effect_summary(report))
    title = html.escape(printable(f"Effect of {report.axis}: {report.b} vs {report.a}"), quote=False)
    return f"{title}\n\n{table}\n{means}\n"


def pivot_to_csv(pivot: Pivot) -> str:
    """Wide CSV: axis values, runs in the row, then mean / std / n per column (blank when empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stat_headers = [f"{column.name} {part}" for column in pivot.columns for part in ("mean", "std", "n")]
    writer.writerow([printable(name) for name in (*pivot.row_axes, "runs", *stat_headers)])
    for row in pivot.rows:
        stats: list[object] = []
        for column in pivot.columns:
            stat = row.cells[column.name]
            stats.extend(("", "", 0) if stat is None else (repr(stat.mean), repr(stat.std), stat.n))
        writer.writerow(
            [*("" if value is None else printable(render_value(value)) for value in row.key), row.expected, *stats]
        )
    return buffer.getvalue()


def pivot_to_json(pivot: Pivot) -> dict[str, Any]:
    """JSON-ready dict: row axes, columns, and rows keyed by axis name."""
    return {
        "row_axes": list(pivot.row_axes),
        "columns": [
            {"name": column.name, "kind": column.kind, "metric": column.metric, "task_type": column.task_type}
            for column in pivot.columns
        ],
        "rows": [
            {
                "key": dict(zip(pivot.row_axes, row.key, strict=True)),
                "runs": row.expected,
                "pending": row.pending,
                "cells": {column.name: _stat_json(row.cells[column.name]) for column in pivot.columns},
            }
            for row in pivot.rows
        ],
    }


def _stat_json(stat: CellStat | None) -> dict[str, float | int] | None:
    if stat is None:
        return None
    return {"mean": stat.mean, "std": stat.std, "n": stat.n, "expected": stat.expected}


def effect_to_json(report: EffectReport) -> dict[str, Any]:
    """JSON-ready dict of an effect report; relative improvements are fractions (0.31 = +31 %)."""
    return {
        "axis": report.axis,
        "a": report.a,
        "b": report.b,
        "overall": report.overall,
        "interval_95": list(report.interval) if report.interval is not None else None,
        "by_type": dict(report.by_type),
        "compared": report.n_compared,
        "skipped_zero_baseline": report.skipped_zero_baseline,
        "skipped_missing": report.skipped_missing,
        "comparisons": [
            {
                "combo": dict(comparison.combo),
                "task_type": comparison.task_type,
                "a_mean": comparison.a_mean,
                "b_mean": comparison.b_mean,
                "n_a": comparison.n_a,
                "n_b": comparison.n_b,
                "relative": comparison.relative,
                "skipped": comparison.skipped,
            }
            for comparison in report.comparisons
        ],
    }
