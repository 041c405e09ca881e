"""Packed batches (paft.data.packing): the shared-prompt / multi-sequence layout gives the padded layout's
log-probs, losses and gradients, for SFT, pairs and ranked lists, and the same reference-cache keys."""

import pytest
import torch

from paft.data.collate import PairCollator, RankedCollator, SFTCollator
from paft.data.formats import PreferenceExample, RankedExample, SFTExample
from paft.data.packing import Doc, pack
from paft.data.tokenize import IGNORE, encode_pair, encode_ranked, encode_sft
from paft.models.attention import packing_unsupported
from paft.models.logps import batch_sequence_logps, batch_token_logps
from paft.train.preference import PreferenceObjective
from paft.models.reference import ReferenceLogps, batch_keys
from paft.train.sft import SFTObjective


def _pairs(n=5):
    return [PreferenceExample(prompt=[{"role": "user", "content": f"question number {i} " + "why " * (3 * i)}],
                              chosen="yes " * (i + 2), rejected="no " * (6 - i)) for i in range(n)]


def _sft(n=5):
    return [SFTExample(messages=[{"role": "user", "content": f"say {i} " + "a " * (4 * i)},
                                 {"role": "assistant", "content": "ok " * (i + 1)}]) for i in range(n)]


def _ranked(n=3):
    return [RankedExample(prompt=[{"role": "user", "content": f"rank {i} " + "b " * (2 * i)}],
                          responses=["good " * (i + 1), "fine " * 2, "bad " * (3 - i)][: 2 + (i % 2)],
                          scores=[3.0, 2.0, 1.0][: 2 + (i % 2)]) for i in range(n)]


def _loss_and_grads(model, objective, batch):
    model.zero_grad()
    loss, _ = objective(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(model, objective, padded, packed):
    loss_a, grads_a = _loss_and_grads(model, objective, padded)
    loss_b, grads_b = _loss_and_grads(model, objective, packed)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=2e-5, rtol=1e-4, msg=name)


def test_pack_layout_positions_mask_and_targets():
    docs = [Doc([1, 2, 3], [IGNORE] * 3, [[4, 5], [6]], [[4, 5], [6]], [0, 2]),
            Doc([7, 8], [IGNORE, IGNORE], [[9], [10, 11]], [[9], [10, 11]], [1, 3])]
    b = pack(docs, pad_id=0, pack_length=64)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]]
    m = b["attention_mask"][0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True] + [False] * 5  # rejected sees prompt, not chosen
    assert m[8].tolist() == [False] * 6 + [True, True, True, False, False]  # another document: nothing of the first
    # sequence 0 = [1,2,3,4,5]: targets 4 (from hidden 2) and 5 (from hidden 3); sequence 2 = [1,2,3,6]: 6 from 2
    assert b["target_seq"].tolist() == [0, 0, 1, 2, 3, 3]
    assert b["targets"].tolist() == [4, 5, 9, 6, 10, 11]
    assert b["pred_index"].tolist() == [2, 3, 7, 2, 7, 9]
    assert b["sequence_tokens"].tolist() == [5, 3, 4, 4]


def test_pack_length_splits_rows_balanced():
    docs = [Doc(list(range(1, n + 1)), list(range(1, n + 1)), seq_ids=[i]) for i, n in enumerate([6, 5, 4, 3])]
    b = pack(docs, pad_id=0, pack_length=9)
    assert b["input_ids"].shape == (2, 9)  # [6 + 3] and [5 + 4]
    assert pack(docs, pad_id=0, pack_length=12)["input_ids"].shape == (2, 9)  # not [6 + 5] and [4 + 3]: width 11
    assert pack(docs, pad_id=0, pack_length=100)["input_ids"].shape == (1, 18)
    m = b["attention_mask"]
    assert m.shape == (2, 1, 9, 9) and bool(m[0, 0].diagonal().all())
    big = pack(docs, pad_id=0, pack_length=4)  # longer documents get rows of their own
    assert big["input_ids"].shape == (4, 6)
    pad_row = big["attention_mask"][3, 0]  # the 3-token document's row: 3 pads that see only themselves
    assert pad_row[4].tolist() == [False] * 4 + [True, False]


def test_sequence_keys_equal_the_padded_row_keys(tiny_tok):
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in _pairs()]
    padded = PairCollator(tiny_tok.pad_token_id)(rows)
    packed = PairCollator(tiny_tok.pad_token_id, pack_length=64)(rows)
    assert batch_keys(packed) == batch_keys(padded)


def test_packed_logps_equal_padded(tiny_model, tiny_tok):
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in _pairs()]
    padded = PairCollator(tiny_tok.pad_token_id)(rows)
    for pack_length in (32, 80, 4096):  # several rows, a few, one
        packed = PairCollator(tiny_tok.pad_token_id, pack_length=pack_length)(rows)
        with torch.no_grad():
            want, want_n = batch_sequence_logps(tiny_model, padded)
            got, got_n = batch_sequence_logps(tiny_model, packed)
            full, _ = batch_sequence_logps(tiny_model, packed, full_logits=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
        assert got_n.tolist() == want_n.tolist()
    # the prompt runs once per pair: fewer tokens than the padded rows hold, let alone their width
    assert int((packed["input_ids"] != tiny_tok.pad_token_id).sum()) < int(padded["attention_mask"].sum())


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "simpo"])
def test_pair_loss_and_gradients_equal_padded(lora_model, tiny_tok, method):
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in _pairs()]
    padded = PairCollator(tiny_tok.pad_token_id)(rows)
    packed = PairCollator(tiny_tok.pad_token_id, pack_length=96)(rows)
    _assert_same(lora_model, PreferenceObjective(method, 0.1), padded, packed)


