"""Durations and sizes as people read them, in sentences and in table cells. Light to import: the standard library
only."""

from __future__ import annotations


def format_duration(seconds: float | None, *, compact: bool = False) -> str:
    """`3 h 12 min` (days from 24 h: `2 d 3 h`), for log lines and notifications; `compact`, for a table
    cell: `3h12m`, `1m05s`, `42s`, whole seconds, never negative. None (not known) is `—`."""
    if seconds is None:
        return "—"
    minutes, secs = divmod(max(0, int(seconds)) if compact else round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if compact:
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def format_bytes(size: float) -> str:
    """`512 B`, `1.5 KiB`, `9.0 GiB`: binary units, as nvidia-smi and `df -h` count them."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
