"""Preference objective: policy and reference log-probs of both replies, then a registered loss.

The reference is the same model with its LoRA adapter disabled (no second copy in
memory); for the sequential baseline the adapter sits on the SFT-merged weights, so
disabling it gives the SFT model, as sequential DPO expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from paft.train.logps import sequence_logps
from paft.train.losses import PairLogps, get_loss


@dataclass
class PreferenceObjective:
    method: str = "dpo"
    beta: float = 0.1
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.spec = get_loss(self.method)
        self.kwargs = {**self.spec.defaults, **self.params}

    def __call__(self, model, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = ids.shape[0] // 2
        logps, counts = sequence_logps(model, ids, mask, labels)
        lp = PairLogps(policy_chosen=logps[:n], policy_rejected=logps[n:],
                       chosen_tokens=counts[:n], rejected_tokens=counts[n:])
        if self.spec.reference:
            with torch.no_grad(), model.disable_adapter():
                ref, _ = sequence_logps(model, ids, mask, labels)
            lp.ref_chosen, lp.ref_rejected = ref[:n].detach(), ref[n:].detach()
        loss = self.spec.fn(lp, beta=self.beta, **self.kwargs).mean()
        return loss, _pair_metrics(lp, self.beta)


def _pair_metrics(lp: PairLogps, beta: float) -> dict[str, float]:
    out = {"logps/chosen": lp.policy_chosen.mean().item(), "logps/rejected": lp.policy_rejected.mean().item()}
    if lp.ref_chosen is not None:
        rc = beta * (lp.policy_chosen - lp.ref_chosen).detach()
        rr = beta * (lp.policy_rejected - lp.ref_rejected).detach()
        out.update({"rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
                    "rewards/margin": (rc - rr).mean().item(), "rewards/accuracy": (rc > rr).float().mean().item()})
    return out