def test_ranked_loss_and_gradients_equal_padded(lora_model, tiny_tok):
    rows = [encode_ranked(e, tiny_tok, 96, 64) for e in _ranked()]
    padded = RankedCollator(tiny_tok.pad_token_id)(rows)
    packed = RankedCollator(tiny_tok.pad_token_id, pack_length=128)(rows)
    assert torch.equal(packed["list_index"], padded["list_index"])
    _assert_same(lora_model, PreferenceObjective("lipo", 0.1), padded, packed)


def test_sft_loss_and_gradients_equal_padded(lora_model, tiny_tok):
    rows = [encode_sft(e, tiny_tok, 96) for e in _sft()]
    padded = SFTCollator(tiny_tok.pad_token_id)(rows)
    packed = SFTCollator(tiny_tok.pad_token_id, pack_length=4096)(rows)
    assert packed["input_ids"].numel() == sum(len(r.input_ids) for r in rows)  # one row, no padding
    _assert_same(lora_model, SFTObjective(l1_lambda=1e-4), padded, packed)
    _assert_same(lora_model, SFTObjective(full_logits=True), padded, packed)


def test_full_logits_path_equals_completion_logits(lora_model, tiny_tok):
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in _pairs()]
    padded = PairCollator(tiny_tok.pad_token_id)(rows)
    plain = PreferenceObjective("dpo", 0.1)
    plain.full_logits = True
    loss_a, grads_a = _loss_and_grads(lora_model, plain, padded)
    loss_b, grads_b = _loss_and_grads(lora_model, PreferenceObjective("dpo", 0.1), padded)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5)


def test_eager_attention_takes_the_packed_mask(tiny_model, tiny_tok):
    rows = [encode_sft(e, tiny_tok, 96) for e in _sft()]
    padded = SFTCollator(tiny_tok.pad_token_id)(rows)
    packed = SFTCollator(tiny_tok.pad_token_id, pack_length=128)(rows)
    tiny_model.config._attn_implementation = "eager"
    with torch.no_grad():
        want, _, _ = batch_token_logps(tiny_model, padded)
        got, _, _ = batch_token_logps(tiny_model, packed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_cache_shared_by_both_layouts(lora_model, tiny_tok):
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in _pairs()]
    padded = PairCollator(tiny_tok.pad_token_id)(rows)
    packed = PairCollator(tiny_tok.pad_token_id, pack_length=96)(rows)
    ref = ReferenceLogps(None)
    want = ref(lora_model, padded)
    got = ref(lora_model, packed)  # every sequence found under the padded layout's key
    assert ref.misses == 10 and ref.hits == 10 and torch.equal(got, want)
    fresh = ReferenceLogps(None)
    torch.testing.assert_close(fresh(lora_model, packed), want, atol=1e-5, rtol=0)
    snap = ReferenceLogps(None)
    assert snap.snapshot(lora_model, [packed]) == 10
    with torch.no_grad():
        policy, _ = batch_sequence_logps(lora_model, padded)
    torch.testing.assert_close(snap(lora_model, padded), policy, atol=1e-5, rtol=0)


def test_packing_unsupported_names_the_reason(tiny_model):
    assert packing_unsupported(tiny_model, 512) is None
    tiny_model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in packing_unsupported(tiny_model, 512)
    tiny_model.config._attn_implementation = "sdpa"
    tiny_model.config.sliding_window = 128
    tiny_model.config.use_sliding_window = True
    assert "sliding window (128 tokens)" in packing_unsupported(tiny_model, 512)
    assert packing_unsupported(tiny_model, 100) is None  # a window longer than every sequence never bites


def test_sdpa_runs_attention_per_document(lora_model, tiny_tok, monkeypatch):
    from paft.models import attention

    assert lora_model.get_base_model().config._attn_implementation == "sdpa"
    calls = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda m, q, *a, **kw: calls.append(q.shape[2]) or real(m, q, *a, **kw))
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in _pairs()]
    packed = PairCollator(tiny_tok.pad_token_id, pack_length=4096)(rows)
    with torch.no_grad():
        got, _ = batch_sequence_logps(lora_model, packed)
        want, _ = batch_sequence_logps(lora_model, PairCollator(tiny_tok.pad_token_id)(rows))
    layers = lora_model.get_base_model().config.num_hidden_layers
    lengths = sorted(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    assert sorted(calls) == sorted(lengths * layers)  # one call per document and layer, over that document only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert lora_model.get_base_model().config._attn_implementation == "sdpa"  # restored after the forward
