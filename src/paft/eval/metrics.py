"""Held-out metrics shared by `paft eval` and the run's eval step.

- ``sft_exact_match``: greedy reply (``paft.models.generation.generate_replies``) equals the reference reply,
  whitespace-stripped.
- ``sft_nll``: mean per-token NLL of held-out SFT completions (teacher-forced).
- ``pref_accuracy``: share of held-out pairs where the model itself gives the chosen reply a higher
  summed log-probability than the rejected one (reference-free: the base model has a score too).
- ``reward_margin`` / ``reward_accuracy``: DPO implicit reward beta * (h(y_w) - h(y_l)) with the base
  model as reference, mean and share > 0 (zero for the base by definition).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paft.data.collate import PairCollator, SFTCollator
from paft.data.formats import PreferenceExample, SFTExample
from paft.data.tokenize import encode_pair, encode_sft
from paft.models.generation import generate_replies
from paft.models.logps import sequence_logps, token_logps


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def exact_match(model, tok, examples: list[SFTExample], *, max_new_tokens: int, batch_size: int,
                max_prompt_tokens: int, progress=None) -> tuple[float, list[dict]]:
    """Greedy generation against the last assistant turn of each chat example."""
    chats = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    if not chats:
        return float("nan"), []
    replies = generate_replies(model, tok, [e.messages[:-1] for e in chats], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, progress=progress)
    samples, hits = [], 0
    for e, reply in zip(chats, replies):
        target = e.messages[-1]["content"].strip()
        hits += reply == target
        samples.append({"prompt": e.messages[-2]["content"] if len(e.messages) > 1 else "",
                        "target": target, "reply": reply})
    return hits / len(chats), samples


@torch.no_grad()
def completion_nll(model, tok, examples: list[SFTExample], *, max_length: int, batch_size: int) -> float:
    rows = [encode_sft(e, tok, max_length) for e in examples]
    collate, device = SFTCollator(tok.pad_token_id), next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(rows, batch_size):
        b = {k: v.to(device) for k, v in collate(batch).items()}
        logps, _ = token_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        total -= logps.sum().item()
        count += logps.numel()
    return total / max(count, 1)


@torch.no_grad()
def pair_logps(model, tok, examples: list[PreferenceExample], *, max_length: int, max_prompt_length: int,
               batch_size: int) -> torch.Tensor:
    """[N, 2] summed completion log-probs (chosen, rejected)."""
    rows = [encode_pair(e, tok, max_length, max_prompt_length) for e in examples]
    collate, device = PairCollator(tok.pad_token_id), next(model.parameters()).device
    out = []
    for batch in _batches(rows, max(1, batch_size // 2)):
        b = {k: v.to(device) for k, v in collate(batch).items()}
        lp, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        n = len(batch)
        out.append(torch.stack([lp[:n], lp[n:]], dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


@dataclass
class PreferenceScores:
    accuracy: float
    reward_margin: float | None
    reward_accuracy: float | None


def preference_scores(lp: torch.Tensor, ref: torch.Tensor | None, beta: float) -> PreferenceScores:
    acc = (lp[:, 0] > lp[:, 1]).float().mean().item()
    if ref is None:
        return PreferenceScores(acc, None, None)
    margin = beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))
    return PreferenceScores(acc, margin.mean().item(), (margin > 0).float().mean().item())
