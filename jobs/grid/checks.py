"""What the grid schema cannot check: that the data files are there and hold the tasks named, that no
held-out task leaks into training, that every shots value leaves examples to draw them from, that the
models and mixtures named exist, and that the grid is not too large to queue. Also where a grid file's
paths point: relative ones are the grid file's.

Every problem is reported, one line each, as `file:line: field: what is wrong` (jobs/grid/yaml_file.py found
the lines); jobs/grid/parse.py runs these checks once the file matches its schema.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stl.jobs.axes import listed_values
from stl.jobs.grid.yaml_file import Loc, _field_name, _Positions, _refuse

if TYPE_CHECKING:
    from stl.jobs.grid.parse import GridFile, TaskSplit

RESERVED_MTL = ("none", "in-domain")  # values of the mtl axis that are not mixtures
HF_SOURCE = re.compile(r"^hf:[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")


def _local_path(raw: str, base: Path) -> str:
    """A path from the grid file, absolute: relative ones are the grid file's."""
    path = Path(raw).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _resolve_source(source: str, base: Path) -> str:
    return source if source.startswith("hf:") else _local_path(source, base)


def _resolve_model(model: str, base: Path) -> str:
    """A local model path, absolute (relative ones are the grid file's, like data paths): the worker runs
    elsewhere, and two grids' `./model` are two models. Hub ids and tiny: names stay as they are."""
    from stl.jobs.ml.models import is_local_path

    return _local_path(model, base) if is_local_path(model) else model


def check_grid(grid: GridFile, base: Path, where: str, positions: _Positions, *, max_runs: int) -> None:
    """Raise GridError listing every problem of a grid file that matches the schema; `base` is its folder."""
    checks = _GridChecks(grid, base, where, positions)
    sources = checks.resolved_sources()
    if checks.problems:  # every later check needs the sources
        raise _refuse(checks.problems)
    checks.mixture_names()
    checks.read_catalogs(sources)
    checks.splits()
    checks.shots_fit()
    checks.mixtures()
    checks.models()
    checks.mtl_and_split_axes()
    checks.size(max_runs)
    if checks.problems:
        raise _refuse(checks.problems)


