"""Merge methods against hand-computed values and PEFT, LoRA deltas against PEFT, and the merge engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from paft.errors import PaftError
from paft.merge import engine
from paft.merge.deltas import CheckpointDeltas, LoraDeltas, open_state
from paft.merge.mergekit_config import plan_from_flags
from paft.merge.standalone import run_merge
from paft.merge.methods import (MERGE_METHODS, OWN_FUNCTIONS, check_merge_args, dare_drop, della_drop,
                                della_keep_probs, drop_outliers, elect_sign, merge_deltas, tensor_generator,
                                trim_magnitude)

T = torch.tensor
D1 = T([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
D2 = T([[-1.0, 1.0, 2.0], [0.5, -3.0, 1.0]])
D3 = T([[0.5, 0.5, -1.0], [-2.0, 1.0, 0.25]])


def _merge(base, branches, weights, method, *, out_dir, density=None, seed=0, dtype=None, force=False, workers=None,
           progress=None, **params):
    """A run's merge: the plan its merge section builds, through the one entry point."""
    plan = plan_from_flags(base, branches, method, weights=weights, density=density, params=params, seed=seed,
                           dtype=dtype)
    return run_merge(plan, out_dir, force=force, workers=workers, progress=progress)


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, atol=tol, rtol=0)


# --- methods: hand-computed -----------------------------------------------------------------------

def test_registry():
    assert set(MERGE_METHODS) == {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "magnitude_prune",
                                  "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sign_consensus",
                                  "slerp", "model_stock"}


def test_table_rows_describe_the_methods():
    """The row is the method: what it reads, how it combines, which path runs it, its line in docs/merge.md."""
    readme = (Path(__file__).parent.parent / "docs" / "merge.md").read_text()
    for name, spec in MERGE_METHODS.items():
        assert spec.name == name and f"| `{name}` | {spec.what} |" in readme, name
        assert spec.family == (name not in OWN_FUNCTIONS)
    ties, crumbs, della, slerp = (MERGE_METHODS[n] for n in ("ties", "breadcrumbs", "della", "slerp"))
    assert ties.sparsifier.name == "magnitude" and ties.consensus and ties.normalize and ties.streams
    assert crumbs.uses == ("gamma", "lambda_") and della.uses == ("epsilon", "lambda_") and not della.streams
    assert slerp.uses == ("t",) and slerp.needs_base and not slerp.reference and slerp.needs_base_model
    assert not MERGE_METHODS["linear"].needs_base_model and MERGE_METHODS["model_stock"].reference
    assert MERGE_METHODS["dare_ties"].mergekit_normalize is False and MERGE_METHODS["ties"].mergekit_normalize is None
    assert [n for n, s in MERGE_METHODS.items() if s.rescale] == ["dare_linear", "dare_ties"]


def test_sign_consensus_is_one_row_hand_computed():
    # weighted: D1, D2, 2*D3; elected sign of their sum [[1, 0, 3], [-3, -1, 0.5]] -> [[+, +, +], [-, -, +]];
    # each entry sums the weighted deltas of its sign (a zero never agrees), with no trim
    out = merge_deltas("sign_consensus", [D1, D2, D3], [1, 1, 2])
    assert torch.equal(out, T([[2.0, 2.0, 5.0], [-4.0, -3.0, 1.5]]))
    # normalize divides by the agreeing weights: (0,0) D1 and D3 agree, 2 / (1 + 2); lambda scales the result
    norm = merge_deltas("sign_consensus", [D1, D2, D3], [1, 1, 2], normalize=True, lambda_=0.5)
    assert close(norm, 0.5 * T([[2 / 3, 2 / 3, 5 / 2], [-4 / 2, -3 / 1, 1.5 / 3]]))
    assert torch.equal(out, merge_deltas("ties", [D1, D2, D3], [1, 1, 2], normalize=False))  # ties at density 1


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


