"""Delta sparsity statistics on hand-made deltas and on a tiny LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from paft.errors import PaftError
from paft.merge.deltas import LoraDeltas, open_state
from paft.sparsity import delta_sparsity, model_sparsity, module_type

Q0, UP, Q1 = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.1.self_attn.q_proj.weight")
DELTAS = [
    (Q0, torch.tensor([[0.0, 5e-7], [-5e-6, 5e-5]])),
    (UP, torch.tensor([[5e-4, -2e-3, 0.0], [0.0, 0.0, 0.0]])),
    (Q1, torch.zeros(2)),
]
RMS = {Q0: 0.01, UP: 1.0, Q1: 0.5}


def approx(x):
    return pytest.approx(x, rel=1e-6, abs=1e-12)


def test_hand_made_deltas():
    out = delta_sparsity(DELTAS, RMS)
    json.dumps(out)
    q0 = out["modules"][Q0]
    assert q0 == {"numel": 4, "abs<=1e-06": 0.5, "abs<=1e-05": 0.75, "abs<=0.0001": 1.0,
                  "rel<=0.001": 0.75, "rel<=0.01": 1.0,  # thresholds 1e-5 and 1e-4 for rms 0.01
                  "mean_abs": approx(5.55e-5 / 4), "max_abs": approx(5e-5), "l1": approx(5.55e-5)}
    up = out["modules"][UP]
    assert up["abs<=1e-06"] == pytest.approx(4 / 6) and up["abs<=0.0001"] == pytest.approx(4 / 6)
    assert up["rel<=0.001"] == pytest.approx(5 / 6) and up["rel<=0.01"] == 1.0
    assert out["modules"][Q1]["abs<=1e-06"] == 1.0 and out["modules"][Q1]["l1"] == 0.0

    overall = out["overall"]
    assert overall["numel"] == 12
    assert overall["abs<=1e-06"] == pytest.approx(8 / 12)
    assert overall["abs<=1e-05"] == pytest.approx(9 / 12)
    assert overall["abs<=0.0001"] == pytest.approx(10 / 12)
    assert overall["rel<=0.001"] == pytest.approx(10 / 12)
    assert overall["rel<=0.01"] == 1.0
    assert overall["l1"] == approx(5.55e-5 + 2.5e-3)
    assert overall["mean_abs"] == approx((5.55e-5 + 2.5e-3) / 12)
    assert overall["max_abs"] == approx(2e-3)

    assert set(out["by_type"]) == {"q_proj", "up_proj"}
    q = out["by_type"]["q_proj"]
    assert q["numel"] == 6 and q["abs<=1e-06"] == pytest.approx(4 / 6) and q["abs<=1e-05"] == pytest.approx(5 / 6)
    assert out["by_type"]["up_proj"] == out["modules"][UP]


def test_without_base_and_with_callable():
    out = delta_sparsity(DELTAS, None, absolute=(1e-5,), relative=(1e-2,))
    assert set(out["overall"]) == {"numel", "abs<=1e-05", "mean_abs", "max_abs", "l1"}
    assert delta_sparsity(DELTAS, RMS.__getitem__) == delta_sparsity(DELTAS, RMS)


def test_refusals():
    with pytest.raises(PaftError, match="no base RMS for model.layers.1"):
        delta_sparsity(DELTAS, {Q0: 1.0, UP: 1.0})
    with pytest.raises(PaftError, match="no deltas"):
        delta_sparsity([], None)


def test_module_type():
    assert module_type(Q0) == "q_proj" and module_type("model.norm.weight") == "norm"


def test_model_sparsity(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "fresh")  # lora_B starts at zero: every delta is exactly 0
    fresh = model_sparsity(tmp_path / "fresh", tmp_path / "base")
    assert len(fresh["modules"]) == 7 and fresh["overall"]["abs<=1e-06"] == 1.0 and fresh["overall"]["l1"] == 0.0

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    model.save_pretrained(tmp_path / "trained")
    out = model_sparsity(tmp_path / "trained", tmp_path / "base", absolute=(1e-5,), relative=(1e-2,))
    name = "model.layers.0.self_attn.v_proj.weight"
    delta = dict(LoraDeltas(tmp_path / "trained"))[name]
    rms = open_state(tmp_path / "base").get(name).pow(2).mean().sqrt()
    assert out["modules"][name]["rel<=0.01"] == pytest.approx((delta.abs() <= 1e-2 * rms).float().mean().item())
    assert 0.0 < out["overall"]["abs<=1e-05"] < 1.0
