"""The sparsity figure (`paft sparsity` and the run report): |delta| histograms, per-layer and per-module-type
near-zero shares, one colour per input."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from paft.report.style import BRANCH_LABELS, COLORS


def _layer_metric(results: dict) -> str:
    first = next(iter(results.values()))["overall"]
    rel = [k for k in first if k.startswith("rel<=")]
    return rel[0] if rel else [k for k in first if k.startswith("abs<=")][-1]


def _threshold_label(key: str) -> str:
    kind, t = key.split("<=")
    return f"≤{float(t):g}" + ("·RMS(W)" if kind == "rel" else "")


def plot_sparsity(results: dict, out: str | Path | IO[bytes], *, by_type: bool = False, width: float = 12.0,
                  dpi: int = 120) -> str | Path | IO[bytes]:
    """Left: share of entries per log10|δ| bin (zeros noted in the legend); next: per-layer share under a
    threshold; with ``by_type``, also the share per module type.

    Results saved before histograms and per-layer shares were recorded (a run's older sparsity.json) get the
    share of entries under each saved threshold instead of the histogram, and no per-layer panel.
    """
    import matplotlib  # lazily: a second of start-up, needed only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if isinstance(out, str) else out
    metric = _layer_metric(results)
    has_hist = all("histogram" in r for r in results.values())
    has_layers = any(k != "other" for r in results.values() for k in r.get("by_layer", {}))
    n_panels = 1 + has_layers + by_type
    fig, axes = plt.subplots(1, n_panels, figsize=(width, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1.25] + [1] * (n_panels - 1)})
    axes = list(axes[0])
    ax_h = axes.pop(0)
    ax_l = axes.pop(0) if has_layers else None
    ax_t = axes.pop(0) if by_type else None
    names = list(results)
    bar_w = 0.8 / max(1, len(names))
    peak = 0.0

    def color(i: int, name: str) -> str:
        return COLORS.get(name) or f"C{i}"

    def label(name: str) -> str:
        return BRANCH_LABELS.get(name, name)

    for i, (name, res) in enumerate(results.items()):
        if has_hist:
            h = res["histogram"]
            total = sum(h["counts"]) + h["zeros"]
            shares = [c / total for c in h["counts"]] if total else h["counts"]
            peak = max([peak, *shares])
            ax_h.stairs(shares, h["edges"], color=color(i, name), lw=1.6,
                        label=f"{label(name)} (exact zeros {h['zeros'] / max(total, 1):.1%})")
        else:
            keys = [k for k in res["overall"] if k.startswith(("abs<=", "rel<="))]
            xs = [j + (i - (len(names) - 1) / 2) * bar_w for j in range(len(keys))]
            ax_h.bar(xs, [res["overall"][k] for k in keys], bar_w, color=color(i, name), label=label(name))
            ax_h.set_xticks(range(len(keys)), [_threshold_label(k) for k in keys])
        if ax_l is not None:
            layers = [(k, v[metric]) for k, v in res.get("by_layer", {}).items() if k != "other"]
            if layers:
                ax_l.plot([int(k) for k, _ in layers], [v for _, v in layers], marker="o", ms=3,
                          color=color(i, name), label=label(name))
        if ax_t is not None:
            types = list(res["by_type"])
            xs = [j + (i - (len(names) - 1) / 2) * bar_w for j in range(len(types))]
            ax_t.bar(xs, [res["by_type"][t][metric] for t in types], bar_w, color=color(i, name), label=label(name))
            ax_t.set_xticks(range(len(types)), [t.removesuffix("_proj") for t in types])
    ax_h.set_ylabel("share of entries")
    if has_hist:
        ax_h.set_ylim(0, max(peak, 0.01) * 1.3)  # room for the legend above the peak
        ax_h.set_xlabel("log10 |delta|  (end bins include everything beyond)")
        ax_h.set_title("delta magnitude histogram")
    else:
        ax_h.set_title("share of delta entries under each threshold")
        ax_h.set_ylim(0, 1.02)
    ax_h.legend(fontsize=8, frameon=False, loc="upper left")  # small |delta| bins are nearly empty
    what = f"|delta| {_threshold_label(metric)}"
    if ax_l is not None:
        ax_l.set_xlabel("layer")
        ax_l.set_ylabel(f"share with {what}")
        ax_l.set_title("near-zero share per layer")
        ax_l.set_ylim(0, 1.02)
        ax_l.xaxis.get_major_locator().set_params(integer=True)
        if ax_l.lines:
            ax_l.legend(fontsize=8, frameon=False)
    if ax_t is not None:
        ax_t.set_ylabel(f"share with {what}")
        ax_t.set_title("near-zero share per module type")
        ax_t.set_ylim(0, 1.02)
        ax_t.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)
    return out
