"""Training-free alignment-tax candidates as data: one frozen :class:`Candidate` row per family.

Each family reuses branches a run trains anyway and costs only a merge and an evaluation. The
interpolating families (ExPO, weight averaging, per-block averaging) are written as weights over the
two fine-tuned models relative to the base, ``(theta_sft - base, theta_seq - base)``: every one of them
is then a ``task_arithmetic`` merge, and :func:`branch_weights` converts those weights, once for all
families, to the branch outputs a run holds. The PAFT-merge family applies another merge method to
the run's own SFT and preference deltas. The pipeline's candidates stage
(:meth:`paft.pipeline.Run.candidates`) reads these rows; docs/candidates.md is their table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from paft.errors import PaftError
from paft.methods.merging import MERGE_METHODS

#: a weight: a number, or a layer gradient (anchors interpolated linearly from the bottom layer to the top,
#: as mergekit's gradients: :func:`paft.merge.mergekit_config.evaluate_setting`)
Weight = Union[float, list[float]]


@dataclass(frozen=True)
class Recipe:
    """What one candidate merges: ``weights`` over ``(theta_sft - base, theta_seq - base)`` (a task-arithmetic
    merge of the SFT and sequential models), or ``method`` on the SFT and preference deltas (the run's
    ``merge`` weights, density and parameters)."""

    weights: tuple[Weight, Weight] | None = None
    method: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One training-free candidate family; ``recipe`` maps one setting to what it merges."""

    name: str
    what: str  # equation and paper: its line in docs/candidates.md
    needs: tuple[str, ...]  # the trained branches it reuses (their steps and wall time are its cost)
    key: str  # the ``candidates`` config key listing its settings
    recipe: Callable[[Any], Recipe]
    label: Callable[[Any], str]  # the setting in a candidate's name


def num(x: float) -> str:
    """0.5 -> "0.5", 1.0 -> "1": settings in names."""
    return f"{float(x):g}"


def _expo(alpha: float) -> Recipe:
    # theta_seq + a (theta_seq - theta_sft) = base + (1 + a)(theta_seq - base) - a (theta_sft - base)
    return Recipe(weights=(-float(alpha), 1.0 + float(alpha)))


def _average(alpha: float) -> Recipe:
    return Recipe(weights=(1.0 - float(alpha), float(alpha)))


def _average_blocks(anchors: list[float]) -> Recipe:
    # (1 - a(t)) theta_sft + a(t) theta_seq; linear interpolation commutes with 1 - x, so 1 - a is a gradient too
    return Recipe(weights=([1.0 - float(a) for a in anchors], [float(a) for a in anchors]))


#: every training-free candidate family, by name
CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("expo", "ExPO, model extrapolation: `theta_seq + alpha (theta_seq - theta_sft)` (Zheng et al. 2024, "
              "Weak-to-Strong Extrapolation Expedites Alignment, arXiv 2404.16792).",
              ("sft", "sequential"), "expo_alpha", _expo, num),
    Candidate("average", "Weight averaging of the SFT and sequential models: `(1 - alpha) theta_sft + alpha "
              "theta_seq` (Lin et al. 2023, Mitigating the Alignment Tax of RLHF, arXiv 2309.06256).",
              ("sft", "sequential"), "average_alpha", _average, num),
    Candidate("average_blocks", "Heterogeneous model averaging: the same average with alpha interpolated over the "
              "layers from the first anchor (bottom) to the last (top) (Lin et al. 2023, arXiv 2309.06256).",
              ("sft", "sequential"), "average_blocks", _average_blocks, lambda a: "-".join(num(x) for x in a)),
    Candidate("paft", "Another merge method on the PAFT deltas: `merge(d_sft, d_pref)` with the run's merge "
              "weights and density (paft.methods.merging.MERGE_METHODS, docs/merge.md).",
              ("sft", "preference"), "merge_methods", lambda m: Recipe(method=m), str),
)}

#: the run's own models, as candidates are costed: what each is and the trained branches it needs
MAIN_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("`theta_0`, the pre-trained model", ()),
    "sft": ("`theta_sft = theta_0 + d_sft`, the SFT branch", ("sft",)),
    "preference": ("`theta_0 + d_pref`, the preference branch", ("preference",)),
    "sequential": ("`theta_seq`: preference training on top of the SFT model", ("sft", "sequential")),
    "paft": ("`theta_0 + merge(d_sft, d_pref)` with the run's merge method", ("sft", "preference")),
}


def settings(family: Candidate, section: Any) -> list:
    """The settings the ``candidates`` config section lists for ``family`` (its ``key``)."""
    return list(getattr(section, family.key))


def candidate_name(family: Candidate, setting: Any) -> str:
    """``expo_0.5``, ``average_blocks_0-1``, ``paft_dare_ties``."""
    return f"{family.name}_{family.label(setting)}"


def add_weights(a: Weight, b: Weight) -> Weight:
    """``a + b`` as one weight: numbers and gradients add anchor by anchor (exact, since the interpolation over
    the layers is linear). Gradients of different lengths have no common anchors: a row must not produce them."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) + float(b)
    a_list = [float(a)] * len(b) if isinstance(a, (int, float)) else [float(x) for x in a]
    b_list = [float(b)] * len(a_list) if isinstance(b, (int, float)) else [float(x) for x in b]
    if len(a_list) != len(b_list):
        raise PaftError(f"cannot add layer gradients of {len(a_list)} and {len(b_list)} anchors; a candidate's "
                        "two weights need the same anchors")
    return [x + y for x, y in zip(a_list, b_list)]


def branch_weights(weights: tuple[Weight, Weight], sequential_full: bool) -> tuple[Weight, Weight]:
    """Weights over ``(theta_sft - base, theta_seq - base)`` -> weights over the branch outputs.

    A full fine-tuned sequential branch wrote ``theta_seq`` itself: the weights stand. A LoRA sequential
    adapter holds ``d_seqA`` on the SFT model, ``theta_seq - base = d_sft + d_seqA``, so
    ``w_sft d_sft + w_seq (d_sft + d_seqA)`` is ``(w_sft + w_seq, w_seq)`` over ``(d_sft, d_seqA)``.
    """
    w_sft, w_seq = weights
    if sequential_full:
        return w_sft, w_seq
    return add_weights(w_sft, w_seq), w_seq


def method_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The run's ``merge.params`` that ``method`` reads (``rescale: false`` set for DARE would fail elsewhere)."""
    spec = MERGE_METHODS[method]
    reads = {*spec.uses, "normalize", "majority_sign", *(("rescale",) if spec.rescale else ())}
    return {k: v for k, v in params.items() if {"lambda": "lambda_"}.get(k, k) in reads}
