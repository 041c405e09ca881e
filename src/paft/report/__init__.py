"""Run reports: report.json (every number), report.md and report.html (tables, alignment tax), PNG plots.

The report model (``model``) is serialized by ``to_markdown`` and ``to_html``; other reports (the sweep's) build
their tables with ``table``/``Table`` and serialize them the same way.
"""

from paft.report.html import to_html
from paft.report.markdown import to_markdown
from paft.report.model import Cell, Column, Table, table
from paft.report.render import write_report

__all__ = ["Cell", "Column", "Table", "table", "to_html", "to_markdown", "write_report"]
