"""Writes that survive a crash and a full disk: fsync'd files and folders, and failed saves told apart.

A save is written aside, fsync'd (the folder too) and renamed into place, so a crash or a power cut
leaves the old version or the whole new one. When a save fails, what it wrote aside is removed (a full
disk must not stay full of half a checkpoint) and the failure is classified: torch's serializer reports
a full disk as "unexpected pos" or "iostream error" with no errno, so a failure the disk explains (it is
full, or read-only) is raised again as the OSError it really was, which stl.jobs.health counts as the
machine's fault: the stage is requeued and the worker pauses until the disk has room.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from stl.jobs.disk_space import free_space

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# What libraries say when a write fails without an errno: torch's zip writer (PyTorchStreamWriter, with the
# C++ stream's "basic_ios::clear: iostream error" as its context), or an errno worded in the text by Rust.
_WRITE_FAILED = re.compile(
    r"unexpected pos|iostream error|PytorchStreamWriter|file write failed|inline_container"
    r"|No space left on device|Disk quota exceeded|Read-only file system|\(os error (28|122|30)\)",
    re.IGNORECASE)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
MIN_NEED_BYTES = 1 << 20  # a save needs at least this much room, whatever its estimate


class DiskFull(OSError):
    """A save found no room on its disk (errno ENOSPC); `needed_bytes` is about what it needed in all."""

    def __init__(self, message: str, target: Path, needed_bytes: int) -> None:
        super().__init__(errno.ENOSPC, message, str(target))
        self.needed_bytes = needed_bytes


def needed_bytes(error: BaseException) -> int:
    """What the save that `error` (or what it was raised from) reports it needed; 0 if none says."""
    seen: BaseException | None = error
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, DiskFull):
            return seen.needed_bytes
        seen = seen.__cause__ or seen.__context__
    return 0


def disk_write_fault(error: BaseException, target: Path, needed: int) -> OSError | None:
    """The disk's own error behind the failed save of about `needed` bytes to `target`, or None when the
    disk does not explain it. Call it before removing what the save wrote: a full disk is still full then."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 6:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    detail = "; ".join(" ".join(str(e).split()) for e in chain)[:300]
    if not (codes & _DISK_ERRNOS or _WRITE_FAILED.search(detail)):
        return None
    if errno.EROFS in codes or _read_only(target):
        return OSError(errno.EROFS, f"Read-only file system ({detail})", str(target))
    space = free_space(target)
    needed = max(needed, MIN_NEED_BYTES)
    # An errno says it; the texts are only believed where the disk is too full for the save.
    if codes & {errno.ENOSPC, errno.EDQUOT} or (space is not None and space[0] < needed):
        return DiskFull(f"No space left on device: a save of about {needed / (1 << 20):.1f} MiB failed ({detail})",
                        target, needed)
    return None


def _read_only(path: Path) -> bool:
    for candidate in (path, *path.parents):
        try:
            return bool(os.statvfs(candidate).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False


@contextlib.contextmanager
def saving(target: Path, *aside: Path, needed: int) -> Iterator[None]:
    """Around a save of about `needed` bytes that ends in `target`: when it fails, the paths `aside` (what it
    wrote before renaming into place) are removed, and a failure the disk explains is raised as the disk's
    error (DiskFull, or EROFS), from the original."""
    try:
        yield
    except BaseException as e:
        fault = disk_write_fault(e, target, needed) if isinstance(e, Exception) else None
        if fault is not None:
            _close_what_it_held(e)
        for path in aside:
            remove(path)
        if fault is not None:
            raise fault from e
        raise


def _close_what_it_held(error: BaseException) -> None:
    """Drop the locals of the frames `error` went through: torch's writer keeps its file open there, and a
    file removed while open still fills the disk until the error is gone (long after, in a work horse)."""
    seen: BaseException | None = error
    for _ in range(6):
        if seen is None:
            break
        traceback.clear_frames(seen.__traceback__)  # frames still running (this one) are left alone
        seen = seen.__cause__ or seen.__context__


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it is there; never raises (it runs while handling another error)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make the names in `path` durable (a rename or a new file is in the directory, not only the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then every folder, deepest first."""
    folders = []
    for root, _dirs, names in os.walk(directory):
        folders.append(Path(root))
        for name in names:
            fsync_file(Path(root, name))
    for folder in reversed(folders):
        fsync_directory(folder)


def write_atomically(path: Path, data: str | bytes, *, before_commit: Callable[[], None] | None = None) -> None:
    """Replace `path` by `data` through a file aside, fsync'd, then the folder fsync'd: a crash leaves the old
    file or the new one, never a torn one; a full disk leaves no file aside. `before_commit` runs just before the
    replace and may refuse it by raising (a stale work horse: stl.jobs.queue.fence); the file aside is then removed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    with saving(path, temporary, needed=len(payload)):
        with temporary.open("wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(temporary, path)
        fsync_directory(path.parent)
