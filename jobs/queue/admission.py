"""Whether one more stage fits on a device now: a pure decision on memory, no Redis, no device calls.

The rule: a stage is admitted when its estimated peak plus a margin fits in what the device has
free now (as NVML reports it, so processes outside stl count) less what the stages already admitted there may
still grow into. A stage already there may grow into its estimate minus what it uses now; where its use is
not known (its horse has not started, or the device cannot tell per process, as under MPS), into its whole
estimate. A stage with nothing else of stl on its device is always admitted: that is one stage at a time,
and an out-of-memory back-off handles a device too small for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stl.jobs.humanize import format_bytes

if TYPE_CHECKING:
    from collections.abc import Sequence

MARGIN_FRACTION = 0.10
MARGIN_BYTES = 512 * 2**20  # the horse's CUDA context and the caching allocator's slack, outside its peak


class DeviceMemory(Protocol):
    """A device's memory as it is now, whoever uses it."""

    def total_and_free(self) -> tuple[int, int]:
        """(total bytes, free bytes) now; processes outside stl count."""
        ...

    def used_by_process(self, pid: int) -> int | None:
        """Device memory process `pid` holds now; None where the device cannot tell."""
        ...


@dataclass(frozen=True)
class Reservation:
    """A stage admitted to the device earlier, still running or about to."""

    stage_id: str
    estimate_bytes: int
    used_bytes: int | None = None  # what it holds now; None: not known

    @property
    def may_still_grow(self) -> int:
        if self.used_bytes is None:
            return self.estimate_bytes
        return max(self.estimate_bytes - self.used_bytes, 0)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str  # for people: "needs 9.0 GiB, 6.1 GiB free" or why it was admitted
    estimate_bytes: int  # the stage's estimated peak
    need_bytes: int  # the estimate plus the margin: the budget its horse is capped at
    available_bytes: int  # free now, less what admitted stages may still grow into
    alone: bool  # nothing else of stl on the device: admitted whatever the numbers say


def with_margin(estimate_bytes: int) -> int:
    return int(estimate_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def decide_admission(estimate_bytes: int, *, free_bytes: int, others: Sequence[Reservation]) -> Admission:
    """Admit a stage of `estimate_bytes` peak to a device with `free_bytes` free now and `others` admitted."""
    need = with_margin(estimate_bytes)
    promised = sum(other.may_still_grow for other in others)
    available = free_bytes - promised
    if not others:
        return Admission(True, f"alone on the device (needs {format_bytes(need)}, {format_bytes(free_bytes)} "
                               "free)", estimate_bytes, need, available, alone=True)
    held = (f"{format_bytes(free_bytes)} free now, {format_bytes(promised)} of it promised to "
            f"{len(others)} running stage{'s' if len(others) != 1 else ''}")
    if need <= available:
        return Admission(True, f"needs {format_bytes(need)}, {format_bytes(available)} free ({held})",
                         estimate_bytes, need, available, alone=False)
    return Admission(False, f"needs {format_bytes(need)}, {format_bytes(max(available, 0))} free ({held})",
                     estimate_bytes, need, available, alone=False)
