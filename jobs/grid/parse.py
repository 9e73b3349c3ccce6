"""The grid file: its schema, and parse_grid, which reads, validates and expands it into runs and stages.

Every problem is reported as `file:line: field: what is wrong`, one line each, and nothing is
written until the whole file is valid. Hostile input (alias bombs, huge or binary files, names
that would escape a path or a shell) is refused before anything expensive happens.
parse_grid's steps, each in its module: read the YAML with the line of every value (jobs/grid/yaml_file.py),
check it against the schema here, check what the schema cannot (jobs/grid/checks.py: data files,
tasks, leaks, models, size), and expand each cell of the axes (jobs/axes.py) into stages (here).
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from stl.jobs.axes import AXES, default_values, listed_values, with_axis_values
from stl.jobs.errors import GridError
from stl.jobs.grid.checks import RESERVED_MTL, _resolve_model, _resolve_source, check_grid
from stl.jobs.grid.yaml_file import MAX_REPORTED_PROBLEMS, _field_name, _Positions, _refuse, load_yaml
from stl.jobs.settings import DEFAULT_MAX_RUNS
from stl.jobs.specs import EvalConfig, RunSpec, StageKind, StageSpec, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TASK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
PATTERN_HINTS = {
    NAME_PATTERN.pattern: "expected a name of 1 to 64 letters, digits, '_', '.' or '-', starting with a letter "
                          "or digit (no paths, spaces or shell characters)",
    TASK_PATTERN.pattern: "expected a task name of letters, digits, '_', '.', ':', '+' or '-' "
                          "(no paths, spaces or shell characters)",
}


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _as_list(value: Any) -> Any:
    """An axis may be written as a single value instead of a list."""
    return value if isinstance(value, list) else [value]


Name = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
TaskName = Annotated[str, Field(pattern=TASK_PATTERN.pattern)]
Source = Annotated[str, Field(min_length=1)]
def _each_once(tasks: list[str]) -> list[str]:
    repeated = sorted({task for task in tasks if tasks.count(task) > 1})
    if repeated:
        raise ValueError(f"a task is listed more than once: {', '.join(repeated)}; name each task once")
    return tasks


class TaskSplit(Strict):
    train: list[TaskName] = Field(default_factory=list)
    eval: Annotated[list[TaskName], Field(min_length=1)]

    _tasks_once = field_validator("train", "eval")(_each_once)


SINGLE_TAG, SPLITS_TAG = "single-split", "named-splits"


def _tasks_form(value: Any) -> str:
    """`tasks` is either {train, eval} or a map of split names to {train, eval}; pick the one meant,
    so that a mistake is reported against that form alone instead of against both."""
    if (isinstance(value, dict) and "train" not in value and "eval" not in value
            and any(isinstance(v, dict) for v in value.values())):
        return SPLITS_TAG
    return SINGLE_TAG


Tasks = Annotated[
    Annotated[TaskSplit, Tag(SINGLE_TAG)] | Annotated[dict[Name, TaskSplit], Tag(SPLITS_TAG)],
    Discriminator(_tasks_form),
]


class Mixture(Strict):
    data: Source
    tasks: Annotated[list[TaskName], Field(min_length=1)]

    _tasks_once = field_validator("tasks")(_each_once)


class Axes(Strict):
    """The `grid:` section: the values of each axis of jobs/axes.py (one field per axis there), as checked here."""

    model: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(min_length=1)]
    mtl: Annotated[list[Name], Field(min_length=1)] = default_values("mtl")
    instructions: Annotated[list[bool], Field(min_length=1)] = default_values("instructions")
    shots: Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(min_length=1)] = default_values("shots")
    seed: Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)] = default_values("seed")
    split: Annotated[list[Name], Field(min_length=1)] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _single_value(cls, value: Any) -> Any:
        # A mapping or set is not a single value: let it fail as "expected a list", not as an item.
        return value if value is None or isinstance(value, (dict, set)) else _as_list(value)

    @field_validator("*")
    @classmethod
    def _no_duplicates(cls, value: list[Any] | None) -> list[Any] | None:
        if value is None:
            return value
        seen: set[str] = set()
        for item in value:
            if repr(item) in seen:
                raise ValueError(f"values must not repeat; {_show(item)} is given more than once")
            seen.add(repr(item))
        return value


class GridFile(Strict):
    name: Name
    data: Source
    tasks: Tasks
    grid: Axes
    mixtures: dict[Name, Mixture] = Field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    finetune: TrainConfig | None = None  # few-shot stage; defaults to `train`
    eval: EvalConfig = EvalConfig()
    stage_timeout: Annotated[int, Field(gt=0, le=30 * 86400)] = 86400
    # A held-out task's variants (`<task>-poluteoptions`) as sources leak it; true accepts that on purpose.
    allow_task_overlap: bool = False

    @model_validator(mode="after")
    def _split_axis_defaults_to_every_split(self) -> GridFile:
        # A split axis without a split map is reported by parse_grid, where it has a line number.
        if isinstance(self.tasks, dict) and self.grid.split is None:
            object.__setattr__(self.grid, "split", list(self.tasks))
        return self


# Which model describes the keys of each section, to suggest the key that was meant.
SECTION_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): GridFile, ("grid",): Axes, ("train",): TrainConfig, ("finetune",): TrainConfig,
    ("eval",): EvalConfig, ("tasks",): TaskSplit, ("tasks", "*"): TaskSplit, ("mixtures", "*"): Mixture,
}


@dataclass(frozen=True)
class ExpandedGrid:
    grid: GridFile
    path: Path
    runs: list[RunSpec]
    stages: dict[str, StageSpec]

    def run_ids_for(self, cells: list[dict[str, Any]]) -> list[str | None]:
        """The id each cell's run has under this file's settings; None for a cell the file cannot
        express (its mixture or split is gone, or it has other axes). Cells this file queues cost a
        lookup; others (a seed dropped from the axis, say) are expanded again."""
        own = {_cell_key(run.cell): run.run_id for run in self.runs}
        missing = [cell for cell in cells if _cell_key(cell) not in own and _expressible(self.grid, cell)]
        if missing:
            runs, _ = _expand(self.grid, self.path.resolve().parent, missing)
            own.update({_cell_key(run.cell): run.run_id for run in runs})
        return [own.get(_cell_key(cell)) for cell in cells]


def _cell_key(cell: dict[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True)


def _expressible(grid: GridFile, cell: dict[str, Any]) -> bool:
    """Whether `cell` is one this grid file could have produced, whatever values its axes list now."""
    split_mapped = isinstance(grid.tasks, dict)
    axes = [axis for axis in AXES if axis.name in listed_values(grid.grid)]
    if set(cell) != {axis.name for axis in axes}:
        return False
    if split_mapped and cell["split"] not in grid.tasks:  # type: ignore[operator]
        return False
    if any(type(cell[axis.name]) is not axis.type for axis in axes) or cell["shots"] < 0:
        return False
    if cell["mtl"] == "in-domain":
        split = grid.tasks[cell["split"]] if split_mapped else grid.tasks  # type: ignore[index]
        return bool(split.train)  # type: ignore[union-attr]
    return cell["mtl"] in RESERVED_MTL or cell["mtl"] in grid.mixtures


# --- schema errors as file:line: field: message ----------------------------------------------


def _known_keys(section: tuple[Any, ...]) -> list[str]:
    parts = tuple(str(p) for p in section)
    model = SECTION_MODELS.get(parts)
    if model is None and len(parts) == 2:  # a named mixture or split
        model = SECTION_MODELS.get((parts[0], "*"))
    return list(model.model_fields) if model else []


def _describe(error: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            return f"unknown key; did you mean {close[0]}?"
        return f"unknown key; known keys here: {', '.join(known)}" if known else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "invalid_key":
        return f"keys must be names, got {_show(value)}; quote it if it is meant as one"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        text = "expected an integer"
    elif kind == "bool_type":
        text = "expected true or false"
    elif kind in {"float_type", "float_parsing"}:
        text = "expected a number"
    elif kind == "string_type":
        text = "expected a string"
    elif kind == "list_type":
        text = "expected a list"
    elif kind in {"dict_type", "model_type", "model_attributes_type"}:
        text = "expected a mapping of keys to values"
    elif kind == "greater_than_equal":
        text = f"expected a value >= {ctx.get('ge')}"
    elif kind == "greater_than":
        text = f"expected a value > {ctx.get('gt')}"
    elif kind == "less_than_equal":
        text = f"expected a value <= {ctx.get('le')}"
    elif kind == "less_than":
        text = f"expected a value < {ctx.get('lt')}"
    elif kind == "string_pattern_mismatch":
        text = PATTERN_HINTS.get(str(ctx.get("pattern")), f"expected text matching {ctx.get('pattern')}")
    elif kind in {"too_short", "string_too_short"}:
        return "must not be empty; give at least one value"
    elif kind == "string_too_long":
        text = f"is too long (at most {ctx.get('max_length')} characters)"
    else:
        text = str(error["msg"]).removeprefix("Value error, ")
        if isinstance(value, (list, dict)):  # the message of a whole-list check says what is wrong
            return text
    return f"{text}, got {_show(value)}{_yaml_typing_hint(kind, value)}"


def _yaml_typing_hint(kind: str, value: Any) -> str:
    """YAML turns some unquoted words into booleans and dates; say so when a string was wanted."""
    if kind not in {"string_type", "string_pattern_mismatch"}:
        return ""
    if isinstance(value, bool):
        return " (YAML reads yes/no/on/off/true/false as a boolean; quote it)"
    if isinstance(value, (datetime.date, int, float)):
        return " (YAML reads it as a number or a date; quote it)"
    return ""


def _show(value: Any) -> str:
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return '"' + shown.replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, datetime.date):
        return value.isoformat()
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _loc_for_report(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's inner names (the tasks union's tag, validator names) from a location."""
    keep = list(loc)
    if len(keep) >= 2 and keep[0] == "tasks" and keep[1] in (SINGLE_TAG, SPLITS_TAG):
        del keep[1]
    return tuple(p for p in keep if not (isinstance(p, str) and p.startswith("function-")))


