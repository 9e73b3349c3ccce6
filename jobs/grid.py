"""The grid file: parse YAML with line numbers, validate, and expand into runs and stages.

Every problem is reported as `file:line: field: what is wrong`, and nothing is written until the
whole file is valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.errors import GridError
from jobs.specs import EvalConfig, RunSpec, StageKind, StageSpec, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_GRID_FILE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
DEFAULT_MAX_RUNS = 10_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TASK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _as_list(value: Any) -> Any:
    """An axis may be written as a single value instead of a list."""
    return value if isinstance(value, list) else [value]


Name = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
TaskName = Annotated[str, Field(pattern=TASK_PATTERN.pattern)]


class TaskSplit(Strict):
    train: list[TaskName] = Field(default_factory=list)
    eval: Annotated[list[TaskName], Field(min_length=1)]


class Mixture(Strict):
    data: str
    tasks: Annotated[list[TaskName], Field(min_length=1)]


class Axes(Strict):
    model: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(min_length=1)]
    mtl: Annotated[list[Name], Field(min_length=1)] = ["none"]
    instructions: Annotated[list[bool], Field(min_length=1)] = [True]
    shots: Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(min_length=1)] = [0]
    seed: Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)] = [0]
    split: Annotated[list[Name], Field(min_length=1)] | None = None

    @field_validator("model", "mtl", "instructions", "shots", "seed", "split", mode="before")
    @classmethod
    def _single_value(cls, value: Any) -> Any:
        return None if value is None else _as_list(value)

    @field_validator("model", "mtl", "instructions", "shots", "seed", "split")
    @classmethod
    def _no_duplicates(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and len({repr(v) for v in value}) != len(value):
            raise ValueError("values must not repeat")
        return value


class GridFile(Strict):
    name: Name
    data: str
    tasks: TaskSplit | dict[Name, TaskSplit]
    grid: Axes
    mixtures: dict[Name, Mixture] = Field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    finetune: TrainConfig | None = None  # few-shot stage; defaults to `train`
    eval: EvalConfig = EvalConfig()
    stage_timeout: Annotated[int, Field(gt=0, le=30 * 86400)] = 86400

    @model_validator(mode="after")
    def _split_axis_matches_tasks(self) -> GridFile:
        if isinstance(self.tasks, dict):
            if not self.tasks:
                raise ValueError("tasks: give train and eval lists, or a map of split name to them")
            if self.grid.split is None:
                object.__setattr__(self.grid, "split", list(self.tasks))
        elif self.grid.split is not None:
            raise ValueError("grid.split needs tasks to map split names to {train, eval}")
        return self


@dataclass(frozen=True)
class ExpandedGrid:
    grid: GridFile
    path: Path
    runs: list[RunSpec]
    stages: dict[str, StageSpec]


# --- YAML with positions -------------------------------------------------------------------


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that also accepts 5e-5 as a float (YAML 1.1 wants 5.0e-5)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class _Positions:
    lines: dict[tuple[str | int, ...], int]

    def line_of(self, loc: tuple[str | int, ...]) -> int:
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), 1)


def _walk_nodes(node: yaml.Node, loc: tuple[str | int, ...], out: dict[tuple[str | int, ...], int],
                problems: list[str], where: str, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        return
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*loc, key))
                problems.append(f"{where}:{line}: {dotted}: duplicate key (first at line {seen[key]})")
            seen[key] = line
            out[(*loc, key)] = line
            _walk_nodes(value_node, (*loc, key), out, problems, where, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk_nodes(item, (*loc, index), out, problems, where, budget)


def _read_text(path: Path, where: str) -> str:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GridError([f"{where}:1: file: cannot read grid file: {e.strerror or e}"]) from e
    if size > MAX_GRID_FILE_BYTES:
        raise GridError([f"{where}:1: file: grid file is {size:,} bytes; the limit is "
                         f"{MAX_GRID_FILE_BYTES:,}. A grid lists axes, not data"])
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GridError([f"{where}:{line}: file: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                         "save the file as UTF-8"]) from e


def load_yaml(path: Path) -> tuple[Any, _Positions]:
    where = str(path)
    text = _read_text(path, where)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise GridError([f"{where}:{line}: yaml: {e.problem or e.context}"]) from e
    except yaml.YAMLError as e:
        raise GridError([f"{where}:1: yaml: {e}"]) from e
    if root is None:
        raise GridError([f"{where}:1: file: the grid file is empty"])
    lines: dict[tuple[str | int, ...], int] = {}
    problems: list[str] = []
    budget = [MAX_YAML_NODES]
    _walk_nodes(root, (), lines, problems, where, budget)
    if budget[0] < 0:
        raise GridError([f"{where}:1: yaml: more than {MAX_YAML_NODES:,} nodes once aliases are expanded "
                         "(an alias bomb?); write the grid out plainly"])
    if problems:
        raise GridError(problems)
    try:
        data = _Loader(text).construct_document(root)
    except yaml.YAMLError as e:
        raise GridError([f"{where}:1: yaml: {e}"]) from e
    return data, _Positions(lines)


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in {"int_type", "int_parsing"}:
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
        text = "expected letters, digits, '_', '.' or '-' only (no paths, spaces or shell characters)"
    elif kind == "too_short":
        text = "must not be empty"
    elif kind == "string_too_long":
        text = "is too long"
    else:
        text = str(error["msg"]).removeprefix("Value error, ")
    return f"{text}, got {_show(error.get('input'))}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return '"' + shown.replace('"', '\\"') + '"'
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value)


def _loc_for_report(loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    """Drop pydantic's union-branch names (e.g. 'TaskSplit', 'dict[...]') from a location."""
    keep: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and (part[:1].isupper() or "[" in part or part.startswith("function-")):
            continue
        keep.append(part)
    return tuple(keep)


