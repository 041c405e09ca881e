"""Attention over packed batches, one document at a time.

A packed row (``paft.data.packing``) holds several documents whose tokens never attend
to each other. The 4D mask says so, but a masked SDPA kernel still computes every
query-key block of the row, so a row of n documents does about n times the attention
work it needs (on a 2-core CPU, packing SFT rows of 1024 tokens made steps 1.5x slower
than padded rows). This attention function runs the model's own SDPA attention on each
document's slice of the row instead, with that document's slice of the mask: the same
numbers, attention cost sum(L_d^2) instead of T^2 per row, and a document with no
branches (an SFT example) takes the causal kernel with no mask at all.

It is registered with transformers' ``AttentionInterface`` as ``paft_packed`` and used only
inside ``packed_attention(model, spans)``, which points the model's attention at it for one
forward; outside that, and for any call without spans, it is plain SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "paft_packed"


def packed_sdpa(module, query, key, value, attention_mask, paft_spans=None, **kwargs):
    """``sdpa_attention_forward`` per document span ``(row, start, end, causal_only)`` of the packed batch."""
    if paft_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, width = query.shape[0], query.shape[2]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    filled = [0] * rows
    for r, s, e, causal in paft_spans:
        mask = None if causal else attention_mask[r:r + 1, :, s:e, s:e]
        out, _ = sdpa_attention_forward(module, query[r:r + 1, :, s:e], key[r:r + 1, :, s:e],
                                        value[r:r + 1, :, s:e], mask, **kwargs)
        pieces[r].append(out)  # [1, L, H, D]
        filled[r] = e
    heads, dim = query.shape[1], query.shape[3]
    for r in range(rows):
        if filled[r] < width:  # padding: never read by a target, its own output is zero
            pieces[r].append(query.new_zeros(1, width - filled[r], heads, dim))
    return torch.cat([torch.cat(p, dim=1) for p in pieces], dim=0), None


AttentionInterface.register(NAME, packed_sdpa)


@contextmanager
def packed_attention(model, spans: list[tuple[int, int, int, bool]] | None):
    """Route ``model``'s sdpa attention through ``packed_sdpa`` for the forwards inside (no-op without spans,
    or for eager attention, which keeps the full 4D mask)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    before = config._attn_implementation
    if spans is None or before != "sdpa":
        yield {}
        return
    config._attn_implementation = NAME
    try:
        yield {"paft_spans": spans}
    finally:
        config._attn_implementation = before
