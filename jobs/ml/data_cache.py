"""On-disk caches under STL_HOME/cache: token ids and JSONL row indexes, as safetensors files (never pickle).

Every file is written aside and renamed, and a missing, damaged or old-format file is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

_Cached = TypeVar("_Cached")

# On-disk caches under STL_HOME/cache (safetensors files, never pickle). Bump a format to drop old entries.
CACHE_FORMAT = 1
INDEX_CACHE_DIR = "index"  # per-task row offsets of a JSONL file
TOKEN_CACHE_DIR = "tokens"  # encoded token ids (few-shot sets, eval examples)


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

def save_row_index(path: Path, keys: Mapping[str, array[int]], *, description: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    names = list(keys)
    arrays = {f"t{i}": np.frombuffer(keys[name], dtype=np.int64) for i, name in enumerate(names)}
    metadata = {"format": str(CACHE_FORMAT), "tasks": json.dumps(names), "source": description}
    _write_cache_file(path, lambda temporary: save_file(arrays, str(temporary), metadata=metadata))


def load_row_index(path: Path, tasks: Sequence[str]) -> dict[str, array[int]] | None:
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
