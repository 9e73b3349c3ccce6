"""The grid's axes, in one place: each one's name, value type and default, the stage field it sets, how
its values read, and which token caches depend on it.

A grid file lists values per axis under `grid:`; every combination is a run's cell, a dict of axis name to
value in the order of AXES. jobs/grid/parse.py validates the values (its `Axes` model has one field per entry
here) and expands each cell into stages; jobs/queue/disk.py describes stages, cli/render.py shows cells, and the
token caches key on the stage fields, all by reading AXES. docs/extending.md walks through adding one.
Light to import: no pydantic, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from stl.jobs.specs import StageSpec

EMPTY_VALUE = "—"
# The token caches (jobs/ml/data_cache.py's token_cache_path) that hold a stage's ids, by the `kind` in their key.
FEW_SHOT_TOKENS, EVAL_TOKENS = "few-shot", "eval"
EVERY_STAGE = frozenset({"mtl", "finetune", "eval"})  # jobs/states.py's StageKind values


def render_value(value: object) -> str:
    """An axis value as the grid file spells it (bools as true/false), as tables show it and `--where` and
    `--effect` match it."""
    if value is None:
        return EMPTY_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Axis:
    name: str  # the key under `grid:` in a grid file, and in each run's cell
    type: type  # of one value: str, bool or int
    # The values a grid file that leaves the axis out gets; None: the axis is not in the cells then
    # (split: only grids whose tasks name splits have one), or, with `required`, it must be given.
    default: tuple[Any, ...] | None
    # The StageSpec field that holds the value in the stages it reaches, or a field of one of its sections
    # (`train.learning_rate`: stages without a train section have none); None: it decides other fields.
    stage_field: str | None
    # True: jobs/grid/parse.py's expansion reads the axis by name, because it decides which stages a run has or
    # what goes into them (a resolved model path, the MTL parent, the tasks). False: the value goes, as
    # written, into `stage_field` of each stage of the run whose kind is in `stage_kinds`.
    shapes_stages: bool
    required: bool = False
    stage_kinds: frozenset[str] = EVERY_STAGE
    # A value in few characters, as `stl status` shows cells (`8-shot`); None: `name=value`.
    short: Callable[[Any], str] | None = None
    # A stage's value as `stl disk` describes the stage; "" says nothing. None: `name=value` (nothing for a
    # stage without the field).
    stage_text: Callable[[Any], str] | None = None
    # The token caches whose ids depend on `stage_field`: it is part of their key.
    token_caches: frozenset[str] = frozenset()

    def shown_short(self, value: Any) -> str:
        return self.short(value) if self.short else f"{self.name}={render_value(value)}"

    def described(self, value: Any) -> str:
        if self.stage_text:
            return self.stage_text(value)
        return "" if value is None else f"{self.name}={render_value(value)}"


AXES: tuple[Axis, ...] = (
    Axis("split", str, default=None, stage_field=None, shapes_stages=True),  # picks the tasks
    Axis("model", str, default=None, required=True, stage_field="model", shapes_stages=True,
         short=str, stage_text=lambda model: "" if model is None else str(model)),
    Axis("mtl", str, default=("none",), stage_field=None, shapes_stages=True),  # picks the parent MTL stage
    Axis("instructions", bool, default=(True,), stage_field="instructions", shapes_stages=False,
         short=lambda on: "instr" if on else "no-instr",
         stage_text=lambda on: "no instructions" if on is False else "",
         token_caches=frozenset({FEW_SHOT_TOKENS, EVAL_TOKENS})),
    Axis("shots", int, default=(0,), stage_field="shots", shapes_stages=True,
         short=lambda shots: f"{shots}-shot", stage_text=lambda shots: f"{shots}-shot" if shots else "",
         token_caches=frozenset({FEW_SHOT_TOKENS})),
    Axis("seed", int, default=(0,), stage_field="seed", shapes_stages=True,
         short=lambda seed: f"seed {seed}", stage_text=lambda seed: f"seed {'?' if seed is None else seed}",
         token_caches=frozenset({FEW_SHOT_TOKENS})),
)
AXIS: dict[str, Axis] = {axis.name: axis for axis in AXES}


def default_values(name: str) -> list[Any]:
    """The values of axis `name` in a grid file that leaves it out."""
    return list(AXIS[name].default or ())


def listed_values(section: object) -> dict[str, list[Any]]:
    """The values a grid file's `grid:` section (jobs/grid/parse.py's Axes) lists per axis, in cell order; an axis the
    cells do not have (split, in a grid whose tasks name no splits) is left out."""
    listed = {axis.name: getattr(section, axis.name) for axis in AXES}
    return {name: values for name, values in listed.items() if values is not None}


def format_cell(cell: Mapping[str, Any], *, short: bool = False) -> str:
    """A run's cell on one line: `model=tiny:bart instructions=true seed=2`, or with `short` each value in
    few characters (`tiny:bart mtl=none no-instr 8-shot seed 1`). Keys no axis has (from a newer stl) read
    as name=value."""
    if short:
        return " ".join(AXIS[name].shown_short(value) if name in AXIS else f"{name}={render_value(value)}"
                        for name, value in cell.items())
    return " ".join(f"{name}={render_value(value)}" for name, value in cell.items())


def with_axis_values(spec: StageSpec, cell: Mapping[str, Any]) -> StageSpec:
    """`spec` with the value of each of the cell's axes that shape no stage in that axis's stage field, where
    the stage is of a kind the axis reaches (and, for a section's field, has that section)."""
    for axis in AXES:
        if (axis.shapes_stages or axis.stage_field is None or axis.name not in cell
                or spec.kind.value not in axis.stage_kinds):
            continue
        section, _, name = axis.stage_field.rpartition(".")
        if not section:
            spec = spec.model_copy(update={name: cell[axis.name]})
        elif (config := getattr(spec, section)) is not None:
            spec = spec.model_copy(update={section: config.model_copy(update={name: cell[axis.name]})})
    return spec


def stage_value(spec: object, stage_field: str) -> Any:
    """A stage's value of `stage_field` (`train.learning_rate` reads a section's field), from a StageSpec or
    the dict of its spec.json; None where the stage has none."""
    value = spec
    for part in stage_field.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            return None
    return value


def token_key_fields(spec: StageSpec, cache: str) -> dict[str, Any]:
    """The stage fields set by axes that decide the ids in token cache `cache`: part of its key."""
    return {axis.stage_field: stage_value(spec, axis.stage_field) for axis in AXES
            if axis.stage_field is not None and cache in axis.token_caches}
