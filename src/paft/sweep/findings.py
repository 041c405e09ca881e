"""PAFT's three findings (Pentyala et al. 2024, arXiv 2406.17923), checked over the seeds of `paft run --seeds N`.

(a) the DPO delta is sparser than the plain SFT delta (the SFT branch trained without L1: the ``no_l1``
    trained candidate, ``candidates.trained.names: [no_l1]``);
(b) L1 makes the SFT delta sparse without losing the SFT metric (the SFT branch against ``no_l1``'s, both
    scored on the held-out SFT metrics: ``sft`` and ``sft_no_l1``);
(c) a tuned PAFT merge (``paft_tuned``, ``tune.trials`` > 0) is not dominated by the sequential baseline on
    the tune's two objectives, measured on the held-out test split.

Each comparison is a paired difference over seeds (``paired_difference``: a paired t-test, p < 0.05 is a
difference, otherwise within noise), and each finding gets a verdict: ``holds``, ``does not hold``, or
``not shown`` (the difference is within noise), or ``missing`` with the setting that produces its inputs.
"""

from __future__ import annotations

from typing import Any

from paft.methods.objectives import METRICS
from paft.report.model import Section, Text, table
from paft.sweep.seeds import ALPHA, paired_difference

#: the sparsity share the headline compares: entries with |delta| <= 1e-3 x RMS of the module's base weight
#: (scale-free across module types); every saved threshold is in findings.json
SPARSITY = "rel<=0.001"
SFT_METRICS = ("sft_nll", "sft_exact_match")
DEFAULT_OBJECTIVES = ("sft_nll", "pref_accuracy")


def _pairs(ok, a: str, b: str) -> tuple[list[float], list[float]] | None:
    if a not in ok.columns or b not in ok.columns:
        return None
    both = ok[[a, b]].dropna()
    return (list(both[a]), list(both[b])) if len(both) else None


def _diff(ok, a: str, b: str) -> dict[str, Any] | None:
    pair = _pairs(ok, a, b)
    if pair is None:
        return None
    import numpy as np

    d = paired_difference(*pair)
    return {**d, "a": a, "b": b, "mean_a": float(np.mean(pair[0])), "mean_b": float(np.mean(pair[1])),
            "std_a": float(np.std(pair[0], ddof=1)) if len(pair[0]) > 1 else None,
            "std_b": float(np.std(pair[1], ddof=1)) if len(pair[1]) > 1 else None}


def _better(d: dict[str, Any], metric: str) -> bool:
    """``a`` better than ``b`` on ``metric`` in the mean (its direction from paft.methods.objectives)."""
    return (d["mean"] > 0) == _higher(metric)


def _higher(metric: str) -> bool:
    return METRICS.get(metric, (metric, True))[1] is not False


def _sparser(ok, a: str, b: str, claim: str) -> dict[str, Any]:
    d = _diff(ok, f"sparsity/{a}/{SPARSITY}", f"sparsity/{b}/{SPARSITY}")
    if d is None:
        return {"claim": claim, "verdict": "missing", "why": f"needs sparsity of the {a} and {b} deltas: "
                "candidates.trained.names: [no_l1]"}
    verdict = "not shown" if d["within_noise"] else ("holds" if d["mean"] > 0 else "does not hold")
    every = {k.split("/", 2)[2]: _diff(ok, k, f"sparsity/{b}/{k.split('/', 2)[2]}") for k in ok.columns
             if k.startswith(f"sparsity/{a}/") and "<=" in k}
    return {"claim": claim, "verdict": verdict, "sparsity": d, "thresholds": every}


