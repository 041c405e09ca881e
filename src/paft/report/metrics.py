"""Which eval.json keys are metrics, how to name them, which way is better, and the alignment-tax table.

The evaluation layer adds metrics over time (harness tasks, reward-model scores, judges), so
nothing here lists them all: known keys get a label and a direction, ``harness/TASK/METRIC``
keys are named from their parts, and any other numeric key is shown under its own name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from paft.methods.objectives import METRICS, name_direction
from paft.report.style import MODELS

# the single-objective branches every other model is compared with
REFERENCES = ("sft", "preference")

# key -> (label, higher is better): the one table, shared with the tuning objectives
KNOWN = METRICS

_PRETTY = {"acc": "accuracy", "acc_norm": "accuracy (norm.)", "em": "exact match", "nll": "NLL", "f1": "F1",
           "ppl": "perplexity"}
# not metrics: timings and standard errors (shown beside their metric instead)
_SKIP = re.compile(r"(^|/|_)(eval_s|wall_s|seconds)$|stderr")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher: bool | None  # True: higher is better; False: lower; None: neither


def metric_info(key: str) -> Metric:
    """Label and direction of an eval.json metric key; an unknown key keeps its own name."""
    if key in KNOWN:
        label, higher = KNOWN[key]
        return Metric(key, label, higher)
    parts = key.split("/")
    if parts[0] == "harness" and len(parts) >= 3:
        name = parts[-1].split(",")[0]
        return Metric(key, f"{'/'.join(parts[1:-1])}: {_PRETTY.get(name, name.replace('_', ' '))}",
                      name_direction(parts[-1]))
    return Metric(key, key, name_direction(parts[-1]))


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def flat_metrics(model_result: dict[str, Any]) -> dict[str, float | None]:
    """A model's numeric entries as flat keys (a nested dict's keys are joined with '/')."""
    out: dict[str, float | None] = {}

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + "/", v)
            elif _number(v) and not _SKIP.search(key):
                out[key] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    walk("", model_result)
    return out


def stderr_of(model_result: dict[str, Any], key: str) -> float | None:
    """The standard error saved beside ``key`` (``KEY_stderr``, or lm-eval's ``acc_stderr,none``), if any."""
    head, _, filt = key.partition(",")
    for cand in (f"{key}_stderr", f"{head}_stderr,{filt}" if filt else None, f"{head}_stderr"):
        v = model_result.get(cand) if cand else None
        if _number(v) and v is not None:
            return float(v)
    return None


def model_order(evals: dict[str, Any]) -> list[str]:
    return [m for m in MODELS if m in evals] + [m for m in evals if m not in MODELS]


def metric_list(evals: dict[str, dict]) -> list[Metric]:
    """Every metric any model has: known keys in their order, then the rest in eval.json's order."""
    seen: dict[str, None] = {}
    for m in model_order(evals):
        for k in flat_metrics(evals[m]):
            seen.setdefault(k, None)
    known = [k for k in KNOWN if k in seen]
    return [metric_info(k) for k in known + [k for k in seen if k not in KNOWN]]


def alignment_tax(evals: dict[str, dict]) -> dict[str, Any]:
    """Values of every metric per model, and each model's difference from the SFT-only and preference-only models.

    ``deltas[ref][model][key] = value(model) - value(ref)`` (None where either is missing).
    ``better[ref][model][key]``: +1 when the difference is an improvement given the metric's
    direction, -1 when it is worse, 0 when equal or the metric has no direction.
    """
    models = model_order(evals)
    metrics = metric_list(evals)
    values = {m: flat_metrics(evals[m]) for m in models}
    values = {m: {x.key: values[m].get(x.key) for x in metrics} for m in models}
    deltas: dict[str, dict] = {}
    better: dict[str, dict] = {}
    noise: dict[str, dict] = {}
    for ref in REFERENCES:
        if ref not in values:
            continue
        deltas[ref], better[ref], noise[ref] = {}, {}, {}
        for m in models:
            if m == ref:
                continue
            d_row, b_row, n_row = {}, {}, {}
            for x in metrics:
                a, b = values[m][x.key], values[ref][x.key]
                d = None if a is None or b is None else a - b
                d_row[x.key] = d
                n_row[x.key] = within_noise(d, stderr_of(evals[m], x.key), stderr_of(evals[ref], x.key))
                b_row[x.key] = 0 if d is None or x.higher is None or abs(d) < 1e-12 or n_row[x.key] else \
                    (1 if (d > 0) == x.higher else -1)
            deltas[ref][m], better[ref][m], noise[ref][m] = d_row, b_row, n_row
    return {"models": models,
            "metrics": [{"key": x.key, "label": x.label, "higher_is_better": x.higher} for x in metrics],
            "values": values, "deltas": deltas, "better": better, "within_noise": noise}


NOISE_Z = 1.96  # a difference within 1.96 combined standard errors (95%) is reported as within noise


def within_noise(d: float | None, se_a: float | None, se_b: float | None) -> bool:
    """|d| < 1.96 sqrt(se_a^2 + se_b^2), the two estimates taken as independent (on the same held-out rows they
    are positively correlated, so this is conservative: it calls some real differences noise, never the reverse).
    False when either standard error is unknown."""
    if d is None or se_a is None or se_b is None:
        return False
    return abs(d) < NOISE_Z * math.sqrt(se_a ** 2 + se_b ** 2)

