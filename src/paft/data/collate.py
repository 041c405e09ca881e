"""Batch collators: right-padded tensors with completion-only labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paft.data.packing import Doc, pack
from paft.data.tokenize import IGNORE, Encoded, EncodedCompletion, EncodedPair, EncodedRanked


def _pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    fill = [[value] * (width - len(s)) for s in seqs]
    return torch.tensor([s + f if side == "right" else f + s for s, f in zip(seqs, fill)], dtype=torch.long)


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token sequences padded to the longest, on ``side``."""
    return {"input_ids": _pad(seqs, pad_id, side), "attention_mask": _pad([[1] * len(s) for s in seqs], 0, side)}


def _padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ids, mask and labels (``IGNORE`` outside the trained tokens)."""
    return {**pad_sequences(seqs, pad_id), "labels": _pad(labels, IGNORE)}


@dataclass
class SFTCollator:
    """Right-padded rows; with ``pack_length``, examples packed into rows of that many tokens
    (``paft.data.packing``: block-diagonal attention, positions restarting per example)."""

    pad_id: int
    pack_length: int | None = None

    def __call__(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        if self.pack_length:
            docs = [Doc(r.input_ids, r.labels, seq_ids=[i]) for i, r in enumerate(rows)]
            return pack(docs, self.pad_id, self.pack_length)
        return _padded([r.input_ids for r in rows], [r.labels for r in rows], self.pad_id)


@dataclass
class PairCollator:
    """Stacks [prompt+chosen for each pair] then [prompt+rejected for each pair] in one batch.

    With ``pack_length``, the same logical sequences in that order, packed: each pair's prompt once,
    chosen and rejected as two branches after it (``paft.data.packing``).
    """

    pad_id: int
    pack_length: int | None = None

    def __call__(self, rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
        if self.pack_length:
            b = len(rows)
            docs = [Doc(r.prompt_ids, [IGNORE] * len(r.prompt_ids), [r.chosen_ids, r.rejected_ids],
                        [list(r.chosen_ids), list(r.rejected_ids)], [i, b + i]) for i, r in enumerate(rows)]
            return pack(docs, self.pad_id, self.pack_length)
        seqs, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for r in rows:
                resp = getattr(r, side)
                seqs.append(r.prompt_ids + resp)
                labels.append([IGNORE] * len(r.prompt_ids) + resp)
        return _padded(seqs, labels, self.pad_id)


@dataclass
class BinaryCollator:
    """Unpaired completions: [prompt_i + completion_i for each row], then, with ``kl``, the KTO "KL" rows.

    KL row i is prompt_{(i+1) mod B} + completion_i: every completion under another row's prompt
    (TRL's KTOTrainer builds the same set by cycling completions within the batch), so the batch
    holds 2B rows, [matched; mismatched], labels on completion tokens only. A mismatched
    completion is right-truncated so its row fits ``max_length`` (when given). ``desirable`` ([B]
    bool) carries the labels of the matched rows, ``rewards`` ([B] float) their rewards when every row has one.
    """

    pad_id: int
    kl: bool = True
    max_length: int | None = None

    def __call__(self, rows: list[EncodedCompletion]) -> dict[str, torch.Tensor]:
        pairs = [(r.prompt_ids, r.completion_ids) for r in rows]
        if self.kl:
            b = len(rows)
            for i, r in enumerate(rows):
                prompt = rows[(i + 1) % b].prompt_ids
                budget = None if self.max_length is None else max(1, self.max_length - len(prompt))
                pairs.append((prompt, r.completion_ids[:budget]))
        seqs = [p + c for p, c in pairs]
        labels = [[IGNORE] * len(p) + c for p, c in pairs]
        out = {**_padded(seqs, labels, self.pad_id),
               "desirable": torch.tensor([bool(r.label) for r in rows], dtype=torch.bool)}
        if all(r.reward is not None for r in rows):  # single-trajectory data (DRO): each reply's reward
            out["rewards"] = torch.tensor([float(r.reward) for r in rows], dtype=torch.float32)
        return out


@dataclass
class RankedCollator:
    """Scored reply lists, flattened example-major into one padded batch.

    Layout for B lists with n_b replies each (K = max n_b, N = sum n_b):

    - ``input_ids`` / ``attention_mask`` / ``labels``: [N, T], row r = prompt_b + response_{b,k} for
      list b = 0..B-1 and, within it, reply k = 0..n_b-1 (list 0's replies first, then list 1's...);
      labels on the reply tokens only.
    - ``list_index``: [B, K] long, the row of reply k of list b in the flat batch, -1 past the end
      of a shorter list.
    - ``scores``: [B, K] float, the reply's score (higher = better), 0 where ``list_index`` is -1.

    With ``pack_length``, the same N logical sequences, packed: each list's prompt once, its replies
    as branches after it (``paft.data.packing``).
    """

    pad_id: int
    pack_length: int | None = None

    def __call__(self, rows: list[EncodedRanked]) -> dict[str, torch.Tensor]:
        k = max(len(r.response_ids) for r in rows)
        index, scores, n = [], [], 0
        for r in rows:
            m = len(r.response_ids)
            index.append(list(range(n, n + m)) + [-1] * (k - m))
            scores.append([float(x) for x in r.scores] + [0.0] * (k - m))
            n += m
        if self.pack_length:
            starts = [row[0] for row in index]
            layout = pack([Doc(r.prompt_ids, [IGNORE] * len(r.prompt_ids), [list(x) for x in r.response_ids],
                               [list(x) for x in r.response_ids], list(range(s, s + len(r.response_ids))))
                           for r, s in zip(rows, starts)], self.pad_id, self.pack_length)
        else:
            pairs = [(r.prompt_ids, resp) for r in rows for resp in r.response_ids]
            layout = _padded([p + c for p, c in pairs], [[IGNORE] * len(p) + c for p, c in pairs], self.pad_id)
        return {
            **layout,
            "list_index": torch.tensor(index, dtype=torch.long),
            "scores": torch.tensor(scores, dtype=torch.float32),
        }


def padded_batches(lengths: list[int], budget: int, extra: int = 0) -> list[list[int]]:
    """Indices, longest first, in batches whose rows times (the batch's longest + ``extra``) stay within ``budget``
    tokens (a row over it alone): right- or left-padded to the batch's longest, sorted batches pad little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * (lengths[batches[-1][0]] + extra) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def packed_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices, longest first, in batches of at most ``budget`` tokens in all (an item over it alone): packed rows
    (``paft.data.packing``) hold no padding, so a batch costs its tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    used = 0
    for i in order:
        if batches and used + lengths[i] <= budget:
            batches[-1].append(i)
            used += lengths[i]
        else:
            batches.append([i])
            used = lengths[i]
    return batches
