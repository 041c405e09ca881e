"""The report model as Markdown: headings, pipe tables, image links; blocks separated by a blank line."""

from __future__ import annotations

from paft.report.model import Block, Figure, Section, Table, Text, cell


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def to_markdown(block: Block, level: int = 1) -> str | None:
    """A section (a whole report at level 1) or block as Markdown; None for an HTML-only block."""
    if getattr(block, "only", "md") not in ("", "md"):
        return None
    if isinstance(block, Section):
        parts = [f"{'#' * level} {block.title}", *(to_markdown(b, level + 1) for b in block.blocks)]
        return "\n\n".join(p for p in parts if p is not None)
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Figure):
        return f"![{block.alt}]({block.src})"
    if isinstance(block, Table):
        return "\n".join([_row([cell(c.title).text for c in block.columns]),
                          "|" + "".join("---:|" if c.num else "---|" for c in block.columns),
                          *(_row([cell(x).text for x in r]) for r in block.rows)])
    raise TypeError(f"not a report block: {block!r}")
