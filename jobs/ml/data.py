"""Reading InstructDial-format text-to-text data, sampling it for training, and stl's own demo dataset.

A source is either a path to a JSONL file (one InstructDial text2text row per line) or
`hf:<dataset>[:<config>]` for a Hugging Face dataset with the same field names (split "train").

This module must stay cheap to import: the CLI imports it to validate grids, so `datasets` is only
imported inside the functions that read `hf:` sources, and nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, count, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stl.jobs.errors import DataError, UsageError, missing_on_worker, path_error
from stl.jobs.specs import TaskType

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

_Cached = TypeVar("_Cached")

HF_PREFIX = "hf:"
# On-disk caches under STL_HOME/cache (safetensors files, never pickle). Bump a format to drop old entries.
CACHE_FORMAT = 1
INDEX_CACHE_DIR = "index"  # per-task row offsets of a JSONL file
TOKEN_CACHE_DIR = "tokens"  # encoded token ids (few-shot sets, eval examples)
HF_SPLIT = "train"
REQUIRED_FIELDS = ("task", "prompt", "input", "output")

# `[OPTIONS] a||||b||||c` runs until the next `[TAG]` (usually `[QUESTION]`) or the end of the input.
OPTIONS_PATTERN = re.compile(r"\[OPTIONS\](.*?)(?=\[[A-Z_]+\]|$)", re.DOTALL)
OPTION_SEPARATOR = "||||"
# InstructDial labels some tasks' options (utils/common.py): "A: first" (get_alphabetwithoptions_string, gold
# "A") and "0: first" (get_integerwithoptions_string, gold "0"); other sources write "(a) first" or "A. first".
OPTION_LABEL_PATTERN = re.compile(
    r"^\s*(?:\(\s*(?P<paren>[A-Za-z]|\d{1,2})\s*\)|(?P<plain>[A-Za-z]|\d{1,2})\s*[:.)])\s*(?P<body>.*)$", re.DOTALL
)
# A gold output that is a bare label, maybe written with its punctuation: "A", "(a)", "2:", "B.".
BARE_LABEL_PATTERN = re.compile(r"^\(?\s*([A-Za-z]|\d{1,2})\s*[).:]?$")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # "Instruction: ...\nInput: ..." (instructions on)
    input: str  # the same example without the instruction (instructions off)
    output: str
    all_outputs: tuple[str, ...]  # every accepted target; never empty
    options: tuple[str, ...] | None  # parsed from "[OPTIONS]" in the input; None for generation


def parse_options(text: str) -> tuple[str, ...] | None:
    """The options listed inline after `[OPTIONS]`, stripped, empty ones dropped; None if there are none."""
    match = OPTIONS_PATTERN.search(text)
    if match is None:
        return None
    options = tuple(option.strip() for option in match.group(1).split(OPTION_SEPARATOR))
    options = tuple(option for option in options if option)
    return options or None


@dataclass(frozen=True)
class LabelledOption:
    text: str  # as listed: "A: first"
    label: str | None  # "a" (normalized); None for an option without a label
    body: str  # "first"


def labelled_options(options: Sequence[str]) -> tuple[LabelledOption, ...]:
    """Each option split into its label and body. Labels count only if the labelled options' labels are
    distinct: a plain option that happens to start like "e. g." does not make a set labelled."""
    parts = []
    for option in options:
        match = OPTION_LABEL_PATTERN.match(option)
        if match and match.group("body").strip():
            label = (match.group("paren") or match.group("plain")).lower()
            parts.append(LabelledOption(option, label, match.group("body").strip()))
        else:
            parts.append(LabelledOption(option, None, option))
    labels = [part.label for part in parts if part.label is not None]
    if len(labels) != len(set(labels)):
        return tuple(LabelledOption(option, None, option) for option in options)
    return tuple(parts)


def accepted_answers(example: Example) -> tuple[str, ...]:
    """Every answer that scores, normalized: the output and each of `all_outputs` (multi-label rows)."""
    return tuple(dict.fromkeys(normalize_answer(answer) for answer in (example.output, *example.all_outputs)))


def _bare_label(answer: str) -> str | None:
    match = BARE_LABEL_PATTERN.match(answer)
    return match.group(1).lower() if match else None


def _names(option: LabelledOption) -> set[str]:
    """The normalized ways a gold output may name this option: its label, its body or the whole text."""
    names = {normalize_answer(option.body), normalize_answer(option.text)}
    if option.label is not None:
        names.add(option.label)
    return names


def _answer_names(answer: str) -> set[str]:
    label = _bare_label(answer)
    return {answer} if label is None else {answer, label}


def correct_options(example: Example) -> frozenset[int]:
    """Positions of the options that any accepted answer names (by label, body or whole text)."""
    if example.options is None:
        return frozenset()
    answers = set().union(*(_answer_names(answer) for answer in accepted_answers(example)))
    return frozenset(i for i, option in enumerate(labelled_options(example.options)) if _names(option) & answers)


def answer_candidates(example: Example) -> tuple[str, ...]:
    """The strings a model should emit for each option, in option order: the form the gold output takes.

    A gold output that is a label ("A", "2") makes the candidates the labels, as the model was trained to
    answer; one that is an option's body ("inform" for "2: inform") makes them the bodies; otherwise the
    options as listed.
    """
    if example.options is None:
        return ()
    options = labelled_options(example.options)
    gold = normalize_answer(example.output)
    gold_label = _bare_label(gold)
    if gold_label is not None and any(option.label == gold_label for option in options):
        return tuple(option.text if option.label is None else _label_as_listed(option) for option in options)
    if any(option.label is not None and normalize_answer(option.body) == gold for option in options):
        return tuple(option.body for option in options)
    return example.options


def _label_as_listed(option: LabelledOption) -> str:
    """The label in the case the option lists it ("A", not "a"): InstructDial's gold is "A"."""
    match = OPTION_LABEL_PATTERN.match(option.text)
    assert match is not None  # a labelled option matched the pattern
    return str(match.group("paren") or match.group("plain"))


