"""Held-out metrics shared by `paft eval` and the run's eval step.

- ``sft_exact_match``: greedy reply (``paft.models.generation.generate_replies``) equals the reference reply,
  whitespace-stripped.
- ``sft_nll``: mean per-token NLL of held-out SFT completions (teacher-forced).
- ``pref_accuracy``: share of held-out pairs where the model itself gives the chosen reply a higher
  summed log-probability than the rejected one (reference-free: the base model has a score too).
- ``reward_margin`` / ``reward_accuracy``: DPO implicit reward beta * (h(y_w) - h(y_l)) with the base
  model as reference, mean and share > 0 (zero for the base by definition).

Each has a standard error beside it (``<metric>_stderr``, read by the report to mark differences within
noise): sqrt(p (1 - p) / n) for the three shares, std / sqrt(n) of the per-pair margins, and for the
token-weighted ``sft_nll`` = sum_i x_i / sum_i n_i (x_i a row's summed NLL, n_i its tokens) the delta
method's sqrt(sum_i (x_i - nll n_i)^2 / (n (n - 1))) / mean(n_i), which is std / sqrt(n) of the rows'
mean NLLs when every row has the same length.

Two paths compute the same numbers (``eval.fast``): the plain one (a padded row per sequence, prompts
repeated for chosen and rejected, ``eval.batch_size`` rows per forward) and the packed one
(``packed_pair_logps``: ``paft.data.packing``'s layout, each pair's prompt computed once with chosen and
rejected attending to it, pairs sorted by length into forwards of at most ``token_budget`` tokens with no
padding, attention per document; ``sorted_nll``: SFT rows sorted by length into padded token-budget batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from paft.data.collate import PairCollator, SFTCollator, packed_batches, padded_batches
from paft.data.formats import PreferenceExample, SFTExample
from paft.data.tokenize import Encoded, EncodedPair, encode_pair, encode_sft
from paft.models.generation import generate_replies
from paft.models.logps import batch_sequence_logps, sequence_logps, sequence_sums, token_logps


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def binomial_stderr(p: float | None, n: int) -> float | None:
    """Standard error of a share ``p`` of ``n`` independent rows: sqrt(p (1 - p) / n)."""
    return None if p is None or not n or math.isnan(p) else math.sqrt(p * (1 - p) / n)


def mean_stderr(x: torch.Tensor) -> float | None:
    """Standard error of the mean of ``x``: its sample standard deviation (n - 1) over sqrt(n)."""
    n = x.numel()
    return None if n < 2 else (x.double().std() / math.sqrt(n)).item()


def ratio_stderr(totals: torch.Tensor, counts: torch.Tensor) -> float | None:
    """Standard error of sum(totals) / sum(counts) over rows (the delta method for a ratio of means)."""
    n = totals.numel()
    if n < 2 or counts.sum() <= 0:
        return None
    totals, counts = totals.double(), counts.double()
    resid = totals - totals.sum() / counts.sum() * counts
    return (resid.pow(2).sum() / (n * (n - 1))).sqrt().item() / counts.mean().item()


def chat_examples(examples: list[SFTExample]) -> list[SFTExample]:
    """The examples exact match scores: conversations ending with an assistant turn."""
    return [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]


def exact_match(model, tok, examples: list[SFTExample], *, max_new_tokens: int, batch_size: int,
                max_prompt_tokens: int, progress=None, token_budget: int | None = None) -> tuple[float, list[dict]]:
    """Greedy generation against the last assistant turn of each chat example (``token_budget``: the batched
    cached loop of ``generate_replies``)."""
    chats = chat_examples(examples)
    if not chats:
        return float("nan"), []
    replies = generate_replies(model, tok, [e.messages[:-1] for e in chats], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, progress=progress,
                               token_budget=token_budget)
    samples, hits = [], 0
    for e, reply in zip(chats, replies):
        target = e.messages[-1]["content"].strip()
        hits += reply == target
        samples.append({"prompt": e.messages[-2]["content"] if len(e.messages) > 1 else "",
                        "target": target, "reply": reply})
    return hits / len(chats), samples


@dataclass
class NLL:
    """Mean per-token NLL of held-out completions, and each row's summed NLL and label-token count."""

    mean: float
    totals: torch.Tensor
    counts: torch.Tensor

    @property
    def stderr(self) -> float | None:
        return ratio_stderr(self.totals, self.counts)


