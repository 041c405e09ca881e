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


def base_config(model):
    """The config of a (possibly PEFT-wrapped) model, which its attention layers read."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def attn_implementation(model) -> str:
    return getattr(base_config(model), "_attn_implementation", None) or "eager"


@contextmanager
def packed_attention(model, spans: list[tuple[int, int, int, bool]] | None):
    """Route ``model``'s sdpa attention through ``packed_sdpa`` for the forwards inside (no-op without spans,
    or for eager attention, which keeps the full 4D mask)."""
    config = base_config(model)
    before = config._attn_implementation
    if spans is None or before != "sdpa":
        yield {}
        return
    config._attn_implementation = NAME
    try:
        yield {"paft_spans": spans}
    finally:
        config._attn_implementation = before


def packing_unsupported(model, max_sequence: int) -> str | None:
    """Why ``model`` cannot take packed batches, or None when it can.

    They need a custom 4D attention mask, which transformers' sdpa and eager attention take (flash
    attention does not); and one mask for every layer, so no sliding window shorter than the longest
    logical sequence (``max_sequence`` tokens), where the layers' masks would differ.
    """
    config = base_config(model)
    impl = attn_implementation(model)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} takes no custom 4D mask (sdpa and eager do)"
    window = getattr(config, "sliding_window", None)
    sliding = any("sliding" in str(t) for t in getattr(config, "layer_types", None) or []) or (
        window and getattr(config, "use_sliding_window", True))
    if sliding and window and window < max_sequence:
        return f"its sliding window ({window} tokens) is shorter than the sequences ({max_sequence})"
    return None
