"""Completion log-probabilities without full-vocabulary logits for prompt tokens.

The decoder runs once; the LM head and log-softmax are applied only at the
positions whose next token is a label, which on chat data (long prompts, short
replies) skips most of the largest matmul and the [T x vocab] activations.
(``full_logits=True`` computes them everywhere, as a plain causal-LM forward
does: the reference path the optimisation is checked and benchmarked against.)

Batches come in two layouts, and every function here takes either: the plain
right-padded one (``input_ids``/``attention_mask``/``labels``, a row per
sequence) and the packed one of ``paft.data.packing`` (a shared prompt computed
once, several sequences per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paft.data.packing import is_packed
from paft.data.tokenize import IGNORE
from paft.models.attention import attn_implementation, packed_attention


def _split(model):
    """(decoder, lm_head) of a (possibly PEFT-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def _target_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from the hidden states [N, H] that predict them: the LM head on those N rows only."""
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                full_logits: bool = False):
    """Log-probs of every label token, flattened, plus the row index of each.

    Returns ``(logps [N], rows [N])`` for the N positions where ``labels[:, 1:] != IGNORE``.
    """
    decoder, head = _split(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if full_logits:
        logprobs = head(hidden[:, :-1]).float().log_softmax(-1)
        logps = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
    else:
        logps = _target_logps(head, hidden[:, :-1][keep], targets[keep])
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    return logps, rows


def _packed_hidden(model, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states of a packed batch, flattened to [rows * width, H]."""
    decoder, _ = _split(model)
    mask = batch["attention_mask"]
    if attn_implementation(model) == "eager":  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min)
    spans = [tuple(x) for x in batch["doc_spans"].tolist()] if "doc_spans" in batch else None
    with packed_attention(model, spans) as extra:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask,
                         position_ids=batch["position_ids"], **extra).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def packed_token_logps(model, batch: dict, full_logits: bool = False):
    """``token_logps`` of a packed batch: ``(logps [N], sequence [N])`` in sequence, then position, order."""
    head = _split(model)[1]
    flat = _packed_hidden(model, batch)
    if full_logits:
        logprobs = head(flat).float().log_softmax(-1)
        logps = logprobs[batch["pred_index"]].gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    else:
        logps = _target_logps(head, flat[batch["pred_index"]], batch["targets"])
    return logps, batch["target_seq"]


def batch_token_logps(model, batch: dict, full_logits: bool = False):
    """Per-token log-probs of either layout: ``(logps [N], sequence [N], number of sequences)``."""
    if is_packed(batch):
        logps, seq = packed_token_logps(model, batch, full_logits)
        return logps, seq, batch["sequence_tokens"].shape[0]
    logps, rows = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], full_logits)
    return logps, rows, batch["labels"].shape[0]


def label_log_softmax(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The full next-token distribution at every label position, for losses that compare distributions (TDPO's
    per-token KL): ``(log-softmax [N, V] float32, targets [N], sequence [N], number of sequences)``, the N
    positions in ``batch_token_logps``' order. Costs [N x vocab] activations: completion positions only."""
    hidden, targets, seq, n = label_hidden(model, batch)
    return _split(model)[1](hidden).float().log_softmax(-1), targets, seq, n


def label_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The last hidden state at every position that predicts a label token, either layout: ``(hidden [N, H],
    targets [N], sequence [N], number of sequences)`` in ``batch_token_logps``' order (a value head reads it)."""
    if is_packed(batch):
        hidden, targets, seq = _packed_hidden(model, batch)[batch["pred_index"]], batch["targets"], batch["target_seq"]
        return hidden, targets, seq, batch["sequence_tokens"].shape[0]
    labels = batch["labels"]
    out = _split(model)[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = labels[:, 1:] != IGNORE
    seq = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    return out[:, :-1][keep], labels[:, 1:][keep], seq, labels.shape[0]


def label_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from the hidden states that predict them (``label_hidden``), through the LM head."""
    return _target_logps(_split(model)[1], hidden, targets)


def label_logps_argmax(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``label_logps`` and the argmax token at each of those positions (what greedy decoding would pick there,
    given the reference tokens before it): the exact-match check of ``paft.eval.metrics`` reads it."""
    logits = _split(model)[1](hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)


def sequence_sums(logps: torch.Tensor, seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed value and token count of each sequence, from ``batch_token_logps``' flat output."""
    total = torch.zeros(n, device=logps.device, dtype=logps.dtype).index_add(0, seq, logps)
    count = torch.zeros(n, device=logps.device, dtype=logps.dtype).index_add(0, seq, torch.ones_like(logps))
    return total, count


def token_matrix(logps: torch.Tensor, seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values (``batch_token_logps`` order: each sequence's tokens in position order) as a
    right-padded [n, T] matrix and its mask, T the most label tokens of any sequence; padding holds 0."""
    order = torch.sort(seq, stable=True).indices  # keeps each sequence's tokens in position order
    seq, logps = seq[order], logps[order]
    counts = torch.bincount(seq, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(seq.shape[0], device=seq.device) - starts[seq]
    width = int(counts.max().item()) if n else 0
    out = torch.zeros(n, width, device=logps.device, dtype=logps.dtype).index_put((seq, pos), logps)
    mask = torch.zeros(n, width, device=logps.device, dtype=torch.bool).index_put(
        (seq, pos), torch.ones_like(seq, dtype=torch.bool))
    return out, mask


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion token count of each row."""
    logps, rows = token_logps(model, input_ids, attention_mask, labels)
    return sequence_sums(logps, rows, labels.shape[0])


def batch_sequence_logps(model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion token count of each sequence of either layout."""
    return sequence_sums(*batch_token_logps(model, batch, full_logits))


def trim_padding(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Cut the columns past the longest row of a right-padded batch (a sub-batch is often narrower)."""
    width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    return ids[:, :width], mask[:, :width], labels[:, :width]
