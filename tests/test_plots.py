from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from stl.jobs.errors import UsageError
from stl.jobs.results.analysis import Pivot, build_pivot
from stl.jobs.results.plots import (
    build_loss_figure,
    build_pivot_figure,
    choose_hue,
    group_label,
    plot_loss_curves,
    plot_pivot,
)

MODELS = ("tiny:bart", "small:t5", "base:t5")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def study_grid(*, task_types: tuple[str, ...] = ("classification", "generation"),
               by: list[str] | None = None) -> Pivot:
    """3 models × 2 mtl × 2 instructions × 2 shots, 3 seeds; base:t5's third seed still running."""
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for index, (model, mtl, instructions, shots, seed) in enumerate(
        (m, t, i, s, seed)
        for m in MODELS
        for t in ("none", "in-domain")
        for i in (False, True)
        for s in (16, 64)
        for seed in range(3)
    ):
        cell = {"model": model, "mtl": mtl, "instructions": instructions, "shots": shots, "seed": seed}
        run = f"run{index:03d}"
        running = model == "base:t5" and seed == 2
        runs.append({"grid": "g", "run": run, "cell": cell, "status": "running" if running else "finished"})
        if running:
            continue
        base = 0.3 + 0.1 * MODELS.index(model) + (0.08 if mtl == "in-domain" else 0) + 0.01 * seed
        for task_type in task_types:
            metric = "accuracy" if task_type == "classification" else "rougeL"
            scale = 1.0 if task_type == "classification" else 0.5
            for task in ("a", "b"):
                rows.append(
                    {
                        "grid": "g",
                        "run": run,
                        "cell": cell,
                        "task": f"{task_type[:3]}_{task}",
                        "task_type": task_type,
                        "metric": metric,
                        "value": base * scale,
                    }
                )
    return build_pivot(rows, runs, by=by)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_plot_pivot_writes_one_panel_per_task_type(tmp_path: Path) -> None:
    pivot = study_grid()
    figure = build_pivot_figure(pivot)
    assert len(figure.axes) == 2
    assert [ax.get_title() for ax in figure.axes] == [
        "Classification: mean accuracy",
        "Generation: mean ROUGE-L",
    ]
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    assert len(labels) == 12  # 3 models × 2 instructions × 2 shots; mtl is the bar colour
    assert labels[0].replace("\n", " ") == "tiny:bart · instructions=false · shots=16"
    assert len(figure.axes[0].patches) == 24  # one bar per pivot row
    legend_texts = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend_texts == ["none", "in-domain", "incomplete (n < runs)"]
    assert figure.axes[0].get_xlabel() == "mean accuracy over classification tasks (error bar: ± std over seeds)"
    folded = build_pivot_figure(study_grid(by=["model", "mtl"]))
    assert folded.axes[1].get_xlabel() == ("mean ROUGE-L over generation tasks (error bar: ± std over runs "
                                           "differing in instructions, shots, seed)")

    path = plot_pivot(pivot, tmp_path / "nested" / "pivot.png", title="g")
    assert path == tmp_path / "nested" / "pivot.png"
    width, height = png_size(path)
    assert width > 800 and height > 800
    assert path.stat().st_size > 20_000


def test_no_tick_past_1_where_the_value_labels_need_the_room() -> None:
    cell = {"model": "tiny:bart", "seed": 0}
    rows = [{"grid": "g", "run": "r", "cell": cell, "task": "a", "task_type": "classification",
             "metric": "accuracy", "value": 0.95}]
    runs = [{"grid": "g", "run": "r", "cell": cell, "status": "finished"}]
    panel = build_pivot_figure(build_pivot(rows, runs)).axes[0]
    assert panel.get_xlim()[1] > 1.2 and max(panel.get_xticks()) == 1.0


def test_plot_pivot_with_one_task_type_and_chosen_hue(tmp_path: Path) -> None:
    rows_pivot = study_grid(task_types=("classification",))
    figure = build_pivot_figure(rows_pivot, hue="shots")
    assert len(figure.axes) == 1
    assert [text.get_text() for text in figure.legends[0].get_texts()][:2] == ["16", "64"]
    assert png_size(plot_pivot(rows_pivot, tmp_path / "cls.png"))[0] > 400
    svg = plot_pivot(rows_pivot, tmp_path / "cls.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_hue_defaults_to_mtl_then_last_axis() -> None:
    pivot = study_grid()
    assert choose_hue(pivot) == "mtl"
    no_mtl = Pivot(row_axes=("model", "shots"), columns=pivot.columns, rows=())
    assert choose_hue(no_mtl) == "shots"
    assert choose_hue(Pivot(row_axes=(), columns=(), rows=())) is None
    with pytest.raises(UsageError, match="not a row axis"):
        choose_hue(pivot, "seed")


def test_group_label_names_only_non_string_values() -> None:
    assert group_label(("model", "instructions", "shots"), ("tiny:bart", True, 16)) == (
        "tiny:bart · instructions=true · shots=16"
    )
    assert group_label((), ()) == "all runs"


def test_nothing_to_plot_and_bad_format_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nothing to plot"):
        plot_pivot(Pivot(row_axes=("model",), columns=(), rows=()), tmp_path / "empty.png")
    with pytest.raises(UsageError, match=r"unknown image format 'bmpx'; use .png, .svg or .pdf \(matplotlib also"):
        plot_pivot(study_grid(), tmp_path / "pivot.bmpx")
    with pytest.raises(UsageError, match="no training-loss steps"):
        plot_loss_curves({"run": []}, tmp_path / "loss.png")


def test_an_unwritable_plot_path_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "res.png").write_bytes(b"not a folder")
    with pytest.raises(UsageError, match=f"cannot write the plot {tmp_path}/res.png/x.png: {tmp_path}/res.png is a "
                                         "file, not a folder"):
        plot_pivot(study_grid(), tmp_path / "res.png" / "x.png")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere
        with pytest.raises(UsageError, match="cannot write the plot .*Permission denied"):
            plot_loss_curves({"run": [(1, 2.0), (2, 1.5)]}, locked / "loss.png")
    with pytest.raises(UsageError, match="cannot write the plot /proc/x.png: "):
        plot_pivot(study_grid(), Path("/proc/x.png"))


