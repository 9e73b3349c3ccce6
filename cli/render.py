"""Pure functions from rows to rich renderables. No Redis, no I/O: tested on their rows."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.text import Text

from stl.jobs.axes import format_cell
from stl.jobs.codec import printable
from stl.jobs.display import LiteralTable as Table  # every table shows its strings as written, never as markup
from stl.jobs.display import literal
from stl.jobs.humanize import format_bytes, format_duration

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from rich.console import RenderableType

    from stl.jobs.grid.parse import ExpandedGrid
    from stl.jobs.queue.disk import DiskUsage, PruneReport
    from stl.jobs.queue.queueing import SubmitReport
    from stl.jobs.queue.records import GridRow, RunRow, StatusSummary, WorkerRow
    from stl.jobs.queue.store import Store

STATUS_ORDER = ("queued", "running", "finished", "failed", "canceled")
STATUS_STYLE = {"queued": "yellow", "running": "cyan", "finished": "green", "failed": "red", "canceled": "dim"}


def summary_rows(counts: dict[tuple[str, str, str], int], key: str) -> list[list[str]]:
    """Counts per status, grouped by `user` or `grid`, from counts per (grid, user, status)."""
    position = {"grid": 0, "user": 1}[key]
    groups: dict[str, dict[str, int]] = {}
    for group_key, n in counts.items():
        row = groups.setdefault(group_key[position], dict.fromkeys(STATUS_ORDER, 0))
        row[group_key[2]] = row.get(group_key[2], 0) + n
    return [[name, *(str(row[s]) for s in STATUS_ORDER), str(sum(row.values()))]
            for name, row in sorted(groups.items())]


def build_summary_table(counts: dict[tuple[str, str, str], int], key: str) -> Table:
    table = Table(title=f"Runs per {key}", title_justify="left", expand=False)
    table.add_column(key, no_wrap=True)
    for status in STATUS_ORDER:
        table.add_column(status, justify="right", style=STATUS_STYLE[status])
    table.add_column("total", justify="right")
    rows = summary_rows(counts, key)
    for row in rows:
        table.add_row(*row)
    if not rows:
        table.add_row("—" if key != "grid" else "none queued or running", *([""] * len(STATUS_ORDER)), "0")
    return table


def running_rows(runs: list[RunRow]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        if run.status != "running":
            continue
        step = f"{run.step}/{run.total}" if run.total else "—"
        rows.append({
            "run": run.id[:10], "user": run.user, "grid": run.grid, "cell": format_cell(run.cell, short=True),
            "stage": (run.stage or "—") + (f", {run.yielding}" if run.yielding else ""),
            "progress": run.progress, "step": step,
            "loss": f"{run.loss:.4f}" if run.loss is not None else "—",
            "speed": (f"{run.samples_per_s:.1f} ex/s" if run.samples_per_s else "—")
            + (f" MFU {run.mfu:.0%}" if run.mfu is not None else ""),
            "elapsed": format_duration(run.elapsed_s, compact=True), "eta": format_duration(run.eta_s, compact=True),
        })
    return rows


RUNNING_COLUMNS = ("run", "user", "grid", "cell", "stage", "progress", "step", "loss", "speed", "elapsed", "eta")
# Narrow terminals lose these first (an 80-column one keeps run, cell, stage, progress and eta).
RUNNING_COLUMNS_DROPPED_FIRST = ("grid", "user", "elapsed", "loss", "speed", "step")
RIGHT_ALIGNED = frozenset({"step", "loss", "speed", "elapsed", "eta"})
# Progress is the run's (all its stages); step, loss, speed and eta are its current stage's.
RUNNING_HEADERS = {"progress": "run progress", "step": "stage step", "loss": "stage loss",
                   "eta": "stage eta"}


def running_columns(width: int | None) -> tuple[str, ...]:
    """The live table's columns for a terminal `width` columns wide (None: all of them)."""
    if width is None or width >= 120:
        return RUNNING_COLUMNS
    dropped = RUNNING_COLUMNS_DROPPED_FIRST[:3] if width >= 100 else RUNNING_COLUMNS_DROPPED_FIRST
    return tuple(name for name in RUNNING_COLUMNS if name not in dropped)


