"""Every domain error stl raises. The message says what failed and what to do next."""

from __future__ import annotations

import errno
from pathlib import Path


class StlError(Exception):
    """Base class; the CLI prints the message on stderr and exits with `exit_code`."""

    exit_code = 1


class GridError(StlError):
    """A grid file is invalid. Holds one line per problem, each naming file, line and field."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UsageError(StlError):
    """A command-line argument is invalid (bad run id, unknown grid, ...)."""

    exit_code = 2


class StoreMismatch(UsageError):
    """A worker's STL_HOME is not the artifact store the other workers of its Redis share."""


class GridChanged(UsageError):
    """A grid enqueued again under its name with settings other than those of runs it already has."""


class RedisUnavailable(StlError):
    """Redis cannot be reached."""


class NotFound(StlError):
    """A run, grid or stage does not exist: bad input, like a malformed id."""

    exit_code = 2


class NoResults(StlError):
    """A grid has no results to show (yet): `stl results` exits 1, so a script does not take silence for a table."""


class PermissionDenied(StlError):
    """The action needs the owner, or --force."""


class DataError(StlError):
    """A dataset file or source is missing or malformed."""


class ModelError(StlError):
    """A model cannot be built or loaded. The message is short (it is the run's error in `stl status`);
    `detail` holds everything the loaders said, for the stage's log."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ParentModelMissing(ModelError):
    """A stage's parent finished, but its model is not in STL_HOME (pruned, deleted, or made elsewhere). The
    worker makes the parent again first (stl.jobs.queue.remake); elsewhere it is a ModelError."""

    def __init__(self, message: str, *, parent_dir: Path, why: str) -> None:
        super().__init__(message)
        self.parent_dir = parent_dir
        self.why = why


class StageWaitsForParent(StlError):
    """The stage went back to wait for its parent, which is made again first: it did not fail."""


class StageCanceled(StlError):
    """The stage was canceled by a user; no checkpoint is written."""


class StagePreempted(StlError):
    """The worker is shutting down; the stage checkpointed and will resume elsewhere."""


class MachineFault(StlError):
    """The machine failed the stage (a full disk, a broken GPU): it goes back to the head of its queue and the
    worker takes no work until the machine is healthy again."""


class StageLeaseLost(StlError):
    """Another work horse took the stage over (its lease expired here); this one stops quietly."""


class StepNotRecordable(StlError):
    """A model's decoding step waits for the GPU, so it cannot be recorded as a CUDA graph; the eval stage
    decodes eagerly instead (the same tokens, at the eager speed)."""


class OutOfMemory(StlError):
    """A stage ran out of accelerator memory even at micro-batch 1."""


class ForeignJob(StlError):
    """A job in Redis names a function other than stl's registered entry point."""


class StagesRunning(StlError):
    """An action that would disturb running stages (clearing the caches) was asked for while some run."""


def path_error(action: str, path: Path, e: OSError) -> UsageError:
    """A path the user gave cannot be used: one line that says which part of it is wrong."""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        for part in (path, *path.parents):
            if part.exists() and not part.is_dir():
                return UsageError(f"cannot {action} {path}: {part} is a file, not a folder; choose another path")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UsageError(f"cannot {action} {path}: the disk is full; free some space there or choose a path on "
                          "another disk")
    reason = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename and Path(str(e.filename)) != path else ""
    return UsageError(f"cannot {action} {path}: {reason}{where}; choose a path in a folder you can write to")


def missing_on_worker(what: str, path: Path) -> str:
    """A path a queued run names is absent where the worker runs: say where, and the usual reason."""
    import socket

    return (f"{what} {path} does not exist on the worker's machine ({socket.gethostname()}); check the path in "
            "the grid file; a worker in docker-compose sees only the host folder STL_DATA_ROOT mounts (.env)")


class DamagedRecord(StlError):
    """A record in Redis is not what stl writes (another tool or a hand wrote it), and the command needs it."""
