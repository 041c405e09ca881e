"""The run report's figures, as PNG bytes (written to files for report.md, embedded in report.html)."""

from __future__ import annotations

import io
import math
from typing import Any

from paft.report.metrics import Metric, metric_info
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


def _front_line(ax, pts: list[tuple[float, float]], color: str, label: str) -> None:
    """The Pareto front as a step line: sorted by x, each point's y held until the next point's x (or reached there
    first when y falls along the front), so the steps bound the region the front dominates."""
    pts = sorted(pts)
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    rising = len(ys) < 2 or ys[-1] >= ys[0]
    ax.step(xs, ys, where="post" if rising else "pre", color=color, lw=1.4, alpha=0.8, label=label, zorder=1)


def _zoom_box(pts: list[tuple[float, float]], front: list[tuple[float, float]]) -> tuple[tuple, tuple] | None:
    """Axis limits around the front (padded), when the front spans under half of every model's range on either
    axis (a base or a single-objective branch far away squeezes the front into a corner); else None."""
    if len(front) < 2:
        return None
    box, squeezed = [], False
    for k in (0, 1):
        full = max(p[k] for p in pts) - min(p[k] for p in pts)
        lo, hi = min(p[k] for p in front), max(p[k] for p in front)
        squeezed |= hi - lo < 0.5 * full
        pad = max((hi - lo) * 0.15, full * 0.01, 1e-9)
        box.append((lo - pad, hi + pad))
    return (box[0], box[1]) if squeezed else None


def _labels(ax, items: list[tuple[float, float, str]], fontsize: float = 7.5) -> None:
    """Each point's label beside it, moved down in steps where it would cover a label already placed (points in
    a cluster otherwise print over each other), a thin line back to its point when moved."""
    fig = ax.figure
    fig.canvas.draw()  # the axes' final limits: placement works in display pixels
    to_px = ax.transData.transform
    step = fontsize * fig.dpi / 72 * 1.25
    placed: list[tuple[float, float, float]] = []  # (x px, y px, width px)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for x, y, text in sorted(items, key=lambda t: -t[1]):
        if not (min(x0, x1) <= x <= max(x0, x1) and min(y0, y1) <= y <= max(y0, y1)):
            continue
        px, py = to_px((x, y))
        width = len(text) * fontsize * fig.dpi / 72 * 0.55
        dy = 0.0
        while any(abs((px + 4) - qx) < max(width, qw) and abs((py + 3 - dy) - qy) < step for qx, qy, qw in placed):
            dy += step
        placed.append((px + 4, py + 3 - dy, width))
        ax.annotate(text, (x, y), fontsize=fontsize, xytext=(4 * 72 / fig.dpi, (3 - dy) * 72 / fig.dpi),
                    textcoords="offset points", va="bottom",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="#8c959f") if dy else None)


def frontier_plot(fr: dict[str, Any], tune: dict[str, Any] | None = None) -> bytes | None:
    """Left: every model on the held-out split, labelled, the front drawn, the tuned pick a star; beside it, when
    the front is squeezed into a corner by far-off models, the same zoomed to the front. Right (when the run was
    tuned): the trials on the dev split with their front and the pick."""
    x, y = fr["x"], fr["y"]
    pts = [p for p in fr["points"] if p["metrics"].get(x) is not None and p["metrics"].get(y) is not None]
    if not pts:
        return None
    trials = [t for t in (tune or {}).get("trials", []) if t.get("metrics") and t["state"] == "COMPLETE"]
    xy = [(p["metrics"][x], p["metrics"][y]) for p in pts]
    front = [c for c, p in zip(xy, pts) if p["on_front"]]
    zoom = _zoom_box(xy, front)
    plt = _plt()
    panels = 1 + bool(zoom) + bool(trials)
    fig, axes = plt.subplots(1, panels, figsize=(WIDTH_IN, 4.6), squeeze=False)
    word = {True: "higher is better", False: "lower is better"}
    xl = f"{metric_info(x).label} ({word[fr['x_higher_is_better']]})"
    yl = f"{metric_info(y).label} ({word[fr['y_higher_is_better']]})"
    # a model of the run keeps its report colour; each other family gets one of matplotlib's tab10 in turn
    families = list(dict.fromkeys(p["family"] for p in pts if p["name"] not in COLORS and p["family"] != "tuned"))
    cycle = plt.get_cmap("tab10").colors
    views = [(axes[0, 0], None, "Held-out split: every model and candidate")]
    if zoom:
        views.append((axes[0, 1], zoom, "Held-out split: near the front"))
    for ax, limits, title in views:
        for p in pts:
            tuned = p["family"] == "tuned"
            color = COLORS.get(p["name"]) or ("#d62728" if tuned else cycle[families.index(p["family"]) % len(cycle)])
            ax.scatter(p["metrics"][x], p["metrics"][y], s=180 if tuned else 40, marker="*" if tuned else "o",
                       color=color, edgecolor="black" if p["on_front"] else "none", lw=0.8, zorder=3)
        _front_line(ax, front, "#2b8a3e", "Pareto front")
        if limits:
            ax.set_xlim(*limits[0])
            ax.set_ylim(*limits[1])
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.legend(fontsize=8, frameon=False)
    if trials:
        ax = axes[0, -1]
        xs = [t["metrics"].get(x) for t in trials]
        ys = [t["metrics"].get(y) for t in trials]
        ax.scatter(xs, ys, s=22, color="#8c959f", label="trial", zorder=2)
        _front_line(ax, [(a, b) for a, b, t in zip(xs, ys, trials) if t["on_front"] and a is not None and b is not None],
                    "#2b8a3e", "Pareto front (dev)")
        pick = (tune.get("pick") or {}).get("trial")
        for t, a, b in zip(trials, xs, ys):
            if t["number"] == pick:
                ax.scatter(a, b, s=180, marker="*", color="#d62728", zorder=3, label=f"pick ({tune['pick']['rule']})")
            elif t.get("default"):
                ax.scatter(a, b, s=50, marker="s", color=COLORS["paft"], zorder=3, label="the run's merge")
        ax.set(xlabel=xl, ylabel=yl, title=f"Dev split: {len(trials)} tune trials")
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle("Alignment-tax frontier", fontsize=11)
    fig.tight_layout()
    for ax, limits, _ in views:  # labels last: their placement reads the final layout's pixels
        # with a zoomed view beside it, the full view labels only the points outside the zoom
        inside = (lambda a, b: zoom[0][0] <= a <= zoom[0][1] and zoom[1][0] <= b <= zoom[1][1]) \
            if zoom and not limits else (lambda a, b: False)
        _labels(ax, [(a, b, SHORT.get(p["name"], p["name"])) for (a, b), p in zip(xy, pts) if not inside(a, b)])
    return _png(fig)
