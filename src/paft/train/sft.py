"""SFT objective: completion-token NLL plus the PAFT L1 penalty on the LoRA delta."""

from __future__ import annotations

from dataclasses import dataclass

from paft.data.packing import is_packed
from paft.data.tokenize import IGNORE
from paft.models.logps import batch_token_logps
from paft.train.lora import l1_delta_norm


@dataclass
class SFTObjective:
    """L = mean NLL over completion tokens + lambda * sum ||B A scale||_1."""

    l1_lambda: float = 0.0
    full_logits: bool = False  # the plain path: full-vocabulary logits at every position

    def count(self, batch) -> int:
        """Completion tokens of ``batch``: what the NLL averages over."""
        if is_packed(batch):
            return int(batch["targets"].numel())
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch, tokens: float | None = None):
        """``tokens``: the denominator of this micro-batch's NLL, when the mean runs over a whole optimizer step
        (all ranks and accumulation steps: ``PaftTrainer`` passes that step's count / micro-batches); else this
        batch's own count. The L1 term is whole in every micro-batch: averaging the micro-batches' gradients over
        ranks and accumulation steps counts it once."""
        logps, _, _ = batch_token_logps(model, batch, self.full_logits)
        nll = -logps.sum() / tokens if tokens else -logps.mean()
        metrics = {"nll": nll.item()}
        loss = nll
        if self.l1_lambda > 0:
            l1 = l1_delta_norm(model)
            loss = loss + self.l1_lambda * l1
            metrics["l1_delta"] = l1.item()
        return loss, metrics