def test_loss_curves_one_line_per_label(tmp_path: Path) -> None:
    curves = {
        "run-a": [(step, 2.0 * math.exp(-step / 200) + 0.3) for step in range(0, 1000, 10)],
        "run-b": [(step, 2.5 * math.exp(-step / 300) + 0.4) for step in range(0, 1000, 10)],
        "run-c": [(1, 2.0), (2, 1.5)],
        "queued": [],
    }
    figure = build_loss_figure(curves)
    (ax,) = figure.axes
    assert ax.get_xlabel() == "training step"
    assert ax.get_ylabel() == "training loss"
    assert ax.get_yscale() == "linear"
    assert (legend_box := ax.get_legend()) is not None
    legend = [text.get_text() for text in legend_box.get_texts()]
    assert legend == ["run-a", "run-b", "run-c", "queued (no steps yet)"]

    path = plot_loss_curves(curves, tmp_path / "loss.png")
    assert png_size(path)[0] > 800
    assert path.stat().st_size > 10_000


def test_loss_curves_switch_to_log_scale_for_wide_ranges() -> None:
    curves = {f"run{i}": [(step, 50 * math.exp(-step / 50) + 0.2) for step in range(500)] for i in range(12)}
    figure = build_loss_figure(curves)
    assert figure.axes[0].get_yscale() == "log"
    assert len(figure.legends) == 1  # many runs: the legend moves outside the axes
    assert len(figure.axes[0].get_lines()) == 12  # smoothed lines only; raw noise would hide them


def test_loss_curves_break_between_stages() -> None:
    nan = float("nan")
    figure = build_loss_figure({"run": [(1, 2.0), (2, 1.5), (2, nan), (3, 3.0), (4, 2.5)]})
    lines = figure.axes[0].lines
    assert [list(line.get_xdata()) for line in lines] == [[1, 2], [3, 4]]  # the stage switch is not a line
    assert [line.get_label() for line in lines][0] == "run" and lines[1].get_label().startswith("_")


def test_few_shot_branches_are_named_by_their_task_at_their_end() -> None:
    nan = float("nan")
    points = [(1, 3.0), (2, 2.0), (2, nan), (3, 1.9), (4, 1.8), (4, nan), (3, 1.7), (4, 1.5)]
    figure = build_loss_figure({"run": points}, stage_names={"run": ["", "emotion", "summary"]})
    texts = {text.get_text(): text.xy for text in figure.axes[0].texts}
    assert texts == {"emotion": (4, 1.8), "summary": (4, 1.5)}
    assert not build_loss_figure({"run": points}).axes[0].texts


def test_a_plot_that_cannot_be_written_leaves_the_last_one_whole(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from matplotlib.figure import Figure

    path = plot_loss_curves({"run": [(1, 2.0), (2, 1.5)]}, tmp_path / "loss.png")
    good = path.read_bytes()

    def disk_fills_up(self: Figure, fname: Path, **kwargs: object) -> None:
        Path(fname).write_bytes(b"\x89PNG torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_fills_up)
    with pytest.raises(UsageError, match="cannot write the plot .*loss.png: the disk is full"):
        plot_loss_curves({"run": [(1, 3.0), (2, 1.0)]}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no temporary file left behind
    with pytest.raises(UsageError, match="it is a folder; name the file"):
        plot_loss_curves({"run": [(1, 3.0), (2, 1.0)]}, tmp_path)


def test_branch_names_that_end_at_the_same_point_do_not_overlap() -> None:
    nan = float("nan")
    branch = [(1, 3.0), (2, 2.0), (2, nan), (3, 1.9), (4, 1.8)]
    figure = build_loss_figure({"a": branch, "b": branch, "c": [(1, 3.0), (4, 0.5)]},
                               stage_names={"a": ["", "summary"], "b": ["", "emotion"], "c": ["far"]})
    figure.draw_without_rendering()
    boxes = {text.get_text(): text.get_window_extent() for text in figure.axes[0].texts}
    assert set(boxes) == {"summary", "emotion", "far"}
    assert not boxes["summary"].overlaps(boxes["emotion"])
    texts = {text.get_text(): text for text in figure.axes[0].texts}
    assert texts["far"].xyann == (4, 0)  # a label with nothing near it stays at its curve's end
    assert {texts["summary"].xy, texts["emotion"].xy} == {(4, 1.8)}  # each still points at its branch's end