@torch.no_grad()
def completion_nll(model, tok, examples: list[SFTExample], *, max_length: int, batch_size: int) -> NLL:
    """The plain path: right-padded rows, ``batch_size`` per forward."""
    rows = [encode_sft(e, tok, max_length) for e in examples]
    collate, device = SFTCollator(tok.pad_token_id), next(model.parameters()).device
    total, count, totals, counts = 0.0, 0, [], []
    for batch in _batches(rows, batch_size):
        b = {k: v.to(device) for k, v in collate(batch).items()}
        logps, seq = token_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        total -= logps.sum().item()
        count += logps.numel()
        row_sum, row_count = sequence_sums(logps, seq, len(batch))
        totals.append(-row_sum.cpu())
        counts.append(row_count.cpu())
    return NLL(total / max(count, 1), torch.cat(totals) if totals else torch.zeros(0),
               torch.cat(counts) if counts else torch.zeros(0))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def sorted_nll(model, rows: list[Encoded], *, pad_id: int, token_budget: int) -> NLL:
    """``completion_nll`` of encoded SFT rows, sorted by length into right-padded batches of at most
    ``token_budget`` tokens (rows x the longest): few forwards, little padding. (Packing them as pairs are packed
    measured 7 % slower on the demo's 48 short rows: an attention call per example, and little padding to save.)"""
    device = next(model.parameters()).device
    totals, counts = torch.zeros(len(rows), dtype=torch.float64), torch.zeros(len(rows), dtype=torch.float64)
    collate = SFTCollator(pad_id)
    for idx in padded_batches([len(r.input_ids) for r in rows], token_budget):
        row_sum, row_count = batch_sequence_logps(model, _to(collate([rows[i] for i in idx]), device))
        totals[idx], counts[idx] = -row_sum.double().cpu(), row_count.double().cpu()
    return NLL((totals.sum() / counts.sum().clamp(min=1)).item(), totals, counts)


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


@torch.no_grad()
def packed_pair_logps(model, rows: list[EncodedPair], *, pad_id: int, token_budget: int,
                      forward=None, pack_length: int | None = None) -> torch.Tensor:
    """``pair_logps`` of encoded pairs in the packed layout: each pair one document (its prompt once, chosen and
    rejected as two branches attending to it), pairs sorted by length into forwards of at most ``token_budget``
    tokens, laid out in rows of at most ``pack_length`` (default the budget; a row's attention mask is
    [pack_length x pack_length]). ``forward(model, batch)`` -> each sequence's summed log-prob (default
    ``batch_sequence_logps``; a ``paft.models.reference.ReferenceLogps`` serves cached reference log-probs)."""
    device = next(model.parameters()).device
    forward = forward or (lambda m, b: batch_sequence_logps(m, b)[0])
    out = torch.zeros(len(rows), 2)
    collate = PairCollator(pad_id, pack_length or token_budget)
    lengths = [len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows]
    for idx in packed_batches(lengths, token_budget):
        lp = forward(model, _to(collate([rows[i] for i in idx]), device)).float().cpu()
        n = len(idx)
        out[idx] = torch.stack([lp[:n], lp[n:]], dim=1)
    return out


@dataclass
class PreferenceScores:
    accuracy: float
    reward_margin: float | None
    reward_accuracy: float | None
    n: int = 0
    margin_stderr: float | None = None

    def metrics(self) -> dict[str, float | None]:
        """The eval.json keys, each with its standard error."""
        return {"pref_accuracy": self.accuracy, "pref_accuracy_stderr": binomial_stderr(self.accuracy, self.n),
                "reward_margin": self.reward_margin, "reward_margin_stderr": self.margin_stderr,
                "reward_accuracy": self.reward_accuracy,
                "reward_accuracy_stderr": binomial_stderr(self.reward_accuracy, self.n)}


def preference_scores(lp: torch.Tensor, ref: torch.Tensor | None, beta: float) -> PreferenceScores:
    acc = (lp[:, 0] > lp[:, 1]).float().mean().item()
    n = lp.shape[0]
    if ref is None:
        return PreferenceScores(acc, None, None, n)
    margin = beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))
    return PreferenceScores(acc, margin.mean().item(), (margin > 0).float().mean().item(), n, mean_stderr(margin))