def _format_errors(error: ValidationError, where: str, positions: _Positions) -> GridError:
    problems: list[str] = []
    seen: set[str] = set()
    items = error.errors(include_url=False)
    # Only the lines that will be shown are worth formatting: a 1 MB file can hold 100,000 mistakes.
    shown = items[: MAX_REPORTED_PROBLEMS + 1]
    for item in shown:
        loc = _loc_for_report(tuple(item["loc"]))
        if loc and loc[-1] == "[key]":  # a bad name used as a key: report it at that key
            line = positions.line_of(loc[:-1])
            field = _field_name(positions.as_written(loc[:-2])) or "grid"
        else:
            line = positions.line_of(loc)
            field = _field_name(positions.as_written(loc)) or "grid"
        message = f"{where}:{line}: {field}: {_describe(dict(item), loc)}"
        if message not in seen:
            seen.add(message)
            problems.append(message)
    return _refuse(problems, not_formatted=len(items) - len(shown))


# --- parsing and expansion ------------------------------------------------------------------


def parse_grid(path: Path, *, max_runs: int = DEFAULT_MAX_RUNS) -> ExpandedGrid:
    """Read, validate and expand a grid file. Raises GridError listing every problem."""
    where = str(path)
    data, positions = load_yaml(path)
    if not isinstance(data, dict):
        raise GridError([f"{where}:{positions.line_of(())}: grid: expected a mapping with name, data, tasks "
                         f"and grid keys, got {_show(data)}; see grids/example.yaml"])
    try:
        grid = GridFile.model_validate(data, strict=True)  # strict all the way down: "yes" is not true
    except ValidationError as e:
        raise _format_errors(e, where, positions) from e
    base = path.resolve().parent
    check_grid(grid, base, where, positions, max_runs=max_runs)
    runs, stages = _expand(grid, base)
    return ExpandedGrid(grid=grid, path=path, runs=runs, stages=stages)


