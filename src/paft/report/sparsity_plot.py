"""The `paft sparsity` figure: |delta| histograms and per-layer near-zero shares, one line per input."""

from __future__ import annotations

from pathlib import Path


def _layer_metric(results: dict) -> str:
    first = next(iter(results.values()))["overall"]
    rel = [k for k in first if k.startswith("rel<=")]
    return rel[0] if rel else [k for k in first if k.startswith("abs<=")][-1]


def plot_sparsity(results: dict, out: str | Path) -> Path:
    """Left: share of entries per log10|δ| bin (zeros noted in the legend); right: per-layer share under a threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    metric = _layer_metric(results)
    fig, (ax_h, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res in results.items():
        h = res["histogram"]
        total = sum(h["counts"]) + h["zeros"]
        shares = [c / total for c in h["counts"]] if total else h["counts"]
        ax_h.stairs(shares, h["edges"], label=f"{name} (zeros {h['zeros'] / max(total, 1):.1%})")
        layers = [(k, v[metric]) for k, v in res["by_layer"].items() if k != "other"]
        if layers:
            ax_l.plot([int(k) for k, _ in layers], [v for _, v in layers], marker="o", label=name)
    ax_h.set_xlabel("log10 |delta|  (end bins include everything beyond)")
    ax_h.set_ylabel("share of entries")
    ax_h.set_title("delta magnitude histogram")
    ax_h.legend(fontsize=8)
    ax_l.set_xlabel("layer")
    ax_l.set_ylabel(f"share of entries with |delta| {metric.replace('<=', ' <= ')}")
    ax_l.set_title("near-zero share per layer")
    ax_l.set_ylim(0, 1.02)
    if ax_l.lines:
        ax_l.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
