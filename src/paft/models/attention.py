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
    width = query.shape[2]
    by_row: dict[int, list[tuple[int, int, int]]] = {}
    for r, s, e, causal in paft_spans:
        by_row.setdefault(r, []).append((s, e, causal))
    rows = []
    # one split per row and tensor, not a slice per document: a slice's backward writes its gradient into a
    # zeroed copy of the whole row, a split's backward concatenates the pieces once (same numbers, less traffic)
    for r, (q, k, v) in enumerate(zip(query.split(1), key.split(1), value.split(1))):
        segments, at = [], 0  # (start, end, causal_only), or None for causal_only where no document is (padding)
        for s, e, causal in sorted(by_row.get(r, ())):
            if s > at:
                segments.append((at, s, None))
            segments.append((s, e, causal))
            at = e
        if at < width:
            segments.append((at, width, None))
        sizes = [e - s for s, e, _ in segments]
        pieces: list[torch.Tensor | None] = []
        for (s, e, causal), qs, ks, vs in zip(segments, q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2)):
            if causal is None:
                pieces.append(None)
                continue
            mask = None if causal else attention_mask[r:r + 1, :, s:e, s:e]
            pieces.append(sdpa_attention_forward(module, qs, ks, vs, mask, **kwargs)[0])  # [1, L, H, D]
        like = next((p for p in pieces if p is not None), query.transpose(1, 2)[:, :0])
        # padding: never read by a target, its own output is zero
        rows.append(torch.cat([p if p is not None else like.new_zeros(1, n, *like.shape[2:])
                               for p, n in zip(pieces, sizes)], dim=1))
    return torch.cat(rows, dim=0), None


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
