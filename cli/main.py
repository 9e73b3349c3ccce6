"""stl: queue transfer-learning grids on a shared GPU, watch them, and read their results."""

from __future__ import annotations

import sys
import time
from pathlib import Path  # noqa: TC003 (typer reads option types at run time)
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from stl.cli.demo_commands import data_app, demo
from stl.cli.results_commands import plot_curves, results
from stl.cli.shared import acting_user, checked_user, cli_settings, connect_redis, echo, handled, one_line, print_json
from stl.jobs.codec import printable
from stl.jobs.errors import StlError, UsageError
from stl.jobs.settings import DEFAULT_MAX_RUNS
from stl.jobs.states import PruneTarget  # noqa: TC001 (typer reads option types at run time)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import redis
    from rich.console import Console, RenderableType


def _click_exceptions(name: str) -> tuple[type[Exception], ...]:
    """Click's exception class `name`, and the copy of it inside the click that newer typers ship."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


class _OneLineUsageErrors(TyperGroup):
    """A mistyped option or a missing argument is one line naming the command, like every other error of stl's,
    instead of click's usage block."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _click_exceptions("NoArgsIsHelpError") as e:  # `stl` alone: the help is the answer
            e.show()  # type: ignore[attr-defined]
            sys.exit(2)
        except _click_exceptions("UsageError") as e:
            context = getattr(e, "ctx", None)
            command = context.command_path if context is not None else "stl"
            # Newer typers check values with pydantic, whose wording leaks through: "Value error, 'x' is not ..."
            message = one_line(e.format_message()).replace("Value error, ", "").rstrip(".")  # type: ignore[attr-defined]
            echo(f"{command}: {message} (see `{command} --help`)", err=True)
            sys.exit(2)
        except _click_exceptions("ClickException") as e:  # a file click itself could not open, say
            echo(f"stl: {one_line(e.format_message())}", err=True)  # type: ignore[attr-defined]
            sys.exit(1)
        except (*_click_exceptions("Abort"), typer.Abort):  # type: ignore[misc]  # Ctrl+C or Ctrl+D at a prompt
            echo("stl: aborted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    help="stl: share one GPU workstation for transfer-learning experiments on small language models.",
    cls=_OneLineUsageErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# `stl --help` lists the commands in the order they are registered: the ones defined in other modules of
# stl.cli (results_commands, demo_commands) are registered below in their place, the `data` group comes last.
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            echo(f"stl {version('stl')}")
        except PackageNotFoundError:
            echo("stl (not installed as a package; run `make venv`)")
        raise typer.Exit


@app.callback()
def main(
    show_version: Annotated[bool, typer.Option(
        "--version", help="Print stl's version and exit.", callback=_print_version, is_eager=True)] = False,
) -> None:
    """stl: share one GPU workstation for transfer-learning experiments on small language models."""

LIVE_READ_TIMEOUT_S = 5.0  # `stl status` (live): how long one Redis command may take before the view says so
RUN_IDS = typer.Argument(help="Run ids (or unique prefixes).", show_default=False, metavar="RUN")


@app.command()
def enqueue(
    grid_file: Annotated[Path, typer.Argument(help="The grid YAML file.", show_default=False, metavar="GRID.yaml")],
    user: Annotated[str | None, typer.Option(help="Queue as this user (default: STL_USER or your login).")] = None,
    priority: Annotated[str, typer.Option(help="Order within your own queue: high, normal or low.")] = "normal",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the expanded runs and which are already queued; write nothing.")] = False,
    max_runs: Annotated[int, typer.Option(
        help="Refuse grids that expand to more runs than this.", min=1)] = DEFAULT_MAX_RUNS,
    replace: Annotated[bool, typer.Option(
        "--replace", help="The grid was edited: cancel and drop its runs made with other settings.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Add runs to another user's grid; with --replace, also drop theirs.")] = False,
) -> None:
    """Validate a grid file, expand it into runs and queue them, all or nothing.

    Identical runs already queued or finished are skipped; so are stages (MTL, fine-tuning,
    evaluation) that an earlier run already computed. A grid edited after it was enqueued (other
    train or eval settings, so its existing runs would now be made differently) is refused unless
    --replace, which cancels those runs and drops them: otherwise its results would mix.
    """
    from stl.jobs.grid.parse import parse_grid
    from stl.jobs.queue.grid_changes import changed_runs, check_grid_owner, check_grid_unchanged, drop_runs
    from stl.jobs.queue.queueing import check_priority, submit_runs

    with handled():
        settings = cli_settings()
        who = checked_user(settings, user)
        check_priority(priority)
        expanded = parse_grid(grid_file, max_runs=max_runs)
        if dry_run:
            import redis
            from rich.console import Console

            from stl.cli.render import build_dry_run_table
            from stl.jobs.queue.connection import connect
            from stl.jobs.queue.grid_changes import run_statuses

            try:  # what is queued already, where Redis answers; a dry run never starts a server
                conn = connect(settings, start_embedded=False)
                statuses: dict[str, str] | None = run_statuses(conn, [run.run_id for run in expanded.runs])
            except (StlError, OSError, redis.RedisError):
                statuses = None
            if statuses is not None:  # what the enqueue itself would refuse, it refuses here too
                who = acting_user(conn, settings, user)
                if not force:
                    check_grid_owner(conn, expanded.grid.name, who)
                if not replace:
                    check_grid_unchanged(conn, expanded, user=None if force else who)
            Console().print(build_dry_run_table(expanded, statuses))
            if statuses is not None and replace:
                _say_what_replace_would_drop(conn, expanded.grid.name, changed_runs(conn, expanded), who, force)
            return
        from stl.cli.render import enqueue_message, kept_runs_message

        conn = connect_redis(settings)
        who = acting_user(conn, settings, user)
        if not force:
            check_grid_owner(conn, expanded.grid.name, who)
        if replace:
            dropped = drop_runs(conn, changed_runs(conn, expanded), user=who, force=force)
            if dropped.dropped:
                echo(f"dropped {dropped.dropped} run(s) of grid {expanded.grid.name} whose settings changed")
            if dropped.kept:
                echo(kept_runs_message(expanded.grid.name, dropped.kept))
        else:
            check_grid_unchanged(conn, expanded, user=None if force else who)
        report = submit_runs(conn, expanded.runs, expanded.stages, user=who, priority=priority,
                             stage_timeout=expanded.grid.stage_timeout, owner_only=not force)
        echo(enqueue_message(report, who, priority))


def _say_what_replace_would_drop(conn: redis.Redis, grid: str, changed: list[str], user: str, force: bool) -> None:
    from stl.cli.render import kept_runs_message
    from stl.jobs.queue.grid_changes import split_by_owner

    mine, others = (changed, {}) if force else split_by_owner(conn, changed, user=user)
    echo(f"--replace would cancel and drop {len(mine)} run(s) of grid {grid} made with other settings")
    if others:
        echo(kept_runs_message(grid, {owner: len(ids) for owner, ids in others.items()}, dry_run=True))


@app.command()
def status(
    user: Annotated[str | None, typer.Option(help="Only this user's runs.")] = None,
    grid: Annotated[str | None, typer.Option(help="Only this grid's runs.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {runs, workers} as JSON and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.2, max=3600)] = 1.0,
) -> None:
    """Show queued, running and finished runs per user and grid, running runs and workers, live.

    Workers of `stl worker --slots N` get a Slots table: what runs in each slot, and why a stage waits for
    device memory."""
    from stl.jobs.queue.connection import connect
    from stl.jobs.queue.records import list_runs, list_workers, status_summary
    from stl.jobs.queue.store import registered_store

    with handled():
        settings = cli_settings()
        # A live view must say within seconds that Redis hangs, not freeze on its last frame for a minute.
        conn = connect(settings, read_timeout=60.0 if once or as_json else LIVE_READ_TIMEOUT_S)
        if as_json:
            runs = list_runs(conn, user=user, grid=grid)
            store = registered_store(conn)
            print_json({"runs": [r.to_json() for r in runs], "workers": [w.to_json() for w in list_workers(conn)],
                         "store": None if store is None else store.to_json()})
            return
        from rich.console import Console

        from stl.cli.render import build_status_view

        console = Console()

        def view() -> RenderableType:  # the width is read each time: a resized terminal gets a fitting table
            return build_status_view(status_summary(conn, user=user, grid=grid), list_workers(conn), console.width,
                                     live=not once, store=registered_store(conn))

        if once:
            console.print(view())
            return
        _live_status(console, view, interval)


def _live_status(console: Console, view: Callable[[], RenderableType], interval: float) -> None:
    """Redraw in place; while Redis is away, say so and keep trying rather than exit."""
    import redis
    from rich.live import Live
    from rich.text import Text

    def frame() -> RenderableType:
        try:
            return view()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            return Text(printable(f"Redis is unreachable ({e}); retrying every {interval:g} s… Ctrl+C to quit"),
                        style="red")

    if not console.is_terminal:  # piped (`stl status | tee log`): Live would show nothing until exit
        while True:
            console.print(frame())
            console.print()
            time.sleep(interval)
    with Live(console=console, auto_refresh=False, screen=False, transient=False) as live:
        while True:
            live.update(frame(), refresh=True)
            time.sleep(interval)


app.command()(results)  # defined in results_commands


@app.command()
def logs(
    run: Annotated[str, typer.Argument(help="Run id (or a unique prefix).", show_default=False, metavar="RUN")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")] = False,
) -> None:
    """Print a run's log: every stage it needs, from any machine that reaches Redis."""
    from stl.jobs.queue.connection import connect
    from stl.jobs.queue.records import check_run_id, resolve_run_ids, run_status
    from stl.jobs.queue.run_details import run_log

    with handled():
        check_run_id(run)  # before Redis is asked anything: a malformed id is bad input wherever Redis is
        settings = cli_settings()
        conn = connect(settings, patient=follow)  # following rides out a Redis restart, as the worker does
        (run_id,) = resolve_run_ids(conn, [run])
        lines, positions = run_log(conn, run_id)
        for line in lines:
            echo(line)
        if not lines:  # an empty answer is not a log: say why there is none
            status = run_status(conn, run_id)
            why = {"queued": "none of its stages has started yet (`stl status` shows the queue)",
                   "canceled": "it was canceled before any of its stages started"}.get(status, f"it is {status}")
            echo(f"stl: run {run_id} has logged nothing: {why}", err=True)
        while follow:
            done = run_status(conn, run_id) in ("finished", "failed", "canceled")
            time.sleep(1.0)
            lines, positions = run_log(conn, run_id, start=positions)
            for line in lines:
                echo(line)
            if done and not lines:
                break


@app.command()
def cancel(
    runs: Annotated[list[str] | None, RUN_IDS] = None,
    grid: Annotated[str | None, typer.Option(help="Cancel every live run of this grid.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Also cancel other users' runs.")] = False,
) -> None:
    """Cancel runs: queued ones leave the queue, running ones stop within seconds."""
    from stl.jobs.queue.queueing import cancel_runs, runs_of_grid
    from stl.jobs.queue.records import check_run_id, resolve_run_ids

    with handled():
        if bool(runs) == bool(grid):
            raise UsageError("give run ids or --grid, not both and not neither")
        for run_id in runs or []:
            check_run_id(run_id)
        settings = cli_settings()
        conn = connect_redis(settings)
        who = acting_user(conn, settings)
        ids = runs_of_grid(conn, grid) if grid else resolve_run_ids(conn, runs or [])
        canceled, already, foreign = cancel_runs(conn, ids, user=who, force=force, skip_foreign=bool(grid))
        echo(f"canceled {len(canceled)} of {len(ids)} run(s); {len(already)} had already ended"
              + (f"; left {len(foreign)} live run(s) of other users (--force cancels those too)"
                 if foreign else ""))


@app.command()
def retry(
    runs: Annotated[list[str] | None, RUN_IDS] = None,
    grid: Annotated[str | None, typer.Option(help="Retry every failed or canceled run of this grid.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Also retry other users' runs.")] = False,
) -> None:
    """Queue failed or canceled runs again; stages that already finished are not redone."""
    from stl.jobs.queue.queueing import retry_runs, runs_of_grid
    from stl.jobs.queue.records import check_run_id, resolve_run_ids

    with handled():
        if bool(runs) == bool(grid):
            raise UsageError("give run ids or --grid G, not both and not neither")
        for run_id in runs or []:
            check_run_id(run_id)
        settings = cli_settings()
        conn = connect_redis(settings)
        who = acting_user(conn, settings)
        ids = runs_of_grid(conn, grid) if grid else resolve_run_ids(conn, runs or [])
        requeued, skipped, foreign = retry_runs(conn, ids, user=who, force=force, skip_foreign=bool(grid))
        echo(f"re-queued {len(requeued)} of {len(ids)} run(s); {len(skipped)} were not failed or canceled"
              + (f"; left {len(foreign)} of other users (--force retries them too)" if foreign else ""))


@app.command()
def worker(
    gpu: Annotated[int | None, typer.Option(help="GPU index to use (sets CUDA_VISIBLE_DEVICES).", min=0)] = None,
    burst: Annotated[bool, typer.Option(
        "--burst", help="Exit when the queues are empty and no other stage runs on this device, since a stage "
                   "that ends may queue the next (exit code 1 if the machine cannot run them).")] = False,
    adopt_store: Annotated[bool, typer.Option(
        "--adopt-store", help="Make this STL_HOME the queue's artifact store, where the one its workers shared "
        "is gone (wiped or moved); refused while workers use that one.")] = False,
    slots: Annotated[int, typer.Option(
        help="Run up to this many stages at once on the device, each in its own worker and work horse; on a "
             "CPU each gets its share of the cores. Fair share charges a stage its share of the device.",
        min=1)] = 1,
) -> None:
    """Run the GPU worker: one stage at a time (or --slots at once), the next from whoever has used the least
    GPU time lately (decayed, half-life one hour), so one person's big grid does not block someone else's run.

    SIGTERM (docker stop) checkpoints the running stage and puts it back at the head of its queue. A fault
    of the machine (a full disk, a broken GPU driver) puts the stage back too, and the worker waits, checking
    the machine every 30 s, until it is fixed: `stl status` shows it paused, with the reason.

    STL_PREEMPT_AFTER (seconds, default 1800; 0 turns it off): a training stage that has run this long since
    it last started checkpoints and goes back to the head of its queue when a user with less recent GPU time
    has a stage waiting and no idle worker can take it; that stage runs next. Evaluations are never
    preempted, and a resumed stage runs this long again before it can be preempted again.

    With --slots N this process supervises N slot workers: it passes SIGTERM and Ctrl+C on to them, starts
    again one that dies, and with --burst ends when all have. On a GPU a stage starts beside others only when
    its estimated peak memory fits what the GPU has free (processes outside stl count); `stl status` shows
    each slot, the sharing mode (MPS or time-slicing) and why a stage waits."""
    with handled():
        from stl.jobs.queue.connection import connect
        from stl.worker.gpu import GpuProbe, missing_gpu
        from stl.worker.main import run_worker

        problem = None if gpu is None else missing_gpu(gpu)
        if problem:
            raise UsageError(problem)
        settings = cli_settings()
        conn = connect(settings, patient=True)
        if slots > 1:  # a supervisor of slot workers, which never imports torch
            from stl.worker.slots import check_before_work, run_slots

            check_before_work(conn, settings, adopt_store=adopt_store)
            on_cpu = gpu is None and not GpuProbe(None).has_gpu
            code = run_slots(slots=slots, gpu_index=gpu, burst=burst, on_cpu=on_cpu,
                             say=lambda line: echo(f"stl worker: {line}", err=True))
            raise typer.Exit(code)
        run_worker(connection=conn, settings=settings, gpu_index=gpu, burst=burst, adopt_store=adopt_store)


@app.command("worker-slot", hidden=True)
def worker_slot(
    slot: Annotated[int, typer.Option(min=1)],
    slots: Annotated[int, typer.Option(min=1)],
    gpu: Annotated[int | None, typer.Option(min=0)] = None,
    burst: Annotated[bool, typer.Option("--burst")] = False,
) -> None:
    """One slot worker of `stl worker --slots N`, started by it (stl.worker.slots)."""
    with handled():
        from stl.jobs.queue.connection import connect
        from stl.worker.main import run_worker

        settings = cli_settings()
        run_worker(connection=connect(settings, patient=True), settings=settings, gpu_index=gpu, burst=burst,
                   slot=slot, slots=slots)


app.command()(demo)  # defined in demo_commands
app.command("plot")(plot_curves)  # defined in results_commands


@app.command()
def disk(
    clear_caches: Annotated[bool, typer.Option(
        "--clear-caches", help="Delete STL_HOME/cache (compiled kernels, token ids, row indexes); stages "
        "rebuild what they need. Refused while stages run.")] = False,
    prune: Annotated[PruneTarget | None, typer.Option(
        "--prune", help="Delete the models of finished finetune stages, mtl stages, or all, that no queued "
        "or running run needs. A run that needs one later trains it again.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --prune: list what would go; delete nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="With --clear-caches: even while stages run. With --prune: other users' models too.")] = False,
) -> None:
    """Show what STL_HOME holds on disk (caches, stage models, run results); clear caches or prune models.

    Stage models add up: every few-shot stage keeps a whole model (about 0.5 GB at BART-base), so a
    paper-sized grid fills a disk. `stl disk --prune finetune` frees them once their runs are done.
    """
    from rich.console import Console

    from stl.cli.render import build_disk_table, format_bytes, prune_lines
    from stl.jobs import keys
    from stl.jobs.disk_space import free_space
    from stl.jobs.queue import disk as disk_lib

    with handled():
        settings = cli_settings()
        if clear_caches and prune is not None:
            raise UsageError("--clear-caches and --prune are separate steps; run one, then the other")
        if dry_run and prune is None:
            raise UsageError("--dry-run goes with --prune")
        if force and not (clear_caches or prune is not None):
            raise UsageError("--force goes with --clear-caches or --prune")
        if prune is not None:
            from stl.jobs.queue.store import check_queue_store

            conn = connect_redis(settings)
            check_queue_store(conn, settings, action="prune models")
            report = disk_lib.prune_stage_models(conn, settings, prune, user=acting_user(conn, settings),
                                                 dry_run=dry_run, force=force)
            for line in prune_lines(report, prune.value, dry_run=dry_run):
                echo(line)
            return
        if settings.home.exists() and not settings.home.is_dir():
            raise UsageError(f"STL_HOME {settings.home} is a file, not a folder; point STL_HOME at a folder")
        if not settings.home.is_dir():  # a typo in STL_HOME would otherwise read as an empty home
            echo(f"stl: STL_HOME {settings.home} does not exist: nothing has run with it yet; if something "
                  "should have, check the variable (stages write under the worker's STL_HOME)", err=True)
            return
        if not clear_caches:
            from stl.jobs.queue.store import read_store

            Console().print(build_disk_table(settings.home, disk_lib.disk_usage(settings),
                                             free_space(settings.home), store=read_store(settings.home)))
            return
        running = 0 if force else int(connect_redis(settings).scard(keys.RUNNING_STAGES))
        removed = disk_lib.clear_caches(settings, running_stages=running, force=force)
        freed = sum(usage.bytes for usage in removed)
        echo(f"cleared {settings.cache_dir}: {format_bytes(freed)} in "
              f"{sum(usage.files for usage in removed)} file(s)")


if __name__ == "__main__":
    app()
