"""The report model as HTML; a report as one self-contained page (inline CSS, figures as base64 PNG data URIs):
no scripts, fonts, stylesheets or images from elsewhere, so it can be mailed, archived or opened offline."""

from __future__ import annotations

import base64
import re
from html import escape

from paft.report.model import Block, Cell, Code, Column, Figure, Section, Table, Text, cell
from paft.report.style import COLORS, DEFAULT_COLOR

CSS = """
*{box-sizing:border-box} main{max-width:1200px;margin:0 auto;padding:20px 16px 48px}
body{margin:0;background:#f4f5f7;color:#1f2328;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Liberation Sans","DejaVu Sans",sans-serif}
h1{font-size:24px;margin:4px 0 2px} h2{font-size:18px;margin:0 0 10px} h3{font-size:15px;margin:18px 0 8px}
p{margin:6px 0} .sub{color:#57606a} nav{margin:10px 0 4px} nav a{color:#0b5cad;text-decoration:none;margin-right:14px}
code{font:12.5px ui-monospace,"DejaVu Sans Mono",monospace;background:#eef0f3;padding:1px 4px;border-radius:4px}
section{background:#fff;border:1px solid #dfe2e6;border-radius:8px;padding:16px 20px;margin:14px 0}
.wrap{overflow-x:auto} table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0}
th,td{padding:5px 12px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #c9ced4;font-weight:600;white-space:nowrap} td.num,th.num{text-align:right}
td.num{font-family:ui-monospace,"DejaVu Sans Mono","Liberation Mono",monospace;font-size:13px;white-space:nowrap}
td.text{max-width:520px;overflow-wrap:anywhere} td.metric{white-space:nowrap} table.values td{vertical-align:middle}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.best{font-weight:700} .good{color:#0f6b2c;background:#e3f4e8} .bad{color:#a3142a;background:#fdebed}
.flat{color:#57606a} table.deltas td.ctx{background:none;opacity:.8} table.deltas td.tax{font-weight:600}
th.tax{background:#eef0f3} .sep{border-left:2px solid #c9ced4}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0 4px} .card h3{margin:0 0 6px}
.card{flex:1 1 300px;border:1px solid #dfe2e6;border-radius:8px;padding:10px 14px}
.card .row{display:flex;justify-content:space-between;gap:12px;padding:2px 0}
.card .v{font-family:ui-monospace,"DejaVu Sans Mono",monospace;padding:0 6px;border-radius:4px}
figure{margin:12px 0 0} figcaption{color:#57606a;font-size:13px;margin-top:4px}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eceef1;border-radius:6px}
details{margin:6px 0} summary{cursor:pointer;font-weight:600}
pre{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;background:#f6f8fa;padding:10px;border-radius:6px;
overflow-x:auto;max-height:480px}
"""


def _inline(text: str) -> str:
    """Escaped text, `code` marked up."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _classes(col: Column, tone: str = "") -> str:
    return " ".join(x for x in ("num" if col.num else "text", tone, col.cls) if x)


def _text(c: Cell, num: bool = False) -> str:
    """A cell's colour swatch, text (numbers with the typographic minus, as wide as the plus) and note."""
    swatch = f'<span class="sw" style="background:{COLORS.get(c.swatch, DEFAULT_COLOR)}"></span>' if c.swatch else ""
    text = "−" + c.text[1:] if num and c.text.startswith("-") else c.text
    return swatch + _inline(text + (" " + c.note if c.note else ""))


def _td(col: Column, c: Cell) -> str:
    data = "" if c.delta is None else f' data-delta="{c.delta!r}"'
    title = f' title="{escape(c.title)}"' if c.title else ""
    return f'<td class="{_classes(col, c.tone)}"{data}{title}>{_text(c, col.num)}</td>'


def _card(cols: list[Column], row: list[Cell]) -> str:
    items = "".join(f'<div class="row"><span>{_text(cell(col.title))}</span><span><span class="sub">{escape(c.note)}'
                    f'</span> <span class="v {c.tone}">{_text(Cell(c.text), num=True)}</span></span></div>'
                    for col, c in zip(cols[1:], row[1:]))
    return f'<div class="card"><h3>{_text(row[0])}</h3>{items}</div>'


def _table(t: Table) -> str:
    cols, rows = t.columns, [[cell(x) for x in r] for r in t.rows]
    if t.cls == "cards":  # the headline at a glance: a card per row, titled by its first cell
        return '<div class="cards">' + "".join(_card(cols, r) for r in rows) + "</div>"
    th = "".join(f'<th class="{_classes(c)}">{_text(cell(c.title))}</th>' for c in cols)
    body = "".join("<tr>" + "".join(_td(c, x) for c, x in zip(cols, r)) + "</tr>" for r in rows)
    cls = f' class="{t.cls}"' if t.cls else ""
    return f'<div class="wrap"><table{cls}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def to_html(block: Block, images: dict[str, bytes] | None = None, level: int = 2) -> str:
    """A section or block as HTML (a level-2 section is a card of the page); ``images``: PNGs by figure ``src``."""
    images = images or {}
    if getattr(block, "only", "") not in ("", "html"):
        return ""
    if isinstance(block, Section):
        anchor = f' id="{block.id}"' if block.id else ""
        body = "".join(to_html(b, images, level + 1) for b in block.blocks)
        if level == 2:
            return f"<section{anchor}><h2>{escape(block.title)}</h2>{body}</section>"
        return f"<h{level}{anchor}>{escape(block.title)}</h{level}>{body}"
    if isinstance(block, Text):
        return f'<p class="sub">{_inline(block.text)}</p>'
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        if block.src not in images:
            return ""
        b64 = base64.b64encode(images[block.src]).decode("ascii")
        caption = f"<figcaption>{escape(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="data:image/png;base64,{b64}" alt="{escape(block.alt)}">{caption}</figure>'
    if isinstance(block, Code):
        return f"<details><summary>{escape(block.summary)}</summary><pre>{escape(block.text)}</pre></details>"
    raise TypeError(f"not a report block: {block!r}")


def page(report: Section, subtitle: str, images: dict[str, bytes]) -> str:
    """A whole report as one page: its text blocks as the header, its sections as cards, a bar linking to them."""
    intro = "".join(f"<p>{_inline(b.text)}</p>" for b in report.blocks if isinstance(b, Text) and b.only != "md")
    sections = [b for b in report.blocks if isinstance(b, Section)]
    nav = "".join(f'<a href="#{x.id}">{escape(x.nav)}</a>'
                  for s in sections for x in (s, *s.blocks) if isinstance(x, Section) and x.nav)
    parts = [f'<header><h1>{escape(report.title)}</h1><p class="sub">{escape(subtitle)}</p>{intro}</header>',
             f"<nav>{nav}</nav>", *(to_html(s, images) for s in sections)]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(f'{report.title} · {subtitle}')}</title><style>{CSS}</style></head>\n"
            f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n")

