"""`paft run --seeds N`: one run's config under N training seeds, as a sweep over ``run.seed``.

Each seed is an ordinary run folder in ``RUN/cells/<key>/`` (resumable like any sweep cell), and
``RUN/report.md|html`` gives every model's mean ± std over the seeds with, for each model, its
difference from the sequential baseline and whether that difference is within noise: a paired t-test
over seeds (each seed trains both models on the same data order), p >= 0.05 or fewer than 2 seeds
reading "within noise".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from paft.config import PaftConfig
from paft.errors import PaftError
from paft.methods.objectives import HELDOUT_METRICS
from paft.report import table
from paft.report.metrics import metric_info
from paft.report.style import LABELS
from paft.sweep.spec import SEED_AXIS, ExecutionSettings, Sweep, SweepSpec, expand

SEEDS_FILE = "seeds.yaml"  # the sweep file name recorded for a seeds run (not written: sweep.yaml is)
ALPHA = 0.05  # a difference with a larger p-value is reported as within noise


def seed_sweep(cfg: PaftConfig) -> Sweep:
    """The cells of ``cfg`` under seeds run.seed .. run.seed + run.seeds - 1, one at a time (each uses every core)."""
    root = Path(cfg.run.output_dir)
    if (root / "config.yaml").exists():
        raise PaftError(f"{root}: holds a single run; --seeds writes a folder of runs: choose another --out")
    data = cfg.model_dump(mode="json")
    data["run"]["seeds"] = 1  # each cell is one run
    seeds = [cfg.run.seed + i for i in range(cfg.run.seeds)]
    spec = SweepSpec(name=f"{root.name}, {len(seeds)} seeds", base=data, axes={"run.seed": seeds},
                     sweep=ExecutionSettings(workers=1))
    return expand(spec, root / SEEDS_FILE)


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a - b`` over seeds, its std, the paired t-test's p-value, and whether it is within noise."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(a, float), np.asarray(b, float)
    d = x - y
    mean = float(d.mean()) if len(d) else math.nan
    std = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    if len(d) < 2:
        p = math.nan
    elif np.allclose(d, d[0]):  # a constant difference: zero variance, the test is undefined
        p = 1.0 if abs(d[0]) < 1e-12 else 0.0
    else:
        p = float(stats.ttest_rel(x, y).pvalue)
    finite = (lambda v: v if math.isfinite(v) else None)  # JSON has no NaN
    return {"mean": finite(mean), "std": finite(std), "p": finite(p), "n": int(len(d)),
            "within_noise": bool(not (p < ALPHA))}  # no p (too few seeds) reads as within noise


#: the per-model table's metrics (eval.json keys), in this order, where the cells have them
HEADLINE = HELDOUT_METRICS
REFERENCE = "sequential"  # the baseline each model's difference is tested against
_NOT_MODELS = ("train", "sparsity")


def model_summary(df, metrics: tuple[str, ...] = HEADLINE, reference: str = REFERENCE) -> dict[str, Any] | None:
    """Per model (the MODEL/METRIC columns of the results table): mean, std and n over the ok cells, and the
    paired difference from ``reference``. None unless the table has a seed column with 2+ seeds."""
    if SEED_AXIS not in df.columns or df[SEED_AXIS].nunique() < 2:
        return None
    ok = df[df["status"] == "ok"]
    cols = [c for c in df.columns if "/" in c and c.split("/", 1)[0] not in _NOT_MODELS
            and c.split("/", 1)[1] in metrics]
    models = list(dict.fromkeys(c.split("/", 1)[0] for c in cols))
    present = [m for m in metrics if any(c.endswith("/" + m) for c in cols)]
    if ok.empty or not models:
        return None
    out: dict[str, Any] = {"seeds": sorted(int(s) for s in ok[SEED_AXIS]), "reference": reference,
                           "metrics": present, "alpha": ALPHA, "models": {}}
    for model in models:
        row: dict[str, Any] = {}
        for m in present:
            col = f"{model}/{m}"
            if col not in ok.columns:
                continue
            vals = ok[col].dropna()
            entry: dict[str, Any] = {"mean": float(vals.mean()) if len(vals) else None,
                                     "std": float(vals.std(ddof=1)) if len(vals) > 1 else None, "n": int(len(vals))}
            ref_col = f"{reference}/{m}"
            if model != reference and ref_col in ok.columns:
                both = ok[[col, ref_col]].dropna()
                if len(both):
                    entry["vs_reference"] = paired_difference(list(both[col]), list(both[ref_col]))
            row[m] = entry
        out["models"][model] = row
    return out


def summary_tables(summary: dict[str, Any]):
    """(means table, differences table) of :func:`model_summary` for the sweep report."""
    metrics, ref = summary["metrics"], summary["reference"]
    header = ["model", *[metric_info(m).label for m in metrics]]

    def fmt(x: float | None, sign: bool = False) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:+.3f}" if sign else f"{x:.3f}")

    means, diffs = [], []
    for model, row in summary["models"].items():
        label = LABELS.get(model, model)
        means.append([label, *[f"{fmt(row[m]['mean'])} ± {fmt(row[m]['std'])}" if m in row else "–"
                               for m in metrics]])
        cells = []
        for m in metrics:
            d = row.get(m, {}).get("vs_reference")
            if d is None:
                cells.append("–")
                continue
            higher = metric_info(m).higher
            verdict = "within noise" if d["within_noise"] or d["mean"] is None else \
                ("better" if higher is not None and (d["mean"] > 0) == higher else
                 "worse" if higher is not None else "differs")
            p = "–" if d["p"] is None else f"{d['p']:.2f}"
            cells.append(f"{fmt(d['mean'], True)} (p {p}, {verdict})")
        if model != ref:
            diffs.append([label, *cells])
    return table(header, means), (table([f"model − {LABELS.get(ref, ref)}", *header[1:]], diffs) if diffs else None)
