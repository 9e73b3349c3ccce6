"""Reading a data source: a JSONL file of InstructDial text2text rows or `hf:<dataset>[:<config>]`.

Streams examples (`read_examples`), lists a source's tasks (`task_catalog`, `task_sizes`) and reads rows by
key (`RowStore`) so a large task is never held in memory. `datasets` is only imported inside the functions
that read `hf:` sources, and nothing here imports torch: the CLI imports this to validate grids.
"""

from __future__ import annotations

import json
import re
from array import array
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stl.jobs.errors import DataError, missing_on_worker
from stl.jobs.ml.data_cache import INDEX_CACHE_DIR, cache_key, load_row_index, save_row_index
from stl.jobs.ml.examples import Example, example_from_row
from stl.jobs.specs import TaskType

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

HF_PREFIX = "hf:"
HF_SPLIT = "train"


def is_hf_source(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def _hf_name(source: str) -> tuple[str, str | None]:
    rest = source[len(HF_PREFIX) :]
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"data source {source!r} names no dataset; write hf:<dataset>[:<config>]")
    return name, config or None


def _jsonl_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(missing_on_worker("data file", path))
    if not path.is_file():
        raise DataError(f"data file {path} is not a file; point the grid's data at an InstructDial JSONL file")
    return path


def _iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object")
            yield line_number, row


def _load_hf(source: str, *, streaming: bool) -> Any:
    name, config = _hf_name(source)
    try:
        import datasets

        return datasets.load_dataset(name, config, split=HF_SPLIT, streaming=streaming)
    except Exception as e:  # datasets raises many unrelated types for "unreachable" / "not found"
        raise DataError(
            f"Hugging Face dataset {source!r} could not be loaded ({type(e).__name__}: {e}); "
            "check the name, the network, or use a local JSONL file"
        ) from e


def read_examples(source: str, tasks: Iterable[str] | None = None) -> Iterator[Example]:
    """Every example of `tasks` (all tasks when None), in source order, streamed."""
    wanted = None if tasks is None else frozenset(tasks)
    if is_hf_source(source):
        dataset = _load_hf(source, streaming=True)
        for position, row in enumerate(dataset):
            if wanted is None or row.get("task") in wanted:
                yield example_from_row(row, f"{source} row {position}")
        return
    path = _jsonl_path(source)
    for line_number, row in _iter_jsonl_rows(path):
        if wanted is None or row.get("task") in wanted:
            yield example_from_row(row, f"{path}:{line_number}")


def task_catalog(source: str) -> dict[str, TaskType]:
    """Task name -> type for a JSONL source; {} for hf: sources ("unknown": no network at enqueue time)."""
    return {task: task_type for task, task_type, _rows in _catalog(source)}


def task_sizes(source: str) -> dict[str, int]:
    """Task name -> number of rows for a JSONL source; {} for hf: sources."""
    return {task: rows for task, _task_type, rows in _catalog(source)}


def _catalog(source: str) -> tuple[tuple[str, TaskType, int], ...]:
    if is_hf_source(source):
        return ()
    path = _jsonl_path(source)
    stat = path.stat()
    return _cached_catalog(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _cached_catalog(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, TaskType, int], ...]:
    del mtime_ns, size  # only part of the cache key: a rewritten file is read again
    types: dict[str, TaskType] = {}
    rows: dict[str, int] = {}
    with Path(path).open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            if not (stripped.startswith(b"{") and stripped.endswith(b"}")):  # the task alone may still be there
                raise DataError(f"{path}:{line_number}: not a whole JSON object (it does not end with '}}'); "
                                "the file may be cut short: copy or download it again")
            task = _task_of_line(line)
            if task is None:
                raise DataError(f"{path}:{line_number}: not a JSON object with a text field task")
            # Only rows that mention [OPTIONS] at all need a full parse to see whether their input does.
            if b"[OPTIONS]" in line and "[OPTIONS]" in str(json.loads(line).get("input", "")):
                types[task] = TaskType.classification
            else:
                types.setdefault(task, TaskType.generation)
            rows[task] = rows.get(task, 0) + 1
    return tuple((task, task_type, rows[task]) for task, task_type in sorted(types.items()))

