"""SFT objective: completion-token NLL plus the PAFT L1 penalty on the LoRA delta."""

from __future__ import annotations

from dataclasses import dataclass

from paft.train.logps import token_logps
from paft.train.lora import l1_delta_norm


@dataclass
class SFTObjective:
    """L = mean NLL over completion tokens + lambda * sum ||B A scale||_1."""

    l1_lambda: float = 0.0

    def __call__(self, model, batch):
        logps, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        nll = -logps.mean()
        metrics = {"nll": nll.item()}
        loss = nll
        if self.l1_lambda > 0:
            l1 = l1_delta_norm(model)
            loss = loss + self.l1_lambda * l1
            metrics["l1_delta"] = l1.item()
        return loss, metrics
