"""Run reports: report.json (every number), report.md and report.html (tables, alignment tax), PNG plots."""

from paft.report.render import write_report

__all__ = ["write_report"]