@dataclass
class _GridChecks:
    grid: GridFile
    base: Path
    where: str
    positions: _Positions
    problems: list[str] = field(default_factory=list)
    catalogs: dict[str, dict[str, Any]] = field(default_factory=dict)  # readable local source -> its tasks

    def report(self, loc: Loc, message: str) -> None:
        self.problems.append(f"{self.where}:{self.positions.line_of(loc)}: {_field_name(loc)}: {message}")

    @property
    def main_source(self) -> str:
        return _resolve_source(self.grid.data, self.base)

    @property
    def split_map(self) -> dict[str, TaskSplit]:
        """The task splits by name; "" for a grid whose tasks name no splits."""
        return self.grid.tasks if isinstance(self.grid.tasks, dict) else {"": self.grid.tasks}

    def resolved_sources(self) -> dict[str, Loc]:
        """Each data source (the grid's, then its mixtures'), resolved, with where it is first named."""
        sources: dict[str, Loc] = {}
        for raw, raw_loc in [(self.grid.data, ("data",)), *((mixture.data, ("mixtures", name, "data"))
                                                               for name, mixture in self.grid.mixtures.items())]:
            try:
                sources.setdefault(_resolve_source(raw, self.base), raw_loc)
            except (RuntimeError, OSError) as e:  # ~nosuchuser, a symlink loop, a name too long
                self.report(raw_loc, f"cannot use the path {raw!r}: {e}; paths are relative to the grid file")
        return sources

    def mixture_names(self) -> None:
        for name in self.grid.mixtures:
            if name in RESERVED_MTL:
                self.report(("mixtures", name),
                            f'"{name}" is a value of the mtl axis already; give the mixture another name')

    def read_catalogs(self, sources: dict[str, Loc]) -> None:
        """The tasks of every local data file that can be read; hf: sources are only checked for form."""
        from stl.jobs.ml.sources import task_catalog

        for source, loc in sources.items():
            if source.startswith("hf:"):
                if not HF_SOURCE.match(source) or ".." in source:
                    self.report(loc, f"{source!r} is not a Hugging Face dataset; write hf:<dataset>[:<config>], "
                                "e.g. hf:bigscience/P3 or hf:glue:sst2")
                continue
            if not self._is_data_file(source, loc):
                continue
            try:
                catalog = task_catalog(source)
            except Exception as e:  # noqa: BLE001 - any unreadable data file is a grid problem
                self.report(loc, f"cannot read data file: {e}")
                continue
            if not catalog:
                self.report(loc, f"{source} holds no rows (it is empty or blank); point it at an InstructDial "
                            "JSONL file")
                continue
            self.catalogs[source] = catalog

    def _is_data_file(self, source: str, loc: Loc) -> bool:
        try:
            if Path(source).is_dir():
                self.report(loc, f"{source} is a directory; point it at the JSONL data file")
                return False
            if not Path(source).exists():
                self.report(loc, f"data file not found: {source}; paths are relative to the grid file")
                return False
            if not Path(source).is_file():
                self.report(loc, f"{source} is not a regular file; point it at the JSONL data file")
                return False
        except OSError as e:  # a folder on the way that cannot be read, a name too long
            self.report(loc, f"cannot use {source}: {e.strerror or e}; check the path and its permissions")
            return False
        return True

    def tasks_in(self, source: str, tasks: list[str], loc: Loc) -> None:
        catalog = self.catalogs.get(source)
        if not catalog:  # unreadable (already reported) or hf: (validated when it runs)
            return
        for index, task in enumerate(tasks):
            if task not in catalog:
                close = difflib.get_close_matches(task, list(catalog), n=3) or sorted(
                    t for t in catalog if t.split("_")[0] == task.split("_")[0])[:3]
                names = sorted(catalog)
                listed = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
                hint = f"; did you mean {', '.join(close)}?" if close else f"; its tasks are {listed}"
                self.report((*loc, index), f'unknown task "{task}" in {Path(source).name}{hint}')

    def families(self, sources: list[str], held_out: list[str], loc: Loc) -> None:
        """A source of the same family as a held-out task (its -poluteoptions twin, say) is refused."""
        from stl.jobs.ml.examples import task_family

        families = {task_family(task): task for task in held_out}
        for index, task in enumerate(sources):
            target = families.get(task_family(task))
            if target is not None and target != task:
                self.report((*loc, index), f'"{task}" is a variant of the held-out task "{target}" (same task '
                            "family), so training on it leaks the target; drop it, or set allow_task_overlap: true")

    def splits(self) -> None:
        """Each split's tasks exist, and none of its held-out tasks is also trained on."""
        for split_name, split in self.split_map.items():
            prefix: Loc = ("tasks", split_name) if split_name else ("tasks",)
            self.tasks_in(self.main_source, split.train, (*prefix, "train"))
            self.tasks_in(self.main_source, split.eval, (*prefix, "eval"))
            overlap = sorted(set(split.train) & set(split.eval))
            if overlap:
                self.report((*prefix, "eval"), f"held-out tasks also appear in train: {', '.join(overlap)}; "
                            "a target task must not be a source")
            elif not self.grid.allow_task_overlap:
                self.families(split.train, split.eval, (*prefix, "train"))

    def shots_fit(self) -> None:
        """Few-shot examples come from the rows after each target task's eval examples: enough must be left.
        One line for the whole axis: the smallest shots value that does not fit, its tasks smallest first."""
        from stl.jobs.ml.data import few_shot_shortfall
        from stl.jobs.ml.sources import task_sizes

        sizes = task_sizes(self.main_source) if self.catalogs.get(self.main_source) else {}
        eval_tasks = sorted({task for split in self.split_map.values() for task in split.eval if task in sizes})
        holdout, shots = self.grid.eval.max_examples, self.grid.grid.shots
        too_small = {index: sorted((t for t in eval_tasks if sizes[t] - holdout < k), key=lambda t: (sizes[t], t))
                     for index, k in enumerate(shots) if k}
        failing = [index for index, tasks in too_small.items() if tasks]
        if failing:
            index = min(failing, key=lambda i: shots[i])
            task, *others = too_small[index]
            also = f" (also too small: {', '.join(others)})" if others else ""
            more = f"; {len(failing) - 1} larger shots value(s) do not fit either" if len(failing) > 1 else ""
            self.report(("grid", "shots", index), few_shot_shortfall(
                task, rows=sizes[task], holdout=holdout, shots=shots[index]) + also + more)

    def mixtures(self) -> None:
        """Each mixture's tasks exist, and none is held out (when it draws from the grid's own data)."""
        held_out = {task for split in self.split_map.values() for task in split.eval}
        for name, mixture in self.grid.mixtures.items():
            mixture_source = _resolve_source(mixture.data, self.base)
            loc: Loc = ("mixtures", name, "tasks")
            self.tasks_in(mixture_source, mixture.tasks, loc)
            leaked = sorted(set(mixture.tasks) & held_out) if mixture_source == self.main_source else []
            if leaked:
                self.report(loc, f"held-out tasks also appear in this mixture: {', '.join(leaked)}; "
                            "a target task must not be a source")
            elif mixture_source == self.main_source and not self.grid.allow_task_overlap:
                self.families(mixture.tasks, sorted(held_out), loc)

    def models(self) -> None:
        from stl.jobs.ml.models import check_model_name, is_local_path, local_model_problem

        for index, model in enumerate(self.grid.grid.model):
            problem = check_model_name(model)
            if problem:
                self.report(("grid", "model", index), problem)
                continue
            if not is_local_path(model):
                continue  # a hub id: looked up by the worker, which may be offline from here or hold a cache
            # A local folder must be here, as data files must: the worker reads both at the same path.
            try:
                problem = local_model_problem(Path(_resolve_model(model, self.base)))
            except (RuntimeError, OSError) as e:
                problem = f"cannot use the model path {model!r}: {e}"
            if problem:
                self.report(("grid", "model", index), problem)

    def mtl_and_split_axes(self) -> None:
        grid = self.grid
        for index, mtl in enumerate(grid.grid.mtl):
            if mtl not in RESERVED_MTL and mtl not in grid.mixtures:
                known = ", ".join(["none", "in-domain", *grid.mixtures])
                self.report(("grid", "mtl", index), f'unknown mixture "{mtl}"; use one of: {known}, '
                            "or define it under mixtures:")
            if mtl == "in-domain" and any(not s.train for s in self.split_map.values()):
                self.report(("grid", "mtl", index), "in-domain MTL needs tasks.train to list source tasks")
        if grid.grid.split is not None and not isinstance(grid.tasks, dict):
            self.report(("grid", "split"), "a split axis needs tasks to map split names to {train, eval}; "
                        "remove grid.split or name the splits under tasks:")
        elif grid.grid.split is not None and isinstance(grid.tasks, dict):
            for index, split_name in enumerate(grid.grid.split):
                if split_name not in grid.tasks:
                    self.report(("grid", "split", index), f'unknown split "{split_name}"; tasks defines '
                                f"{', '.join(grid.tasks)}")

    def size(self, max_runs: int) -> None:
        total = math.prod(len(values) for values in listed_values(self.grid.grid).values())
        if total > max_runs:
            self.report(("grid",), f"expands to {total:,} runs, over the limit of {max_runs:,}; split it into "
                        f"smaller grids, or pass --max-runs {total} if you really mean to queue them all")