def _assert_seeded_per_tensor(method, big, **kw):
    """Same seed and tensor name: bitwise equal; another name or seed: a different mask."""
    def run(seed, name):
        return merge_deltas(method, big, [1, 1], density=0.5, generator=tensor_generator(seed, name), **kw)

    a = run(7, "layers.0.q_proj.weight")
    assert torch.equal(a, run(7, "layers.0.q_proj.weight"))
    assert not torch.equal(a, run(7, "layers.1.q_proj.weight")) and not torch.equal(a, run(8, "layers.0.q_proj.weight"))
    return a


def test_dare_determinism():
    big = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for method in ("dare_linear", "dare_ties"):
        _assert_seeded_per_tensor(method, big)


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
    ours = dict(LoraDeltas(tiny[which], open_state(tiny["base"])))
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
    ours = dict(LoraDeltas(tmp_path / "ad"))
    assert set(ours) == {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"}
    for k, d in ours.items():
        assert close(d, merged[k] - base[k])


def test_lora_deltas_refusals(tiny, tmp_path):
    with pytest.raises(PaftError, match="modules_to_save"):
        LoraDeltas(tiny["B"])
    with pytest.raises(PaftError, match="adapter_config.json is missing"):
        LoraDeltas(tmp_path)
    for patch, msg in (({"peft_type": "IA3"}, "only LoRA adapters"),
                       ({"use_dora": True}, "DoRA adapters are not supported")):
        bad = tmp_path / msg.split()[0]
        bad.mkdir()
        cfg = json.loads((tiny["A"] / "adapter_config.json").read_text()) | patch
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        (bad / "adapter_model.safetensors").write_bytes((tiny["A"] / "adapter_model.safetensors").read_bytes())
        with pytest.raises(PaftError, match=msg):
            LoraDeltas(bad)


def test_checkpoint_deltas_and_refusals(tiny, tmp_path):
    full = tmp_path / "fullA"
    _peft_merged(tiny["base"], tiny["A"]).save_pretrained(full)
    lora = dict(LoraDeltas(tiny["A"]))
    ckpt = dict(CheckpointDeltas(full, open_state(tiny["base"])))
    assert len(ckpt) == len(open_state(tiny["base"]).keys())
    for k, d in ckpt.items():
        assert close(d, lora.get(k, torch.zeros_like(d)))
    for name, tensors in {"x": {"w": torch.zeros(2, 3), "v": torch.zeros(2)},
                          "y": {"w": torch.zeros(3, 2), "v": torch.zeros(2)}, "z": {"w": torch.zeros(2, 3)}}.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    with pytest.raises(PaftError, match=r"w has shape \(2, 3\) but \(3, 2\) in base"):
        CheckpointDeltas(tmp_path / "x", open_state(tmp_path / "y"))
    with pytest.raises(PaftError, match="tensor v of base .* is missing"):
        CheckpointDeltas(tmp_path / "z", open_state(tmp_path / "x"))
    with pytest.raises(PaftError, match="tensor v is not in base"):
        CheckpointDeltas(tmp_path / "x", open_state(tmp_path / "z"))


def test_engine_task_arithmetic_matches_sequential_peft(tiny, tmp_path):
    out = tmp_path / "merged"
    calls = []
    summary = _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], "task_arithmetic", out_dir=out,
                              progress=lambda done, total: calls.append((done, total)))
    base = _base_state(tiny["base"])
    merged = _base_state(out)
    da, db = dict(LoraDeltas(tiny["A"])), dict(LoraDeltas(tiny["B"], open_state(tiny["base"])))
    assert set(merged) == set(base) and "lm_head.weight" not in merged  # tied embeddings stay tied
    for k, w in base.items():
        expected = w + da.get(k, 0) + db.get(k, 0)
        assert close(merged[k], expected)
        if k not in da and k not in db:
            assert torch.equal(merged[k], w)
    timing = {k: summary.pop(k) for k in ("seconds", "workers", "bytes")}
    assert summary == {"method": "task_arithmetic", "base": str(tiny["base"]), "config": "command line",
                       "models": [{"ref": str(tiny[n]), "path": str(tiny[n]), "kind": "lora"} for n in "AB"],
                       "params": {}, "model_params": [{"weight": 1}, {"weight": 1}], "seed": 0, "dtype": None,
                       "tokenizer_source": str(tiny["base"]), "tensors_merged": 15, "tensors_total": 20,
                       "out_dir": str(out)} and timing["bytes"] > 0
    meta = json.loads((out / "paft_merge.json").read_text())
    assert [m["path"] for m in meta["models"]] == [str(tiny["A"]), str(tiny["B"])] and meta["base"] == str(tiny["base"])
    assert calls[-1] == (20, 20) and len(calls) == 20
    for f in ("config.json", "generation_config.json"):
        assert (out / f).read_text() == (tiny["base"] / f).read_text()

    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        theirs = _peft_merged(tiny["base"], tiny["A"], tiny["B"])(ids).logits
    assert close(ours, theirs, 1e-5)

    with pytest.raises(PaftError, match="output exists"):
        _merge(tiny["base"], [tiny["A"]], [1], "linear", out_dir=out)
    _merge(tiny["base"], [tiny["A"]], [1], "linear", out_dir=out, force=True)
    assert json.loads((out / "paft_merge.json").read_text())["method"] == "linear"


