"""Figures for `stl results --plot` and `stl plot`: grouped bars of a pivot, and training-loss curves.

matplotlib is imported inside the functions (it costs ~0.5 s) and only through its object API with
the Agg canvas, so nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import textwrap
from typing import TYPE_CHECKING, NamedTuple, ParamSpec, TypeVar

from stl.jobs.axes import render_value
from stl.jobs.codec import printable
from stl.jobs.errors import UsageError, path_error
from stl.jobs.metrics import metric_label

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from stl.jobs.results.analysis import Column, Pivot, PivotRow

DPI = 120
Colour = tuple[float, float, float, float]
# The study's question is what MTL buys, so MTL variants are compared side by side when present.
PREFERRED_HUE_AXES = ("mtl",)
BAR_HEIGHT = 0.8
GROUP_GAP = 0.8  # empty bar slots between groups
INCH_PER_BAR = 0.24
LABEL_WRAP = 34  # characters per line of a group label
LEGEND_WRAP = 90  # characters per line of a curve's name in the legend (a long local model path)
SMOOTH_FROM_POINTS = 40  # longer curves get a moving-average line over the faint raw one
LABEL_CHARS = 160  # of one name in a figure: a longer one (a damaged record) is cut, so the figure stays drawable
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _label(value: object) -> str:
    """A name from a grid or from Redis as figure text: control characters escaped, cut to LABEL_CHARS."""
    shown = printable(value)
    return shown if len(shown) <= LABEL_CHARS else shown[:LABEL_CHARS - 1] + "…"


def _literal_text(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """Text made while `draw` runs is shown as written: matplotlib reads `$...$` as mathtext, so a model
    named `$\\bad{$` would stop the figure from drawing at all."""
    @functools.wraps(draw)
    def drawing(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        from matplotlib import rc_context

        with rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawing


def plot_pivot(pivot: Pivot, path: Path, *, hue: str | None = None, title: str | None = None) -> Path:
    """Horizontal grouped bars (mean ± std over seeds), one panel per task type; writes `path`."""
    return _save(build_pivot_figure(pivot, hue=hue, title=title), path)


def plot_loss_curves(
    curves: dict[str, list[tuple[int, float]]], path: Path, *, title: str | None = None,
    stage_names: dict[str, list[str]] | None = None,
) -> Path:
    """Training loss against step, one line per label; writes `path`. `stage_names` names each curve's
    stages (segments) where a name helps: the task of each few-shot branch."""
    return _save(build_loss_figure(curves, title=title, stage_names=stage_names), path)


# ----------------------------------------------------------------------------------------------
# Pivot bars


def choose_hue(pivot: Pivot, hue: str | None = None) -> str | None:
    """The row axis whose values become bar colours: `hue`, else "mtl", else the last row axis."""
    if hue is not None:
        if hue not in pivot.row_axes:
            axes = ", ".join(pivot.row_axes) or "none"
            raise UsageError(
                f"cannot colour bars by {hue!r}: it is not a row axis of the table (row axes: {axes})"
            )
        return hue
    for axis in PREFERRED_HUE_AXES:
        if axis in pivot.row_axes:
            return axis
    return pivot.row_axes[-1] if pivot.row_axes else None


def group_label(axes: tuple[str, ...], key: tuple[object, ...]) -> str:
    """`tiny:bart · instructions=true · shots=16`: names are dropped only where the value says it."""
    parts = [
        _label(render_value(value)) if isinstance(value, str) else f"{_label(axis)}={_label(render_value(value))}"
        for axis, value in zip(axes, key, strict=True)
    ]
    return " · ".join(parts) or "all runs"


def _groups(pivot: Pivot, hue: str | None) -> tuple[list[str], list[object], dict[tuple[int, int], PivotRow]]:
    """Group labels (pivot order), hue values (pivot order), and (group, hue) -> pivot row."""
    hue_index = pivot.row_axes.index(hue) if hue is not None else None
    other_axes = tuple(axis for axis in pivot.row_axes if axis != hue)
    group_keys: dict[tuple[object, ...], int] = {}
    hue_values: dict[object, int] = {}
    placed: dict[tuple[int, int], PivotRow] = {}
    for row in pivot.rows:
        hue_value = row.key[hue_index] if hue_index is not None else None
        group_key = tuple(value for index, value in enumerate(row.key) if index != hue_index)
        group = group_keys.setdefault(group_key, len(group_keys))
        slot = hue_values.setdefault(hue_value, len(hue_values))
        placed[(group, slot)] = row
    labels = [group_label(other_axes, key) for key in group_keys]
    return labels, list(hue_values), placed


@_literal_text
def build_pivot_figure(pivot: Pivot, *, hue: str | None = None, title: str | None = None) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = pivot.type_columns()
    if not pivot.rows or not panels:
        raise UsageError(
            "nothing to plot: no classification accuracy or generation ROUGE-L results yet; "
            "run `stl status` to see whether the grid has finished runs"
        )
    hue = choose_hue(pivot, hue)
    labels, hue_values, placed = _groups(pivot, hue)
    slots = len(hue_values)
    stride = slots + GROUP_GAP
    wrapped = [textwrap.fill(label, LABEL_WRAP) for label in labels]
    label_lines = sum(label.count("\n") + 1 for label in wrapped)
    label_width = max(len(line) for label in wrapped for line in label.splitlines())

    bar_rows = len(labels) * stride
    height = max(3.2, 1.8 + max(bar_rows * INCH_PER_BAR, label_lines * 0.17))
    width = 1.0 + label_width * 0.075 + 4.6 * len(panels)
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    colours = _palette(slots)

    group_centres = [group * stride + (slots - 1) / 2 for group in range(len(labels))]
    for panel, column in zip(axes, panels, strict=True):
        _draw_bars(panel, column, placed, stride, colours)
        metric = _label(metric_label(column.metric))
        task_type = _label(column.task_type)
        panel.set_title(f"{task_type.capitalize()}: mean {metric}", fontsize=11)
        panel.set_xlabel(
            f"mean {metric} over {task_type} tasks (error bar: ± std over {_label(spread_of(pivot))})", fontsize=9
        )
        panel.grid(axis="x", alpha=0.3)
        panel.set_axisbelow(True)
        panel.tick_params(axis="y", length=0)
    first = axes[0]
    first.set_yticks(group_centres, wrapped, fontsize=8.5)
    first.set_ylim(bar_rows - GROUP_GAP + 0.2, -0.8)  # first group on top
    other_axes = [axis for axis in pivot.row_axes if axis != hue]
    if other_axes:
        first.set_ylabel(" · ".join(_label(axis) for axis in other_axes), fontsize=9)

    handles = [
        Patch(facecolor=colour, label=_label(render_value(value)))
        for value, colour in zip(hue_values, colours, strict=True)
    ]
    if any(stat is not None and not stat.complete for row in pivot.rows for stat in row.cells.values()):
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///", label="incomplete (n < runs)"))
    if hue is not None or len(handles) > slots:
        figure.legend(
            handles=handles,
            title=None if hue is None else _label(hue),
            loc="outside lower center",
            ncols=min(len(handles), 6),
            fontsize=9,
            title_fontsize=9,
            frameon=False,
        )
    if title:
        figure.suptitle(_label(title), fontsize=12)
    return figure


def _draw_bars(
    panel: Axes,
    column: Column,
    placed: dict[tuple[int, int], PivotRow],
    stride: float,
    colours: list[Colour],
) -> None:
    tops = [
        stat.mean + stat.std for row in placed.values() if (stat := row.cells.get(column.name)) is not None
    ]
    reach = max(tops, default=1.0) or 1.0
    for (group, slot), row in placed.items():
        y = group * stride + slot
        stat = row.cells.get(column.name)
        if stat is None:
            panel.text(reach * 0.01, y, "no result", va="center", fontsize=7, color="0.45")
            continue
        incomplete = not stat.complete
        panel.barh(
            y,
            stat.mean,
            height=BAR_HEIGHT,
            color=colours[slot],
            alpha=0.55 if incomplete else 1.0,
            hatch="///" if incomplete else None,
            edgecolor="0.3" if incomplete else colours[slot],
            linewidth=0.6,
        )
        if stat.n > 1:
            panel.errorbar(
                stat.mean, y, xerr=stat.std, fmt="none", ecolor="0.15", elinewidth=0.9, capsize=2.5
            )
        note = f"{stat.mean:.3f}" + (f"  (n={stat.n}/{stat.expected})" if incomplete else "")
        panel.text(stat.mean + stat.std + reach * 0.015, y, note, va="center", fontsize=7, color="0.2")
    panel.set_xlim(0, reach * 1.28)  # room for the value labels right of the error bars
    # Every metric is a fraction: no tick past 1, even where the labels need the room.
    panel.set_xticks([tick for tick in panel.get_xticks() if 0 <= tick <= 1 + 1e-9])


def spread_of(pivot: Pivot) -> str:
    """What a row's spread is over, for an axis label: "seeds", or the axes its runs differ in."""
    if pivot.folded == ("seed",):
        return "seeds"
    if pivot.folded:
        return f"runs differing in {', '.join(pivot.folded)}"
    return "runs"