def build_running_table(runs: list[RunRow], width: int | None = None) -> Table:
    """The running runs; for a terminal `width` columns wide, the columns that fit (see running_columns),
    fewer still when long cells (grid names, cells) would not fit."""
    columns = running_columns(width)
    table = _running_table(runs, columns)
    while width is not None and runs and _fits(table) > width:
        fewer = next((tuple(c for c in columns if c != drop) for drop in RUNNING_COLUMNS_DROPPED_FIRST
                      if drop in columns), None)
        if fewer is None:
            break
        columns = fewer
        table = _running_table(runs, columns)
    return table


def _fits(table: Table) -> int:
    """Columns `table` needs to print without squeezing a cell."""
    from stl.cli.render_analysis import table_width  # only when runs are running: status starts without it

    return table_width(table)


def _running_table(runs: list[RunRow], columns: tuple[str, ...]) -> Table:
    hidden = [name for name in RUNNING_COLUMNS if name not in columns]
    caption = f"{', '.join(hidden)} hidden at this width; widen the terminal to see them" if hidden and runs else None
    table = Table(title="Running", title_justify="left", caption=caption, caption_justify="left")
    for name in columns:
        header = RUNNING_HEADERS.get(name, name)
        if name == "progress":
            table.add_column(header, min_width=12)
        else:
            table.add_column(header, justify="right" if name in RIGHT_ALIGNED else "left", overflow="fold",
                             no_wrap=name in ("run", "step", "eta", "elapsed"))
    rows = running_rows(runs)
    for row in rows:
        bar = ProgressBar(total=1.0, completed=row["progress"], width=8)
        cells = {**row, "progress": Group(bar, Text(f"{row['progress'] * 100:3.0f}%"))}
        table.add_row(*(cells[name] for name in columns))
    if not rows:
        table.add_row(*("nothing running" if name == "cell" else "—" if name == "run" else "" for name in columns))
    return table


def worker_rows(workers: list[WorkerRow]) -> list[list[str]]:
    rows = []
    for w in workers:
        if w.gpu == "cpu":
            gpu = "cpu"
        else:
            util = f"{w.gpu_util:.0f}%" if w.gpu_util is not None else "?"
            mem = (f"{(w.gpu_mem_used_mb or 0) / 1024:.1f}/{(w.gpu_mem_total_mb or 0) / 1024:.1f} GiB"
                   if w.gpu_mem_total_mb else "?")
            gpu = f"{w.gpu} {util} {mem}" + (f" ({w.sharing})" if w.sharing and w.sharing != "cpu" else "")
        seen = format_duration(time.time() - w.last_seen, compact=True) + " ago" if w.last_seen else "—"
        disk = "?" if w.disk_free_bytes is None else format_bytes(int(w.disk_free_bytes)) + " free"
        rows.append([w.name, w.host, gpu, w.state, w.stage[:12] or "—", seen, disk])
    return rows


def build_workers_table(workers: list[WorkerRow], store: Store | None = None) -> Table:
    """`store`: the STL_HOME the queue's workers share (stl.jobs.queue.store), named in the title."""
    low = sorted({w.host for w in workers if w.disk_low})
    caption = (f"STL_HOME is running out of space on {', '.join(low)}: `stl disk` shows what takes it; "
               "`stl disk --prune finetune` frees few-shot models of finished runs") if low else None
    from stl.jobs.health import HEALTH_CHECK_EVERY_S

    paused = [f"{w.name} takes no work: {w.paused}; it tries the machine every "
              f"{HEALTH_CHECK_EVERY_S:.0f} s and goes on by itself"
              for w in workers if w.paused]
    waiting = [f"{w.name} waits for device memory: {w.waiting}" for w in workers if w.waiting]
    caption = "\n".join([*paused, *waiting, *([caption] if caption else [])]) or None
    title = "Workers" if store is None else f"Workers · STL_HOME {store.home} on {store.host} (store {store.short})"
    table = Table(title=title, title_justify="left", caption=caption, caption_style="bold red")
    for name in ("worker", "host", "gpu", "state", "stage", "seen", "STL_HOME disk"):
        table.add_column(name)
    rows = worker_rows(workers)
    for worker, row in zip(workers, rows, strict=True):
        state = literal(row[3], style="bold red" if worker.paused else "")
        table.add_row(*row[:3], state, *row[4:-1], literal(row[-1], style="bold red" if worker.disk_low else ""))
    if not rows:
        table.add_row("—", "", "", "no worker running: start one with `stl worker`", "", "", "")
    return table


