"""The report model: sections of blocks (text, tables, figures), built once from report.json;
``markdown.to_markdown`` and ``html.to_html`` only serialize it.

Markdown writes what plain text carries; HTML adds presentation: a cell's tone (colour), note (e.g. its standard
error), tooltip, colour swatch and exact value, figure captions and collapsed raw text. A block with
``only="html"`` or ``only="md"`` appears in that format alone. Text may mark `code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Union


@dataclass(frozen=True)
class Cell:
    text: str
    note: str = ""  # HTML: shown after the text
    tone: str = ""  # HTML: good | bad | flat (style.TONES) or best
    title: str = ""  # HTML: tooltip
    swatch: str = ""  # HTML: the colour (a style.COLORS key) shown before the text
    delta: float | None = None  # HTML: the exact difference behind a rounded delta (data-delta)


def cell(c: Any) -> Cell:
    return c if isinstance(c, Cell) else Cell(str(c))


@dataclass(frozen=True)
class Column:
    title: Any  # text or a Cell
    num: bool = False  # right-aligned
    cls: str = ""  # HTML: extra classes of the column's cells


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    rows: list[list[Any]]  # a plain value (not a Cell) is shown with str()
    cls: str = ""  # HTML: the table's class; "cards" draws a card per row, a line per further column


def table(header: list[str], rows: Iterable[Iterable[Any]], num_from: int = 1) -> Table:
    """A plain table; the columns from ``num_from`` on are numbers (right-aligned)."""
    return Table([Column(h, num=i >= num_from) for i, h in enumerate(header)], [list(r) for r in rows])


@dataclass(frozen=True)
class Text:
    text: str
    only: str = ""


@dataclass(frozen=True)
class Figure:
    src: str  # the PNG's file name beside the report; HTML embeds its bytes
    alt: str
    caption: str = ""  # HTML


@dataclass(frozen=True)
class Code:  # raw text (a config dump) under a collapsed summary
    summary: str
    text: str
    only: str = "html"  # Markdown names the file instead


@dataclass(frozen=True)
class Section:  # a heading and its blocks; a whole report is a section at level 1
    title: str
    blocks: list[Block]
    id: str = ""  # HTML: the anchor
    nav: str = ""  # HTML: the name in the page's navigation bar


Block = Union[Text, Table, Figure, Code, Section]
