"""`stl results` and `stl plot`: read finished runs' results and training curves out of Redis."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stl.cli.shared import cli_settings, connect_redis, echo, handled, print_json
from stl.jobs.errors import DamagedRecord, NoResults, UsageError


def results(
    grids: Annotated[list[str], typer.Argument(help="One or more grid names.", show_default=False, metavar="GRID")],
    by: Annotated[str | None, typer.Option(help="Row axes of the pivot, e.g. model,mtl.")] = None,
    effect: Annotated[str | None, typer.Option(help="Relative gain of B over A on an axis: AXIS=A:B.")] = None,
    rows: Annotated[bool, typer.Option("--rows", help="One row per run and task instead of the pivot.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table for a draft.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Also draw the pivot as grouped bars into this PNG.")] = None,
    where: Annotated[list[str] | None, typer.Option(
        help="Keep only runs with these values of an axis: AXIS=V[,V...]; repeat for more axes. "
             "Applies to the pivot, --effect, exports and plots.")] = None,
) -> None:
    """Results of finished runs: a pivot of mean ± std over seeds, effect sizes, exports and plots."""
    from stl.cli import render_analysis
    from stl.cli.render import results_notes, why_no_results
    from stl.jobs.queue.records import list_runs
    from stl.jobs.queue.run_results import result_rows
    from stl.jobs.results import analysis

    with handled():
        if sum([as_json, as_csv, as_markdown]) > 1:
            raise UsageError("choose one of --json, --csv and --markdown")
        if rows and (plot is not None or effect):
            raise UsageError("--rows lists runs one by one, while --plot and --effect work on the pivot; "
                             "leave out --rows")
        by_axes = None
        if by is not None:
            by_axes = [a.strip() for a in by.split(",") if a.strip()]
            if not by_axes:
                raise UsageError(f"--by {by!r} names no axis; e.g. --by model,mtl")
        if effect:
            analysis.check_effect_syntax(effect)  # its values are checked against the results, once there are some
        grids = list(dict.fromkeys(grids))  # a grid named twice is read once
        settings = cli_settings()
        conn = connect_redis(settings)
        all_rows: list[dict] = []
        run_summaries: list[dict] = []
        grid_runs = []
        for grid in grids:
            all_rows += result_rows(conn, grid)
            grid_runs += list_runs(conn, grid=grid)
        if not all_rows:  # in every form (table, --rows, --json, --csv, --plot): nothing written, exit 1
            raise NoResults(why_no_results(grids, grid_runs))
        run_summaries = [{"grid": r.grid, "run": r.id, "cell": r.cell, "status": r.status} for r in grid_runs]
        if where:
            kept = analysis.parse_where(where, [*all_rows, *run_summaries])
            all_rows, run_summaries = analysis.filter_where(all_rows, kept), analysis.filter_where(run_summaries, kept)
            grid_runs = [run for run in grid_runs
                         if analysis.filter_where([{"grid": run.grid, "cell": run.cell}], kept)]
        if rows and not as_json:
            for note in results_notes(grid_runs):  # on stderr: --csv output stays clean
                echo(f"stl: {note}", err=True)
            _print_rows(grids, all_rows, as_csv=as_csv, as_markdown=as_markdown)
            return
        pivot = analysis.build_pivot(all_rows, run_summaries, by=by_axes)
        report = None
        if effect:
            axis, a, b = analysis.parse_effect(effect, all_rows)
            report = analysis.effect_sizes(all_rows, axis=axis, a=a, b=b)
        for note in results_notes(grid_runs):  # after the options are known good: one line for a bad one
            echo(f"stl: {note}", err=True)
        if plot is not None:
            from stl.jobs.results.plots import plot_pivot

            written = plot_pivot(pivot, plot, hue=report.axis if report is not None else None)
            echo(f"stl: wrote {written}", err=True)
        if as_json:
            clean = [{k: r[k] for k in ("run", "cell", "task", "task_type", "metric", "value", "metrics") if k in r}
                     for r in all_rows]
            payload = {"grid": grids[0] if len(grids) == 1 else grids, "rows": clean,
                       "pivot": render_analysis.pivot_to_json(pivot)}
            if report is not None:
                payload["effect"] = render_analysis.effect_to_json(report)
            print_json(payload)
        elif as_csv:
            sys.stdout.write(render_analysis.pivot_to_csv(pivot))
        elif as_markdown:
            sys.stdout.write(render_analysis.pivot_to_markdown(pivot))
            if report is not None:
                sys.stdout.write("\n" + render_analysis.effect_to_markdown(report))
        else:
            from rich.console import Console

            console = Console()
            width: int | None = console.width
            if not console.is_terminal:  # piped or in `make`: don't squeeze the pivot into 80 columns
                console, width = Console(width=200), None
            console.print(render_analysis.build_pivot_table(pivot, width=width))
            if report is not None:
                console.print(render_analysis.build_effect_table(report))


def _print_rows(grids: list[str], rows: list[dict], *, as_csv: bool, as_markdown: bool) -> None:
    if as_markdown:
        from stl.cli.render import result_markdown

        sys.stdout.write(result_markdown(rows))
    elif as_csv:
        import csv

        from stl.cli.render import result_csv_rows

        csv.writer(sys.stdout).writerows(result_csv_rows(rows))
    else:
        from rich.console import Console

        from stl.cli.render import build_results_table

        console = Console()
        if not console.is_terminal:  # piped: one line per row, as with the pivot
            console = Console(width=200)
        console.print(build_results_table(", ".join(grids), rows))


def plot_curves(
    runs: Annotated[list[str], typer.Argument(help="Run ids (or unique prefixes).", show_default=False, metavar="RUN")],
    out: Annotated[Path, typer.Option(help="The image to write: .png, .svg or .pdf.")] = Path("curves.png"),
) -> None:
    """Draw the training-loss curves of runs into a PNG."""
    from stl.jobs.axes import format_cell
    from stl.jobs.queue.records import check_run_id, resolve_run_ids, run_status
    from stl.jobs.queue.run_details import loss_curve, run_cell
    from stl.jobs.results.plots import plot_loss_curves

    with handled():
        for run_id in runs:
            check_run_id(run_id)
        settings = cli_settings()
        conn = connect_redis(settings)
        curves, stage_names = {}, {}
        for run_id in resolve_run_ids(conn, runs):
            try:
                points, names = loss_curve(conn, run_id)
                cell = run_cell(conn, run_id)
            except DamagedRecord as e:  # said, and the other runs are drawn
                echo(f"stl: {e}; run {run_id} is left out", err=True)
                continue
            if not points:
                trains = cell.get("mtl", "none") != "none" or cell.get("shots", 0)
                why = (f"none of its training stages has logged a step yet (it is {run_status(conn, run_id)})"
                       if trains else "it trains nothing: zero-shot with no MTL")
                echo(f"stl: run {run_id} has no training-loss curve: {why}", err=True)
                continue
            label = f"{run_id[:8]} {format_cell(cell)}"
            curves[label], stage_names[label] = points, names
        if not curves:
            raise UsageError("none of these runs has a training-loss curve")
        echo(f"stl: wrote {plot_loss_curves(curves, out, stage_names=stage_names)}", err=True)
