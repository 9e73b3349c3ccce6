"""Other users' names reach your terminal as characters: never as rich markup, terminal escapes or mathtext.

Every view is fed the same hostile values (model names, grids, users, tasks, errors, log lines) and must show
them as written: `[/bold]` as those seven characters (not a crash of `stl status` for everyone), `[link=...]`
as text (not a link), an ESC or BEL as an escape (`\\x1b`), `$\\bad{$` in a plot as text (not a mathtext
error). Control characters a grid writes with YAML escapes are refused at enqueue.
"""

from __future__ import annotations

import html
import io
import json
import re
import time
import warnings
from typing import TYPE_CHECKING, Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from stl.cli import render_analysis
from stl.cli.main import app
from stl.cli.render import (
    build_results_table,
    build_status_view,
    result_csv_rows,
    result_markdown,
)
from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.queue.records import GridRow, RunRow, StatusSummary, WorkerRow
from stl.jobs.results.analysis import build_pivot, effect_sizes
from stl.jobs.results.plots import build_loss_figure, build_pivot_figure, plot_loss_curves, plot_pivot
from tests.helpers import small_grid, stl

if TYPE_CHECKING:
    from pathlib import Path

    import redis
    from rich.console import RenderableType

HOSTILE = {
    "unbalanced closing tag": "./markup/[/bold]",
    "style tag": "[red]red[/red] [bold]",
    "link": "[link=http://x]click[/link]",
    "emoji code": ":red_heart: :smile:",
    "ANSI clear screen": "x\x1b[2J\x1b[31mred",
    "OSC window title and BEL": "x\x1b]0;PWNED\x07y",
    "OSC 8 link": "\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\",
    "C1 CSI": "x\x9b2Jy",
    "carriage return and backspace": "ok\rFAKE\b\b",
    "bidi override": "abc\u202edcba",
    "HTML": "<script>alert(1)</script>",
    "mathtext": "$\\bad{$",
    "very long": "m" * 5000,
    "bytes that are not UTF-8": b"model\xff\xfe[/b]".decode(errors="backslashreplace"),  # as a view reads them
}
IDS = list(HOSTILE)
# What a terminal must never receive from data: any escape or control character but the SGR colour codes rich
# itself writes. (Checked on output with rich's own SGR sequences taken out.)
SGR = re.compile(r"\x1b\[[0-9;]*m")
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escaped(value: str) -> str:
    """How a view shows `value`: each control or bidi character as a Python-style escape (the oracle)."""
    return re.sub("[\x00-\x1f\x7f-\x9f\u202a-\u202e]",
                  lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                  value)


def render(renderable: RenderableType, *, terminal: bool) -> str:
    """What a person sees: on a colour terminal (`terminal`), or piped."""
    out = io.StringIO()
    console = Console(file=out, width=20_000, force_terminal=terminal, color_system="truecolor" if terminal else None,
                      legacy_windows=False)
    console.print(renderable)
    return out.getvalue()


def assert_shown_literally(renderable: RenderableType, value: str, *, shown_chars: int = 12) -> str:
    on_terminal = render(renderable, terminal=True)
    leaked = CONTROL.findall(SGR.sub("", on_terminal).replace("\n", ""))
    assert not leaked, f"control characters reached the terminal: {leaked!r}"
    assert "\x1b]8;" not in on_terminal, "a link was made"
    plain = render(renderable, terminal=False)
    assert escaped(value)[:shown_chars] in plain, plain[:2000]
    return plain


def hostile_run(value: str, **overrides: Any) -> RunRow:
    row = RunRow(id="0123456789abcdef", grid=value, user=value, priority="normal", status="running", progress=0.5,
                 cell={"model": value, "mtl": value, "shots": 0, "seed": 1}, created_at=1.0, started_at=2.0,
                 ended_at=None, error=value, stage=value, step=3, total=8, loss=1.0, samples_per_s=1.0,
                 elapsed_s=1.0, eta_s=1.0)
    for key, field_value in overrides.items():
        setattr(row, key, field_value)
    return row


