"""SFT objective: completion-token NLL plus the PAFT L1 penalty on the LoRA delta."""

from __future__ import annotations

from dataclasses import dataclass

from paft.models.logps import batch_token_logps
from paft.train.lora import l1_delta_norm


@dataclass
class SFTObjective:
    """L = mean NLL over completion tokens + lambda * sum ||B A scale||_1."""

    l1_lambda: float = 0.0
    full_logits: bool = False  # the plain path: full-vocabulary logits at every position

    def __call__(self, model, batch):
        logps, _, _ = batch_token_logps(model, batch, self.full_logits)
        nll = -logps.mean()
        metrics = {"nll": nll.item()}
        loss = nll
        if self.l1_lambda > 0:
            l1 = l1_delta_norm(model)
            loss = loss + self.l1_lambda * l1
            metrics["l1_delta"] = l1.item()
        return loss, metrics
