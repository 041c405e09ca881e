"""Completion log-probabilities without full-vocabulary logits for prompt tokens.

The decoder runs once; the LM head and log-softmax are applied only at the
positions whose next token is a label, which on chat data (long prompts, short
replies) skips most of the largest matmul and the [T x vocab] activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paft.data.tokenize import IGNORE


def _split(model):
    """(decoder, lm_head) of a (possibly PEFT-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Log-probs of every label token, flattened, plus the row index of each.

    Returns ``(logps [N], rows [N])`` for the N positions where ``labels[:, 1:] != IGNORE``.
    """
    decoder, head = _split(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    logits = head(h).float()
    logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    return logps, rows


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion token count of each row."""
    logps, rows = token_logps(model, input_ids, attention_mask, labels)
    n = labels.shape[0]
    total = torch.zeros(n, device=logps.device, dtype=logps.dtype).index_add(0, rows, logps)
    count = torch.zeros(n, device=logps.device, dtype=logps.dtype).index_add(0, rows, torch.ones_like(logps))
    return total, count


def trim_padding(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Cut the columns past the longest row of a right-padded batch (a sub-batch is often narrower)."""
    width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    return ids[:, :width], mask[:, :width], labels[:, :width]