def _format_errors(error: ValidationError, where: str, positions: _Positions) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for item in error.errors():
        loc = _loc_for_report(tuple(item["loc"]))
        field = ".".join(str(p) for p in loc) or "grid"
        line = positions.line_of(loc)
        message = f"{where}:{line}: {field}: {_describe(dict(item))}"
        if message not in seen:
            seen.add(message)
            problems.append(message)
    return problems


# --- semantic checks and expansion ----------------------------------------------------------


def _resolve_source(source: str, base: Path) -> str:
    if source.startswith("hf:"):
        return source
    path = Path(source).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def parse_grid(path: Path, *, max_runs: int = DEFAULT_MAX_RUNS) -> ExpandedGrid:
    """Read, validate and expand a grid file. Raises GridError listing every problem."""
    # Imported here: these modules are light, but keep the grid schema importable on its own.
    from jobs.data import task_catalog
    from jobs.models import check_model_name

    where = str(path)
    data, positions = load_yaml(path)
    if not isinstance(data, dict):
        raise GridError([f"{where}:1: grid: expected a mapping with name, data, tasks and grid keys"])
    try:
        grid = GridFile.model_validate(data)
    except ValidationError as e:
        raise GridError(_format_errors(e, where, positions)) from e

    base = path.resolve().parent
    problems: list[str] = []

    def report(loc: tuple[str | int, ...], message: str) -> None:
        field = ".".join(str(p) for p in loc)
        problems.append(f"{where}:{positions.line_of(loc)}: {field}: {message}")

    sources: dict[str, tuple[str | int, ...]] = {_resolve_source(grid.data, base): ("data",)}
    for name, mixture in grid.mixtures.items():
        sources.setdefault(_resolve_source(mixture.data, base), ("mixtures", name, "data"))
    catalogs: dict[str, dict[str, Any]] = {}
    for source, loc in sources.items():
        if not source.startswith("hf:") and not Path(source).is_file():
            report(loc, f"data file not found: {source}")
            continue
        try:
            catalogs[source] = task_catalog(source)
        except Exception as e:  # noqa: BLE001 - any unreadable data file is a grid problem
            report(loc, f"cannot read data file: {e}")

    def check_tasks(source: str, tasks: list[str], loc: tuple[str | int, ...]) -> None:
        catalog = catalogs.get(source)
        if not catalog:  # unreadable (already reported) or hf: (validated when it runs)
            return
        for index, task in enumerate(tasks):
            if task not in catalog:
                close = sorted(t for t in catalog if t.split("_")[0] == task.split("_")[0])[:3]
                hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(catalog)} tasks"
                report((*loc, index), f'unknown task "{task}" in {Path(source).name}{hint}')

    main_source = _resolve_source(grid.data, base)
    splits = grid.tasks if isinstance(grid.tasks, dict) else {"": grid.tasks}
    for split_name, split in splits.items():
        prefix: tuple[str | int, ...] = ("tasks", split_name) if split_name else ("tasks",)
        check_tasks(main_source, split.train, (*prefix, "train"))
        check_tasks(main_source, split.eval, (*prefix, "eval"))
        overlap = sorted(set(split.train) & set(split.eval))
        if overlap:
            report((*prefix, "eval"), f"held-out tasks also appear in train: {', '.join(overlap)}")
    for name, mixture in grid.mixtures.items():
        check_tasks(_resolve_source(mixture.data, base), mixture.tasks, ("mixtures", name, "tasks"))
    for index, model in enumerate(grid.grid.model):
        problem = check_model_name(model)
        if problem:
            report(("grid", "model", index), problem)
    for index, mtl in enumerate(grid.grid.mtl):
        if mtl not in ("none", "in-domain") and mtl not in grid.mixtures:
            known = ", ".join(["none", "in-domain", *grid.mixtures])
            report(("grid", "mtl", index), f'unknown mixture "{mtl}"; use one of: {known}')
        if mtl == "in-domain" and any(not s.train for s in splits.values()):
            report(("grid", "mtl", index), "in-domain MTL needs tasks.train to list source tasks")
    if grid.grid.split is not None and isinstance(grid.tasks, dict):
        for index, split_name in enumerate(grid.grid.split):
            if split_name not in grid.tasks:
                report(("grid", "split", index), f'unknown split "{split_name}"; tasks defines '
                       f"{', '.join(grid.tasks)}")

    axes = grid.grid
    total = (len(axes.model) * len(axes.mtl) * len(axes.instructions) * len(axes.shots)
             * len(axes.seed) * len(axes.split or [None]))
    if total > max_runs:
        report(("grid",), f"expands to {total:,} runs, over the limit of {max_runs:,}; "
               "split the grid or pass --max-runs")
    if problems:
        raise GridError(problems)
    runs, stages = _expand(grid, base)
    return ExpandedGrid(grid=grid, path=path, runs=runs, stages=stages)