def findings(df, objectives: tuple[str, ...] = DEFAULT_OBJECTIVES) -> dict[str, Any]:
    """The three findings from a seeds run's results table (columns MODEL/METRIC and sparsity/BRANCH/KEY)."""
    ok = df[df["status"] == "ok"]
    out: dict[str, Any] = {"seeds": int(len(ok)), "alpha": ALPHA, "sparsity_key": SPARSITY}

    out["a"] = _sparser(ok, "preference", "no_l1", "the DPO delta is sparser than the plain SFT delta")

    b = _sparser(ok, "sft", "no_l1", "L1 makes the SFT delta sparse without losing the SFT metric")
    b["sft_metrics"] = {m: _diff(ok, f"sft/{m}", f"sft_no_l1/{m}") for m in SFT_METRICS}
    lost = [m for m, d in b["sft_metrics"].items() if d and not d["within_noise"] and not _better(d, m)]
    if b["verdict"] == "holds" and lost:
        b["verdict"] = "does not hold"
    b["lost"] = lost
    out["b"] = b

    c: dict[str, Any] = {"claim": "a tuned PAFT merge is not dominated by the sequential baseline",
                         "objectives": list(objectives)}
    diffs = {m: _diff(ok, f"paft_tuned/{m}", f"sequential/{m}") for m in objectives}
    if any(d is None for d in diffs.values()):
        c.update(verdict="missing", why="needs paft_tuned (tune.trials > 0) and the sequential baseline")
    else:
        c["differences"] = diffs
        # dominated: the baseline at least as good on every objective and strictly better on one, per seed
        cols = {m: _pairs(ok, f"paft_tuned/{m}", f"sequential/{m}") for m in objectives}
        n = min(len(v[0]) for v in cols.values())
        dominated = 0
        for i in range(n):
            signs = []
            for m, (tuned, seq) in cols.items():
                delta = (seq[i] - tuned[i]) * (1 if _higher(m) else -1)  # > 0: the baseline is better
                signs.append(delta)
            dominated += all(s >= 0 for s in signs) and any(s > 0 for s in signs)
        c["seeds_dominated"] = int(dominated)
        worse = [m for m, d in diffs.items() if not d["within_noise"] and not _better(d, m)]
        better = [m for m, d in diffs.items() if not d["within_noise"] and _better(d, m)]
        # holds: significantly better on an objective (so not dominated); does not hold: significantly worse on one,
        # better on none, and dominated in every seed; otherwise the seeds cannot tell (not shown)
        c["verdict"] = "holds" if better else ("does not hold" if worse and dominated == n else "not shown")
        c["better"], c["worse"] = better, worse
    out["c"] = c
    return out


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _row(label: str, d: dict[str, Any] | None) -> list[str]:
    if d is None:
        return [label, "–", "–", "–", "–"]
    p = "–" if d["p"] is None else f"{d['p']:.3f}"
    return [label, _pm(d["mean_a"], d["std_a"]), _pm(d["mean_b"], d["std_b"]), f"{d['mean']:+.4f}", p]


def findings_section(f: dict[str, Any]) -> Section:
    """The findings as a report section: one line per finding with its verdict, then the paired numbers."""
    lines = []
    for key in ("a", "b", "c"):
        x = f[key]
        why = f" ({x['why']})" if x.get("why") else ""
        lines.append(f"({key}) {x['claim']}: **{x['verdict']}**{why}")
    rows = []
    if f["a"].get("sparsity"):
        rows.append(_row(f"(a) sparsity {SPARSITY}: DPO vs plain SFT", f["a"]["sparsity"]))
    if f["b"].get("sparsity"):
        rows.append(_row(f"(b) sparsity {SPARSITY}: SFT with L1 vs without", f["b"]["sparsity"]))
        for m, d in f["b"]["sft_metrics"].items():
            rows.append(_row(f"(b) {m}: SFT with L1 vs without", d))
    for m, d in (f["c"].get("differences") or {}).items():
        rows.append(_row(f"(c) {m}: tuned PAFT vs sequential", d))
    parts: list[Any] = [Text(" ".join(f"{line}." for line in lines)),
                        Text(f"Mean ± std over {f['seeds']} seeds; a paired t-test over seeds, p < {f['alpha']} "
                             "is a difference, otherwise the finding is *not shown* (within noise). "
                             + (f"The sequential baseline dominates the tuned merge in {f['c']['seeds_dominated']} "
                                f"of {f['seeds']} seeds." if "seeds_dominated" in f["c"] else ""))]
    if rows:
        parts.append(table(["comparison (a vs b)", "a", "b", "a − b", "p"], rows))
    return Section("PAFT's findings (arXiv 2406.17923)", parts, id="findings", nav="Findings")
