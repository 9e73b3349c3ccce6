"""What STL_HOME holds on disk, and clearing its caches.

The caches (STL_HOME/cache) hold derived data only — compiled kernels, token ids, row indexes — that
stages rebuild when it is missing, so clearing them loses nothing but time. Stage directories hold the
trained models later runs reuse, runs/ holds results and redis/ the embedded redis-server's data: those
are listed, never cleared here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jobs.errors import StagesRunning, StlError

if TYPE_CHECKING:
    from pathlib import Path

    from jobs.settings import Settings

# STL_HOME/cache/<name>: what each cache holds.
CACHES = {
    "inductor": "torch.compile's compiled kernels (train.compile)",
    "tokens": "token ids of few-shot and eval sets",
    "index": "row offsets of data files (MTL mixtures)",
}


@dataclass(frozen=True)
class DiskUsage:
    name: str  # "stages", "runs" or "cache/<name>"
    path: Path
    what: str
    files: int
    bytes: int
    clearable: bool


def tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under `path`; (0, 0) if it does not exist. Files vanishing meanwhile are skipped."""
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            files += 1
    return files, size


def disk_usage(settings: Settings) -> list[DiskUsage]:
    """Every part of STL_HOME stl writes, with its size; caches first (the part that may be cleared)."""
    parts = [(f"cache/{name}", settings.cache_dir / name, what, True) for name, what in CACHES.items()]
    parts += [
        ("stages", settings.stages_dir, "stage models, kept for reuse by later runs and grids", False),
        ("runs", settings.runs_dir, "per-run results and sample predictions", False),
        ("redis", settings.home / "redis", "the data of the redis-server stl starts when none runs", False),
    ]
    return [
        DiskUsage(name=name, path=path, what=what, files=files, bytes=size, clearable=clearable)
        for name, path, what, clearable in parts
        for files, size in [tree_size(path)]
    ]


def clear_caches(settings: Settings, *, running_stages: int, force: bool = False) -> list[DiskUsage]:
    """Delete STL_HOME/cache/*; return what was there. Refused while stages run (a work horse may be
    reading or compiling into them) unless `force`."""
    if running_stages and not force:
        raise StagesRunning(
            f"{running_stages} stage(s) are running and may be using the caches; clear them when the "
            "workers are idle, or pass --force"
        )
    removed = [usage for usage in disk_usage(settings) if usage.clearable]
    for usage in removed:
        shutil.rmtree(usage.path, ignore_errors=True)
    left = [str(usage.path) for usage in removed if usage.path.exists()]
    if left:
        raise StlError(f"could not delete all of {', '.join(left)}; check its permissions and try again")
    return removed
