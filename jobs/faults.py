"""Fault injection for the reliability tests, read from STL_FAULT_INJECT (empty in normal use).

Format: comma-separated `name=value`, e.g. `oom_at_step=3`, `disk_full=1` (every stage meets a full disk, as if
it filled the disk itself), or `disk_full_while=/tmp/flag` (the disk is full while that file exists: the worker's
health check sees it too).

Test aid for admission by device memory: `device_memory=<bytes>` makes the worker admit stages as if
its device had that much memory (stl.worker.device_memory.FixedDeviceMemory), on the CPU too, and
`device_memory_used=<bytes>` as if processes outside stl held that much of it.

Test aid for timing: `min_step_s=<seconds>` makes every training step take at least that long (the horse
waits at each progress report), so a stage lasts long enough whatever the machine's speed.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable


class _Progress(Protocol):
    @property
    def step(self) -> int: ...


Report = TypeVar("Report", bound=_Progress)


@dataclass(frozen=True)
class Faults:
    oom_at_step: int | None = None
    disk_full: bool = False
    disk_full_while: str = ""
    device_memory: int | None = None
    device_memory_used: int = 0
    min_step_s: float = 0.0

    def disk_full_now(self) -> bool:
        """The whole disk reads as full (the health check sees it too); `disk_full` is each stage's alone."""
        return bool(self.disk_full_while and Path(self.disk_full_while).exists())

    def before_stage(self, workdir: Path) -> None:
        if self.disk_full or self.disk_full_now():
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(workdir))


    def paced(self, on_step: Callable[[Report], None]) -> Callable[[Report], None]:
        """`on_step`, after waiting out whatever the steps since the last report took less than `min_step_s`
        each (from the first report on: a resumed stage starts counting where it resumed)."""
        if self.min_step_s <= 0:
            return on_step
        last: list[tuple[int, float]] = []

        def report(progress: Report) -> None:
            if last:
                step, at = last[0]
                time.sleep(max(0.0, (progress.step - step) * self.min_step_s - (time.monotonic() - at)))
            last[:] = [(progress.step, time.monotonic())]
            on_step(progress)

        return report


def parse_faults(text: str) -> Faults:
    values: dict[str, str] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name:
            values[name] = value
    oom = values.get("oom_at_step")
    memory = values.get("device_memory")
    return Faults(oom_at_step=int(oom) if oom else None, disk_full=values.get("disk_full") == "1",
                  disk_full_while=values.get("disk_full_while", ""),
                  device_memory=int(memory) if memory else None,
                  device_memory_used=int(values.get("device_memory_used") or 0),
                  min_step_s=float(values.get("min_step_s") or 0))
