"""Metrics as objectives: which way each is better, the Pareto front of scored points, and the rules that pick one
point of a front.

``METRICS`` is the one table of metric labels and directions: the report reads it (``paft.report.metrics``), the
``tune`` config section validates its objectives against it, and :func:`pareto_front` orients each objective by
it. A pick rule is a registered function (``PICK_RULES``), chosen by ``tune.pick`` as ``NAME`` or ``NAME:ARG``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

# key -> (label, higher is better; None: no better direction, differences are not judged)
METRICS: dict[str, tuple[str, bool | None]] = {
    "sft_exact_match": ("SFT exact match", True),
    "sft_nll": ("SFT NLL", False),
    "pref_accuracy": ("preference accuracy", True),
    "reward_margin": ("reward margin (implicit)", True),
    "reward_accuracy": ("reward accuracy (implicit)", True),
    "rm_reward": ("reward-model score", True),
    "rm_win_rate": ("reward-model win rate", True),
    "rm_accuracy": ("reward-model accuracy", True),
    "judge_win_rate": ("judge win rate", True),
    "judge_score": ("judge score", True),
    # refusing is right on harmful prompts and wrong on benign ones; a bare rate has no better side
    "refusal_rate": ("refusal rate, harmful prompts", True),  # paft's harmlessness set: refusing is right
    "harmful_refusal_rate": ("refusal rate, harmful prompts", True),
    "benign_refusal_rate": ("refusal rate, benign prompts", False),
    "over_refusal_rate": ("over-refusal rate", False),
}

#: metrics computed from log-likelihoods alone (no generation): what tuning scores a candidate on in seconds
LOGLIK_METRICS = ("sft_nll", "pref_accuracy", "reward_margin", "reward_accuracy")
#: the held-out metrics every evaluated model gets (eval.heldout), in the order tables show them
HELDOUT_METRICS = ("sft_exact_match", *LOGLIK_METRICS)

#: metric names (lm-evaluation-harness's and common ones) whose direction is unambiguous: the report reads
#: ``harness/TASK/METRIC`` keys by them, and a tune may optimise a harness metric named here
HIGHER_NAMES = frozenset({"acc", "acc_norm", "accuracy", "exact_match", "em", "f1", "mcc", "bleu", "rouge1", "rouge2",
                          "rougel", "rougelsum", "chrf", "mc1", "mc2", "win_rate", "pass@1", "pass@k",
                          "exact_match_flex"})
LOWER_NAMES = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll", "loss", "ppl",
                         "ter", "wer", "cer", "error", "error_rate"})

Point = Mapping[str, "float | None"]


def name_direction(name: str) -> bool | None:
    """Which way a metric named ``name`` is better (True: higher), from its name alone: ``HIGHER_NAMES`` /
    ``LOWER_NAMES`` or a telling suffix; lm-eval's ``metric,filter`` form reads as its metric. None: unknown."""
    base = name.split(",")[0].lower()
    if base in HIGHER_NAMES or base.endswith(("_accuracy", "_acc", "_win_rate", "exact_match")):
        return True
    if base in LOWER_NAMES or base.endswith(("_nll", "_loss", "_perplexity", "_ppl")):
        return False
    return None


