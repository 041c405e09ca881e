"""How the reports name and colour things: model order, labels, colours, number formats. One place, so the
tables, the HTML page and the plots agree."""

from __future__ import annotations

from typing import Any

MODELS = ("base", "sft", "preference", "sequential", "paft")
LABELS = {"base": "base", "sft": "SFT only", "preference": "preference only",
          "sequential": "sequential SFT->pref", "paft": "PAFT merge"}
SHORT = {"base": "base", "sft": "SFT", "preference": "pref.", "sequential": "seq.", "paft": "PAFT"}
# training branches (plot legends); the reward model trains but is not one of the evaluated models
BRANCH_LABELS = {"sft": "SFT branch", "preference": "preference branch", "sequential": "sequential (pref. on SFT)",
                 "reward": "reward model"}
COLORS = {"base": "#9e9e9e", "sft": "#4c72b0", "preference": "#dd8452", "sequential": "#8172b3",
          "paft": "#55a868", "reward": "#c44e52"}
DEFAULT_COLOR = "#333333"
# a difference's judgement (metrics.alignment_tax's `better`) as a tone: HTML colours it
TONES = {1: "good", -1: "bad", 0: "flat"}
ARROWS = {True: " ↑", False: " ↓", None: ""}  # after a metric's label: its better direction
DIRECTIONS = {True: "higher is better", False: "lower is better", None: "no better direction"}


def fmt(v: Any) -> str:
    """A table cell: floats to three decimals, missing as an en dash."""
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _tiny_or_huge(v: float) -> bool:
    return v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3)


def fmt_value(v: float | None) -> str:
    return "–" if v is None else f"{v:.2e}" if _tiny_or_huge(v) else f"{v:.3f}"


def fmt_delta(d: float | None) -> str:
    """``+0.021`` / ``-0.150`` (HTML sets the minus typographically)."""
    return "–" if d is None else f"{d:+.1e}" if _tiny_or_huge(d) else f"{d:+.3f}"
