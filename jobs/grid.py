"""The grid file: parse YAML with line numbers, validate, and expand into runs and stages.

Every problem is reported as `file:line: field: what is wrong`, one line each, and nothing is
written until the whole file is valid. Hostile input (alias bombs, huge or binary files, names
that would escape a path or a shell) is refused before anything expensive happens.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
import stat
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
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

from jobs.codec import UNSAFE_CHARS
from jobs.errors import GridError
from jobs.settings import DEFAULT_MAX_RUNS
from jobs.specs import EvalConfig, RunSpec, StageKind, StageSpec, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

MAX_GRID_FILE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
# The deepest real path is tasks.<split>.eval.<index>; anything far deeper is a mistake or an attack.
MAX_YAML_DEPTH = 12
MAX_REPORTED_PROBLEMS = 50
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TASK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
# Characters YAML refuses (it allows tab, newline, carriage return and printable Unicode).
YAML_FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
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
RESERVED_MTL = ("none", "in-domain")  # values of the mtl axis that are not mixtures
HF_SOURCE = re.compile(r"^hf:[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")


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
    model: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(min_length=1)]
    mtl: Annotated[list[Name], Field(min_length=1)] = ["none"]
    instructions: Annotated[list[bool], Field(min_length=1)] = [True]
    shots: Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(min_length=1)] = [0]
    seed: Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)] = [0]
    split: Annotated[list[Name], Field(min_length=1)] | None = None

    @field_validator("model", "mtl", "instructions", "shots", "seed", "split", mode="before")
    @classmethod
    def _single_value(cls, value: Any) -> Any:
        # A mapping or set is not a single value: let it fail as "expected a list", not as an item.
        return value if value is None or isinstance(value, (dict, set)) else _as_list(value)

    @field_validator("model", "mtl", "instructions", "shots", "seed", "split")
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
    if set(cell) != {"model", "mtl", "instructions", "shots", "seed", *(["split"] if split_mapped else [])}:
        return False
    if split_mapped and cell["split"] not in grid.tasks:  # type: ignore[operator]
        return False
    types_ok = (isinstance(cell["model"], str) and isinstance(cell["mtl"], str)
                and isinstance(cell["instructions"], bool) and type(cell["shots"]) is int
                and type(cell["seed"]) is int)
    if not types_ok or cell["shots"] < 0:
        return False
    if cell["mtl"] == "in-domain":
        split = grid.tasks[cell["split"]] if split_mapped else grid.tasks  # type: ignore[index]
        return bool(split.train)  # type: ignore[union-attr]
    return cell["mtl"] in RESERVED_MTL or cell["mtl"] in grid.mixtures


def _refuse(problems: list[str], not_formatted: int = 0) -> GridError:
    """One line per problem, however odd the input; a flood is cut short so the first ones stay readable."""
    lines = [YAML_FORBIDDEN_CHARS.sub("?", " ".join(p.split())) for p in problems[:MAX_REPORTED_PROBLEMS]]
    hidden = len(problems) + not_formatted - len(lines)
    if hidden > 0:
        where_and_line = lines[-1].split(": ", 1)[0]
        lines.append(f"{where_and_line}: grid: {hidden:,} more problems not shown; fix the ones above first")
    return GridError(lines)


# --- YAML with positions -------------------------------------------------------------------


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that also accepts 5e-5 as a float (YAML 1.1 wants 5.0e-5)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's constructors raise plain Python errors for values such as 2024-13-45 or
        # `!!int abc`; give them the node's position like any other YAML error.
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            kind = str(node.tag).rsplit(":", 1)[-1]
            shown = node.value[:40] if isinstance(node.value, str) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown!r} as a YAML {kind}", node.start_mark) from e


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

Loc = tuple[str | int, ...]
MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_path(loc: tuple[Any, ...]) -> tuple[str, ...]:
    # YAML keys are recorded as written; pydantic may hand back an int key or a list index.
    return tuple(str(part) for part in loc)


@dataclass
class _Positions:
    lines: dict[tuple[str, ...], int]
    # A key YAML reads as true, null or a number reaches pydantic as True, None, 1...: (parent, that) -> as written.
    aliases: dict[tuple[str, ...], str] = field(default_factory=dict)

    def as_written(self, loc: tuple[Any, ...]) -> tuple[str, ...]:
        written: tuple[str, ...] = ()
        for part in _key_path(loc):
            written = (*written, self.aliases.get((*written, part), part))
        return written

    def line_of(self, loc: tuple[Any, ...]) -> int:
        path = self.as_written(loc)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


@dataclass
class _Walk:
    """State of one pass over the composed YAML graph (aliases still shared, so this is cheap)."""

    where: str
    lines: dict[tuple[str, ...], int]
    problems: list[str]
    nodes_left: int = MAX_YAML_NODES
    aliases: dict[tuple[str, ...], str] = field(default_factory=dict)

    def visit(self, node: yaml.Node, loc: tuple[str, ...], ancestors: set[int]) -> None:
        self.nodes_left -= 1
        if self.nodes_left < 0:
            return
        line = node.start_mark.line + 1
        self.lines.setdefault(loc, line)
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return
        field = _field_name(loc) or "yaml"
        if id(node) in ancestors:
            self.problems.append(f"{self.where}:{line}: {field}: recursive alias (a list or mapping that "
                                 "contains itself); write the values out")
            self.nodes_left = min(self.nodes_left, 0)  # the graph is infinite: nothing further is meaningful
            return
        if len(loc) >= MAX_YAML_DEPTH:
            self.problems.append(f"{self.where}:{line}: {field}: nested too deeply (more than "
                                 f"{MAX_YAML_DEPTH} levels); a grid needs at most 4")
            return
        ancestors.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self._visit_mapping(node, loc, ancestors)
        else:
            for index, item in enumerate(node.value):
                if not node.start_mark.index <= item.start_mark.index <= node.end_mark.index:
                    # An alias to a node defined elsewhere: point at the list that uses it.
                    self.lines.setdefault((*loc, str(index)), line)
                self.visit(item, (*loc, str(index)), ancestors)
        ancestors.discard(id(node))

    def _visit_merge(self, node: yaml.Node, loc: tuple[str, ...], line: int, ancestors: set[int]) -> None:
        # Checked here, where the `<<` line is known; the constructor would blame the merged value.
        merged = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not all(isinstance(item, yaml.MappingNode) for item in merged):
            self.problems.append(f"{self.where}:{line}: {_field_name(loc) or 'yaml'}: '<<' merges a mapping "
                                 "(or a list of mappings) into this one; point it at a mapping")
            return
        for item in merged:
            self.visit(item, loc, ancestors)

    def _visit_mapping(self, node: yaml.MappingNode, loc: tuple[str, ...], ancestors: set[int]) -> None:
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(f"{self.where}:{line}: {_field_name(loc) or 'yaml'}: a key must be a "
                                     "plain name, not a list or mapping")
                continue
            key = key_node.value
            if key == "<<" and key_node.tag == MERGE_TAG:
                self._visit_merge(value_node, loc, line, ancestors)
                continue
            if key in seen:
                self.problems.append(f"{self.where}:{line}: {_field_name((*loc, key))}: duplicate key "
                                     f"(first at line {seen[key]}); keep one")
            seen[key] = line
            self.lines[(*loc, key)] = line
            for spelling in _constructed_spellings(key_node):
                self.aliases.setdefault((*loc, spelling), key)
            self.visit(value_node, (*loc, key), ancestors)


def _constructed_spellings(key_node: yaml.ScalarNode) -> list[str]:
    """How pydantic may spell a key that YAML reads as something other than a string (`true:` -> True or 1)."""
    if key_node.tag == "tag:yaml.org,2002:str":
        return []
    try:
        value = yaml.safe_load(key_node.value)
    except Exception:  # noqa: BLE001 - `2024-13-45:` reads as a date and fails as one: the key stays as written
        return []
    return [str(value), *([str(int(value))] if isinstance(value, bool) else [])]


def _open_grid_file(path: Path, where: str) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError as e:
        raise GridError([f"{where}:1: file: no such grid file; check the path"]) from e
    except OSError as e:
        raise GridError([f"{where}:1: file: cannot read grid file: {e.strerror or e}"]) from e
    if stat.S_ISDIR(info.st_mode):
        raise GridError([f"{where}:1: file: is a directory; give the grid's YAML file"])
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device could block or never end
        raise GridError([f"{where}:1: file: not a regular file; give the grid's YAML file"])
    if info.st_size > MAX_GRID_FILE_BYTES:
        raise GridError([f"{where}:1: file: grid file is {info.st_size:,} bytes; the limit is "
                         f"{MAX_GRID_FILE_BYTES:,}. A grid lists axes, not data: point `data` at the dataset"])
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_GRID_FILE_BYTES + 1)  # the file may have grown since stat()
    except OSError as e:
        raise GridError([f"{where}:1: file: cannot read grid file: {e.strerror or e}"]) from e
    if len(raw) > MAX_GRID_FILE_BYTES:
        raise GridError([f"{where}:1: file: grid file is over {MAX_GRID_FILE_BYTES:,} bytes; "
                         "a grid lists axes, not data"])
    return raw


def _read_text(path: Path, where: str) -> str:
    raw = _open_grid_file(path, where)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise GridError([f"{where}:1: file: the file is UTF-16 (or UTF-32); save it as UTF-8"])
    if b"\0" in raw:
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise GridError([f"{where}:{line}: file: contains NUL bytes, so this looks like a binary file, "
                         "not a YAML grid"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GridError([f"{where}:{line}: file: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                         "save the file as UTF-8"]) from e
    bad = YAML_FORBIDDEN_CHARS.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise GridError([f"{where}:{line}: file: control character U+{ord(bad.group()):04X} is not allowed in "
                         "YAML; delete it"])
    return text


def _yaml_hint(error: yaml.MarkedYAMLError, text: str) -> str:
    """What to do about a YAML error, in the words of someone editing the file."""
    said = f"{error.context or ''} {error.problem or ''}"
    mark = error.problem_mark
    if mark is not None and 0 <= mark.index < len(text) and text[mark.index] == "\t":
        return "a tab character; YAML indents with spaces only"
    hints = [
        ("quoted scalar", "close the quote"),
        ("flow sequence", "close the [ with ], or quote a value that contains ',' or ']'"),
        ("flow mapping", "close the { with }, or quote a value that contains ',' or '}'"),
        ("mapping values are not allowed", "a second ': ' on this line; quote the value, or fix the indentation"),
        ("undefined alias", "define the &anchor before its *alias, or write the values out"),
        ("duplicate anchor", "give each &anchor its own name"),
        ("single document", "one grid per file: remove the '---' and what follows, or split the file"),
        ("constructor for the tag", "grids are plain YAML: remove the !tag"),
        ("unhashable key", "a key must be a plain name"),
        ("merging", "'<<' merges a mapping (or a list of mappings) into this one"),
        ("nesting depth", "a grid needs at most 4 levels of nesting"),
        ("cannot read", "quote it if it is meant as text"),
        ("block", "check the indentation: keys of one mapping start in the same column"),
    ]
    for words, hint in hints:
        if words in said:
            return hint
    return "check the YAML syntax on this line"


def _yaml_problem(error: yaml.YAMLError, where: str, text: str) -> str:
    if not isinstance(error, yaml.MarkedYAMLError):
        return f"{where}:1: yaml: {' '.join(str(error).split())}"
    problem_mark, context_mark = error.problem_mark, error.context_mark
    # An error found only at the end of the file (an unclosed quote) is about where it started.
    at_end = problem_mark is not None and problem_mark.index >= len(text.rstrip())
    mark = context_mark if (at_end and context_mark is not None) else (problem_mark or context_mark)
    line = mark.line + 1 if mark is not None else 1
    what = error.problem or error.context or "invalid YAML"
    if error.context and error.problem and context_mark is not None and context_mark.line + 1 != line:
        what = f"{error.problem} ({error.context} from line {context_mark.line + 1})"
    return f"{where}:{line}: yaml: {what}; {_yaml_hint(error, text)}"


def load_yaml(path: Path) -> tuple[Any, _Positions]:
    where = str(path)
    text = _read_text(path, where)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise GridError([_yaml_problem(e, where, text)]) from e
    if root is None:
        raise GridError([f"{where}:1: file: the grid file is empty; see grids/example.yaml for one"])
    walk = _Walk(where=where, lines={}, problems=[])
    walk.visit(root, (), set())
    if walk.nodes_left < 0 and not walk.problems:
        raise GridError([f"{where}:{root.start_mark.line + 1}: yaml: more than {MAX_YAML_NODES:,} values once "
                         "aliases are expanded (an alias bomb?); a grid needs far fewer: write it out plainly"])
    if walk.problems:
        raise _refuse(walk.problems)
    try:
        data = _Loader(text).construct_document(root)
    except yaml.YAMLError as e:
        raise GridError([_yaml_problem(e, where, text)]) from e
    positions = _Positions(walk.lines, walk.aliases)
    problems = _control_character_problems(data, where, positions)
    if problems:
        raise _refuse(problems)
    return data, positions


def _control_character_problems(data: Any, where: str, positions: _Positions) -> list[str]:
    """Control characters that YAML escapes (`"\\e[2J"`, `"\\a"`) put into a value or key: the file itself
    holds none, but the names and paths it gives would reach other users' terminals in `stl status`."""
    problems: list[str] = []
    checked: set[int] = set()  # an alias is the same string object: a long one used 2000 times is read once

    def check(value: str, loc: tuple[Any, ...], what: str) -> None:
        if id(value) in checked:
            return
        checked.add(id(value))
        bad = UNSAFE_CHARS.search(value)
        if bad:
            problems.append(f"{where}:{positions.line_of(loc)}: {_field_name(positions.as_written(loc)) or 'grid'}: "
                            f"{what} holds control character U+{ord(bad.group()):04X} (YAML makes one of an escape "
                            "such as \\e or \\a in double quotes); remove it")

    def visit(value: Any, loc: tuple[Any, ...]) -> None:
        if isinstance(value, str):
            check(value, loc, "the value")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    check(key, (*loc, key), "the key")
                visit(item, (*loc, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, (*loc, index))

    visit(data, ())
    return problems


# --- schema errors as file:line: field: message ----------------------------------------------


def _field_name(loc: tuple[Any, ...]) -> str:
    # The field goes between colons on a line of its own: keep it one word, whatever a key holds.
    return ".".join(re.sub(r"[^A-Za-z0-9_.+\-\[\]*]", "?", str(part)) for part in loc)


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


# --- semantic checks and expansion ----------------------------------------------------------


def _local_path(raw: str, base: Path) -> str:
    """A path from the grid file, absolute: relative ones are the grid file's."""
    path = Path(raw).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _resolve_source(source: str, base: Path) -> str:
    return source if source.startswith("hf:") else _local_path(source, base)


def _resolve_model(model: str, base: Path) -> str:
    """A local model path, absolute (relative ones are the grid file's, like data paths): the worker runs
    elsewhere, and two grids' `./model` are two models. Hub ids and tiny: names stay as they are."""
    from jobs.models import is_local_path

    return _local_path(model, base) if is_local_path(model) else model


def parse_grid(path: Path, *, max_runs: int = DEFAULT_MAX_RUNS) -> ExpandedGrid:
    """Read, validate and expand a grid file. Raises GridError listing every problem."""
    # Imported here: these modules are light, but keep the grid schema importable on its own.
    from jobs.data import few_shot_shortfall, task_catalog, task_family, task_sizes
    from jobs.models import check_model_name, is_local_path, local_model_problem

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
    problems: list[str] = []

    def report(loc: Loc, message: str) -> None:
        problems.append(f"{where}:{positions.line_of(loc)}: {_field_name(loc)}: {message}")

    sources: dict[str, Loc] = {}
    for raw, raw_loc in [(grid.data, ("data",)),
                         *((mixture.data, ("mixtures", name, "data")) for name, mixture in grid.mixtures.items())]:
        try:
            sources.setdefault(_resolve_source(raw, base), raw_loc)
        except (RuntimeError, OSError) as e:  # ~nosuchuser, a symlink loop, a name too long
            report(raw_loc, f"cannot use the path {raw!r}: {e}; paths are relative to the grid file")
    if problems:  # every later check needs the sources
        raise _refuse(problems)
    for name in grid.mixtures:
        if name in RESERVED_MTL:
            report(("mixtures", name), f'"{name}" is a value of the mtl axis already; give the mixture another name')
    catalogs: dict[str, dict[str, Any]] = {}
    for source, loc in sources.items():
        if source.startswith("hf:"):
            if not HF_SOURCE.match(source) or ".." in source:
                report(loc, f"{source!r} is not a Hugging Face dataset; write hf:<dataset>[:<config>], "
                       "e.g. hf:bigscience/P3 or hf:glue:sst2")
            continue
        try:
            if Path(source).is_dir():
                report(loc, f"{source} is a directory; point it at the JSONL data file")
                continue
            if not Path(source).exists():
                report(loc, f"data file not found: {source}; paths are relative to the grid file")
                continue
            if not Path(source).is_file():
                report(loc, f"{source} is not a regular file; point it at the JSONL data file")
                continue
        except OSError as e:  # a folder on the way that cannot be read, a name too long
            report(loc, f"cannot use {source}: {e.strerror or e}; check the path and its permissions")
            continue
        try:
            catalog = task_catalog(source)
        except Exception as e:  # noqa: BLE001 - any unreadable data file is a grid problem
            report(loc, f"cannot read data file: {e}")
            continue
        if not catalog:
            report(loc, f"{source} holds no rows (it is empty or blank); point it at an InstructDial JSONL file")
            continue
        catalogs[source] = catalog

    def check_tasks(source: str, tasks: list[str], loc: Loc) -> None:
        catalog = catalogs.get(source)
        if not catalog:  # unreadable (already reported) or hf: (validated when it runs)
            return
        for index, task in enumerate(tasks):
            if task not in catalog:
                close = difflib.get_close_matches(task, list(catalog), n=3) or sorted(
                    t for t in catalog if t.split("_")[0] == task.split("_")[0])[:3]
                names = sorted(catalog)
                listed = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
                hint = f"; did you mean {', '.join(close)}?" if close else f"; its tasks are {listed}"
                report((*loc, index), f'unknown task "{task}" in {Path(source).name}{hint}')

    def check_families(sources: list[str], held_out: list[str], loc: Loc) -> None:
        """A source of the same family as a held-out task (its -poluteoptions twin, say) is refused."""
        families = {task_family(task): task for task in held_out}
        for index, task in enumerate(sources):
            target = families.get(task_family(task))
            if target is not None and target != task:
                report((*loc, index), f'"{task}" is a variant of the held-out task "{target}" (same task family), '
                       "so training on it leaks the target; drop it, or set allow_task_overlap: true")

    main_source = _resolve_source(grid.data, base)
    splits = grid.tasks if isinstance(grid.tasks, dict) else {"": grid.tasks}
    for split_name, split in splits.items():
        prefix: Loc = ("tasks", split_name) if split_name else ("tasks",)
        check_tasks(main_source, split.train, (*prefix, "train"))
        check_tasks(main_source, split.eval, (*prefix, "eval"))
        overlap = sorted(set(split.train) & set(split.eval))
        if overlap:
            report((*prefix, "eval"), f"held-out tasks also appear in train: {', '.join(overlap)}; "
                   "a target task must not be a source")
        elif not grid.allow_task_overlap:
            check_families(split.train, split.eval, (*prefix, "train"))
    # Few-shot examples come from the rows after each target task's eval examples: enough must be left.
    sizes = task_sizes(main_source) if catalogs.get(main_source) else {}
    eval_tasks = sorted({task for split in splits.values() for task in split.eval if task in sizes})
    # One line for the whole axis: the smallest shots value that does not fit, its tasks smallest first.
    holdout = grid.eval.max_examples
    too_small = {index: sorted((t for t in eval_tasks if sizes[t] - holdout < shots), key=lambda t: (sizes[t], t))
                 for index, shots in enumerate(grid.grid.shots) if shots}
    failing = [index for index, tasks in too_small.items() if tasks]
    if failing:
        index = min(failing, key=lambda i: grid.grid.shots[i])
        task, *others = too_small[index]
        also = f" (also too small: {', '.join(others)})" if others else ""
        more = f"; {len(failing) - 1} larger shots value(s) do not fit either" if len(failing) > 1 else ""
        report(("grid", "shots", index), few_shot_shortfall(
            task, rows=sizes[task], holdout=holdout, shots=grid.grid.shots[index]) + also + more)
    held_out = {task for split in splits.values() for task in split.eval}
    for name, mixture in grid.mixtures.items():
        mixture_source = _resolve_source(mixture.data, base)
        check_tasks(mixture_source, mixture.tasks, ("mixtures", name, "tasks"))
        leaked = sorted(set(mixture.tasks) & held_out) if mixture_source == main_source else []
        if leaked:
            report(("mixtures", name, "tasks"), f"held-out tasks also appear in this mixture: {', '.join(leaked)}; "
                   "a target task must not be a source")
        elif mixture_source == main_source and not grid.allow_task_overlap:
            check_families(mixture.tasks, sorted(held_out), ("mixtures", name, "tasks"))
    for index, model in enumerate(grid.grid.model):
        problem = check_model_name(model)
        if problem:
            report(("grid", "model", index), problem)
            continue
        if not is_local_path(model):
            continue  # a hub id: looked up by the worker, which may be offline from here or hold a cache
        # A local folder must be here, as data files must: the worker reads both at the same path.
        try:
            problem = local_model_problem(Path(_resolve_model(model, base)))
        except (RuntimeError, OSError) as e:
            problem = f"cannot use the model path {model!r}: {e}"
        if problem:
            report(("grid", "model", index), problem)
    for index, mtl in enumerate(grid.grid.mtl):
        if mtl not in RESERVED_MTL and mtl not in grid.mixtures:
            known = ", ".join(["none", "in-domain", *grid.mixtures])
            report(("grid", "mtl", index), f'unknown mixture "{mtl}"; use one of: {known}, '
                   "or define it under mixtures:")
        if mtl == "in-domain" and any(not s.train for s in splits.values()):
            report(("grid", "mtl", index), "in-domain MTL needs tasks.train to list source tasks")
    if grid.grid.split is not None and not isinstance(grid.tasks, dict):
        report(("grid", "split"), "a split axis needs tasks to map split names to {train, eval}; "
               "remove grid.split or name the splits under tasks:")
    elif grid.grid.split is not None and isinstance(grid.tasks, dict):
        for index, split_name in enumerate(grid.grid.split):
            if split_name not in grid.tasks:
                report(("grid", "split", index), f'unknown split "{split_name}"; tasks defines '
                       f"{', '.join(grid.tasks)}")

    axes = grid.grid
    total = (len(axes.model) * len(axes.mtl) * len(axes.instructions) * len(axes.shots)
             * len(axes.seed) * len(axes.split or [None]))
    if total > max_runs:
        report(("grid",), f"expands to {total:,} runs, over the limit of {max_runs:,}; split it into smaller "
               f"grids, or pass --max-runs {total} if you really mean to queue them all")
    if problems:
        raise _refuse(problems)
    runs, stages = _expand(grid, base)
    return ExpandedGrid(grid=grid, path=path, runs=runs, stages=stages)


def _cells(grid: GridFile) -> Iterator[dict[str, Any]]:
    axes = grid.grid
    splits: list[str | None] = list(axes.split) if axes.split else [None]
    for split, model, mtl, instructions, shots, seed in product(
        splits, axes.model, axes.mtl, axes.instructions, axes.shots, axes.seed
    ):
        cell: dict[str, Any] = {"model": model, "mtl": mtl, "instructions": instructions,
                                "shots": shots, "seed": seed}
        if split is not None:
            cell = {"split": split, **cell}
        yield cell


def _expand(grid: GridFile, base: Path, cells: Iterable[dict[str, Any]] | None = None
            ) -> tuple[list[RunSpec], dict[str, StageSpec]]:
    stages: dict[str, StageSpec] = {}
    runs: list[RunSpec] = []
    data = _resolve_source(grid.data, base)
    finetune_cfg = grid.finetune or grid.train

    def add(spec: StageSpec) -> str:
        stage_id = spec.stage_id
        stages.setdefault(stage_id, spec)
        return stage_id

    for cell in _cells(grid) if cells is None else cells:
        split = grid.tasks[cell["split"]] if isinstance(grid.tasks, dict) else grid.tasks
        seed, instructions = cell["seed"], cell["instructions"]
        model = _resolve_model(cell["model"], base)  # the cell keeps the name as written
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
                                      shots=cell["shots"], holdout=grid.eval.max_examples, train=finetune_cfg))
                eval_id = add(StageSpec(kind=StageKind.eval, model=model, parent=ft_id, seed=seed,
                                        instructions=instructions, data=data, tasks=(task,),
                                        shots=cell["shots"], eval=grid.eval))
                order += [ft_id, eval_id]
                eval_stages.append(eval_id)
        runs.append(RunSpec(grid=grid.name, cell=cell, stages=tuple(order), eval_stages=tuple(eval_stages)))
    return runs, stages