def harness_objective(key: str) -> tuple[str, str] | None:
    """``harness/TASK/METRIC`` -> (task, metric) when METRIC has a direction (``name_direction``; lm-eval's
    ``metric,filter`` form as eval.json writes it); None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "harness" or not parts[1] or not parts[2]:
        return None
    return (parts[1], parts[2]) if name_direction(parts[2]) is not None else None


def higher_is_better(key: str) -> bool:
    """The direction of an objective; a metric without one cannot be optimised."""
    harness = harness_objective(key)
    if harness is not None:
        return bool(name_direction(harness[1]))
    higher = METRICS.get(key, (key, None))[1]
    if higher is None:
        raise KeyError(f"{key!r} has no better direction; objectives: "
                       + ", ".join(k for k, (_, h) in METRICS.items() if h is not None))
    return higher


def _gain(point: Point, objectives: Sequence[str]) -> tuple[float, ...] | None:
    """The point's objectives oriented so that larger is better; None when one is missing or NaN."""
    out = []
    for key in objectives:
        v = point.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        out.append(float(v) if higher_is_better(key) else -float(v))
    return tuple(out)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one (both oriented larger-is-better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Point], objectives: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates, in input order. A point missing an objective is never on
    the front; equal points are all on it."""
    gains = [_gain(p, objectives) for p in points]
    return [i for i, g in enumerate(gains)
            if g is not None and not any(h is not None and dominates(h, g) for h in gains)]


@dataclass(frozen=True)
class Pick:
    index: int  # into the points the rule was given
    note: str = ""  # why, when the rule fell back


@dataclass(frozen=True)
class PickRule:
    name: str
    what: str  # the rule in words: docs/tune.md's line
    arg: str | None  # the argument's meaning (``NAME:ARG``); None: takes none
    pick: Callable[[Sequence[Point], Sequence[str], Sequence[int], Point | None, float | None], Pick]


def _utopia(points, objectives, front, sft_ref, arg) -> Pick:
    # each objective min-max normalised over the front, 1 the best; the utopia point is all ones
    gains = {i: _gain(points[i], objectives) for i in front}
    lo = [min(g[j] for g in gains.values()) for j in range(len(objectives))]
    hi = [max(g[j] for g in gains.values()) for j in range(len(objectives))]

    def distance(i: int) -> float:
        return math.sqrt(sum((1.0 - ((g - a) / (b - a) if b > a else 1.0)) ** 2
                             for g, a, b in zip(gains[i], lo, hi)))

    return Pick(min(front, key=lambda i: (distance(i), i)))


def _sft_tolerance(points, objectives, front, sft_ref, arg) -> Pick:
    # the best second objective (the preference metric) among points within arg of the SFT branch's first one
    sft_key, pref_key = objectives[0], objectives[1]
    if sft_ref is None or sft_ref.get(sft_key) is None:
        raise ValueError(f"sft_tolerance needs the SFT branch's {sft_key}")
    ref, up = float(sft_ref[sft_key]), higher_is_better(sft_key)
    scored = [i for i, p in enumerate(points) if _gain(p, objectives) is not None]
    ok = [i for i in scored if (points[i][sft_key] >= ref - arg if up else points[i][sft_key] <= ref + arg)]
    sign = 1.0 if higher_is_better(pref_key) else -1.0
    if ok:
        return Pick(max(ok, key=lambda i: (sign * points[i][pref_key], -i)))
    best = max(scored, key=lambda i: ((1.0 if up else -1.0) * points[i][sft_key], -i))
    return Pick(best, f"no point within {arg:g} of the SFT branch's {sft_key} ({ref:.4g}); took the best {sft_key}")


PICK_RULES: dict[str, PickRule] = {r.name: r for r in (
    PickRule("utopia", "the Pareto-front point closest (Euclidean) to the utopia point, after min-max normalising "
             "each objective over the front", None, _utopia),
    PickRule("sft_tolerance", "the best preference metric (second objective) among the points whose SFT metric "
             "(first objective) is within X of the SFT branch's on the dev split", "X >= 0", _sft_tolerance),
)}


def parse_pick(rule: str) -> tuple[PickRule, float | None]:
    """``utopia`` / ``sft_tolerance:0.05`` -> (rule, argument); a ValueError naming the problem otherwise."""
    name, _, raw = rule.partition(":")
    if name not in PICK_RULES:
        raise ValueError(f"unknown pick rule {name!r}; known: "
                         + ", ".join(r.name + (":X" if r.arg else "") for r in PICK_RULES.values()))
    spec = PICK_RULES[name]
    if spec.arg is None:
        if raw:
            raise ValueError(f"pick rule {name!r} takes no argument")
        return spec, None
    try:
        arg = float(raw)
    except ValueError:
        raise ValueError(f"pick rule {name!r} needs a number: {name}:X ({spec.arg})") from None
    if not arg >= 0 or math.isinf(arg):
        raise ValueError(f"pick rule {name}: X must be a finite number >= 0, got {raw}")
    return spec, arg


def pick_point(rule: str, points: Sequence[Point], objectives: Sequence[str], sft_ref: Point | None = None) -> Pick:
    """The point ``rule`` picks among ``points`` (at least one scored on every objective)."""
    spec, arg = parse_pick(rule)
    front = pareto_front(points, objectives)
    if not front:
        raise ValueError("no point has every objective: nothing to pick")
    return spec.pick(points, objectives, front, sft_ref, arg)
