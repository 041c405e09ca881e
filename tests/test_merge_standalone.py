"""`paft merge` on your own checkpoints (mergekit YAML and flags), --to-lora, and `paft sparsity --base`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from paft.cli import app
from paft.errors import PaftError
from paft.merge import engine
from paft.merge.deltas import LoraDeltas, open_state
from paft.merge.engine import ordered_map
from paft.merge.mergekit_config import evaluate_setting, layer_position, load_mergekit_yaml, plan_from_flags
from paft.merge.methods import ChunkedRandom, merge_deltas
from paft.merge.standalone import run_merge
from paft.merge.to_lora import svd_factor
from paft.sparsity import compare_sparsity

runner = CliRunner()
Q = "model.layers.{}.self_attn.q_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"


def _state(folder):
    st = open_state(folder)
    return {k: st.get(k) for k in st.keys()}


def _err(result):
    return " ".join((result.output or "").split())


def _full_variant(base, out, seed, scale=0.05, edit=None):
    """A full checkpoint: base + a seeded random delta on every tensor (config and tokenizer copied)."""
    shutil.copytree(base, out)
    (out / "model.safetensors").unlink()
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in _state(base).items()}
    if edit:
        edit(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    from paft.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("ck")
    base = build_tiny(root / "base", seed=0, hidden=32, layers=5, vocab=300)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(root / "lora")
    return {"root": root, "base": base, "ft1": _full_variant(base, root / "ft1", 1),
            "ft2": _full_variant(base, root / "ft2", 2), "lora": root / "lora"}


def _yaml(path, cfg):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --- parameter evaluation (mergekit semantics) -----------------------------------------------------

def test_gradient_and_filters_hand_computed():
    assert [layer_position(Q.format(i), 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_position("model.embed_tokens.weight", 5) == 0.0 and layer_position("model.norm.weight", 5) == 1.0
    assert layer_position("lm_head.weight", 5) == 1.0 and layer_position(Q.format(0), 1) == 1.0
    grad = [1.0, 2.0, 5.0]  # anchors at t = 0, 0.5, 1
    assert [evaluate_setting("x", grad, t) for t in (0, 0.25, 0.5, 0.75, 1)] == [1.0, 1.5, 2.0, 3.5, 5.0]
    cond = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "self_attn", "value": 0.3}, {"value": 7}]
    assert evaluate_setting(UP.format(3), cond, 0.75) == 0.75
    assert evaluate_setting(Q.format(3), cond, 0.75) == 0.3
    assert evaluate_setting("model.norm.weight", cond, 1.0) == 7
    assert evaluate_setting("model.norm.weight", cond[:2], 1.0) is None  # no filter matches: falls through


# --- mergekit YAML -----------------------------------------------------------------------------------

def test_mergekit_task_arithmetic_gradient_filter_bf16_sharded(ck, tmp_path, monkeypatch):
    cfg = _yaml(tmp_path / "m.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(ck["base"]), "dtype": "bfloat16",
        "models": [
            {"model": str(ck["ft1"]),
             "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]}},
            {"model": str(ck["ft2"]), "parameters": {"weight": [1.0, 2.0, 5.0]}},
            {"model": str(ck["base"])},  # the base in the list is the reference, not a task vector
        ]})
    monkeypatch.setattr(engine, "SHARD_BYTES", 60_000)
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(cfg), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    base, f1, f2, merged = _state(ck["base"]), _state(ck["ft1"]), _state(ck["ft2"]), _state(out)
    assert set(merged) == set(base) and all(t.dtype == torch.bfloat16 for t in merged.values())

    def expect(name, w1, w2):  # base + w1 d1 + w2 d2, summed in the engine's order, then cast
        direct = base[name] + w1 * (f1[name] - base[name]) + w2 * (f2[name] - base[name])
        mixed = merge_deltas("task_arithmetic", [f1[name] - base[name], f2[name] - base[name]], [w1, w2])
        assert torch.allclose(base[name] + mixed, direct, atol=1e-6)
        return (base[name] + mixed).to(torch.bfloat16)

    for i, (t, w2) in enumerate(zip((0, 0.25, 0.5, 0.75, 1), (1.0, 1.5, 2.0, 3.5, 5.0))):
        assert torch.equal(merged[UP.format(i)], expect(UP.format(i), t, w2))
        assert torch.equal(merged[Q.format(i)], expect(Q.format(i), 0.5, w2))
    assert torch.equal(merged["model.embed_tokens.weight"], expect("model.embed_tokens.weight", 0.5, 1.0))
    assert torch.equal(merged["model.norm.weight"], expect("model.norm.weight", 0.5, 5.0))
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out.get("dtype", cfg_out.get("torch_dtype")) == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (ck["base"] / "tokenizer.json").read_bytes()
    meta = json.loads((out / "paft_merge.json").read_text())
    assert [m["kind"] for m in meta["models"]] == ["full", "full"] and meta["workers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_mergekit_ties_per_model_density_mixed_lora_and_defaults(ck, tmp_path):
    cfg = _yaml(tmp_path / "ties.yaml", {
        "merge_method": "dare_ties", "base_model": str(ck["base"]), "parameters": {"int8_mask": True},
        "models": [{"model": str(ck["ft1"]), "parameters": {"weight": 0.7, "density": 0.5}},
                   {"model": f"{ck['base']}+{ck['lora']}", "parameters": {"weight": 0.3, "density": 0.9}}],
        "seed": 3})
    spec = load_mergekit_yaml(cfg)
    out = tmp_path / "o"
    summary = run_merge(spec, out, workers=2)
    assert [m["kind"] for m in summary["models"]] == ["full", "lora"]
    base, f1, merged = _state(ck["base"]), _state(ck["ft1"]), _state(out)
    dl = dict(LoraDeltas(ck["lora"], open_state(ck["base"])))
    for name in (Q.format(2), UP.format(0), "model.norm.weight"):
        d = [f1[name] - base[name], dl.get(name, torch.zeros_like(base[name]))]
        # mergekit's dare_ties is unnormalised by default; each model keeps its own density
        want = base[name] + merge_deltas("dare_ties", d, [0.7, 0.3], density=[0.5, 0.9], normalize=False,
                                         generator=ChunkedRandom(3, name))
        assert torch.equal(merged[name], want)
    # the same merge on one worker is bit-identical
    single = run_merge(load_mergekit_yaml(cfg), tmp_path / "o1", workers=1)
    assert single["workers"] == 1
    one = _state(tmp_path / "o1")
    assert all(torch.equal(one[k], merged[k]) for k in merged)


def test_linear_and_slerp_keep_the_base_as_an_input(ck, tmp_path):
    lin = load_mergekit_yaml(_yaml(tmp_path / "l.yaml", {
        "merge_method": "linear", "models": [{"model": str(ck["base"]), "parameters": {"weight": 1.0}},
                                             {"model": str(ck["ft1"]), "parameters": {"weight": 3.0}}]}))
    run_merge(lin, tmp_path / "lin")
    base, f1, out = _state(ck["base"]), _state(ck["ft1"]), _state(tmp_path / "lin")
    for k in base:
        assert torch.allclose(out[k], (base[k] + 3 * f1[k]) / 4, atol=1e-6)
    slerp = load_mergekit_yaml(_yaml(tmp_path / "s.yaml", {
        "merge_method": "slerp", "base_model": str(ck["base"]), "parameters": {"t": 0.0},
        "models": [{"model": str(ck["ft1"])}, {"model": str(ck["base"])}]}))
    run_merge(slerp, tmp_path / "sl")
    out = _state(tmp_path / "sl")
    assert all(torch.allclose(out[k], base[k], atol=1e-6) for k in base)  # t = 0 is base_model, as in mergekit


@pytest.mark.parametrize("cfg, msg", [
    ({"slices": []}, "slices: layer slicing/stacking is not supported"),
    ({"merge_method": "nuslerp"}, "merge_method 'nuslerp' is not supported"),
    ({"parameters": {"bogus": 1}}, "parameters.bogus: unknown or unsupported parameter"),
    ({"tokenizer_source": "union"}, "tokenizer_source: union is not supported"),
    ({"models": [{"model": "/nope/missing"}]}, "models[0].model: model '/nope/missing' is not a local folder"),
    ({"parameters": {"normalize": "maybe"}}, "normalize must be true, false or unset"),
])
def test_mergekit_refusals_are_one_line(ck, tmp_path, cfg, msg):
    base = {"merge_method": "ties", "base_model": str(ck["base"]),
            "models": [{"model": str(ck["ft1"]), "parameters": {"weight": 1}}]}
    path = _yaml(tmp_path / "bad.yaml", {**base, **cfg})
    result = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and msg in _err(result) and str(path) in _err(result), result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


# --- checks: architecture, shapes, vocabulary, NaN, existing output --------------------------------

def test_checks_refuse_with_a_clear_line(ck, tmp_path):
    base = ck["base"]
    arch = _full_variant(base, tmp_path / "arch", 5)
    c = json.loads((arch / "config.json").read_text())
    c["num_hidden_layers"] = 4
    (arch / "config.json").write_text(json.dumps(c))
    with pytest.raises(PaftError, match="config.json num_hidden_layers is 4 but 5 in base"):
        run_merge(plan_from_flags(str(base), [str(arch)], "ties"), tmp_path / "o")

    def grow(state):
        state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"], torch.ones(4, 32)])

    vocab = _full_variant(base, tmp_path / "vocab", 6, edit=grow)
    with pytest.raises(PaftError, match=r"vocabulary of 304 tokens .* has 300; pass --resize-vocab"):
        run_merge(plan_from_flags(str(base), [str(vocab)], "task_arithmetic"), tmp_path / "o")
    run_merge(plan_from_flags(str(base), [str(vocab)], "task_arithmetic", resize_vocab=True), tmp_path / "rv")
    emb = "model.embed_tokens.weight"
    assert torch.equal(_state(tmp_path / "rv")[emb], _state(vocab)[emb][:300])

    def reshape(state):
        state[UP.format(1)] = state[UP.format(1)][:, :16].contiguous()

    shape = _full_variant(base, tmp_path / "shape", 7, edit=reshape)
    with pytest.raises(PaftError, match=r"model.layers.1.mlp.up_proj.weight has shape \(64, 16\) but \(64, 32\)"):
        run_merge(plan_from_flags(str(base), [str(shape)], "ties"), tmp_path / "o")

    def nan(state):
        state[Q.format(3)][0, 0] = float("inf")

    bad = _full_variant(base, tmp_path / "nan", 8, edit=nan)
    with pytest.raises(PaftError, match=r"model.layers.3.self_attn.q_proj.weight: delta 1 contains NaN or inf"):
        run_merge(plan_from_flags(str(base), [str(ck["ft1"]), str(bad)], "ties"), tmp_path / "o")
    assert not (tmp_path / "o").exists()

    run_merge(plan_from_flags(str(base), [str(ck["ft1"])], "ties"), tmp_path / "exists")
    result = runner.invoke(app, ["merge", "--base", str(base), "--models", str(ck["ft1"]), "--out",
                                 str(tmp_path / "exists")])
    assert result.exit_code == 1 and "output exists; pass --force" in _err(result)
    result = runner.invoke(app, ["merge", "--base", str(base), "--models", f"{ck['ft1']},{ck['lora']}",
                                 "--weights", "0.5,2", "--method", "task_arithmetic", "--out",
                                 str(tmp_path / "exists"), "--force"])
    assert result.exit_code == 0, result.output
    b, f1, out = _state(base), _state(ck["ft1"]), _state(tmp_path / "exists")
    dl = dict(LoraDeltas(ck["lora"], open_state(base)))
    assert torch.allclose(out[Q.format(0)], b[Q.format(0)] + 0.5 * (f1[Q.format(0)] - b[Q.format(0)])
                          + 2 * dl[Q.format(0)], atol=1e-6)


def test_run_config_flags_are_refused_and_dispatch(tmp_path):
    run_cfg = _yaml(tmp_path / "run.yaml", {"merge": {"method": "ties"}})
    result = runner.invoke(app, ["merge", str(run_cfg), "--to-lora", "4"])
    assert result.exit_code == 1 and "--to-lora: only with a mergekit YAML or --base/--models" in _err(result)
    result = runner.invoke(app, ["sparsity", str(tmp_path)])
    assert result.exit_code == 1 and "need --base BASE" in _err(result)


# --- to-lora -------------------------------------------------------------------------------------------

def test_svd_factor_error_is_tail_energy():
    torch.manual_seed(0)
    d = torch.randn(12, 7)
    s = torch.linalg.svdvals(d).double()
    for r in (1, 3, 7, 20):
        b, a, tail, total, used = svd_factor(d, r)
        assert used == min(r, 7) and b.shape == (12, used) and a.shape == (used, 7)
        assert tail == pytest.approx(float(s[used:].pow(2).sum()), rel=1e-5, abs=1e-10)
        assert total == pytest.approx(float(d.double().pow(2).sum()), rel=1e-6)
        assert float((d - b @ a).double().pow(2).sum()) == pytest.approx(tail, rel=1e-3, abs=1e-8)
    b, a, tail, _, _ = svd_factor(d, 7)
    assert tail < 1e-20 and torch.allclose(b @ a, d, atol=1e-5)  # full rank: exact


def test_to_lora_reports_closed_form_error_and_full_rank_is_exact(ck, tmp_path):
    spec = lambda: plan_from_flags(str(ck["base"]), [str(ck["ft1"]), str(ck["ft2"])], "task_arithmetic",  # noqa: E731
                                   weights=[0.5, 0.5])
    run_merge(spec(), tmp_path / "full")
    base, merged = _state(ck["base"]), _state(tmp_path / "full")
    summary = run_merge(spec(), tmp_path / "r3", to_lora=3, workers=2)["to_lora"]
    report = json.loads((tmp_path / "r3" / "paft_lora.json").read_text())
    tail = total = 0.0
    for name, w in base.items():
        d = (merged[name] - w).double()
        if d.dim() == 2:
            s = torch.linalg.svdvals(d)
            tail += float(s[3:].pow(2).sum())
            assert report["per_tensor"][name]["relative_error"] == pytest.approx(
                math.sqrt(float(s[3:].pow(2).sum()) / float(s.pow(2).sum())), rel=1e-4)
        else:
            tail += float(d.pow(2).sum())  # norms cannot be LoRA factors: fully counted as error
        total += float(d.pow(2).sum())
    assert summary["relative_error"] == pytest.approx(math.sqrt(tail / total), rel=1e-4)
    assert "model.norm.weight" in summary["dropped_non_matrix"]
    # the stored factors reproduce the rank-3 approximation, through paft's reader (PEFT's layout)
    dl = dict(LoraDeltas(tmp_path / "r3", open_state(ck["base"])))
    d = merged[UP.format(2)] - base[UP.format(2)]
    err = float((d - dl[UP.format(2)]).double().pow(2).sum().sqrt() / d.double().pow(2).sum().sqrt())
    assert err == pytest.approx(report["per_tensor"][UP.format(2)]["relative_error"], rel=1e-3)

    # full rank on LoRA inputs only (no norm deltas): exact, and PEFT serves it like the merged model
    lspec = plan_from_flags(str(ck["base"]), [str(ck["lora"])], "task_arithmetic")
    run_merge(lspec, tmp_path / "lm")
    rep = run_merge(plan_from_flags(str(ck["base"]), [str(ck["lora"])], "task_arithmetic"), tmp_path / "lfull",
                    to_lora=64)["to_lora"]
    assert rep["relative_error"] < 1e-5 and rep["dropped_non_matrix"] == {}
    cfg = json.loads((tmp_path / "lfull" / "adapter_config.json").read_text())
    assert cfg["r"] == 64 and set(cfg["rank_pattern"].values()) == {32}  # min(64, 32) for 32-wide matrices
    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    with torch.no_grad():
        ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ck["base"]), tmp_path / "lfull")(ids)
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")(ids)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-4)


# --- sparsity ------------------------------------------------------------------------------------------

def test_sparsity_standalone_matches_direct_computation(ck, tmp_path):
    def sparse(state):
        base_state = _state(ck["base"])
        for k in state:
            keep = torch.arange(state[k].numel()).reshape(state[k].shape) % 4 == 0
            state[k] = torch.where(keep, state[k], base_state[k])  # three of four entries unchanged

    sp = _full_variant(ck["base"], tmp_path / "sparse", 9, edit=sparse)
    out = tmp_path / "sp"
    result = runner.invoke(app, ["sparsity", str(sp), str(ck["lora"]), "--base", str(ck["base"]), "--out", str(out),
                                 "--abs", "1e-6,1e-2", "--rel", "0.1", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "sparsity.png").stat().st_size > 5000 and "layer 4" in result.output
    data = json.loads((out / "sparsity.json").read_text())["inputs"]
    assert set(data) == {"sparse", "lora"} and data["lora"]["kind"] == "lora"
    base, model = _state(ck["base"]), _state(sp)
    deltas = {k: (model[k] - base[k]).abs() for k in base}
    n = sum(d.numel() for d in deltas.values())
    for t in (1e-6, 1e-2):
        direct = sum(int((d <= t).sum()) for d in deltas.values()) / n
        assert data["sparse"]["overall"][f"abs<={t:g}"] == pytest.approx(direct, abs=1e-12)
    layer2 = [k for k in deltas if ".layers.2." in k]
    rel = sum(int((deltas[k] <= 0.1 * base[k].pow(2).mean().sqrt()).sum()) for k in layer2)
    assert data["sparse"]["by_layer"]["2"]["rel<=0.1"] == pytest.approx(rel / sum(deltas[k].numel() for k in layer2))
    h = data["sparse"]["histogram"]
    assert sum(h["counts"]) + h["zeros"] == n and h["zeros"] == sum(int((d == 0).sum()) for d in deltas.values())
    assert data["sparse"]["overall"]["abs<=1e-06"] >= 0.75
    assert data["lora"]["by_type"].keys() == {"q_proj", "up_proj"}
    # the library call gives the same numbers without writing anything
    again = compare_sparsity([sp], ck["base"], absolute=[1e-6, 1e-2], relative=[0.1], workers=1)
    assert again["sparse"]["overall"] == data["sparse"]["overall"]


def test_ordered_map_keeps_order_and_budget():
    import threading
    import time

    live, peak, lock = [0], [0], threading.Lock()

    def fn(x):
        with lock:
            live[0] += x
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01 * (x % 3))
        with lock:
            live[0] -= x
        return x * 2

    items = [5, 1, 1, 7, 2, 3, 1, 9, 1]
    assert list(ordered_map(fn, items, 2, cost=lambda x: x, budget=8)) == [2 * x for x in items]
    assert peak[0] <= 9  # within budget, except an item costlier than it running alone
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(lambda x: 1 // 0 if x == 3 else x, range(6), 2))


# --- issue 16 class 2: an adapter from another base is refused ------------------------------------

def test_adapter_from_another_base_is_refused(ck, tmp_path):
    from paft.models.tiny import build_tiny

    root = ck["root"]
    wide = build_tiny(tmp_path / "wide", seed=0, hidden=48, layers=5, vocab=300)  # other shapes
    twin = build_tiny(tmp_path / "twin", seed=7, hidden=32, layers=5, vocab=300)  # same shapes, other weights
    copy = shutil.copytree(ck["base"], tmp_path / "copy")  # the same base in another folder
    recorded = json.loads((ck["lora"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(ck["base"])

    def merge(base, *extra):
        return runner.invoke(app, ["merge", "--base", str(base), "--models", str(ck["lora"]), "--method",
                                   "task_arithmetic", "--out", str(tmp_path / "out"), "--force", *extra])

    for flags in ((), ("--allow-base-mismatch",)):  # wrong shapes: no flag makes that mergeable
        bad = merge(wide, *flags)
        assert bad.exit_code == 1 and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
        assert f"{ck['lora']}: model.layers.0." in _err(bad) and "delta has shape (" in _err(bad)
        assert "in base " + str(wide) in _err(bad)
        assert "trained on another base" in _err(bad) and f"names {ck['base']}" in _err(bad)
    bad = merge(twin)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert f"trained on base {ck['base']}" in _err(bad) and f"merged into {twin}" in _err(bad)
    assert "--allow-base-mismatch" in _err(bad)
    assert merge(twin, "--allow-base-mismatch").exit_code == 0
    assert merge(copy).exit_code == 0  # the same base by content
    assert merge(ck["base"]).exit_code == 0
    # BASE+ADAPTER and a mergekit YAML's allow_base_mismatch
    cfg = {"merge_method": "task_arithmetic", "base_model": str(twin),
           "models": [{"model": f"{twin}+{ck['lora']}", "parameters": {"weight": 1.0}}]}
    y = _yaml(tmp_path / "m.yaml", cfg)
    bad = runner.invoke(app, ["merge", str(y), "--out", str(tmp_path / "y"), "--force"])
    assert bad.exit_code == 1 and "--allow-base-mismatch (YAML: allow_base_mismatch: true)" in _err(bad)
    y = _yaml(tmp_path / "m.yaml", {**cfg, "allow_base_mismatch": True})
    assert runner.invoke(app, ["merge", str(y), "--out", str(tmp_path / "y"), "--force"]).exit_code == 0
