"""Preference losses, registered by name.

Each loss is one small function of the sequence log-probabilities of a batch of
pairs, with its equation and paper in the docstring, returning the per-pair loss.
Notation: h(y) = log pi_theta(y|x) - log pi_ref(y|x); y_w chosen, y_l rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed completion log-probs of a batch of pairs (shape [B] each)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None  # completion lengths, for length-aware losses
    rejected_tokens: torch.Tensor | None = None

    def margin(self) -> torch.Tensor:
        """Delta = h(y_w) - h(y_l)."""
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    data: str  # "pairs", ...
    reference: bool
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, data: str, reference: bool, paper: str, **defaults: Any):
    def deco(fn):
        LOSSES[name] = LossSpec(name, fn, data, reference, paper, dict(defaults))
        return fn

    return deco


def get_loss(name: str) -> LossSpec:
    from paft.errors import ConfigError

    try:
        return LOSSES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preference method {name!r}; known: {', '.join(sorted(LOSSES))}") from None


@register_loss("dpo", data="pairs", reference=True,
               paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290)")
def dpo_loss(lp: PairLogps, beta: float) -> torch.Tensor:
    """DPO (sigmoid): L = -log sigma(beta * (h(y_w) - h(y_l))).

    ``logsigmoid`` keeps very large margins finite (no exp overflow).
    """
    return -F.logsigmoid(beta * lp.margin())
