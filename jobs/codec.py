"""Redis hands back bytes; stl's records are text. Text that others wrote is shown through `printable`."""

from __future__ import annotations

import re

# C0 and C1 controls and DEL (ESC, BEL, CR, backspace...), the invisible format characters that reorder
# or hide text (bidi overrides, zero-width marks, BOM), and lone surrogates.
UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                          "\ufff9-\ufffb\ud800-\udfff]")


def text(value: object) -> str:
    """A Redis reply as str: bytes decoded (a byte that is not UTF-8 as a `\\xff` escape, so that one bad
    byte written by another tool cannot stop a view), None as the empty string."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(errors="backslashreplace")
    return str(value)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, *, keep: str = "") -> str:
    r"""`value` as text with every control or invisible character written as an escape (`\x1b`, `\u202e`),
    so that it reaches a terminal as characters, never as a command to it; those in `keep` ("\n") stay."""
    shown = value if isinstance(value, str) else str(value)
    if not UNSAFE_CHARS.search(shown):
        return shown
    return UNSAFE_CHARS.sub(lambda m: m.group() if m.group() in keep else _escaped(m), shown)
