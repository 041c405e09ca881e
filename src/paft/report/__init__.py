"""Run reports: report.json (every number), report.md (tables), PNG plots."""

from paft.report.render import write_report

__all__ = ["write_report"]