def is_correct(example: Example, prediction: str) -> bool:
    """Whether a generated (or chosen) answer names an accepted answer: the option it names, for a row
    with options; exact (normalized) match with any accepted answer otherwise."""
    answer = normalize_answer(prediction)
    if example.options is not None:
        named = _answer_names(answer)
        chosen = {i for i, option in enumerate(labelled_options(example.options)) if _names(option) & named}
        if chosen:
            return bool(chosen & correct_options(example))
    return answer in accepted_answers(example)


def task_family(task: str) -> str:
    """The base task of an InstructDial variant: `persuasion_present-poluteoptions` -> `persuasion_present`
    (create_data_text2text.py names variants `<task>-<variant>`; base task names use underscores)."""
    return task.split("-", 1)[0]


def normalize_answer(text: str) -> str:
    return " ".join(text.split()).lower()


def source_text(example: Example, instructions: bool) -> str:
    return example.prompt if instructions else example.input


def example_from_row(row: Mapping[str, Any], where: str = "row") -> Example:
    missing = [name for name in REQUIRED_FIELDS if not isinstance(row.get(name), str)]
    if missing:
        raise DataError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
    output = row["output"]
    raw_outputs = row.get("all_outputs")
    if isinstance(raw_outputs, str):
        raw_outputs = [raw_outputs]
    all_outputs = tuple(str(text) for text in raw_outputs or () if text is not None) or (output,)
    return Example(
        task=row["task"],
        prompt=row["prompt"],
        input=row["input"],
        output=output,
        all_outputs=all_outputs,
        # No fallback to `candidates`/`classes_in_options`: a row that does not show its options to the
        # model is not rank-classified (the InstructDial README's rule: [OPTIONS] makes classification).
        options=parse_options(row["input"]),
    )


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


# --- sampling -------------------------------------------------------------------------------------


def _seeded(*parts: object) -> random.Random:
    # Seeding with a str hashes it with SHA-512: stable across processes, unlike hash().
    return random.Random(":".join(str(part) for part in ("stl", *parts)))


