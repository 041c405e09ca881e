"""Held-out metrics shared by `paft eval` and the run's eval step.

- ``sft_exact_match``: greedy reply (``paft.models.generation.generate_replies``) equals the reference reply,
  whitespace-stripped. The fast path reads most rows' verdicts off the NLL forward instead of generating them
  (``teacher_forced_replies``: greedy decoding follows the reference exactly as long as the argmax at each
  reference position is the reference token; lm-evaluation-harness's ``is_greedy`` is the same check) and
  generates only the rows that check leaves open, plus the report's sample rows.
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
from paft.data.tokenize import IGNORE, Encoded, EncodedPair, encode_pair, encode_sft, prompt_text
from paft.models.generation import generate_replies, plain_greedy
from paft.models.logps import (batch_sequence_logps, label_hidden, label_logps_argmax, sequence_logps, sequence_sums,
                               token_logps)

SAMPLES = 8  # greedy replies kept per model for the report


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


def is_chat(e: SFTExample) -> bool:
    """Whether exact match scores ``e``: a conversation ending with an assistant turn."""
    return bool(e.messages) and e.messages[-1]["role"] == "assistant"


def chat_examples(examples: list[SFTExample]) -> list[SFTExample]:
    """The examples exact match scores (``is_chat``)."""
    return [e for e in examples if is_chat(e)]


def exact_match(model, tok, examples: list[SFTExample], *, max_new_tokens: int, batch_size: int,
                max_prompt_tokens: int, progress=None, token_budget: int | None = None,
                teacher: tuple[list[Encoded], list[list[int]]] | None = None) -> tuple[float, list[dict]]:
    """Greedy generation against the last assistant turn of each chat example (``token_budget``: the batched
    cached loop of ``generate_replies``). Returns the hit rate and a sample per row (prompt, target, reply).

    ``teacher``: ``examples``' encoded rows and the argmax at their label positions (``sorted_nll(argmax=True)``):
    a row's verdict is read off them where they decide it (``teacher_forced_replies``) and only the other rows are
    generated, plus the first ``SAMPLES`` (their replies are the report's samples); the samples then hold those
    first rows only. The verdicts are generation's (tests/test_eval_fast.py) up to argmax near-ties, where the
    padded forward and the KV-cached decoding round differently (as between any two batchings)."""
    index = [i for i, e in enumerate(examples) if is_chat(e)]
    chats = [examples[i] for i in index]
    if not chats:
        return float("nan"), []
    targets = [e.messages[-1]["content"].strip() for e in chats]
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
               progress=progress, token_budget=token_budget)
    if teacher is not None and plain_greedy(model):
        rows, argmax = teacher
        known = teacher_forced_replies(tok, chats, [rows[i] for i in index], [argmax[i] for i in index],
                                       max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
        todo = [j for j, k in enumerate(known) if k is None or j < SAMPLES]
        for j, reply in zip(todo, generate_replies(model, tok, [chats[j].messages[:-1] for j in todo], **gen)):
            known[j] = reply
        keep = range(min(SAMPLES, len(chats)))
    else:
        known = generate_replies(model, tok, [e.messages[:-1] for e in chats], **gen)
        keep = range(len(chats))
    hits = sum(k == t for k, t in zip(known, targets))
    samples = [{"prompt": chats[j].messages[-2]["content"] if len(chats[j].messages) > 1 else "",
                "target": targets[j], "reply": known[j]} for j in keep]
    return hits / len(chats), samples


class _Miss:
    """A verdict without a reply: greedy decoding provably leaves the reference (``teacher_forced_replies``); equal
    to no target (identity equality)."""

    def __repr__(self) -> str:
        return "MISS"


MISS = _Miss()


def teacher_forced_replies(tok, chats: list[SFTExample], rows: list[Encoded], argmax: list[list[int]], *,
                           max_new_tokens: int, max_prompt_tokens: int) -> list:
    """What greedy decoding replies to each chat, as far as one teacher-forced forward over its reference tells.

    Greedy decoding from the generation prompt picks, at each step, the argmax given the tokens so far; while
    they are the reference's, that is the argmax the forward over prompt + reference computed at that position.
    So the reply is known when the argmax follows the reference up to the end-of-sequence token or
    ``max_new_tokens`` (a hit when it decodes to the reference, or an early end), and a miss is certain
    when it leaves the reference with a token whose text cannot begin the reference's remaining text. Per chat:
    the reply (str), ``MISS`` (certainly not the reference; reply unknown) or None (generate it). None also where
    the encoded row's prompt is not the generation prompt's tokens (template, truncation), or the
    tokenizer's decode is not a concatenation of its tokens' texts (``clean_up_tokenization_spaces``)."""
    eos = tok.eos_token_id
    special = set(tok.all_special_ids)
    cleanup = bool(getattr(tok, "clean_up_tokenization_spaces", False))
    prompts = [tok(prompt_text(tok, c.messages[:-1]), add_special_tokens=False, truncation=True,
                   max_length=max_prompt_tokens)["input_ids"] for c in chats]
    out: list = []
    for chat, row, am, prompt in zip(chats, rows, argmax, prompts):
        labels = row.labels
        end = len(labels)
        while end > 0 and labels[end - 1] == IGNORE:
            end -= 1
        start = end
        while start > 0 and labels[start - 1] != IGNORE:  # the last assistant turn: the trailing label run
            start -= 1
        if start == end or list(row.input_ids[:start]) != prompt or len(am) < end - start:
            out.append(None)
            continue
        ref, picks = list(row.input_ids[start:end]), am[len(am) - (end - start):]
        target = chat.messages[-1]["content"].strip()
        tokens: list[int] = []
        done = False
        for j in range(min(max_new_tokens, len(ref))):
            tokens.append(picks[j])
            if picks[j] == eos or picks[j] != ref[j]:
                done = picks[j] == eos
                break
        else:
            # else the reference ended before eos: a truncated row, or a template whose turn ends in another token
            done = len(tokens) == max_new_tokens
        text = tok.decode(tokens, skip_special_tokens=True)
        if done:
            out.append(text.strip())
            continue
        head = text.lstrip()
        could_match = (not head or target.startswith(head)
                       or (head.startswith(target) and not head[len(target):].strip()))
        unsure = cleanup or "\ufffd" in text or any(t in special for t in tokens)
        out.append(None if could_match or unsure else MISS)
    return out


@dataclass
class NLL:
    """Mean per-token NLL of held-out completions, and each row's summed NLL and label-token count."""

    mean: float
    totals: torch.Tensor
    counts: torch.Tensor
    argmax: list[list[int]] | None = None  # per row: the argmax at each label position (``sorted_nll(argmax=True)``)

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
def sorted_nll(model, rows: list[Encoded], *, pad_id: int, token_budget: int, argmax: bool = False) -> NLL:
    """``completion_nll`` of encoded SFT rows, sorted by length into right-padded batches of at most
    ``token_budget`` tokens (rows x the longest): few forwards, little padding. (Packing them as pairs are packed
    measured 7 % slower on the demo's 48 short rows: an attention call per example, and little padding to save.)
    ``argmax``: also each row's argmax token at its label positions (``exact_match``'s ``teacher``)."""
    device = next(model.parameters()).device
    totals, counts = torch.zeros(len(rows), dtype=torch.float64), torch.zeros(len(rows), dtype=torch.float64)
    picks: list[list[int]] = [[] for _ in rows]
    collate = SFTCollator(pad_id)
    for idx in padded_batches([len(r.input_ids) for r in rows], token_budget):
        batch = _to(collate([rows[i] for i in idx]), device)
        if argmax:
            hidden, targets, seq, n = label_hidden(model, batch)
            logps, top = label_logps_argmax(model, hidden, targets)
            for j, t in zip(seq.tolist(), top.tolist()):  # each row's positions in order
                picks[idx[j]].append(t)
            row_sum, row_count = sequence_sums(logps, seq, n)
        else:
            row_sum, row_count = batch_sequence_logps(model, batch)
        totals[idx], counts[idx] = -row_sum.double().cpu(), row_count.double().cpu()
    return NLL((totals.sum() / counts.sum().clamp(min=1)).item(), totals, counts, picks if argmax else None)


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
