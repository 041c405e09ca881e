"""Joint training (``candidates.trained.names: [joint]``): one branch from the base on the preference data plus an
NLL term on the SFT data, ``L = L_pref(preference batch) + gamma * NLL(SFT batch)`` (RPO / LLaMA-Factory's
``pref_ftx`` style, here with the NLL on the run's SFT split rather than on the chosen replies).

Mixed batches, not alternating ones: every optimizer step sees one preference batch and one SFT batch (the SFT
rows cycled when the split is shorter), so each step's gradient is the gradient of the joint loss itself, the
branch takes ``preference.max_steps`` steps like the preference branch, and one AdamW state serves both terms
(alternating steps would double the steps and let each term's step see the other's moments). The training knobs
are the ``preference`` section's; the NLL term is the SFT objective without L1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paft.train.preference import DATA_KINDS, PreferenceObjective
from paft.train.sft import SFTObjective


@dataclass
class JointObjective:
    """``(pref_loss + gamma * nll, metrics)`` of a ``{"pref": batch, "sft": batch}`` batch (``JointCollator``)."""

    preference: PreferenceObjective
    sft: SFTObjective
    gamma: float = 1.0

    @property
    def reference(self):  # train_branch sets the reference log-probs of the preference term here
        return self.preference.reference

    @reference.setter
    def reference(self, value) -> None:
        self.preference.reference = value

    def __call__(self, model, batch: dict[str, Any]):
        pref, metrics = self.preference(model, batch["pref"])
        nll, sft_metrics = self.sft(model, batch["sft"])
        metrics = {**metrics, "pref_loss": pref.item(), **sft_metrics}
        return pref + self.gamma * nll, metrics


@dataclass
class JointCollator:
    """Batches ``(preference row, SFT row)`` pairs into ``{"pref": ..., "sft": ...}`` with each kind's collator."""

    pref: Any
    sft: Any

    def __call__(self, rows: list[tuple]) -> dict[str, Any]:
        return {"pref": self.pref([r[0] for r in rows]), "sft": self.sft([r[1] for r in rows])}


def joint_rows(pref_rows: list, sft_rows: list) -> list[tuple]:
    """One training row per preference row, each with an SFT row (cycled when there are fewer)."""
    return [(p, sft_rows[i % len(sft_rows)]) for i, p in enumerate(pref_rows)]


def joint_collator(pref_kind: str):
    """The collator factory ``(pad_id, pack_length, max_length) -> JointCollator`` of a joint branch."""
    def make(pad_id, pack_length, max_length):
        return JointCollator(DATA_KINDS[pref_kind].collator(pad_id, pack_length, max_length),
                             DATA_KINDS["sft"].collator(pad_id, pack_length, max_length))
    return make