def _chosen_indices(n: int, k: int, seed: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted(_seeded("k-shot", seed).sample(range(n), k))


def k_shot(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k examples drawn without replacement (all of them when k >= len), kept in source order."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return [examples[i] for i in _chosen_indices(len(examples), k, seed)]


class _RowStore:
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
        cached = _load_row_index(cache, list(keys))
        if cached is not None:
            self._log(f"row index cache hit for {self._path} ({cache})")
            keys.update(cached)
            return keys
        every_task = _scan_offsets(self._path, None)
        try:
            _save_row_index(cache, every_task, description=str(self._path))
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


def _save_row_index(path: Path, keys: Mapping[str, array[int]], *, description: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    names = list(keys)
    arrays = {f"t{i}": np.frombuffer(keys[name], dtype=np.int64) for i, name in enumerate(names)}
    metadata = {"format": str(CACHE_FORMAT), "tasks": json.dumps(names), "source": description}
    _write_cache_file(path, lambda temporary: save_file(arrays, str(temporary), metadata=metadata))


def _load_row_index(path: Path, tasks: Sequence[str]) -> dict[str, array[int]] | None:
    """The cached offsets of `tasks` (tasks absent from the file are left out); None if not cached."""
    import numpy as np

    def read(cached: Any, metadata: dict[str, str]) -> dict[str, array[int]]:
        position = {name: i for i, name in enumerate(json.loads(metadata["tasks"]))}
        found: dict[str, array[int]] = {}
        for task in tasks:
            if task in position:
                offsets = array("q")
                offsets.frombytes(np.ascontiguousarray(cached.get_tensor(f"t{position[task]}"), np.int64).tobytes())
                found[task] = offsets
        return found

    return _read_cache_file(path, read)


# --- on-disk caches ---------------------------------------------------------------------------------


def source_fingerprint(source: str) -> dict[str, Any] | None:
    """What identifies a JSONL file's contents, cheaply: its path, size and modification time (hashing a
    multi-GB file would cost as much as the pass the cache saves). None for hf: sources, which are not
    cached here (the datasets library keeps its own cache)."""
    if is_hf_source(source):
        return None
    path = _jsonl_path(source).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the JSON of everything that decides a cached value, plus the cache format."""
    payload = json.dumps({"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def token_cache_path(cache_dir: Path, parts: Mapping[str, Any]) -> Path:
    return cache_dir / TOKEN_CACHE_DIR / f"{cache_key(parts)}.safetensors"


def save_token_lists(path: Path, groups: Mapping[str, Sequence[Sequence[int]]], *, description: str = "") -> None:
    """Write named lists of token-id sequences (ragged) as one safetensors file, atomically."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays: dict[str, Any] = {}
    for name, rows in groups.items():
        arrays[f"{name}.ids"] = np.fromiter((i for row in rows for i in row), dtype=np.int64)
        arrays[f"{name}.lengths"] = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    metadata = {"format": str(CACHE_FORMAT), "groups": json.dumps(list(groups)), "description": description}
    _write_cache_file(path, lambda temporary: save_file(arrays, str(temporary), metadata=metadata))


def load_token_lists(path: Path) -> dict[str, list[list[int]]] | None:
    """What `save_token_lists` wrote; None when the file is missing, of another format, or damaged."""
    import numpy as np

    def read(cached: Any, metadata: dict[str, str]) -> dict[str, list[list[int]]] | None:
        groups: dict[str, list[list[int]]] = {}
        for name in json.loads(metadata["groups"]):
            ids = cached.get_tensor(f"{name}.ids").tolist()
            lengths = cached.get_tensor(f"{name}.lengths")
            if int(lengths.sum()) != len(ids):
                return None
            ends = np.cumsum(lengths).tolist()
            groups[name] = [ids[end - length : end] for end, length in zip(ends, lengths.tolist(), strict=True)]
        return groups

    return _read_cache_file(path, read)


def _read_cache_file(path: Path, read: Callable[[Any, dict[str, str]], _Cached | None]) -> _Cached | None:
    """Open a file `_write_cache_file` wrote and hand it to `read`; None when missing, of another
    format, or damaged (a miss: the caller recomputes and rewrites it)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as cached:
            metadata = cached.metadata() or {}
            if metadata.get("format") != str(CACHE_FORMAT):
                return None
            return read(cached, metadata)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def _write_cache_file(path: Path, write: Callable[[Path], None]) -> None:
    # Written aside and renamed: a reader (another work horse) sees the old file or the whole new one.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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


def _indexed_tasks(store: _RowStore, tasks: Iterable[str]) -> dict[str, array[int]]:
    names = list(dict.fromkeys(tasks))  # keep the caller's order, drop repeats
    if not names:
        raise DataError("no tasks given")
    keys = store.index(names)
    empty = [task for task in names if not keys[task]]
    if empty:
        raise DataError(f"task(s) {', '.join(empty)} have no examples in {store.source}")
    return keys


def few_shot_examples(
    source: str,
    tasks: Iterable[str],
    k: int,
    seed: int,
    *,
    holdout: int = 0,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Example]:
    """k_shot() of each task's examples after its first `holdout` (the ones eval stages score), read by
    index so a large task is never held in memory.

    Gives the same examples as `k_shot(list(read_examples(source, [task]))[holdout:], k, seed)` per task.
    With `cache_dir`, a JSONL file's row index is cached there (see `_RowStore.index`).
    """
    if k <= 0:
        raise DataError(f"few-shot fine-tuning needs shots > 0, got {k}")
    store = _RowStore(source, cache_dir=cache_dir, log=log)
    chosen: list[Example] = []
    for task, keys in _indexed_tasks(store, tasks).items():
        pool = keys[holdout:]
        if len(pool) < k:
            raise DataError(few_shot_shortfall(task, rows=len(keys), holdout=holdout, shots=k))
        chosen.extend(store.rows([pool[i] for i in _chosen_indices(len(pool), k, seed)]))
    return chosen


def few_shot_shortfall(task: str, *, rows: int, holdout: int, shots: int) -> str:
    """Why `shots` examples of `task` cannot be drawn apart from its eval examples, and what to change."""
    held = min(rows, holdout)
    if rows - shots >= 1:
        fix = f"lower eval.max_examples to {rows - shots} or less, or lower shots"
    else:  # even one eval example leaves too few
        fix = f"lower shots below {rows}, or leave the task out of few-shot runs"
    return (f'task "{task}" has {rows} rows; the first {held} are its eval examples (eval.max_examples: {holdout}), '
            f"which leaves {rows - held} to draw shots: {shots} from; {fix}")


def _reservoir(keys: array[int], cap: int, rng: random.Random) -> array[int]:
    if len(keys) <= cap:
        return keys
    pool = keys[:cap]
    for seen, key in enumerate(islice(keys, cap, None), start=cap):
        slot = rng.randrange(seen + 1)
        if slot < cap:
            pool[slot] = key
    return pool


class Mixture:
    """Examples-proportional mixing of tasks with a per-task cap (T5/T0 convention), streamed.

    How it streams (memory stays flat as the data grows):
    1. One pass over the source builds, per task, the keys (byte offsets / row numbers) of its rows,
       thinned to at most `cap` by reservoir sampling: 8 bytes per row, never the text. With
       `cache_dir`, a JSONL file's offsets are kept there and later mixtures skip the pass.
    2. Each draw picks a task with probability min(n_task, cap) / sum(min(n, cap)), then takes that
       task's next key from a per-epoch shuffle of its pool, and reads that one row.
    `stream(start)` skips the first `start` draws without reading them (only random numbers are
    replayed), so a resumed training run continues exactly where it stopped.
    """

    def __init__(
        self,
        source: str,
        tasks: Iterable[str],
        *,
        cap: int,
        seed: int,
        cache_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if cap <= 0:
            raise DataError(f"mixture cap must be positive, got {cap}")
        self._store = _RowStore(source, cache_dir=cache_dir, log=log)
        self._seed = seed
        self._pools = {
            task: _reservoir(keys, cap, _seeded("pool", seed, task))
            for task, keys in _indexed_tasks(self._store, tasks).items()
        }

    @property
    def sizes(self) -> dict[str, int]:
        """Examples each task can contribute (its count, capped); the mixing rates are proportional."""
        return {task: len(pool) for task, pool in self._pools.items()}

    def stream(self, start: int = 0) -> Iterator[Example]:
        """The endless, deterministic stream of draws, from draw number `start` on."""
        return self._store.rows(islice(_mixture_keys(self._pools, self._seed), start, None))


def _mixture_keys(pools: dict[str, array[int]], seed: int) -> Iterator[int]:
    names = list(pools)
    cumulative = list(accumulate(len(pools[task]) for task in names))
    total = cumulative[-1]
    chooser = _seeded("mixture", seed)
    orders: dict[str, array[int]] = {}
    positions = dict.fromkeys(names, 0)
    epochs = dict.fromkeys(names, -1)
    while True:
        task = names[bisect_right(cumulative, chooser.randrange(total))]
        if task not in orders or positions[task] == len(orders[task]):
            epochs[task] += 1
            order = array("q", pools[task])
            _seeded("epoch", seed, task, epochs[task]).shuffle(order)
            orders[task] = order
            positions[task] = 0
        yield orders[task][positions[task]]
        positions[task] += 1


def cycle_shuffled(examples: Sequence[Example], seed: int, start: int = 0) -> Iterator[Example]:
    """`examples` over and over, reshuffled each epoch; `start` skips that many draws."""
    if not examples:
        raise DataError("no examples to train on")
    first_epoch, offset = divmod(start, len(examples))
    for epoch in count(first_epoch):
        order = list(range(len(examples)))
        _seeded("cycle", seed, epoch).shuffle(order)
        for position in order[offset:]:
            yield examples[position]
        offset = 0
    raise AssertionError("unreachable")  # pragma: no cover  (count() never ends)


def length_grouped_batches(
    stream_from: Callable[[int], Iterator[Example]],
    *,
    batch_size: int,
    seed: int,
    length: Callable[[Example], int],
    start_batch: int = 0,
    window_batches: int = 50,
) -> Iterator[list[Example]]:
    """Batches of similar-length examples, to keep dynamic padding small.

    The stream is cut into windows of `window_batches * batch_size` examples; each window is sorted by
    `length` (ties by position), cut into batches, and the batches are shuffled. Batch number b depends
    only on the seed and the data, so `start_batch` resumes exactly: `stream_from(n)` must return the
    stream with its first n examples skipped.
    """
    window_size = window_batches * batch_size
    window, skip = divmod(start_batch, window_batches)
    stream = stream_from(window * window_size)
    for window_number in count(window):
        examples = list(islice(stream, window_size))
        if len(examples) < window_size:
            raise DataError("the training stream ended early")  # streams given here are endless
        order = sorted(range(window_size), key=lambda i: (length(examples[i]), i))
        batches = [
            [examples[i] for i in order[first : first + batch_size]] for first in range(0, window_size, batch_size)
        ]
        _seeded("batches", seed, window_number).shuffle(batches)
        yield from batches[skip:]
        skip = 0
    raise AssertionError("unreachable")  # pragma: no cover


# --- stl's own demo dataset ---------------------------------------------------------------------

DEMO_DATASET = "stl-demo"
DEMO_FILE = "demo_text2text.jsonl"
DEMO_TRAIN_TASKS = (
    "sentiment_classification",
    "intent_classification",
    "act_classification",
    "response_generation",
    "question_generation",
    "answer_generation",
)
DEMO_EVAL_TASKS = ("emotion_classification", "summarization")
DEMO_ROWS_PER_TASK = 48

_NAMES = ("ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo", "iris", "jonas")
_CITIES = ("paris", "lima", "oslo", "tokyo", "cairo", "rome", "delhi", "quito")
_FOODS = ("pizza", "sushi", "tacos", "curry", "pasta", "salad")
_TIMES = ("7 am", "9 am", "noon", "3 pm", "5 pm", "8 pm")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")

# What in-domain MTL can transfer (`make demo` shows it). The held-out emotion task is labelled by the cues that
# label the sentiment training task ({m}: words and the stop after them), with the same labels, in other sentences
# and asked another way; a model that never saw sentiment has nothing to prefer one label by. The held-out summary
# names the speaker and the request's slot, as the response training task's reply does.
_CUES = {
    "positive": ("yay !", "i love it !", "so happy !"),
    "negative": ("ugh .", "i hate it .", "so sad ."),
}
_SENTIMENT_LINES = dict.fromkeys(_CUES, ("{m} the {x} in {c}", "{m} {c} on {d}", "{m} dinner with {n}",
                                         "{m} at {t} with {n}"))
_SENTIMENT_WORDINGS = (
    ("Classify the sentiment.", "Sentiment?"),
    ("Is the turn positive or negative?", "Tone?"),
    ("Tell the mood of the turn.", "Mood?"),
    ("How does the speaker sound?", "Positive or negative?"),
)
_EMOTION_LINES = dict.fromkeys(_CUES, ("{m} the show at {t}", "{m} {n} called"))
_INTENTS = {
    "flight": ("book a flight to {c} .", "i need a plane to {c} ."),
    "weather": ("is it sunny in {c} ?", "will it rain in {c} ?"),
    "food": ("i want {x} .", "can i order {x} ?"),
    "alarm": ("wake me at {t} .", "set an alarm for {t} ."),
}
_ACTS = {
    "greeting": ("hello {n} !", "hi {n} , good morning !"),
    "question": ("do you like {x} ?", "when do we leave ?"),
    "thanks": ("thank you for the {x} .", "thanks {n} ."),
    "inform": ("the train leaves at {t} .", "the shop opens on {d} ."),
}
_REPLIES = {
    "flight": "ok {n} , flight to {c} booked .",
    "weather": "{n} , it is sunny in {c} .",
    "food": "ok {n} , {x} is coming .",
    "alarm": "ok {n} , alarm at {t} .",
}
_SUMMARIES = {
    "flight": "{n} wants a flight to {c} .",
    "weather": "{n} asks if it is sunny in {c} .",
    "food": "{n} wants {x} .",
    "alarm": "{n} wants an alarm at {t} .",
}
_FACTS = (
    ("the train leaves at {t} .", "when does the train leave ?", "{t}"),
    ("{n} flies to {c} .", "where does {n} fly ?", "{c}"),
    ("{n} ordered {x} .", "what did {n} order ?", "{x}"),
    ("the party is on {d} .", "when is the party ?", "{d}"),
)


def _row(task: str, instruction: str, text: str, output: str, labels: Sequence[str] = ()) -> dict[str, Any]:
    if labels:
        text = f"{text} [OPTIONS] {OPTION_SEPARATOR.join(labels)}"
    return {
        "prompt": f"Instruction: {instruction}\nInput: {text}",
        "input": text,
        "output": output,
        "all_outputs": [output],
        "task": task,
        "dataset": DEMO_DATASET,
        "candidates": list(labels),
        "classes_in_options": list(labels),
    }


def _slots(rng: random.Random, cues: Sequence[str] = ("",)) -> dict[str, str]:
    return {
        "n": rng.choice(_NAMES),
        "c": rng.choice(_CITIES),
        "x": rng.choice(_FOODS),
        "t": rng.choice(_TIMES),
        "d": rng.choice(_DAYS),
        "m": rng.choice(cues),
    }


def _classification_rows(
    task: str, wordings: Sequence[tuple[str, str]], lines: Mapping[str, Sequence[str]], rng: random.Random
) -> list[dict[str, Any]]:
    """Balanced labels; each row asks in one of `wordings` (instruction, question), as InstructDial words a task
    in several ways."""
    labels = sorted(lines)
    rows = []
    for i in range(DEMO_ROWS_PER_TASK):
        label = labels[i % len(labels)]
        said = rng.choice(lines[label]).format(**_slots(rng, _CUES.get(label, ("",))))
        instruction, question = rng.choice(wordings)
        rows.append(_row(task, instruction, f"[CONTEXT] {said} [QUESTION] {question}", label, labels))
    return rows


def _request_rows(
    task: str, instruction: str, question: str, outputs: Mapping[str, str], rng: random.Random
) -> list[dict[str, Any]]:
    """Someone asks for something; the output names them and the request's slot (a reply or a summary)."""
    intents = sorted(outputs)
    rows = []
    for i in range(DEMO_ROWS_PER_TASK):
        intent = intents[i % len(intents)]
        slots = _slots(rng)
        request = rng.choice(_INTENTS[intent]).format(**slots)
        text = f"[CONTEXT] {slots['n']} : {request} [QUESTION] {question}"
        rows.append(_row(task, instruction, text, outputs[intent].format(**slots)))
    return rows


def _fact_rows(task: str, instruction: str, rng: random.Random, *, answer: bool) -> list[dict[str, Any]]:
    """A fact in the dialogue: write the question it answers, or answer its question."""
    rows = []
    for i in range(DEMO_ROWS_PER_TASK):
        fact, question, reply = _FACTS[(i + int(answer)) % len(_FACTS)]
        slots = _slots(rng)
        asked = question.format(**slots)
        text = f"[CONTEXT] {fact.format(**slots)} [QUESTION] {asked if answer else 'Ask about it.'}"
        rows.append(_row(task, instruction, text, (reply if answer else question).format(**slots)))
    return rows


def _demo_rows() -> list[dict[str, Any]]:
    rng = _seeded("demo-dataset", 1)
    tasks = [
        _classification_rows("sentiment_classification", _SENTIMENT_WORDINGS, _SENTIMENT_LINES, rng),
        _classification_rows("emotion_classification", [("Say how the speaker feels.", "Feeling?")],
                             _EMOTION_LINES, rng),
        _classification_rows("intent_classification", [("Find the intent.", "Intent?")], _INTENTS, rng),
        _classification_rows("act_classification", [("Find the dialogue act.", "Act?")], _ACTS, rng),
        _request_rows("response_generation", "Reply to the user.", "Reply.", _REPLIES, rng),
        _fact_rows("question_generation", "Ask what the last turn answers.", rng, answer=False),
        _fact_rows("answer_generation", "Answer in a few words.", rng, answer=True),
        _request_rows("summarization", "Summarize the dialogue.", "Summary?", _SUMMARIES, rng),
    ]
    # One row of each task in turn: each task keeps its order, so its first rows (the ones evaluated) hold every
    # label equally often, and an answer that ignores the input scores exactly chance.
    return [row for rows in zip(*tasks, strict=True) for row in rows]

_DEMO_README = """# stl demo dataset (synthetic)

Synthetic dialogue data generated by stl (`jobs/ml/data.py: write_demo_dataset`) from templates, so the
pipeline can be exercised with no downloads. It is NOT InstructDial and says nothing about the
paper's results.

Same JSONL format and field names as InstructDial's text2text files (prompt, input, output, all_outputs,
task, dataset, candidates, classes_in_options); classification inputs list their options inline as
`[OPTIONS] a||||b`. Labels follow cue words in the dialogue, so tiny models can learn them, and the held-out
tasks share what the training tasks teach: emotion has sentiment's cues and labels in other sentences, and a
summary names the speaker and the request's slot as a response does.

Tasks for multi-task training: {train}
Held-out tasks for zero-shot / few-shot evaluation: {held_out}
"""


def write_demo_dataset(directory: Path) -> Path:
    """Write the demo JSONL (byte-identical every time) and its README; return the JSONL path."""
    path = directory / DEMO_FILE
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in _demo_rows()]
    readme = _DEMO_README.format(train=", ".join(DEMO_TRAIN_TASKS), held_out=", ".join(DEMO_EVAL_TASKS))
    # Never over someone's own files (`stl data demo .` in a project): only over an earlier demo set.
    marks = {path: f'"dataset": "{DEMO_DATASET}"'.encode(), directory / "README.md": _DEMO_README[:30].encode()}
    for target, mark in marks.items():
        try:
            head = target.read_bytes()[:4096] if target.is_file() else None
        except OSError:
            head = b""
        if head is not None and mark not in head:
            raise UsageError(f"{target} exists and is not stl's demo data; write the demo dataset into another "
                             "folder (e.g. a new one: stl data demo demo-data)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, "".join(line + "\n" for line in lines))
        _write_atomically(directory / "README.md", readme)
    except OSError as e:
        raise path_error("write the demo dataset into", directory, e) from e
    return path


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file: a full disk leaves the old file, not a torn one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8", newline="\n")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
