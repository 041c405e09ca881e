import math

import pytest
import torch

from paft.config import LoraConfig
from paft.data.collate import SFTCollator
from paft.data.formats import SFTExample
from paft.data.tokenize import encode_sft
from paft.methods.losses import LOSSES, PairLogps, dpo_loss
from paft.train.lora import attach_lora, l1_delta_norm, lora_modules
from paft.train.sft import SFTObjective


def test_dpo_closed_form():
    lp = PairLogps(policy_chosen=torch.tensor([-10.0, -5.0, -3.0]), policy_rejected=torch.tensor([-12.0, -5.0, -1.0]),
                   ref_chosen=torch.tensor([-11.0, -5.0, -2.0]), ref_rejected=torch.tensor([-11.0, -5.0, -2.0]))
    beta = 0.5
    # margins h_w - h_l: (1 - (-1)) = 2, 0, (-1 - 1) = -2
    want = [math.log1p(math.exp(-beta * m)) for m in (2.0, 0.0, -2.0)]
    torch.testing.assert_close(dpo_loss(lp, beta), torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert dpo_loss(lp, beta)[1].item() == pytest.approx(math.log(2))


def test_dpo_large_margin_is_finite():
    big = torch.tensor([1e4])
    lp = PairLogps(big, -big, torch.zeros(1), torch.zeros(1))
    assert dpo_loss(lp, 1.0).item() == 0.0
    lp = PairLogps(-big, big, torch.zeros(1), torch.zeros(1))
    assert dpo_loss(lp, 1.0).item() == pytest.approx(2e4)
    assert LOSSES["dpo"].reference and LOSSES["dpo"].data == "pairs"


def _lora_model(tiny_model, seed=0):
    model = attach_lora(tiny_model, LoraConfig(r=4, alpha=8), seed)
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model):  # B starts at zero; give it values so the delta is non-zero
        m.lora_B["default"].weight.data = torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.1
    return model


def test_l1_equals_norm_of_merged_delta(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = _lora_model(tiny_model)
    l1 = l1_delta_norm(model).item()
    merged = model.merge_and_unload().state_dict()
    want = sum((merged[k] - base[k]).abs().sum().item() for k in base if k in merged)
    assert l1 == pytest.approx(want, rel=1e-5)


def test_sft_objective_adds_lambda_times_l1_and_its_gradient(tiny_model, tiny_tok):
    model = _lora_model(tiny_model)
    ex = SFTExample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    batch = SFTCollator(tiny_tok.pad_token_id)([encode_sft(ex, tiny_tok, 64)])
    lam = 1e-3
    loss0, m0 = SFTObjective(0.0)(model, batch)
    loss1, m1 = SFTObjective(lam)(model, batch)
    assert "l1_delta" not in m0
    assert loss1.item() - loss0.item() == pytest.approx(lam * m1["l1_delta"], rel=1e-4)
    # d/dB of lambda*||B A s||_1 = lambda * s * sign(B A s) A^T
    mod = lora_modules(model)[0]
    model.zero_grad()
    (lam * l1_delta_norm(model)).backward()
    a, b, s = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]
    want = lam * s * torch.sign(b @ a * s) @ a.T
    torch.testing.assert_close(mod.lora_B["default"].weight.grad, want, rtol=1e-5, atol=1e-8)


def test_every_method_data_kind_is_a_row_of_the_data_kind_tables():
    from paft.data.formats import DATA_KINDS as FORMAT_KINDS
    from paft.train.preference import DATA_KINDS

    assert {s.data for s in LOSSES.values()} == set(FORMAT_KINDS) == set(DATA_KINDS) - {"sft"}
    # sampled kinds build their rows each round (from_samples), in the shape of an offline kind
    assert DATA_KINDS["online"].logps is DATA_KINDS["pairs"].logps and DATA_KINDS["groups"].logps is DATA_KINDS["ranked"].logps
    assert {k for k, v in DATA_KINDS.items() if v.from_samples is not None} == {"online", "groups"}
    assert all(DATA_KINDS[k].logps is not None for k in FORMAT_KINDS) and DATA_KINDS["sft"].logps is None