def _cells(grid: GridFile) -> Iterator[dict[str, Any]]:
    values = listed_values(grid.grid)
    for combination in product(*values.values()):
        yield dict(zip(values, combination, strict=True))


def _expand(grid: GridFile, base: Path, cells: Iterable[dict[str, Any]] | None = None
            ) -> tuple[list[RunSpec], dict[str, StageSpec]]:
    stages: dict[str, StageSpec] = {}
    runs: list[RunSpec] = []
    data = _resolve_source(grid.data, base)
    finetune_cfg = grid.finetune or grid.train

    def add(spec: StageSpec) -> str:
        spec = with_axis_values(spec, cell)  # the values of the axes below that shape no stage
        stage_id = spec.stage_id
        stages.setdefault(stage_id, spec)
        return stage_id

    for cell in _cells(grid) if cells is None else cells:
        split = grid.tasks[cell["split"]] if isinstance(grid.tasks, dict) else grid.tasks
        seed = cell["seed"]
        model = _resolve_model(cell["model"], base)  # the cell keeps the name as written
        order: list[str] = []
        parent: str | None = None
        if cell["mtl"] != "none":
            if cell["mtl"] == "in-domain":
                mix_data, mix_tasks = data, split.train
            else:
                mixture = grid.mixtures[cell["mtl"]]
                mix_data, mix_tasks = _resolve_source(mixture.data, base), mixture.tasks
            parent = add(StageSpec(kind=StageKind.mtl, model=model, seed=seed,
                                   data=mix_data, tasks=tuple(mix_tasks), train=grid.train))
            order.append(parent)
        eval_stages: list[str] = []
        # A hub model evaluated with no training is the same for every seed: let seeds share it.
        eval_seed = seed if (parent is not None or model.startswith("tiny:")) else 0
        if cell["shots"] == 0:
            eval_id = add(StageSpec(kind=StageKind.eval, model=model, parent=parent, seed=eval_seed,
                                    data=data, tasks=tuple(split.eval),
                                    eval=grid.eval))
            order.append(eval_id)
            eval_stages.append(eval_id)
        else:
            for task in split.eval:
                ft_id = add(StageSpec(kind=StageKind.finetune, model=model, parent=parent, seed=seed,
                                      data=data, tasks=(task,),
                                      shots=cell["shots"], holdout=grid.eval.max_examples, train=finetune_cfg))
                eval_id = add(StageSpec(kind=StageKind.eval, model=model, parent=ft_id, seed=seed,
                                        data=data, tasks=(task,),
                                        shots=cell["shots"], eval=grid.eval))
                order += [ft_id, eval_id]
                eval_stages.append(eval_id)
        runs.append(RunSpec(grid=grid.name, cell=cell, stages=tuple(order), eval_stages=tuple(eval_stages)))
    return runs, stages