def slot_rows(workers: list[WorkerRow]) -> list[list[str]]:
    """One row per slot of the devices that run several stages at once (`stl worker --slots N`), or whose
    worker says why a stage waits: device, slot, worker, state, stage, why it waits. A device's slots together."""
    shown = {w.device for w in workers if w.device and (w.slots > 1 or w.waiting)}
    rows = []
    for w in sorted((w for w in workers if w.device in shown), key=lambda w: (w.device, w.slot, w.name)):
        rows.append([w.device, f"{w.slot}/{w.slots}", w.name, w.state, w.stage[:12] or "—", w.waiting])
    return rows


def build_slots_table(workers: list[WorkerRow]) -> Table | None:
    """The slots of each device and what runs in each; None where every worker runs one stage at a time."""
    rows = slot_rows(workers)
    if not rows:
        return None
    table = Table(title="Slots", title_justify="left")
    for name in ("device", "slot", "worker", "state", "stage", "waits because"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


ERROR_CHARS = 120  # of a failed run's error in `stl status`; `stl logs RUN` has all of it
# "finetune stage 3f9a…(20 hex): …": the stage id says nothing in a row that names the run; its kind stays.
_STAGE_ID_IN_ERROR = re.compile(r"^(\w+) stage [0-9a-f]{20}: ")


def short_error(error: str) -> str:
    """A run's error for the failures table: one line, without the stage id, cut between words past ERROR_CHARS."""
    error = _STAGE_ID_IN_ERROR.sub(r"\1: ", " ".join(error.split()))
    if len(error) <= ERROR_CHARS:
        return error
    cut = error[:ERROR_CHARS - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > ERROR_CHARS // 2 else cut).rstrip(" ,;:") + "…"


def failed_rows(runs: list[RunRow]) -> list[list[str]]:
    rows = []
    for run in runs:
        ended = time.strftime("%m-%d %H:%M", time.localtime(run.ended_at)) if run.ended_at else "—"
        rows.append([run.id[:10], run.grid, format_cell(run.cell, short=True), ended, short_error(run.error) or "—"])
    return rows


FAILED_COLUMNS = ("run", "grid", "cell", "ended", "error")


def build_failed_table(runs: list[RunRow], width: int | None = None) -> Table:
    """The latest failed runs; a terminal under 120 columns gets run, cell and error only."""
    columns = FAILED_COLUMNS if width is None or width >= 120 else ("run", "cell", "error")
    table = Table(title="Recent failures", title_justify="left",
                  caption="`stl logs RUN` shows the whole story; `stl retry RUN` (or --grid G) queues them again",
                  caption_justify="left")
    for name in columns:
        table.add_column(name, no_wrap=name in ("run", "ended"), overflow="fold",
                         style="red" if name == "error" else None)
    for row in failed_rows(runs):
        cells = dict(zip(FAILED_COLUMNS, row, strict=True))
        table.add_row(*(cells[name] for name in columns))
    return table


def finished_grid_rows(grids: list[GridRow]) -> list[list[str]]:
    rows = []
    for g in sorted(grids, key=lambda g: g.ended_at or 0.0, reverse=True):  # the latest first
        if not g.done:
            continue
        took = (g.ended_at - g.created_at) if g.ended_at and g.created_at else None
        ended = time.strftime("%Y-%m-%d %H:%M", time.localtime(g.ended_at)) if g.ended_at else "—"
        rows.append([g.grid, str(g.counts.get("finished", 0)), str(g.counts.get("failed", 0)),
                     str(g.counts.get("canceled", 0)), ended, format_duration(took, compact=True)])
    return rows


ENDED_GRIDS_SHOWN = 5  # `stl status` is watched for weeks: older ended grids are counted, not listed


def build_finished_grids_table(grids: list[GridRow], shown: int = ENDED_GRIDS_SHOWN) -> Table:
    # "Ended": a grid whose runs were canceled is done too, and its row says how each run ended.
    rows = finished_grid_rows(grids)
    earlier = len(rows) - shown
    caption = (f"and {earlier} earlier ended grid(s): `stl results GRID` reads any of them, "
               "`stl status --grid GRID` shows one") if earlier > 0 else None
    table = Table(title="Ended grids", title_justify="left", caption=caption, caption_justify="left")
    for name in ("grid", "finished", "failed", "canceled", "ended", "took"):
        table.add_column(name)
    for row in rows[:shown]:
        table.add_row(*row)
    return table


def build_status_view(summary: StatusSummary, workers: list[WorkerRow], width: int | None = None, *,
                      live: bool = True, store: Store | None = None) -> RenderableType:
    """The whole `stl status` screen; `width` (the terminal's columns) picks the running table's columns.
    `live`: the screen refreshes (it says how to quit); otherwise it is one frame (`--once`)."""
    # Grids whose runs have all ended are listed under "Ended grids" instead: months of them would bury the live.
    ended = {g.grid for g in summary.grids if g.done}
    live_counts = {key: n for key, n in summary.counts.items() if key[0] not in ended}
    parts: list[RenderableType] = [
        build_summary_table(summary.counts, "user"), build_summary_table(live_counts, "grid"),
        build_running_table(summary.running, width), build_workers_table(workers, store),
    ]
    slots = build_slots_table(workers)
    if slots is not None:
        parts.append(slots)
    if summary.failed:
        parts.append(build_failed_table(summary.failed, width))
    if any(g.done for g in summary.grids):
        parts.append(build_finished_grids_table(summary.grids))
    stamp = Text(f"updated {time.strftime('%H:%M:%S')} · Ctrl+C to quit" if live
                 else f"as of {time.strftime('%H:%M:%S')}", style="dim")
    return Group(*parts, stamp)


def results_notes(runs: list[RunRow]) -> list[str]:
    """What `stl results` says besides the table: runs with no results, and where to find out why."""
    notes = []
    for status, why in (("failed", "`stl logs RUN` says why"), ("canceled", "`stl retry RUN` queues them again")):
        ended = [run for run in runs if run.status == status]
        if not ended:
            continue
        if status == "canceled" and len({run.grid for run in ended}) == 1 and len(ended) > 1:
            why += f", or all of them `stl retry --grid {ended[0].grid}`"
        example = ended[0]
        detail = f": {example.error}" if example.error else ""
        notes.append(f"{len(ended)} of {len(runs)} run(s) {status} and have no results; {why} "
                     f"(e.g. run {example.id[:10]}{detail})")
    from stl.jobs.states import LIVE

    live = sum(run.status in LIVE for run in runs)
    if live:
        notes.append(f"{live} of {len(runs)} run(s) are still queued or running; their cells show n=k/m")
    return notes


def why_no_results(grids: list[str], runs: list[RunRow]) -> str:
    """One line for `stl results` when no run of these (existing) grids has a result: still to come, or never."""
    from stl.jobs.states import LIVE

    names, its = ", ".join(grids), "its" if len(grids) == 1 else "their"
    shown_by = f"`stl status --grid {grids[0]}`" if len(grids) == 1 else "`stl status`"
    count = {status: sum(run.status == status for run in runs) for status in ("failed", "canceled", "finished")}
    ended = ", ".join(f"{n} {status}" for status, n in count.items() if n)
    live = sum(run.status in LIVE for run in runs)
    if live:
        of = f"{its} {live} run(s) are" if live == len(runs) else f"{live} of {len(runs)} run(s) are"
        return f"no results for {names} yet: {of} still queued or running{f' ({ended})' if ended else ''}; " \
               f"{shown_by} shows their progress"
    if count["finished"]:  # a finished run has results unless they were lost from Redis
        return f"no results for {names}: {its} {count['finished']} finished run(s) recorded none ({ended})"
    failed = [run for run in runs if run.status == "failed"]
    if failed:
        error = short_error(failed[0].error) or "no error recorded"
        why = f"`stl logs RUN` says why, e.g. run {failed[0].id[:10]}: {error}"
    else:
        why = f"`stl retry --grid {grids[0]}` queues them again" if len(grids) == 1 else "`stl retry` queues them"
    return f"no results for {names}: none of {its} {len(runs)} run(s) finished ({ended}); {why}"


def result_table_rows(rows: list[dict[str, Any]], hide: Iterable[str] = ()) -> list[list[str]]:
    """One row per run and task; the cell without the axes in `hide` (said once, in the title)."""
    hidden = set(hide)

    def cell(r: dict[str, Any]) -> str:
        shown = {axis: value for axis, value in r["cell"].items() if axis not in hidden or axis == "seed"}
        return format_cell(shown)

    return [[r["run"][:10], cell(r), r["task"], r["task_type"], r["metric"], f"{r['value']:.4f}"] for r in rows]


def result_csv_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """`--rows --csv`: a header, then one row per run and task; axes in the grid's order, true/false as
    the grid file and the pivot's CSV spell them."""
    from stl.jobs.results.analysis import render_value

    axes = list(dict.fromkeys(axis for r in rows for axis in r["cell"]))

    def value(v: Any) -> str:
        return "" if v is None else render_value(v)

    out = [["grid", "run", *axes, "task", "task_type", "metric", "value"]]
    out += [[r["grid"], r["run"], *(value(r["cell"].get(a)) for a in axes), r["task"], r["task_type"],
             r["metric"], repr(float(r["value"]))] for r in rows]
    return [[printable(cell) for cell in row] for row in out]  # a terminal or a spreadsheet gets no ESC


def result_markdown(rows: list[dict[str, Any]]) -> str:
    """`--rows --markdown`: the `--rows --csv` table as a pipe table, values to 4 places, for a draft."""
    from stl.cli.render_analysis import markdown_table

    header, *body = result_csv_rows(rows)
    return markdown_table(header, [[*row[:-1], f"{float(row[-1]):.4f}"] for row in body], len(header) - 1)


def build_results_table(grid: str, rows: list[dict[str, Any]]) -> Table:
    from stl.cli.render_analysis import constant_axes

    constant = constant_axes([r["cell"] for r in rows])
    constant.pop("seed", None)
    title = f"Results of {grid}"
    if constant:
        title += ": " + format_cell(constant)
    table = Table(title=title, title_justify="left")
    for name in ("run", "cell", "task", "type", "metric"):
        table.add_column(name, overflow="fold")
    table.add_column("value", justify="right")
    for row in result_table_rows(rows, hide=constant):
        table.add_row(*row)
    return table


def dry_run_rows(expanded: ExpandedGrid, statuses: dict[str, str] | None = None) -> list[list[str]]:
    """One row per run: id, cell, stages; with `statuses` (the queue's, by run id), what enqueue would do."""
    from stl.jobs.queue.queueing import SKIPPED_ON_ENQUEUE

    rows = []
    for run in expanded.runs:
        kinds = [expanded.stages[s].kind.value for s in run.stages]
        row = [run.run_id, format_cell(run.cell), " → ".join(kinds)]
        if statuses is not None:
            status = statuses.get(run.run_id, "")
            row.append(f"skip ({status})" if status in SKIPPED_ON_ENQUEUE else
                       f"queue again ({status})" if status else "queue")
        rows.append(row)
    return rows


def build_dry_run_table(expanded: ExpandedGrid, statuses: dict[str, str] | None = None) -> Table:
    rows = dry_run_rows(expanded, statuses)
    title = f"{expanded.grid.name}: {len(expanded.runs)} runs, {len(expanded.stages)} distinct stages"
    caption = None
    if statuses is not None:
        skipped = sum(row[-1].startswith("skip") for row in rows)
        title += f"; enqueue would queue {len(rows) - skipped} and skip {skipped} already queued or finished"
    else:
        caption = "Redis not reachable: which runs are already queued or finished is not shown"
    table = Table(title=title, title_justify="left", caption=caption)
    for name in ("run", "cell", "stages", *(["enqueue"] if statuses is not None else [])):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def enqueue_message(report: SubmitReport, user: str, priority: str = "normal") -> str:
    lines = [f"queued {len(report.queued)} run(s) of grid {report.grid} for {user}; "
             f"skipped {len(report.skipped)} identical run(s) already queued or finished"]
    if report.left_to_others:
        lines.append(f"left {len(report.left_to_others)} failed or canceled run(s) of other users as they are "
                     f"(e.g. {report.left_to_others[0]}): `stl retry --force RUN` queues them again")
    if report.skipped and priority != "normal":
        lines.append(f"the skipped runs keep the priority they were queued with, not {priority}; to change it, "
                     f"`stl cancel --grid {report.grid}` and enqueue again (finished stages are reused)")
    if report.stages_created or report.stages_reused:
        retrained = (f" ({report.stages_retrained} of them train again a model `stl disk --prune` deleted)"
                     if report.stages_retrained else "")
        lines.append(f"{report.stages_created} new stage job(s){retrained}; "
                     f"{report.stages_reused} reused from earlier runs")
    if report.finished_at_once:
        lines.append(f"{report.finished_at_once} of the queued run(s) finished at once: every stage they need was "
                     f"done by earlier runs (see stl results {report.grid})")
    if len(report.queued) > report.finished_at_once:
        lines.append(f"watch them with: stl status --grid {report.grid}")
    return "\n".join(lines)


def kept_runs_message(grid: str, kept: dict[str, int], *, dry_run: bool = False) -> str:
    """What `enqueue --replace` without --force left of other users' runs, and why."""
    count = sum(kept.values())
    whose = " and ".join(f"{user}'s" for user in sorted(kept))
    return (f"{'would keep' if dry_run else 'kept'} {count} run{'' if count == 1 else 's'} of {whose} made with other "
            f"settings (`stl results {grid}` averages them with yours): only their owner drops them, and "
            "--force drops other users' runs too")


def disk_rows(usage: list[DiskUsage]) -> list[list[str]]:
    rows = [[u.name, format_bytes(u.bytes), str(u.files), u.what, u.freed_by] for u in usage]
    total = sum(u.bytes for u in usage)
    return [*rows, ["total", format_bytes(total), str(sum(u.files for u in usage)), "", ""]]


def build_disk_table(home: Path, usage: list[DiskUsage], space: tuple[int, int] | None = None,
                     store: Store | None = None) -> Table:
    """`space`: (free, total) bytes of the file system holding STL_HOME; `store`: its store id (stl.jobs.queue.store),
    which `stl status` shows for the queue's workers."""
    title = f"STL_HOME = {home}"
    if space is not None:
        title += f" ({format_bytes(space[0])} free of {format_bytes(space[1])})"
    if store is not None:
        title += f" · store {store.short}"
    table = Table(title=title, title_justify="left",
                  caption="--clear-caches loses only time; --prune deletes models no queued or running run needs "
                          "(a later run that needs one trains it again); runs and redis stay")
    table.add_column("part", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("files", justify="right")
    table.add_column("holds")
    table.add_column("freed by", no_wrap=True)
    for row in disk_rows(usage):
        table.add_row(*row)
    return table


def prune_lines(report: PruneReport, target: str, *, dry_run: bool) -> list[str]:
    """What `stl disk --prune` did (or, with --dry-run, would do), one model per line, then totals."""
    verb = "would prune" if dry_run else "pruned"
    label = "stage" if target == "all" else target
    lines = [f"  {m.stage_id}  {format_bytes(m.bytes):>10}  {m.kind:<8}  {m.about}" for m in report.pruned]
    lines.append(f"{verb} {len(report.pruned)} {label} model(s), {format_bytes(report.freed_bytes)}"
                 + ("" if dry_run or not report.pruned else "; a run that needs one again trains it first"))
    if report.needed:
        size = format_bytes(sum(m.bytes for m in report.needed))
        lines.append(f"kept {len(report.needed)} ({size}): a queued or running run needs them")
    if report.others:
        size = format_bytes(sum(m.bytes for m in report.others))
        lines.append(f"left {len(report.others)} ({size}) alone: runs of {', '.join(report.owners)} used them; "
                     "ask them, or pass --force to prune those too")
    if report.unknown:
        size = format_bytes(sum(m.bytes for m in report.unknown))
        lines.append(f"left {len(report.unknown)} ({size}) alone: this Redis has no record of their stages "
                     "(is STL_REDIS_URL the Redis they were queued on?)")
    return lines
