"""How a preference method trains: its schedule, as data on its ``LossSpec``.

The trainer asks the schedule (``kind``, ``stages``, ``sample_from``, ``selection``, ``reference``,
``scorer``) instead of testing method names, so a new staged or online method is one registry row.
A schedule's own hyper-parameters (``params``) are set through ``preference.params`` like the loss's;
``LossSpec.configure`` splits them between the two.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from paft.errors import ConfigError


class ScheduleParamError(ConfigError, ValueError):
    """A schedule hyper-parameter out of range (a ``ValueError`` and a ``ConfigError``)."""


@dataclass(frozen=True)
class Schedule:
    """The offline schedule, one pass over a fixed dataset; the base of the others."""

    kind: ClassVar[str] = "offline"

    @property
    def params(self) -> dict[str, Any]:
        """The schedule's hyper-parameters (``preference.params`` keys) and their values."""
        return asdict(self)

    def scorer_kind(self, configured: str) -> str | None:
        """The kind of scorer the schedule rates replies with (None: it samples nothing)."""
        return None

    def with_params(self, params: dict[str, Any]) -> tuple["Schedule", dict[str, Any]]:
        """(this schedule with the params it owns set, the params left for the loss)."""
        own = {k: v for k, v in params.items() if k in self.params}
        return self._set(own) if own else self, {k: v for k, v in params.items() if k not in own}

    def _set(self, own: dict[str, Any]) -> "Schedule":
        return replace(self, **own)


@dataclass(frozen=True)
class Staged(Schedule):
    """sDPO (Kim et al. 2024, arXiv 2403.19270): the data in ``stages`` consecutive chunks, trained in
    sequence; stage t's reference is the model after stage t-1 (``paft.train.phases.train_staged``)."""

    kind: ClassVar[str] = "staged"
    stages: int = 2


@dataclass(frozen=True)
class BestWorst:
    """Every sampled reply competes; the pair is the highest- against the lowest-scored one."""

    def select(self, scores: list[float], rng: random.Random) -> list[int]:
        return list(range(len(scores)))


@dataclass(frozen=True)
class RejectionSampling(BestWorst):
    """RSO (Liu et al. 2024, arXiv 2309.06657): ``candidates`` replies per prompt, ``keep`` of them accepted
    towards pi_start exp(r / rso_beta) (``rejection_sample``); the pair is best vs worst among those."""

    rso_beta: float = 0.5
    candidates: int = 8
    keep: int = 4

    def __post_init__(self):
        if self.rso_beta <= 0 or self.keep < 2 or self.candidates < self.keep:
            raise ScheduleParamError(f"rso: needs rso_beta > 0 and 2 <= keep <= candidates; got "
                                     f"rso_beta={self.rso_beta}, keep={self.keep}, candidates={self.candidates}")

    def select(self, scores: list[float], rng: random.Random) -> list[int]:
        return rejection_sample(scores, beta=self.rso_beta, keep=self.keep, rng=rng)


@dataclass(frozen=True)
class Group(BestWorst):
    """Policy-gradient methods (RLOO, GRPO, PPO, SPPO): ``candidates`` replies per prompt (None:
    ``preference.online.samples_per_prompt``), all of them kept and trained on as one scored group (data kind
    ``groups``) instead of a best-vs-worst pair."""

    candidates: int | None = None

    def __post_init__(self):
        if self.candidates is not None and self.candidates < 2:
            raise ScheduleParamError(f"params.candidates (replies per prompt of a group) must be at least 2; got "
                                     f"{self.candidates}: a group of one has no baseline to compare against")


@dataclass(frozen=True)
class Online(Schedule):
    """Rounds of sample -> score -> select -> pair or group -> train (``paft.train.online``).

    ``sample_from``: "policy" (the current adapter) or "start" (adapter disabled: the start model).
    ``selection``: which sampled replies the round keeps: the best-vs-worst pair among them (data kind
    ``online``) or all of them as one scored group (data kind ``groups``).
    ``reference``: None = ``preference.online.reference``, else "initial" / "previous" fixed by the method.
    ``scorer``: None = ``preference.online.scorer``; "self_judge" = the policy rates its own replies.
    """

    kind: ClassVar[str] = "online"
    sample_from: str = "policy"
    selection: BestWorst = field(default_factory=BestWorst)
    reference: str | None = None
    scorer: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        return asdict(self.selection)

    @property
    def candidates(self) -> int | None:
        """Replies sampled per prompt when the selection fixes it (None: ``online.samples_per_prompt``)."""
        return getattr(self.selection, "candidates", None)

    def scorer_kind(self, configured: str) -> str:
        return self.scorer or configured  # the method's own ("self_judge"), else ``online.scorer.kind``

    def _set(self, own: dict[str, Any]) -> "Online":
        return replace(self, selection=replace(self.selection, **own))  # the params are the selection's


def rejection_sample(scores: list[float], *, beta: float, keep: int, rng: random.Random) -> list[int]:
    """RSO's statistical rejection sampling (Liu et al. 2024, Algorithm 1).

    Candidates drawn from pi_sft are accepted towards pi_r(y|x) ∝ pi_sft(y|x) exp(r(y)/beta):
    repeatedly, each remaining candidate is accepted with probability exp((r - r_max) / beta),
    r_max the highest remaining score, until ``keep`` are accepted. Small beta approaches
    best-of-n; large beta approaches uniform sampling from pi_sft. Returns candidate indices.
    """
    remaining = list(range(len(scores)))
    accepted: list[int] = []
    while remaining and len(accepted) < keep:
        r_max = max(scores[i] for i in remaining)
        for i in list(remaining):
            if len(accepted) >= keep:
                break
            if rng.random() < math.exp((scores[i] - r_max) / beta):
                accepted.append(i)
                remaining.remove(i)
    return accepted


def best_worst(replies: list[str], scores: list[float]) -> tuple[str, str, float] | None:
    """(chosen, rejected, score gap) = highest vs lowest scored reply; None when all scores tie."""
    hi = max(range(len(scores)), key=lambda i: scores[i])
    lo = min(range(len(scores)), key=lambda i: scores[i])
    if scores[hi] <= scores[lo] or replies[hi] == replies[lo]:
        return None
    return replies[hi], replies[lo], scores[hi] - scores[lo]