def hostile_results(value: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Result rows and run summaries where the model, a task, a metric and a task type are `value`."""
    rows, runs = [], []
    for index, model in enumerate((value, "tiny:bart")):
        for seed in (0, 1):
            run = f"run{index}{seed}"
            cell = {"model": model, "mtl": "none", "seed": seed}
            runs.append({"grid": "g", "run": run, "cell": cell, "status": "finished"})
            for task, task_type, metric in ((value, "classification", "accuracy"), ("t2", value, value)):
                rows.append({"grid": "g", "run": run, "cell": cell, "task": task, "task_type": task_type,
                             "metric": metric, "value": 0.2 + 0.1 * index + 0.01 * seed})
    return rows, runs


# --- the live view, results, effects and exports ------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE.values(), ids=IDS)
def test_the_status_view_shows_hostile_names_as_written(value: str) -> None:
    summary = StatusSummary(counts={(value, value, "running"): 1, (value, value, "failed"): 1},
                            grids=[GridRow(grid=value, total=1, counts={"finished": 1}, created_at=1.0, ended_at=2.0)],
                            running=[hostile_run(value)],
                            failed=[hostile_run(value, status="failed", ended_at=time.time())])
    workers = [WorkerRow(name=value, host=value, gpu=value, gpu_util=1.0, gpu_mem_used_mb=1.0, gpu_mem_total_mb=2.0,
                         state="paused", stage=value, last_seen=time.time(), paused=value)]
    for width in (None, 80, 200):  # the live view's rendering function, at a few terminal widths
        assert_shown_literally(build_status_view(summary, workers, width), value)


@pytest.mark.parametrize("value", HOSTILE.values(), ids=IDS)
def test_the_slots_table_and_the_workers_caption_show_hostile_names_as_written(value: str) -> None:
    """Worker names, devices, the sharing mode and why a stage waits come from other workers' records."""
    slots = [WorkerRow(name=value, host=value, gpu=value, gpu_util=1.0, gpu_mem_used_mb=1.0, gpu_mem_total_mb=2.0,
                       state=value, stage=value, last_seen=time.time(), sharing=value, device=value, slot=slot,
                       slots=2, waiting=value, paused=value) for slot in (1, 2)]
    summary = StatusSummary(counts={}, grids=[], running=[], failed=[])
    plain = assert_shown_literally(build_status_view(summary, slots), value)
    assert "Slots" in plain
    for said in (f"takes no work: {escaped(value)[:12]}", f"waits for device memory: {escaped(value)[:12]}"):
        assert said in plain, said  # the captions as written too: not markup, not escaped for markup

@pytest.mark.parametrize("value", HOSTILE.values(), ids=IDS)
def test_results_tables_show_hostile_names_as_written(value: str) -> None:
    rows, runs = hostile_results(value)
    assert_shown_literally(build_results_table(value, rows), value)
    pivot = build_pivot(rows, runs)
    assert_shown_literally(render_analysis.build_pivot_table(pivot, title=value), value)
    assert_shown_literally(render_analysis.build_pivot_table(pivot, width=80), value)  # the narrow form too
    report = effect_sizes(rows, axis="model", a=value, b="tiny:bart")
    assert_shown_literally(render_analysis.build_effect_table(report), value)


@pytest.mark.parametrize("value", HOSTILE.values(), ids=IDS)
def test_exports_carry_no_control_characters_and_markdown_no_html(value: str) -> None:
    rows, runs = hostile_results(value)
    pivot = build_pivot(rows, runs)
    report = effect_sizes(rows, axis="model", a=value, b="tiny:bart")
    csv_text = "\n".join(",".join(row) for row in result_csv_rows(rows)) + render_analysis.pivot_to_csv(pivot)
    markdown = (result_markdown(rows) + render_analysis.pivot_to_markdown(pivot)
                + render_analysis.effect_to_markdown(report))
    for exported, shown in ((csv_text, escaped(value)), (markdown, html.escape(escaped(value), quote=False))):
        assert not CONTROL.findall(exported.replace("\n", ""))
        assert shown[:12] in exported
    assert "<script>" not in markdown  # a draft rendered as HTML runs no script
    json.dumps(render_analysis.pivot_to_json(pivot))  # JSON escapes by itself


# --- plots ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE.values(), ids=IDS)
def test_plots_draw_hostile_names_as_written(value: str, tmp_path: Path) -> None:
    rows, runs = hostile_results(value)
    pivot = build_pivot(rows, runs)
    curves = {f"0123abcd model={value}": [(1, 2.0), (2, 1.0)], "4567cdef model=tiny:bart": [(1, 3.0), (2, 2.5)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot_pivot(pivot, tmp_path / "pivot.png").stat().st_size > 0  # mathtext would raise here
        assert plot_loss_curves(curves, tmp_path / "loss.png", stage_names={next(iter(curves)): [value]},
                                title=value).stat().st_size > 0
    said = [str(w.message) for w in caught]
    assert not [m for m in said if CONTROL.search(m)], said  # "Glyph 27 missing" would print the ESC itself

    figure = build_pivot_figure(pivot)
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert any(label.replace("\n", "").startswith(escaped(value)[:12]) for label in labels), labels
    loss = build_loss_figure(curves, stage_names={next(iter(curves)): [value]})
    texts = [t.get_text() for t in loss.findobj(lambda a: hasattr(a, "get_text"))]  # legend, titles, end labels
    assert not [t for t in texts if CONTROL.search(t)]
    assert all(not t.get_parse_math() for t in loss.axes[0].get_legend().get_texts())


# --- the commands, as a person types them -------------------------------------------------------------------


def hostile_grid(tmp_path: Path, demo_data: Path) -> tuple[Path, list[str]]:
    """A grid whose local models are named with markup (`./markup/[/bold]` is a folder like any other)."""
    models = ["./markup/[/bold]", "./markup/[red]RED[link=http://x]L"]
    for model in models:
        folder = tmp_path / model
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    return small_grid(tmp_path, demo_data, "hostile", models=models, shots=[0]), models


def test_commands_show_markup_in_names_and_escapes_in_records_as_written(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    """The reported case: a local model `./markup/[/bold]` made `stl status` crash for every user while its
    failed run was among the five latest failures; and escapes written into a run's error and its stage's log
    (by an older stl, another tool) reached other users' terminals raw."""
    from stl.jobs.queue.recovery import fail_stage
    from stl.jobs.settings import load_settings

    grid, _ = hostile_grid(tmp_path, demo_data)
    dry = stl("enqueue", "--dry-run", str(grid))
    assert dry.returncode == 0 and "./markup/[/bold]" in dry.stdout, dry.stdout + dry.stderr
    assert stl("enqueue", str(grid)).returncode == 0
    run_ids = [text(r) for r in conn.zrange(keys.grid_runs("hostile"), 0, -1)]
    stage_ids = [json.loads(text(conn.hget(keys.run(run_id), "stages")))[0] for run_id in run_ids]
    escapes = HOSTILE["ANSI clear screen"] + HOSTILE["OSC window title and BEL"] + HOSTILE["OSC 8 link"]
    for stage_id in stage_ids:  # as the worker records a stage that cannot run
        fail_stage(conn, load_settings(), stage_id, f"cannot load the model {escapes}")
        conn.rpush(keys.stage_log(stage_id), f"a line written by another tool {escapes}")
    conn.sadd(keys.USERS, f"mallory{escapes}")

    results = {
        "status": stl("status", "--once"),
        "logs": stl("logs", run_ids[0]),
        "results": stl("results", "hostile"),
        "unknown user": stl("status", "--once", "--user", "nobody"),
    }
    for name, result in results.items():
        output = result.stdout + result.stderr
        assert "Traceback" not in output, (name, output)
        assert not CONTROL.findall(output.replace("\n", "")), (name, output)
        assert "\x1b" not in output, (name, output)
        if name != "status":  # a table cell may be folded anywhere: lines of text are not
            assert "\\x1b]0;PWNED\\x07" in output, (name, output)
    assert results["status"].returncode == 0
    assert "[/bold]" in results["status"].stdout and "[red]RED[link=http://x]L" in results["status"].stdout
    assert results["logs"].returncode == 0 and "a line written by another tool x\\x1b[2J" in results["logs"].stdout
    assert results["unknown user"].returncode == 2 and "mallory" in results["unknown user"].stderr


ESCAPES_IN_YAML = [
    ("data", 'data: "x\\e[2J\\e]0;PWNED\\a.jsonl"'),
    ("grid.model.0", 'grid: {model: ["./m\\x1b[31m"], shots: [0]}'),
    ("tasks.eval.0", 'tasks: {train: [sentiment_classification], eval: ["emotion_classification\\u202e"]}'),
    ("name", 'name: "hostile\\t"'),
]


@pytest.mark.parametrize(("field", "line"), ESCAPES_IN_YAML, ids=[field for field, _ in ESCAPES_IN_YAML])
def test_control_characters_made_by_yaml_escapes_are_refused_at_enqueue(
        field: str, line: str, stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    """The file holds no control character (YAML's own check passes); the value YAML decodes does."""
    base = small_grid(tmp_path, demo_data, "hostile", shots=[0]).read_text().splitlines()
    top = line.split(":", 1)[0]
    kept = []
    skipping = False
    for old in base:  # drop the key the line replaces (with its indented block)
        if old.startswith(f"{top}:"):
            skipping = True
            continue
        if skipping and old.startswith(" "):
            continue
        skipping = False
        kept.append(old)
    path = tmp_path / "escapes.yaml"
    path.write_text("\n".join([*kept, line]) + "\n")
    result = CliRunner().invoke(app, ["enqueue", str(path)])
    assert result.exit_code == 2, result.stdout + result.stderr
    (error,) = result.stderr.splitlines()
    assert error.startswith(f"{path}:{len(kept) + 1}: {field}: ") and "control character U+" in error, error
    assert "\x1b" not in error and "\x07" not in error
    assert conn.dbsize() == 0