def test_engine_partial_branch_and_full_checkpoint(tiny, tmp_path):
    # C touches only q/v: it contributes a zero delta elsewhere, so linear halves A's k_proj delta
    _merge(tiny["base"], [tiny["A"], tiny["C"]], [1, 1], "linear", out_dir=tmp_path / "lin")
    base, out = _base_state(tiny["base"]), _base_state(tmp_path / "lin")
    da, dc = dict(LoraDeltas(tiny["A"])), dict(LoraDeltas(tiny["C"]))
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert close(out[q], base[q] + (da[q] + dc[q]) / 2)
    assert close(out[k], base[k] + da[k] / 2)
    # a full model folder as a branch gives the same result as its adapter
    full = tmp_path / "fullA"
    _peft_merged(tiny["base"], tiny["A"]).save_pretrained(full)
    _merge(tiny["base"], [full, tiny["C"]], [1, 1], "task_arithmetic", out_dir=tmp_path / "ta")
    merged = _base_state(tmp_path / "ta")
    for name, w in base.items():
        assert close(merged[name], w + da.get(name, 0) + dc.get(name, 0))


def test_engine_dare_reproducible_and_sharded(tiny, tmp_path, monkeypatch):
    kw = dict(method="dare_ties", density=0.5, seed=5)
    _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], out_dir=tmp_path / "a", **kw)
    monkeypatch.setattr(engine, "SHARD_BYTES", 20_000)
    _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], out_dir=tmp_path / "b", **kw)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "b" / "model.safetensors").exists()
    assert all((tmp_path / "b" / s).is_file() for s in shards) and "model-00001-of-" in min(shards)
    a, b = _base_state(tmp_path / "a"), _base_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], out_dir=tmp_path / "c", **{**kw, "seed": 6})
    c = _base_state(tmp_path / "c")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_engine_dtype_and_refusals(tiny, tmp_path):
    out = tmp_path / "bf16"
    _merge(tiny["base"], [tiny["A"]], [1], "ties", out_dir=out, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in _base_state(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    nan = tmp_path / "nan"
    state = _base_state(tiny["base"])
    state["model.norm.weight"] = state["model.norm.weight"] * float("nan")
    nan.mkdir()
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PaftError, match="model.norm.weight: delta 1 contains NaN"):
        _merge(tiny["base"], [tiny["A"], nan], [1, 1], "linear", out_dir=tmp_path / "o")
    with pytest.raises(PaftError, match="got 3 values for 2 models"):
        _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1, 1], "linear", out_dir=tmp_path / "o")
    with pytest.raises(PaftError, match="missing' is not a local folder"):
        _merge(tiny["base"], [tmp_path / "missing"], [1], "linear", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --- magnitude_prune, breadcrumbs, DELLA, slerp, model_stock --------------------------------------

B1 = T([0.3, -1.0, 0.1, 0.9, -0.5, 0.2, -0.8, 0.4, 0.7, -0.6])
B2 = T([-0.2, 0.5, -0.9, -0.8, 1.0, -0.1, 0.3, 0.7, -0.4, 0.6])


def test_magnitude_prune_hand_computed_and_peft():
    # top 3 of 6: D1 -> [[1,-2,3],[0,0,0]], D2 -> [[-1,0,2],[0,-3,0]] (equal magnitudes: lowest index)
    out = merge_deltas("magnitude_prune", [D1, D2], [1, 3], density=0.5)
    assert close(out, T([[-2.0, -2.0, 9.0], [0.0, -9.0, 0.0]]))
    assert close(merge_deltas("magnitude_prune", [D1, D2], [1, 3], density=0.5, normalize=True),
                 T([[-0.5, -0.5, 2.25], [0.0, -2.25, 0.0]]))
    ds, w = _rand(3, 4), [0.5, 1.0, 2.0]
    assert close(merge_deltas("magnitude_prune", ds, w, density=0.3), merge_utils.magnitude_prune(ds, T(w), 0.3), 1e-5)
    assert torch.equal(merge_deltas("magnitude_prune", ds, w), merge_deltas("task_arithmetic", ds, w))


def test_breadcrumbs_drops_top_gamma_keeps_next_density():
    # n = 10: gamma 0.1 drops the single largest |d|, density 0.3 keeps the next 3, the rest is zeroed
    assert torch.equal(drop_outliers(B1, 0.3, 0.1), T([0, 0, 0, 0.9, 0, 0, -0.8, 0, 0.7, 0]))
    assert torch.equal(drop_outliers(B2, 0.3, 0.1), T([0, 0, -0.9, -0.8, 0, 0, 0, 0.7, 0, 0]))
    assert torch.equal(drop_outliers(B1, 0.3, 0.2), T([0, 0, 0, 0, 0, 0, -0.8, 0, 0.7, -0.6]))
    assert torch.equal(drop_outliers(B1, 0.3, 0.0), trim_magnitude(B1, 0.3))  # gamma 0: plain magnitude trim
    assert torch.equal(drop_outliers(B1, 0.5, 0.5), T([0.3, 0, 0.1, 0, -0.5, 0.2, 0, 0.4, 0, 0]))  # bottom half
    assert torch.equal(drop_outliers(T([0.1, -5.0, 0.2]), 0.2, 0.4), T([0.0, 0.0, 0.2]))  # keeps at least one
    assert torch.equal(drop_outliers(B1, 1.0, 0.1), B1)  # density 1: unchanged, as in mergekit
    # drop share on a big tensor: exactly int(gamma n) outliers and int(density n) kept
    d = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    out = drop_outliers(d, 0.2, 0.05)
    order = d.abs().flatten().argsort(descending=True)
    kept = out.flatten() != 0
    assert not kept[order[:500]].any() and kept[order[500:2500]].all() and not kept[order[2500:]].any()


def test_breadcrumbs_and_breadcrumbs_ties_hand_computed():
    # masked: m1 = [0,0,0,.9,0,0,-.8,0,.7,0], m2 = [0,0,-.9,-.8,0,0,0,.7,0,0]; weights 1, 2
    kw = dict(density=0.3, gamma=0.1)
    assert close(merge_deltas("breadcrumbs", [B1, B2], [1, 2], **kw),
                 T([0, 0, -1.8, -0.7, 0, 0, -0.8, 1.4, 0.7, 0]))
    # TIES at index 3: 0.9 - 1.6 < 0 elects -, so only branch 2's -1.6 stays; not normalised by default
    assert close(merge_deltas("breadcrumbs_ties", [B1, B2], [1, 2], **kw),
                 T([0, 0, -1.8, -1.6, 0, 0, -0.8, 1.4, 0.7, 0]))
    assert close(merge_deltas("breadcrumbs_ties", [B1, B2], [1, 2], normalize=True, **kw),
                 T([0, 0, -0.9, -0.8, 0, 0, -0.8, 0.7, 0.7, 0]))
    ds, w = [D1, D2, D3], [1, 1, 2]
    assert torch.equal(merge_deltas("breadcrumbs", ds, w), merge_deltas("task_arithmetic", ds, w))
    assert torch.equal(merge_deltas("breadcrumbs_ties", ds, w, normalize=True), merge_deltas("ties", ds, w))


def test_della_keep_probabilities_by_rank():
    # density 0.5, epsilon 0.2: ranks 0..4 by |d| within the row map linearly onto [0.3, 0.7]
    p = della_keep_probs(T([[0.1, -0.4, 0.3, 0.2, -0.5], [5.0, 4.0, 3.0, 2.0, 1.0]]), 0.5, 0.2)
    assert close(p, T([[0.3, 0.6, 0.5, 0.4, 0.7], [0.7, 0.6, 0.5, 0.4, 0.3]]))
    assert close(della_keep_probs(D1, 0.5, 0.2), T([[0.3, 0.5, 0.7], [0.5, 0.3, 0.7]]))
    assert close(della_keep_probs(T([1.0, -1.0, 1.0]), 0.5, 0.1), T([0.4, 0.5, 0.6]))  # 1-D: one row, ties by index
    assert close(della_keep_probs(T([[2.0], [3.0]]), 0.4, 0.1), T([[0.4], [0.4]]))  # one-entry rows: density
    p3 = della_keep_probs(torch.arange(24.0).view(2, 3, 4), 0.5, 0.15)  # rows = first dim
    assert close(p3.view(2, 12), (0.35 + 0.3 * torch.arange(12.0) / 11).expand(2, 12))
    assert close(della_keep_probs(T([[0.5, 0.2, 0.9]]), 0.85, 0.15), T([[0.85, 0.7, 1.0]]))  # density + eps = 1
    # empirical keep frequency per rank over many identical rows
    row = T([0.1, -0.4, 0.3, 0.2, -0.5])
    kept = (della_drop(row.expand(20000, 5).contiguous(), 0.5, 0.2, tensor_generator(0, "p")) != 0).float().mean(0)
    assert close(kept, T([0.3, 0.6, 0.5, 0.4, 0.7]), 0.02)


def test_della_hand_computed_with_mask():
    # Reproduce the generator's two masks (one per task, drawn in order) and compute by hand.
    p1, p2 = della_keep_probs(D1, 0.5, 0.2), della_keep_probs(D2, 0.5, 0.2)
    g = tensor_generator(3, "x")
    m1, m2 = torch.bernoulli(p1, generator=g), torch.bernoulli(p2, generator=g)
    t1, t2 = D1 * m1 / p1, 3 * D2 * m2 / p2
    kw = dict(density=0.5, epsilon=0.2, lambda_=1.5)
    assert close(merge_deltas("della_linear", [D1, D2], [1, 3], generator=tensor_generator(3, "x"), **kw),
                 1.5 * (t1 + t2), 1e-5)
    s = torch.where(t1 + t2 >= 0, 1.0, -1.0)
    a1, a2 = (t1.sign() == s).float(), (t2.sign() == s).float()
    div = torch.where(a1 + 3 * a2 == 0, 1.0, a1 + 3 * a2)
    assert close(merge_deltas("della", [D1, D2], [1, 3], generator=tensor_generator(3, "x"), **kw),
                 1.5 * (a1 * t1 + a2 * t2) / div, 1e-5)


def test_della_determinism_dare_limit_and_density_one():
    big = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for method in ("della", "della_linear"):
        a = _assert_seeded_per_tensor(method, big)
        doubled = merge_deltas(method, big, [1, 1], density=0.5, lambda_=2.0,
                               generator=tensor_generator(7, "layers.0.q_proj.weight"))
        assert torch.equal(doubled, 2 * a)
    # epsilon 0: every entry kept with probability density, i.e. DARE with the same draws
    for della_m, dare_m in (("della", "dare_ties"), ("della_linear", "dare_linear")):
        assert close(merge_deltas(della_m, big, [1, 2], density=0.4, epsilon=0.0, generator=tensor_generator(1, "w")),
                     merge_deltas(dare_m, big, [1, 2], density=0.4, generator=tensor_generator(1, "w")))
    # density 1: no sampling at all (epsilon unused)
    ds, w = [D1, D2, D3], [1, 1, 2]
    assert torch.equal(merge_deltas("della", ds, w), merge_deltas("ties", ds, w))
    assert torch.equal(merge_deltas("della_linear", ds, w), merge_deltas("task_arithmetic", ds, w))


def test_della_unbiased_in_expectation():
    # 200 identical rows x 200 seeds = 40,000 draws per column; E[m d / p] = d (p >= 0.1: ~1.5% noise)
    row = torch.linspace(-1.0, 1.0, 16)
    row = row + 0.01 * torch.sign(row)  # no zeros
    d = row.expand(200, 16).contiguous()
    total = torch.zeros(16)
    for seed in range(200):
        total += della_drop(d, 0.3, 0.2, tensor_generator(seed, "u")).mean(0)
    assert torch.allclose(total / 200, row, rtol=0.06, atol=0)
    # and through merge_deltas: della_linear with one branch, weight 1
    mean = sum(merge_deltas("della_linear", [d], [1.0], density=0.3, epsilon=0.2, generator=tensor_generator(s, "v"))
               for s in range(200)) / 200
    assert torch.allclose(mean.mean(0), row, rtol=0.06, atol=0)


def test_slerp_hand_computed():
    s2 = 2 ** -0.5
    # orthogonal unit vectors (base 0): the midpoint is (a + b)/sqrt(2), still of norm 1
    mid = merge_deltas("slerp", [T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])], [1, 1], base=torch.zeros(3))
    assert close(mid, T([s2, s2, 0.0])) and abs(mid.norm().item() - 1.0) < 1e-6
    # the same on full weights with a non-zero base: v0 = base + d0 = e1, v1 = base + d1 = e2; returns a delta
    base = T([1.0, 1.0, 0.0, 0.0])
    d0, d1 = T([0.0, -1.0, 0.0, 0.0]), T([-1.0, 0.0, 0.0, 0.0])
    assert close(merge_deltas("slerp", [d0, d1], [1, 1], base=base), T([s2 - 1, s2 - 1, 0.0, 0.0]))
    assert close(merge_deltas("slerp", [d0, d1], [1, 1], base=base, t=0.0), d0)
    assert close(merge_deltas("slerp", [d0, d1], [1, 1], base=base, t=1.0), d1)
    # t = 1/3 of a right angle is 30 degrees: (cos 30, sin 30)
    third = merge_deltas("slerp", [T([1.0, 0.0]), T([0.0, 1.0])], [1, 1], base=torch.zeros(2), t=1 / 3)
    assert close(third, T([3 ** 0.5 / 2, 0.5]))
    # unequal norms: coefficients sin(pi/4)/sin(pi/2) = 1/sqrt(2) on the raw vectors, as mergekit does
    assert close(merge_deltas("slerp", [T([2.0, 0.0]), T([0.0, 4.0])], [1, 1], base=torch.zeros(2)),
                 T([2 * s2, 4 * s2]), 1e-5)
    assert merge_deltas("slerp", [T([[1.0, 0.0]]), T([[0.0, 1.0]])], [3, 1], base=torch.zeros(1, 2)).shape == (1, 2)


