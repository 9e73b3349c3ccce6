"""Redis hands back bytes; stl's records are text."""

from __future__ import annotations


def text(value: object) -> str:
    """A Redis reply as str: bytes decoded, None as the empty string."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
