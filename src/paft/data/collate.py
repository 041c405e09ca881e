"""Batch collators: right-padded tensors with completion-only labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paft.data.tokenize import IGNORE, Encoded, EncodedPair


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


@dataclass
class SFTCollator:
    pad_id: int

    def __call__(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        ids = [r.input_ids for r in rows]
        return {
            "input_ids": _pad(ids, self.pad_id),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad([r.labels for r in rows], IGNORE),
        }


@dataclass
class PairCollator:
    """Stacks [prompt+chosen for each pair] then [prompt+rejected for each pair] in one batch."""

    pad_id: int

    def __call__(self, rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for r in rows:
                resp = getattr(r, side)
                seqs.append(r.prompt_ids + resp)
                labels.append([IGNORE] * len(r.prompt_ids) + resp)
        return {
            "input_ids": _pad(seqs, self.pad_id),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
            "labels": _pad(labels, IGNORE),
        }
