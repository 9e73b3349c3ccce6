"""Fault injection for the reliability tests, read from STL_FAULT_INJECT (empty in normal use).

Format: comma-separated `name=value`, e.g. `oom_at_step=3` or `disk_full=1`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(frozen=True)
class Faults:
    oom_at_step: int | None = None
    disk_full: bool = False

    def before_stage(self, workdir: Path) -> None:
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(workdir))


def parse_faults(text: str) -> Faults:
    values: dict[str, str] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name:
            values[name] = value
    oom = values.get("oom_at_step")
    return Faults(oom_at_step=int(oom) if oom else None, disk_full=values.get("disk_full") == "1")
