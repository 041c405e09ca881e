"""Packed batches: several sequences per row, a shared prompt computed once for all its replies.

A *document* is a trunk (a prompt, or a whole SFT example) and zero or more branches (the
replies to that prompt). Each branch, appended to the trunk, is one *logical sequence*: the row
the plain padded layout would hold (``prompt + chosen``, ``prompt + rejected``...). A document
without branches is a single logical sequence (its trunk).

Documents are laid out one after another in rows of at most ``pack_length`` tokens (as few rows
as fit, balanced so the padded width is small; a longer document gets a row of its own), with

- ``position_ids`` restarting at 0 for every trunk, and every branch continuing from its trunk's
  end, so each logical sequence sees the positions it has in the plain layout;
- a 4D attention mask ``[R, 1, T, T]`` (True = may attend): a token attends to the earlier tokens
  of its own document's trunk and of its own branch, never to a sibling reply or to another
  document; padding attends only to itself.

So every logical sequence's hidden states equal the plain layout's, while the prompt shared by
chosen and rejected (or by K ranked replies) runs through the model once and no column is
padding between documents. The batch also lists each scored position as (hidden-state index,
target token, logical sequence), which is all the log-prob computation needs.

Keys of a packed batch:

- ``input_ids`` / ``position_ids`` [R, T], ``attention_mask`` [R, 1, T, T] bool;
- ``pred_index`` [N]: flat index r * T + t of the hidden state that predicts target n;
- ``targets`` [N]: the target token; ``target_seq`` [N]: its logical sequence (0..S-1), sorted;
- ``sequence_tokens`` [S]: tokens of each logical sequence in the plain layout (trunk + branch);
- ``sequence_keys``: list of S reference-cache keys, equal to ``paft.models.reference.row_key`` of
  the plain layout's row, so cached reference log-probs are shared by both layouts;
- ``doc_spans`` [D, 4]: (row, start, end, 1 if the document has no branches) of each document, so
  attention can run per document (``paft.models.attention``) instead of over whole rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from paft.data.tokenize import IGNORE


@dataclass
class Doc:
    """A trunk and its branches; ``seq_ids``: the logical sequence number of each branch (or of the trunk
    alone when there are no branches). Labels are unshifted: ``labels[i]`` is the target of position i-1."""

    trunk_ids: list[int]
    trunk_labels: list[int]
    branch_ids: list[list[int]] = field(default_factory=list)
    branch_labels: list[list[int]] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trunk_ids) + sum(len(b) for b in self.branch_ids)


def sequence_key(ids: list[int], labels: list[int]) -> str:
    """Reference-cache key of a sequence: a hash of its int64 tokens, then which of them are scored.
    ``paft.models.reference.row_key`` gives a padded row's real tokens to it, so both layouts share keys."""
    tokens = np.asarray(ids, dtype=np.int64).tobytes()
    scored = (np.asarray(labels, dtype=np.int64) != IGNORE).tobytes()
    return hashlib.blake2b(tokens + b"|" + scored, digest_size=16).hexdigest()


def _rows(docs: list[Doc], pack_length: int) -> list[list[int]]:
    """Doc indices per row: the fewest rows of at most ``pack_length`` tokens, balanced so the longest row
    (the batch width every row is padded to) is as short as it can be.

    Longest-first onto the least-loaded of k rows, k = ceil(tokens / pack_length) and up from there
    until every row fits; a doc longer than ``pack_length`` gets a row of its own.
    """
    order = sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i))
    alone = [[i] for i in order if len(docs[i]) > pack_length]
    rest = [i for i in order if len(docs[i]) <= pack_length]
    if not rest:
        return alone
    k = max(1, -(-sum(len(docs[i]) for i in rest) // pack_length))
    while True:
        rows: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        for i in rest:
            r = min(range(k), key=lambda j: (load[j], j))
            rows[r].append(i)
            load[r] += len(docs[i])
        if max(load) <= pack_length:
            return alone + [row for row in rows if row]
        k += 1


def pack(docs: list[Doc], pad_id: int, pack_length: int) -> dict:
    """The packed batch of ``docs`` (see the module docstring)."""
    rows = _rows(docs, pack_length)
    width = max(sum(len(docs[i]) for i in row) for row in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    doc_of = torch.full((n_rows, width), -1, dtype=torch.long)
    branch_of = torch.zeros((n_rows, width), dtype=torch.long)
    n_seq = sum(max(1, len(d.branch_ids)) for d in docs)
    seq_tokens = [0] * n_seq
    keys = [""] * n_seq
    targets: list[tuple[int, int, int, int]] = []  # (seq, position in seq, flat hidden index, token)
    spans: list[list[int]] = []  # (row, start, end, causal only: no branches) of each document
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            d = docs[i]
            spans.append([r, at, at + len(d), int(not d.branch_ids)])
            t = len(d.trunk_ids)
            ids[r, at:at + t] = torch.tensor(d.trunk_ids)
            pos[r, at:at + t] = torch.arange(t)
            doc_of[r, at:at + t] = i
            trunk_phys = list(range(at, at + t))
            at += t
            branches = list(zip(d.branch_ids, d.branch_labels)) or [([], [])]
            for k, (b_ids, b_labels) in enumerate(branches):
                b = len(b_ids)
                if b:
                    ids[r, at:at + b] = torch.tensor(b_ids)
                    pos[r, at:at + b] = torch.arange(t, t + b)
                    doc_of[r, at:at + b] = i
                    branch_of[r, at:at + b] = k + 1
                phys = trunk_phys + list(range(at, at + b))
                at += b
                s = d.seq_ids[k]
                seq_ids_, seq_labels = d.trunk_ids + b_ids, d.trunk_labels + b_labels
                seq_tokens[s] = len(seq_ids_)
                keys[s] = sequence_key(seq_ids_, seq_labels)
                for p in range(len(seq_ids_) - 1):
                    if seq_labels[p + 1] != IGNORE:
                        targets.append((s, p, r * width + phys[p], seq_labels[p + 1]))
    targets.sort()
    same_doc = doc_of[:, :, None] == doc_of[:, None, :]
    visible = (branch_of[:, None, :] == 0) | (branch_of[:, None, :] == branch_of[:, :, None])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = same_doc & visible & causal & (doc_of[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no all-masked softmax row)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "attention_mask": allowed.unsqueeze(1),
        "pred_index": torch.tensor([t[2] for t in targets], dtype=torch.long),
        "targets": torch.tensor([t[3] for t in targets], dtype=torch.long),
        "target_seq": torch.tensor([t[0] for t in targets], dtype=torch.long),
        "sequence_tokens": torch.tensor(seq_tokens, dtype=torch.long),
        "sequence_keys": keys,
        "doc_spans": torch.tensor(spans, dtype=torch.long),
    }


def is_packed(batch: dict) -> bool:
    return "pred_index" in batch


def real_tokens(batch: dict) -> torch.Tensor | int:
    """The tokens a batch runs through the model, padding excluded, as a 0-d tensor on the batch's device (no
    host sync): each packed document's span (a shared prompt counted once), else the 2D attention mask's ones;
    without a mask, every token. A batch of sub-batches (joint training's ``{"pref": ..., "sft": ...}``): their sum."""
    if "input_ids" not in batch:
        return sum(real_tokens(b) for b in batch.values() if isinstance(b, dict))
    if is_packed(batch):
        spans = batch["doc_spans"]
        return (spans[:, 2] - spans[:, 1]).sum()
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.sum()
    return batch["input_ids"].numel()
