"""Merge methods against hand-computed values and PEFT, LoRA deltas against PEFT, and the merge engine."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from paft.errors import PaftError
from paft.merge import engine
from paft.merge.deltas import checkpoint_deltas, lora_deltas, open_state
from paft.merge.engine import merge_into_base
from paft.merge.methods import (MERGE_METHODS, dare_drop, elect_sign, merge_deltas, tensor_generator,
                                trim_magnitude)

T = torch.tensor
D1 = T([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
D2 = T([[-1.0, 1.0, 2.0], [0.5, -3.0, 1.0]])
D3 = T([[0.5, 0.5, -1.0], [-2.0, 1.0, 0.25]])


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, atol=tol, rtol=0)


# --- methods: hand-computed -----------------------------------------------------------------------

def test_registry():
    assert set(MERGE_METHODS) == {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"}


def test_linear_and_task_arithmetic():
    lin = merge_deltas("linear", [D1, D2], [1, 3])
    assert close(lin, T([[-0.5, 0.25, 2.25], [0.5, -2.25, 0.5]]))
    ta = merge_deltas("task_arithmetic", [D1, D2], [1, 3])
    assert close(ta, T([[-2.0, 1.0, 9.0], [2.0, -9.0, 2.0]]))
    assert close(merge_deltas("linear", [D1, D2], [1, 3], normalize=False), ta)
    assert lin.dtype == torch.float32
    assert merge_deltas("task_arithmetic", [D1.bfloat16()], [1.0]).dtype == torch.float32


def test_ties_total_dense():
    # weighted deltas: D1, D2, 2*D3; sign by summed mass (0 elects +); divide by agreeing weights
    out = merge_deltas("ties", [D1, D2, D3], [1, 1, 2])
    assert close(out, T([[2 / 3, 2 / 3, 2.5], [-2.0, -3.0, 0.5]]))
    raw = merge_deltas("ties", [D1, D2, D3], [1, 1, 2], normalize=False)
    assert close(raw, T([[2.0, 2.0, 5.0], [-4.0, -3.0, 1.5]]))


def test_ties_count():
    # (1,0): signs +,+,- elect + although the mass is negative; (1,1): 0,-,+ ties -> +
    out = merge_deltas("ties", [D1, D2, D3], [1, 1, 2], majority_sign="count")
    assert close(out, T([[2 / 3, 2 / 3, 2.5], [0.5, 1.0, 0.5]]))


def test_ties_density_trim():
    # top 3 of 6 per task, equal magnitudes kept by lowest index:
    # D1 -> [[1,-2,3],[0,0,0]], D2 -> [[-1,0,2],[0,-3,0]], D3 -> [[0,0,-1],[-2,1,0]]
    out = merge_deltas("ties", [D1, D2, D3], [1, 1, 2], density=0.5)
    assert close(out, T([[1.0, -2.0, 2.5], [-2.0, -3.0, 0.0]]))
    assert torch.equal(trim_magnitude(T([1.0, 1.0, 1.0, 1.0]), 0.5), T([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(trim_magnitude(T([0.1, -5.0, 0.2]), 0.1), T([0.0, -5.0, 0.0]))  # keeps at least one


def test_dare_density_one_is_plain():
    assert torch.equal(merge_deltas("dare_linear", [D1, D2], [1, 3]), merge_deltas("task_arithmetic", [D1, D2], [1, 3]))
    ds, w = [D1, D2, D3], [1, 1, 2]
    assert torch.equal(merge_deltas("dare_ties", ds, w), merge_deltas("ties", ds, w))


def test_dare_drop_share_and_exact_rescale():
    d = torch.randn(400, 250, generator=torch.Generator().manual_seed(0))
    out = dare_drop(d, 0.3, tensor_generator(0, "w"))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.equal(out[kept], d[kept] / 0.3)


def test_dare_determinism():
    big = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for method in ("dare_linear", "dare_ties"):
        a = merge_deltas(method, big, [1, 1], density=0.5, generator=tensor_generator(7, "layers.0.q_proj.weight"))
        b = merge_deltas(method, big, [1, 1], density=0.5, generator=tensor_generator(7, "layers.0.q_proj.weight"))
        c = merge_deltas(method, big, [1, 1], density=0.5, generator=tensor_generator(7, "layers.1.q_proj.weight"))
        e = merge_deltas(method, big, [1, 1], density=0.5, generator=tensor_generator(8, "layers.0.q_proj.weight"))
        assert torch.equal(a, b)
        assert not torch.equal(a, c) and not torch.equal(a, e)


def test_dare_linear_hand_computed_with_mask():
    # Reproduce the generator's two masks (one per task, drawn in order) and compute by hand.
    g = tensor_generator(3, "x")
    m1, m2 = (torch.bernoulli(torch.full((2, 3), 0.5), generator=g) for _ in range(2))
    expected = (1 * D1 * m1 + 3 * D2 * m2) / 0.5
    assert close(merge_deltas("dare_linear", [D1, D2], [1, 3], density=0.5, generator=tensor_generator(3, "x")),
                 expected)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(method="nope", deltas=[D1], weights=[1]), "unknown merge method 'nope'; known: linear"),
    (dict(method="ties", deltas=[D1, D2], weights=[1]), "got 1 weights for 2 deltas"),
    (dict(method="ties", deltas=[D1, D2], weights=[1, 1], density=0.0), "density must be in (0, 1]"),
    (dict(method="ties", deltas=[D1, D2], weights=[1, 1], density=1.5), "density must be in (0, 1]"),
    (dict(method="ties", deltas=[D1, D2.T], weights=[1, 1]), "delta 1 has shape (3, 2), delta 0 has (2, 3)"),
    (dict(method="linear", deltas=[D1, D2 * float("nan")], weights=[1, 1]), "delta 1 contains NaN or inf"),
    (dict(method="linear", deltas=[D1, D2], weights=[1, -1]), "weights sum to zero"),
    (dict(method="ties", deltas=[D1], weights=[1], majority_sign="vote"), "majority_sign must be one of"),
])
def test_bad_inputs(kwargs, msg):
    with pytest.raises(PaftError) as exc:
        merge_deltas(kwargs.pop("method"), kwargs.pop("deltas"), kwargs.pop("weights"), **kwargs)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


# --- methods: against PEFT's merge_utils ---------------------------------------------------------

def _rand(n, seed, shape=(16, 24)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_peft_task_arithmetic_and_trim():
    ds = _rand(3, 0)
    w = [0.5, 1.0, 2.0]
    assert close(merge_deltas("task_arithmetic", ds, w), merge_utils.task_arithmetic(ds, T(w)), 1e-5)
    for d in ds:  # no equal magnitudes in random data, so top-k sets coincide
        assert torch.equal(trim_magnitude(d, 0.3), merge_utils.prune(d, 0.3, method="magnitude"))


def test_peft_sign_election():
    stacked = torch.stack(_rand(3, 1))
    for ours, theirs in (("total", "total"), ("count", "frequency")):
        mask = stacked.sign() == elect_sign(stacked, ours)
        assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method=theirs))


def test_peft_dare_with_same_mask():
    ds = _rand(2, 2)
    torch.manual_seed(11)  # PEFT draws its masks from the global RNG, task by task, like paft's generator
    theirs_lin = merge_utils.dare_linear(ds, T([1.0, 0.5]), 0.4)
    torch.manual_seed(11)
    theirs_ties = merge_utils.dare_ties(ds, T([1.0, 1.0]), 0.4)
    ours_lin = merge_deltas("dare_linear", ds, [1.0, 0.5], density=0.4, generator=torch.Generator().manual_seed(11))
    ours_ties = merge_deltas("dare_ties", ds, [1.0, 1.0], density=0.4, generator=torch.Generator().manual_seed(11))
    assert close(ours_lin, theirs_lin, 1e-5)
    assert close(ours_ties, theirs_ties, 1e-5)  # unit weights: weight sum == agreeing count


@pytest.mark.filterwarnings("ignore:The density")
def test_peft_ties_documented_difference():
    # Unit weights: identical. Unequal weights: PEFT divides by the agreeing *count*, paft
    # (like mergekit) by the agreeing *weights*; with all signs agreeing that is a factor sum(w)/n.
    ds = _rand(2, 3)
    assert close(merge_deltas("ties", ds, [1, 1], density=0.5), merge_utils.ties(ds, T([1.0, 1.0]), 0.5), 1e-5)
    pos = [d.abs() + 0.1 for d in ds]
    ours = merge_deltas("ties", pos, [1, 3])
    theirs = merge_utils.ties(pos, T([1.0, 3.0]), 1.0)
    assert close(ours, (1 * pos[0] + 3 * pos[1]) / 4, 1e-5)
    assert close(theirs, ours * 4 / 2, 1e-5)


def test_tensor_generator_stable():
    a = torch.rand(5, generator=tensor_generator(0, "a"))
    assert torch.equal(a, torch.rand(5, generator=tensor_generator(0, "a")))
    assert not torch.equal(a, torch.rand(5, generator=tensor_generator(0, "b")))
    assert not torch.equal(a, torch.rand(5, generator=tensor_generator(1, "a")))


# --- LoRA deltas and the engine on a tiny Llama -----------------------------------------------------

def _lora(base_dir, out_dir, seed, **cfg):
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    base = root / "base"
    return {
        "root": root, "base": base,
        "A": _lora(base, root / "A", 1, r=4, lora_alpha=8, target_modules="all-linear"),
        # rank/alpha patterns plus a full tensor (modules_to_save) to diff against the base
        "B": _lora(base, root / "B", 2, r=4, lora_alpha=8, target_modules="all-linear",
                   rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 16}, modules_to_save=["model.norm"]),
        # rsLoRA on two module types only
        "C": _lora(base, root / "C", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    }


def _peft_merged(base_dir, *adapters):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    for ad in adapters:
        model = PeftModel.from_pretrained(model, ad).merge_and_unload()
    return model


def _base_state(base_dir):
    st = open_state(base_dir)
    return {k: st.get(k) for k in st.keys()}


@pytest.mark.parametrize("which", ["A", "B", "C"])
def test_lora_deltas_match_peft_merge(tiny, which):
    base = _base_state(tiny["base"])
    merged = _peft_merged(tiny["base"], tiny[which]).state_dict()
    ours = dict(lora_deltas(tiny[which], tiny["base"]))
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == set(ours)
    for k, d in ours.items():
        assert close(d, merged[k] - base[k])
    assert ("model.norm.weight" in ours) == (which == "B")


def test_lora_deltas_fan_in_fan_out_and_embedding(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(tmp_path / "ad")
    base = _base_state(tmp_path / "base")
    merged = model.merge_and_unload().state_dict()
    ours = dict(lora_deltas(tmp_path / "ad"))
    assert set(ours) == {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"}
    for k, d in ours.items():
        assert close(d, merged[k] - base[k])


def test_lora_deltas_refusals(tiny, tmp_path):
    with pytest.raises(PaftError, match="modules_to_save"):
        lora_deltas(tiny["B"])
    with pytest.raises(PaftError, match="adapter_config.json is missing"):
        lora_deltas(tmp_path)
    for patch, msg in (({"peft_type": "IA3"}, "only LoRA adapters"),
                       ({"use_dora": True}, "DoRA adapters are not supported")):
        bad = tmp_path / msg.split()[0]
        bad.mkdir()
        cfg = json.loads((tiny["A"] / "adapter_config.json").read_text()) | patch
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        (bad / "adapter_model.safetensors").write_bytes((tiny["A"] / "adapter_model.safetensors").read_bytes())
        with pytest.raises(PaftError, match=msg):
            lora_deltas(bad)


def test_checkpoint_deltas_and_refusals(tiny, tmp_path):
    full = tmp_path / "fullA"
    _peft_merged(tiny["base"], tiny["A"]).save_pretrained(full)
    lora = dict(lora_deltas(tiny["A"]))
    ckpt = dict(checkpoint_deltas(full, tiny["base"]))
    assert len(ckpt) == len(open_state(tiny["base"]).keys())
    for k, d in ckpt.items():
        assert close(d, lora.get(k, torch.zeros_like(d)))
    for name, tensors in {"x": {"w": torch.zeros(2, 3), "v": torch.zeros(2)},
                          "y": {"w": torch.zeros(3, 2), "v": torch.zeros(2)}, "z": {"w": torch.zeros(2, 3)}}.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    with pytest.raises(PaftError, match=r"w: shape \(2, 3\) in .* but \(3, 2\) in base"):
        checkpoint_deltas(tmp_path / "x", tmp_path / "y")
    with pytest.raises(PaftError, match="tensor v of base .* is missing"):
        checkpoint_deltas(tmp_path / "z", tmp_path / "x")
    with pytest.raises(PaftError, match="tensor v is not in base"):
        checkpoint_deltas(tmp_path / "x", tmp_path / "z")


def test_engine_task_arithmetic_matches_sequential_peft(tiny, tmp_path):
    out = tmp_path / "merged"
    calls = []
    summary = merge_into_base(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], "task_arithmetic", out_dir=out,
                              progress=lambda done, total: calls.append((done, total)))
    base = _base_state(tiny["base"])
    merged = _base_state(out)
    da, db = dict(lora_deltas(tiny["A"])), dict(lora_deltas(tiny["B"], tiny["base"]))
    assert set(merged) == set(base) and "lm_head.weight" not in merged  # tied embeddings stay tied
    for k, w in base.items():
        expected = w + da.get(k, 0) + db.get(k, 0)
        assert close(merged[k], expected)
        if k not in da and k not in db:
            assert torch.equal(merged[k], w)
    assert summary == {"method": "task_arithmetic", "weights": [1.0, 1.0], "density": 1.0, "seed": 0,
                       "tensors_merged": 15, "tensors_total": 20, "out_dir": str(out)}
    meta = json.loads((out / "paft_merge.json").read_text())
    assert meta["branches"] == [str(tiny["A"]), str(tiny["B"])] and meta["base"] == str(tiny["base"])
    assert calls[-1] == (20, 20) and len(calls) == 20
    for f in ("config.json", "generation_config.json"):
        assert (out / f).read_text() == (tiny["base"] / f).read_text()

    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        theirs = _peft_merged(tiny["base"], tiny["A"], tiny["B"])(ids).logits
    assert close(ours, theirs, 1e-5)

    with pytest.raises(PaftError, match="output exists"):
        merge_into_base(tiny["base"], [tiny["A"]], [1], "linear", out_dir=out)
    merge_into_base(tiny["base"], [tiny["A"]], [1], "linear", out_dir=out, force=True)
    assert json.loads((out / "paft_merge.json").read_text())["method"] == "linear"


def test_engine_partial_branch_and_full_checkpoint(tiny, tmp_path):
    # C touches only q/v: it contributes a zero delta elsewhere, so linear halves A's k_proj delta
    merge_into_base(tiny["base"], [tiny["A"], tiny["C"]], [1, 1], "linear", out_dir=tmp_path / "lin")
    base, out = _base_state(tiny["base"]), _base_state(tmp_path / "lin")
    da, dc = dict(lora_deltas(tiny["A"])), dict(lora_deltas(tiny["C"]))
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert close(out[q], base[q] + (da[q] + dc[q]) / 2)
    assert close(out[k], base[k] + da[k] / 2)
    # a full model folder as a branch gives the same result as its adapter
    full = tmp_path / "fullA"
    _peft_merged(tiny["base"], tiny["A"]).save_pretrained(full)
    merge_into_base(tiny["base"], [full, tiny["C"]], [1, 1], "task_arithmetic", out_dir=tmp_path / "ta")
    merged = _base_state(tmp_path / "ta")
    for name, w in base.items():
        assert close(merged[name], w + da.get(name, 0) + dc.get(name, 0))


def test_engine_dare_reproducible_and_sharded(tiny, tmp_path, monkeypatch):
    kw = dict(method="dare_ties", density=0.5, seed=5)
    merge_into_base(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], out_dir=tmp_path / "a", **kw)
    monkeypatch.setattr(engine, "SHARD_BYTES", 20_000)
    merge_into_base(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], out_dir=tmp_path / "b", **kw)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "b" / "model.safetensors").exists()
    assert all((tmp_path / "b" / s).is_file() for s in shards) and "model-00001-of-" in min(shards)
    a, b = _base_state(tmp_path / "a"), _base_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merge_into_base(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], out_dir=tmp_path / "c", **{**kw, "seed": 6})
    c = _base_state(tmp_path / "c")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_engine_dtype_and_refusals(tiny, tmp_path):
    out = tmp_path / "bf16"
    merge_into_base(tiny["base"], [tiny["A"]], [1], "ties", out_dir=out, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in _base_state(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    nan = tmp_path / "nan"
    state = _base_state(tiny["base"])
    state["model.norm.weight"] = state["model.norm.weight"] * float("nan")
    nan.mkdir()
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PaftError, match="model.norm.weight: delta 1 contains NaN"):
        merge_into_base(tiny["base"], [tiny["A"], nan], [1, 1], "linear", out_dir=tmp_path / "o")
    with pytest.raises(PaftError, match="got 1 weights for 2 deltas"):
        merge_into_base(tiny["base"], [tiny["A"], tiny["B"]], [1], "linear", out_dir=tmp_path / "o")
    with pytest.raises(PaftError, match="branch folder does not exist"):
        merge_into_base(tiny["base"], [tmp_path / "missing"], [1], "linear", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
