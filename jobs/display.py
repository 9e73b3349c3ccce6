"""Rich renderables of text that others wrote (model names, paths, errors): literally, never as markup.

rich reads a plain str as markup, so a model named `./m/[/bold]` crashes a table and `[link=...]` becomes a
link; and it passes ESC through, so an escape sequence in a path reaches the terminal. Every table stl
prints is a `LiteralTable`, and any Text made of such strings is made with `literal`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from stl.jobs.codec import UNSAFE_CHARS, printable

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.style import Style


def literal(value: object, style: str | Style = "", *, keep: str = "\n") -> Text:
    """A Text that shows `value`'s characters (control characters escaped), whatever they are."""
    return Text(printable(value, keep=keep), style=style)


def _literal_cell(cell: RenderableType | None) -> RenderableType | None:
    if isinstance(cell, str):
        return literal(cell)
    if isinstance(cell, Text) and UNSAFE_CHARS.search(cell.plain.replace("\n", "")):
        return literal(cell.plain, cell.style)  # a Text someone built from raw input: escaped (its spans go)
    return cell


class LiteralTable(Table):
    """A rich Table whose strings (title, caption, headers, cells) are shown as written."""

    def __init__(self, *headers: Any, title: str | Text | None = None, caption: str | Text | None = None,
                 **options: Any) -> None:
        # A Text title or caption takes no style from the table: give it the one rich gives a str.
        if isinstance(title, str):
            title = literal(title, options.get("title_style") or "table.title")
        if isinstance(caption, str):
            caption = literal(caption, options.get("caption_style") or "table.caption")
        super().__init__(*headers, title=title, caption=caption, **options)  # str headers go to add_column

    def add_column(self, header: RenderableType = "", *args: Any, **options: Any) -> None:
        super().add_column(_literal_cell(header) or "", *args, **options)

    def add_row(self, *renderables: RenderableType | None, **options: Any) -> None:
        super().add_row(*(_literal_cell(cell) for cell in renderables), **options)
