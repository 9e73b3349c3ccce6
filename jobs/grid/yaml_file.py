"""Reading a grid file: safely (size, encoding, control characters), as YAML that remembers the line of
every key and value, and with YAML's own errors in the words of someone editing the file.

Every problem is one line, `file:line: field: what is wrong`; the schema (jobs/grid/parse.py) reports its own
problems at the positions found here. Alias bombs, recursive aliases and absurd nesting are refused while
walking the composed graph, before anything is constructed.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from stl.jobs.codec import UNSAFE_CHARS
from stl.jobs.errors import GridError

if TYPE_CHECKING:
    from pathlib import Path

MAX_GRID_FILE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
# The deepest real path is tasks.<split>.eval.<index>; anything far deeper is a mistake or an attack.
MAX_YAML_DEPTH = 12
MAX_REPORTED_PROBLEMS = 50
# Characters YAML refuses (it allows tab, newline, carriage return and printable Unicode).
YAML_FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


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


def _field_name(loc: tuple[Any, ...]) -> str:
    # The field goes between colons on a line of its own: keep it one word, whatever a key holds.
    return ".".join(re.sub(r"[^A-Za-z0-9_.+\-\[\]*]", "?", str(part)) for part in loc)