def test_slerp_colinear_fallback_is_lerp():
    base = T([0.5, -0.5, 1.0])
    v0 = T([1.0, 2.0, 3.0])
    for v1 in (2 * v0, -v0, v0 + T([0.0, 0.0, 0.01])):  # |cos| > 0.9995 (the last: cos ~ 0.99999)
        out = merge_deltas("slerp", [v0 - base, v1 - base], [1, 1], base=base, t=0.25)
        assert close(base + out, 0.75 * v0 + 0.25 * v1)
    zero = merge_deltas("slerp", [-base, v0 - base], [1, 1], base=base, t=0.25)  # a zero-norm side: lerp
    assert close(base + zero, 0.25 * v0)


def test_model_stock_hand_computed():
    d = T([[0.3, -0.2], [0.1, 0.4]])
    assert close(merge_deltas("model_stock", [d, d], [1, 1]), d)  # cos 1 -> t 1: the fine-tuned tensor
    assert close(merge_deltas("model_stock", [d, d, d], [1, 1, 1]), d)
    assert torch.equal(merge_deltas("model_stock", [T([1.0, 0.0]), T([0.0, 2.0])], [1, 1]), T([0.0, 0.0]))  # t 0
    # k = 2, cos = 1/sqrt(2): t = 2c / (1 + c) = 2 (sqrt 2 - 1); delta = t * mean
    t2 = 2 * (2 ** 0.5 - 1)
    assert close(merge_deltas("model_stock", [T([1.0, 0.0]), T([1.0, 1.0])], [1, 1]), t2 * T([1.0, 0.5]))
    # k = 3, pairwise cos 0, 1/sqrt 2, 1/sqrt 2 -> mean c = sqrt(2)/3; t = 3c / (1 + 2c)
    c = 2 ** 0.5 / 3
    out = merge_deltas("model_stock", [T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0]), T([1.0, 1.0, 0.0])], [1, 1, 1])
    assert close(out, 3 * c / (1 + 2 * c) * T([2 / 3, 2 / 3, 0.0]))
    # anti-correlated (cos -1, mergekit's pole): clamped to the base, no NaN; a zero delta also gives the base
    assert torch.equal(merge_deltas("model_stock", [d, -d], [1, 1]), torch.zeros(2, 2))
    assert torch.equal(merge_deltas("model_stock", [d, torch.zeros(2, 2)], [1, 1]), torch.zeros(2, 2))
    # tiny deltas keep their exact cosine (mergekit's 1e-6 clamp on the norm product would give t ~ 0)
    assert close(merge_deltas("model_stock", [1e-5 * d, 1e-5 * d], [1, 1]), 1e-5 * d, 1e-12)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(method="breadcrumbs", density=0.5, gamma=-0.1), "gamma must be in [0, 1), got -0.1"),
    (dict(method="breadcrumbs", density=0.5, gamma=1.0), "gamma must be in [0, 1), got 1.0"),
    (dict(method="breadcrumbs", density=0.6, gamma=0.5), "gamma + density must be <= 1"),
    (dict(method="breadcrumbs_ties", density=0.995, gamma=0.01), "gamma + density must be <= 1"),
    (dict(method="della", density=0.1), "epsilon must keep density +/- epsilon in (0, 1]"),
    (dict(method="della_linear", density=0.9, epsilon=0.15), "epsilon must keep density +/- epsilon in (0, 1]"),
    (dict(method="della", density=0.5, epsilon=-0.1), "epsilon must be in [0, 1), got -0.1"),
    (dict(method="della", density=0.5, lambda_=float("nan")), "lambda_ must be a finite number"),
    (dict(method="slerp", t=1.5), "t must be in [0, 1], got 1.5"),
    (dict(method="slerp", t=-0.1), "t must be in [0, 1], got -0.1"),
    (dict(method="slerp", deltas=[D1, D2, D3], weights=[1, 1, 1]), "slerp interpolates exactly 2 models, got 3"),
    (dict(method="slerp", deltas=[D1], weights=[1]), "slerp interpolates exactly 2 models, got 1"),
    (dict(method="slerp", base=None), "slerp interpolates full weights: pass the base tensor as base="),
    (dict(method="slerp", base=torch.zeros(3, 2)), "base has shape (3, 2), the deltas have (2, 3)"),
    (dict(method="model_stock", deltas=[D1], weights=[1]), "model_stock needs at least 2 fine-tuned models, got 1"),
])
def test_bad_method_parameters(kwargs, msg):
    kwargs = {"deltas": [D1, D2], "weights": [1, 1], "base": torch.zeros(2, 3), **kwargs}
    with pytest.raises(PaftError) as exc:
        merge_deltas(kwargs.pop("method"), kwargs.pop("deltas"), kwargs.pop("weights"), **kwargs)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_parameter_checks_only_where_used():
    # defaults are valid for every method at density 1 and at the config default 0.5
    for method in MERGE_METHODS:
        for density in (1.0, 0.5):
            check_merge_args(method, 2, [1, 1], density)
    check_merge_args("ties", 2, [1, 1], 0.9, gamma=0.5, epsilon=0.5)  # not used by ties: no coupled check
    check_merge_args("della", 2, [1, 1], 1.0, epsilon=0.5)  # density 1 keeps everything, as in mergekit
    check_merge_args("della", 2, [1, 1], 0.85, epsilon=0.15)  # density + epsilon = 1 is allowed
    with pytest.raises(PaftError, match="unknown merge parameter 'gama'; known: normalize, majority_sign, gamma"):
        check_merge_args("breadcrumbs", 2, [1, 1], 0.5, gama=0.1)
    with pytest.raises(PaftError, match="t must be a number, got '0.3'"):
        check_merge_args("slerp", 2, [1, 1], 1.0, t="0.3")
    with pytest.raises(PaftError, match="normalize must be true, false or unset"):
        check_merge_args("ties", 2, [1, 1], 0.5, normalize="yes")


