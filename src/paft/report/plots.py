"""The run report's figures, as PNG bytes (written to files for report.md, embedded in report.html)."""

from __future__ import annotations

import io
import math
from typing import Any

from paft.report.metrics import Metric
from paft.report.sparsity_plot import plot_sparsity
from paft.report.style import BRANCH_LABELS, COLORS, DEFAULT_COLOR, DIRECTIONS, SHORT

WIDTH_IN, DPI = 11.5, 100  # 1150 px: the HTML page's content width, so images show at 1:1


def _plt():
    import matplotlib  # lazily: a second of start-up, needed only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def metric_bars(tax: dict[str, Any]) -> bytes | None:
    """One small bar chart per metric, models side by side in their report colours."""
    models, values = tax["models"], tax["values"]
    metrics = [Metric(m["key"], m["label"], m["higher_is_better"]) for m in tax["metrics"]
               if any(values[n][m["key"]] is not None for n in models)]
    if not metrics:
        return None
    plt = _plt()
    nrows = math.ceil(len(metrics) / 5)  # at most five panels a row, rows filled evenly
    ncols = math.ceil(len(metrics) / nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH_IN, 2.7 * nrows + 0.5), squeeze=False)
    for ax, x in zip(axes.flat, metrics):
        vals = [values[n][x.key] for n in models]
        ys = [float("nan") if v is None else v for v in vals]
        ax.bar(range(len(models)), ys, color=[COLORS.get(n, DEFAULT_COLOR) for n in models], width=0.7)
        ax.set_xticks(range(len(models)), [SHORT.get(n, n) for n in models])
        ax.set_title(x.label + (f"\n({DIRECTIONS[x.higher]})" if x.higher is not None else "\n"), fontsize=9)
        ax.grid(axis="x", visible=False)
        for i, v in enumerate(vals):
            if v is None:  # a model without this metric: say so instead of a silent gap
                ax.annotate("n/a", (i, 0), ha="center", va="bottom", fontsize=7.5, color="#8c959f",
                            xytext=(0, 2), textcoords="offset points")
            else:
                ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7.5,
                            xytext=(0, 2 if v >= 0 else -2), textcoords="offset points")
        ax.margins(y=0.18)
        ax.axhline(0, color="#444444", lw=0.6)
        shown = [v for v in vals if v is not None]
        if shown and min(shown) >= 0:  # no empty negative half for non-negative metrics
            ax.set_ylim(0, max(shown) * 1.18 or 1.0)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Held-out metrics per model", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; a staged or online branch restarts its step count per fit, so later fits
    are shifted to continue after the previous one."""
    xs, ys, offset, last = [], [], 0, 0
    for h in history:
        step = h.get("step")
        if step is None:
            continue
        if step + offset < last:  # a new fit began at step 0
            offset = last
        last = step + offset
        v = h.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(last)
            ys.append(float(v))
    return xs, ys


# (log key, panel title); panels without data are left out
TRAIN_PANELS = [
    ("loss", "training loss (SFT: NLL + λ·L1)"),
    ("nll", "SFT NLL (without the L1 term)"),
    ("rewards/margin", "reward margin (chosen − rejected)"),
    ("rewards/accuracy", "reward accuracy (chosen > rejected)"),
]


def training_curves(training: dict[str, dict]) -> bytes | None:
    """Loss, SFT NLL, reward margin and reward accuracy by step, one line per branch."""
    panels = [(k, t) for k, t in TRAIN_PANELS
              if any(_series(s.get("log_history") or [], k)[0] for s in training.values())]
    if not panels:
        return None
    plt = _plt()
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH_IN, 3.1 * nrows + 0.4), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, s in training.items():
            xs, ys = _series(s.get("log_history") or [], key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.5, color=COLORS.get(name), label=BRANCH_LABELS.get(name, name))
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "rewards/accuracy":
            ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=8, frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training curves by optimizer step", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def sparsity_figure(sparsity: dict[str, dict]) -> bytes:
    _plt()
    buf = io.BytesIO()
    plot_sparsity(sparsity, buf, by_type=True, width=WIDTH_IN, dpi=DPI)
    return buf.getvalue()
