"""How much room the disk holding STL_HOME has, and whether a worker can write there at all.

Low-level on purpose: durable saves, the health check, `stl status` and the worker all ask it.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from stl.jobs.errors import UsageError

if TYPE_CHECKING:
    from pathlib import Path

    from stl.jobs.settings import Settings

# `stl status` warns when the disk holding STL_HOME has less free than either: a BART-large stage
# writes a 1.6 GB model, and keeps up to two checkpoints of about three times that while it trains.
LOW_DISK_BYTES = 10 * 2**30
LOW_DISK_FRACTION = 0.05


def check_home_writable(settings: Settings) -> None:
    """A worker that cannot write STL_HOME would fail every stage it takes: refuse to start instead."""
    probe = settings.home / f".write-check.{os.getpid()}"  # in the home itself: stages make their folders
    if settings.home.exists() and not settings.home.is_dir():
        raise UsageError(f"STL_HOME {settings.home} is a file, not a folder; point STL_HOME at a folder the worker "
                         "can write (checkpoints, models and results go there)")
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"STL_HOME {settings.home} cannot be written ({e.strerror or e}"
            f"{f': {e.filename}' if e.filename else ''}); the worker keeps checkpoints, models and results there: "
            "point STL_HOME at a folder it can write (a shared one, when workers are on several machines)"
        ) from e


def free_space(path: Path) -> tuple[int, int] | None:
    """(free, total) bytes of the file system that holds `path` (or would, once created); None if unknown."""
    for candidate in (path, *path.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return usage.free, usage.total
    return None


def disk_is_low(free: float | None, total: float | None) -> bool:
    if free is None or not total:
        return False
    return free < LOW_DISK_BYTES or free / total < LOW_DISK_FRACTION