def test_engine_slerp_and_model_stock_pass_base_and_params(tiny, tmp_path):
    base = _base_state(tiny["base"])
    da, db = dict(LoraDeltas(tiny["A"])), dict(LoraDeltas(tiny["B"], open_state(tiny["base"])))
    summary = _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], "slerp", out_dir=tmp_path / "s", t=0.3)
    assert summary["params"] == {"t": 0.3}
    assert json.loads((tmp_path / "s" / "paft_merge.json").read_text())["params"] == {"t": 0.3}
    _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], "model_stock", out_dir=tmp_path / "m")
    slerped, stocked = _base_state(tmp_path / "s"), _base_state(tmp_path / "m")
    for name, w in base.items():
        if name not in da and name not in db:
            assert torch.equal(slerped[name], w) and torch.equal(stocked[name], w)
            continue
        ds = [da.get(name, torch.zeros(w.shape)), db.get(name, torch.zeros(w.shape))]
        assert close(slerped[name], w + merge_deltas("slerp", ds, [1, 1], t=0.3, base=w))
        assert close(stocked[name], w + merge_deltas("model_stock", ds, [1, 1]))
    with pytest.raises(PaftError, match="unknown merge parameter 'tt'"):
        _merge(tiny["base"], [tiny["A"], tiny["B"]], [1, 1], "slerp", out_dir=tmp_path / "x", tt=0.3)
    with pytest.raises(PaftError, match="slerp interpolates exactly 2 models, got 3"):
        _merge(tiny["base"], [tiny["A"], tiny["B"], tiny["C"]], [1, 1, 1], "slerp", out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