class RowStore:
    """Random access to the rows of a source by a small integer key, plus a per-task key index.

    JSONL: keys are byte offsets of lines. hf: keys are row numbers of the memory-mapped Arrow table
    (the dataset is downloaded once into the datasets cache). Either way no example text is kept in
    memory, only 8 bytes per indexed row.
    """

    def __init__(self, source: str, *, cache_dir: Path | None = None, log: Callable[[str], None] | None = None) -> None:
        self.source = source
        self._path: Path | None = None
        self._dataset: Any = None
        self._cache_dir = cache_dir
        self._log = log or (lambda line: None)
        if is_hf_source(source):
            self._dataset = _load_hf(source, streaming=False)
        else:
            self._path = _jsonl_path(source)

    def index(self, tasks: Iterable[str]) -> dict[str, array[int]]:
        keys: dict[str, array[int]] = {task: array("q") for task in tasks}
        if self._dataset is not None:
            position = 0
            for batch in self._dataset.select_columns(["task"]).iter(batch_size=10_000):
                for task in batch["task"]:
                    if task in keys:
                        keys[task].append(position)
                    position += 1
            return keys
        assert self._path is not None
        fingerprint = source_fingerprint(self.source)
        if self._cache_dir is None or fingerprint is None:
            keys.update(_scan_offsets(self._path, frozenset(keys)))
            return keys
        # The pass over a multi-GB file is what makes a stage slow to start: index every task once and
        # keep the offsets, so later stages on the same file (any tasks) skip it.
        cache = self._cache_dir / INDEX_CACHE_DIR / f"{cache_key({'kind': 'row-index', **fingerprint})}.safetensors"
        cached = load_row_index(cache, list(keys))
        if cached is not None:
            self._log(f"row index cache hit for {self._path} ({cache})")
            keys.update(cached)
            return keys
        every_task = _scan_offsets(self._path, None)
        try:
            save_row_index(cache, every_task, description=str(self._path))
            self._log(f"row index cache miss for {self._path}; wrote {cache}")
        except OSError as e:
            self._log(f"row index cache miss for {self._path}; could not write {cache}: {e}")
        keys.update({task: every_task[task] for task in keys if task in every_task})
        return keys

    def rows(self, keys: Iterable[int]) -> Iterator[Example]:
        if self._dataset is not None:
            for key in keys:
                yield example_from_row(self._dataset[int(key)], f"{self.source} row {key}")
            return
        assert self._path is not None
        with self._path.open("rb") as handle:
            for key in keys:
                handle.seek(key)
                line = handle.readline()
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{self._path} at byte {key}: not valid JSON ({e})") from e
                yield example_from_row(row, f"{self._path} at byte {key}")

def _scan_offsets(path: Path, tasks: frozenset[str] | None) -> dict[str, array[int]]:
    """Byte offsets of the rows of each task (every task when `tasks` is None), in file order."""
    keys: dict[str, array[int]] = {}
    with path.open("rb") as handle:
        offset = 0
        for line in handle:
            if line.strip():
                task = _task_of_line(line)
                if task is not None and (tasks is None or task in tasks):
                    keys.setdefault(task, array("q")).append(offset)
            offset += len(line)
    return keys

def source_fingerprint(source: str) -> dict[str, Any] | None:
    """What identifies a JSONL file's contents, cheaply: its path, size and modification time (hashing a
    multi-GB file would cost as much as the pass the cache saves). None for hf: sources, which are not
    cached here (the datasets library keeps its own cache)."""
    if is_hf_source(source):
        return None
    path = _jsonl_path(source).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

# Finding `"task": "..."` with a regex is several times faster than parsing the whole row, which
# matters for multi-GB files; a row where the key is not found exactly once is parsed instead.
_TASK_FIELD = re.compile(rb'"task"\s*:\s*("(?:[^"\\]|\\.)*")')


def _task_of_line(line: bytes) -> str | None:
    found = _TASK_FIELD.findall(line)
    try:
        if len(found) == 1:
            task = json.loads(found[0])
        else:
            row = json.loads(line)
            task = row.get("task") if isinstance(row, dict) else None
    except ValueError:
        return None  # reported with its position when (if) the row is actually read
    return task if isinstance(task, str) else None