def _palette(count: int) -> list[Colour]:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](index) for index in range(count)]
    cmap = colormaps["viridis"]
    return [cmap(index / max(count - 1, 1)) for index in range(count)]


# ----------------------------------------------------------------------------------------------
# Loss curves


def _segments(points: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """Runs of finite points, split where the loss is NaN (between two stages), each sorted by step."""
    segments: list[list[tuple[int, float]]] = [[]]
    for step, loss in points:
        if math.isfinite(loss):
            segments[-1].append((step, loss))
        elif segments[-1]:
            segments.append([])
    return [sorted(segment) for segment in segments if segment]


@_literal_text
def build_loss_figure(curves: dict[str, list[tuple[int, float]]], *, title: str | None = None,
                      stage_names: dict[str, list[str]] | None = None) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    drawable = {label: points for label, points in curves.items() if any(math.isfinite(loss) for _, loss in points)}
    if not drawable:
        raise UsageError("no training-loss steps to plot yet: the runs have not logged a training step")
    many = len(curves) > 8
    figure = Figure(figsize=(10.5 if many else 8.5, 5.0), dpi=DPI, layout="constrained")
    panel = figure.subplots()
    colours = _palette(len(curves))
    smoothed = False
    end_labels: list[_EndLabel] = []
    for label, colour in zip(curves, colours, strict=True):
        points = drawable.get(label, [])
        if not points:
            panel.plot([], [], color=colour, label=textwrap.fill(f"{_label(label)} (no steps yet)", LEGEND_WRAP))
            continue
        names = (stage_names or {}).get(label, [])
        for index, segment in enumerate(_segments(points)):  # one per stage: stages are not joined
            steps = [step for step, _ in segment]
            losses = [loss for _, loss in segment]
            name = textwrap.fill(_label(label), LEGEND_WRAP) if index == 0 else None
            if len(segment) >= SMOOTH_FROM_POINTS:
                smoothed = True
                if not many:  # raw noise of a dozen runs hides the curves
                    panel.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
                window = max(3, len(segment) // 30)
                losses = _centred_mean(losses, window=window)
                panel.plot(steps, losses, color=colour, linewidth=1.8, label=name)
            else:
                panel.plot(steps, losses, color=colour, linewidth=1.6, marker="o", markersize=3, label=name)
            stage_name = names[index] if index < len(names) else ""
            if stage_name and not many:  # which task each few-shot branch trains on, at its end
                end_labels.append(_EndLabel(steps[-1], losses[-1], _label(stage_name), colour))
    finite = [loss for points in drawable.values() for _, loss in points if math.isfinite(loss) and loss > 0]
    if finite and max(finite) / min(finite) > 30:
        panel.set_yscale("log")  # early spikes would flatten the part of the curve that matters
        panel.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        panel.yaxis.set_major_formatter(ScalarFormatter())
        panel.yaxis.set_minor_formatter(NullFormatter())
    panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    _place_end_labels(figure, panel, end_labels)
    panel.set_xlabel("training step")
    panel.set_ylabel("training loss" + (" (log scale)" if panel.get_yscale() == "log" else ""))
    note = ""
    if smoothed:
        note = " (moving average)" if many else " (faint: raw, solid: moving average)"
    panel.set_title(_label(title) if title else f"Training loss{note}")
    panel.grid(alpha=0.3)
    if many:
        figure.legend(loc="outside right upper", fontsize=8, frameon=False)
    else:
        panel.legend(fontsize=9)
    return figure


class _EndLabel(NamedTuple):
    step: float
    loss: float
    text: str
    colour: Colour


END_LABEL_POINTS = 8  # font size
END_LABEL_LINE = 1.4  # line height, in font sizes: the text's height and a little air
END_LABEL_NEAR_PX = 150.0  # labels this close in x could overlap: stack them


def _place_end_labels(figure: Figure, panel: Axes, labels: list[_EndLabel]) -> None:
    """Each label at its curve's end, moved up just enough that no two that end near each other overlap
    (branches of several runs often end at the same step and loss)."""
    if not labels:
        return
    figure.draw_without_rendering()  # the layout and scales as they will be saved
    gap = END_LABEL_POINTS * END_LABEL_LINE * figure.dpi / 72
    to_pixels = panel.transData.transform
    placed: list[tuple[float, float]] = []  # (x, y) in pixels of the labels placed so far
    ends = sorted(((tuple(to_pixels((label.step, label.loss))), label) for label in labels), key=lambda e: e[0][1])
    for (x, y), label in ends:
        lifted = max([y, *(other_y + gap for other_x, other_y in placed
                           if abs(other_x - x) < END_LABEL_NEAR_PX)])
        placed.append((x, lifted))
        points = (lifted - y) * 72 / figure.dpi
        panel.annotate(label.text, (label.step, label.loss), xytext=(4, points), textcoords="offset points",
                       fontsize=END_LABEL_POINTS, color=label.colour, va="center", annotation_clip=False)


def _centred_mean(values: list[float], *, window: int) -> list[float]:
    """Moving average centred on each point (shrinking at the ends), so a falling curve does not lag."""
    half = window // 2
    return [
        math.fsum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


# ----------------------------------------------------------------------------------------------


@_literal_text
def _save(figure: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if path.is_dir():
        raise UsageError(f"cannot write the plot {path}: it is a folder; name the file, e.g. {path / 'plot.png'}")
    canvas = FigureCanvasAgg(figure)
    suffix = path.suffix.lower().lstrip(".")
    supported = canvas.get_supported_filetypes()
    if suffix not in supported:
        others = ", ".join(sorted(set(supported) - {"png", "svg", "pdf"}))
        raise UsageError(
            f"cannot write {path}: unknown image format {suffix or '(none)'!r}; use .png, .svg or .pdf "
            f"(matplotlib also writes {others})"
        )
    # Through a temporary file: a full disk must not leave a torn image where the last good plot was.
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(temporary, dpi=DPI, format=suffix)
        os.replace(temporary, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise path_error("write the plot", path, e) from e
    return path
