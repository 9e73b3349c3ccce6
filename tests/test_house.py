"""The house rules a newcomer relies on: small modules, classes and functions, and imports that only go down.

Layers, lowest first: base (`jobs/*.py`), `jobs/ml`, `jobs/grid`, `jobs/queue`; `jobs/results` sits on base
alone; `cli` and `worker` sit on top and nothing in `jobs` reaches up to them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("cli", "jobs", "worker")
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 100

# jobs/ packages, each allowed to import itself and the ones listed
ALLOWED_JOBS_IMPORTS = {
    "base": {"base"},
    "ml": {"base", "ml"},
    "grid": {"base", "ml", "grid"},
    "queue": {"base", "ml", "grid", "queue"},
    "results": {"base", "results"},
}

# Heavy libraries the CLI imports only inside the commands that train or plot, so `stl --help` starts fast.
HEAVY_FOR_CLI = ("torch", "transformers", "datasets", "matplotlib")


@dataclass(frozen=True)
class Import:
    module: str  # the imported module, absolute (e.g. "stl.jobs.ml.data")
    line: int
    top_level: bool  # at module level, run on import (not inside a function)
    type_checking: bool  # inside `if TYPE_CHECKING:`, never run


def product_files() -> list[Path]:
    return sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_of(path: Path) -> str:
    """The dotted package a module lives in, as installed (`stl.jobs.queue` for jobs/queue/entry.py)."""
    return ".".join(("stl", *path.relative_to(ROOT).parent.parts))


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import in a module, with relative ones made absolute; `source` stands in for the file's text."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, *, top_level: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, child.lineno, top_level, type_checking) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package_of(path).split(".")
                    parts = parts[:len(parts) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                # `from stl.jobs import keys` imports the module stl.jobs.keys
                found.extend(Import(f"{base}.{alias.name}", child.lineno, top_level, type_checking)
                             for alias in child.names)
            elif isinstance(child, ast.If) and is_type_checking(child.test):
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), top_level=top_level, type_checking=True)
                for part in child.orelse:
                    visit(ast.Module(body=[part], type_ignores=[]), top_level=top_level,
                          type_checking=type_checking)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, top_level=False, type_checking=type_checking)
            else:
                visit(child, top_level=top_level, type_checking=type_checking)

    visit(tree, top_level=True, type_checking=False)
    return found


def jobs_layer(module: str) -> str | None:
    """The jobs/ layer a dotted module name belongs to, or None when it is outside stl.jobs."""
    parts = module.split(".")
    if parts[:2] != ["stl", "jobs"]:
        return None
    if len(parts) > 2 and parts[2] in ALLOWED_JOBS_IMPORTS and parts[2] != "base":
        return parts[2]
    return "base"


def too_long_parts() -> dict[str, str]:
    """`path` or `path:name` of every module, class and function over its limit -> what is wrong with it."""
    too_long: dict[str, str] = {}
    for path in product_files():
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long[relative(path)] = f"{relative(path)}: module has {lines} lines (limit {MAX_MODULE_LINES})"
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.ClassDef):
                kind, limit = "class", MAX_CLASS_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                kind, limit = "function", MAX_FUNCTION_LINES
            else:
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                too_long[f"{relative(path)}:{node.name}"] = (
                    f"{relative(path)}:{node.lineno}: {kind} {node.name} has {length} lines (limit {limit})")
    return too_long


def test_no_module_class_or_function_is_too_long() -> None:
    too_long = list(too_long_parts().values())
    assert not too_long, "split these by responsibility:\n" + "\n".join(too_long)


def test_jobs_imports_only_go_down_the_layers() -> None:
    upward: list[str] = []
    for path in product_files():
        if path.relative_to(ROOT).parts[0] != "jobs":
            continue
        own = jobs_layer(package_of(path) + "." + path.stem)
        assert own is not None
        for imported in imports_of(path):
            if imported.type_checking:
                continue
            where = f"{relative(path)}:{imported.line} imports {imported.module}"
            if imported.module.startswith(("stl.cli", "stl.worker")):
                upward.append(f"{where} (jobs never imports the cli or the worker)")
                continue
            layer = jobs_layer(imported.module)
            if layer is not None and layer not in ALLOWED_JOBS_IMPORTS[own]:
                upward.append(f"{where} ({own} may import only {sorted(ALLOWED_JOBS_IMPORTS[own])})")
    assert not upward, "move the code to the layer it belongs to:\n" + "\n".join(upward)


def test_the_layer_check_sees_imports_inside_functions_and_ignores_type_checking() -> None:
    text = ("from typing import TYPE_CHECKING\nfrom . import rank\nif TYPE_CHECKING:\n"
            "    from stl.jobs.queue import store\n"
            "def f():\n    from stl.jobs.grid import parse\n    from ..queue import entry\n")
    found = {(i.module, i.top_level, i.type_checking)
             for i in imports_of(ROOT / "jobs" / "ml" / "sample.py", source=text)}
    assert ("stl.jobs.ml.rank", True, False) in found
    assert ("stl.jobs.queue.store", True, True) in found
    assert ("stl.jobs.grid.parse", False, False) in found
    assert ("stl.jobs.queue.entry", False, False) in found
    assert jobs_layer("stl.jobs.keys") == "base"
    assert jobs_layer("stl.jobs.queue.entry") == "queue"
    assert jobs_layer("torch") is None


def test_cli_does_not_import_heavy_libraries_at_module_level() -> None:
    heavy: list[str] = []
    for path in sorted((ROOT / "cli").rglob("*.py")):
        for imported in imports_of(path):
            if imported.top_level and not imported.type_checking and \
                    imported.module.split(".")[0] in HEAVY_FOR_CLI:
                heavy.append(f"{relative(path)}:{imported.line} imports {imported.module}")
    assert not heavy, "import these inside the command that needs them:\n" + "\n".join(heavy)