def _cells(grid: GridFile) -> Iterator[dict[str, Any]]:
    axes = grid.grid
    for split, model, mtl, instructions, shots, seed in product(
        axes.split or [None], axes.model, axes.mtl, axes.instructions, axes.shots, axes.seed
    ):
        cell: dict[str, Any] = {"model": model, "mtl": mtl, "instructions": instructions,
                                "shots": shots, "seed": seed}
        if split is not None:
            cell = {"split": split, **cell}
        yield cell


def _expand(grid: GridFile, base: Path) -> tuple[list[RunSpec], dict[str, StageSpec]]:
    stages: dict[str, StageSpec] = {}
    runs: list[RunSpec] = []
    data = _resolve_source(grid.data, base)
    finetune_cfg = grid.finetune or grid.train

    def add(spec: StageSpec) -> str:
        stage_id = spec.stage_id
        stages.setdefault(stage_id, spec)
        return stage_id

    for cell in _cells(grid):
        split = grid.tasks[cell["split"]] if isinstance(grid.tasks, dict) else grid.tasks
        model, seed, instructions = cell["model"], cell["seed"], cell["instructions"]
        order: list[str] = []
        parent: str | None = None
        if cell["mtl"] != "none":
            if cell["mtl"] == "in-domain":
                mix_data, mix_tasks = data, split.train
            else:
                mixture = grid.mixtures[cell["mtl"]]
                mix_data, mix_tasks = _resolve_source(mixture.data, base), mixture.tasks
            parent = add(StageSpec(kind=StageKind.mtl, model=model, seed=seed, instructions=instructions,
                                   data=mix_data, tasks=tuple(mix_tasks), train=grid.train))
            order.append(parent)
        eval_stages: list[str] = []
        # A hub model evaluated with no training is the same for every seed: let seeds share it.
        eval_seed = seed if (parent is not None or model.startswith("tiny:")) else 0
        if cell["shots"] == 0:
            eval_id = add(StageSpec(kind=StageKind.eval, model=model, parent=parent, seed=eval_seed,
                                    instructions=instructions, data=data, tasks=tuple(split.eval),
                                    eval=grid.eval))
            order.append(eval_id)
            eval_stages.append(eval_id)
        else:
            for task in split.eval:
                ft_id = add(StageSpec(kind=StageKind.finetune, model=model, parent=parent, seed=seed,
                                      instructions=instructions, data=data, tasks=(task,),
                                      shots=cell["shots"], train=finetune_cfg))
                eval_id = add(StageSpec(kind=StageKind.eval, model=model, parent=ft_id, seed=seed,
                                        instructions=instructions, data=data, tasks=(task,),
                                        shots=cell["shots"], eval=grid.eval))
                order += [ft_id, eval_id]
                eval_stages.append(eval_id)
        runs.append(RunSpec(grid=grid.name, cell=cell, stages=tuple(order), eval_stages=tuple(eval_stages)))
    return runs, stages
