"""Branch adapter kinds: LoRA (default), QLoRA (4-bit NF4 base via bitsandbytes) and full fine-tuning."""

import importlib.util
import json
import math

import pytest
import torch

from paft.config import load_config
from paft.errors import ConfigError

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'paft[qlora]')")

# few steps, no warmup (the first step's learning rate would be 0), no loggers
FAST = ["sft.max_steps=3", "sft.warmup_ratio=0", "sft.logging_steps=1", "preference.max_steps=2",
        "preference.warmup_ratio=0", "preference.logging_steps=1", "run.report_to=[]"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, paft_cache):
    """A tiny run folder with its data prepared (no training)."""
    from paft.pipeline import Run

    out = tmp_path_factory.mktemp("adapters") / "run"
    run = Run(load_config(preset="tiny", overrides=[f"run.output_dir={out}", *FAST]))
    run.prepare()
    run.data()
    return run


def _train(data_run, kind, overrides, name=None):
    from paft.train.branch import train_branch

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={data_run.root}", *FAST, *overrides])
    out = data_run.root / (name or f"{kind}-{'-'.join(o.split('=')[1] for o in overrides)}")
    summary = train_branch(kind, cfg, data_run.model_dir, data_run.data_dir / f"{kind}_train.jsonl", out, threads=1)
    logs = json.loads((out / "log_history.json").read_text())
    return summary, out, [h for h in logs if "loss" in h]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, key", [
    ("sft.adapter=bogus", "sft.adapter"),
    ("preference.adapter=LoRA", "preference.adapter"),
    ("reward.adapter=qlora", "reward.adapter"),
    ("preference.method=sdpo", "preference.adapter"),  # full FT with a staged method
])
def test_bad_adapter_values_are_one_line_errors_naming_the_key(override, key):
    sets = [override] + (["preference.adapter=full"] if "sdpo" in override else [])
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=sets)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_adapter_defaults_to_lora():
    cfg = load_config(preset="tiny")
    assert cfg.sft.adapter == cfg.preference.adapter == cfg.reward.adapter == "lora"


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    from paft.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"sft\.adapter 'qlora' needs bitsandbytes: pip install 'paft\[qlora\]'"):
        loading.require_bitsandbytes("sft.adapter")


def test_reference_cache_key_includes_the_adapter_kind(tiny_dir):
    from paft.models.reference import reference_identity

    keys = {a: reference_identity(tiny_dir, dtype="float32", bf16=False, init_adapter=None, adapter=a)
            for a in ("lora", "qlora", "full")}
    assert len(set(keys.values())) == 3
    # lora keeps the key it had before adapter kinds existed, so existing caches stay valid
    assert keys["lora"] == reference_identity(tiny_dir, dtype="float32", bf16=False, init_adapter=None)


# --------------------------------------------------------------------------- full fine-tuning


def test_full_l1_penalty_is_the_l1_norm_of_w_minus_w_base(tiny_model):
    from paft.train.lora import keep_frozen_copy, l1_delta_norm

    frozen = keep_frozen_copy(tiny_model)
    assert l1_delta_norm(tiny_model).item() == 0.0
    assert "paft_frozen_base" not in dict(tiny_model.named_modules())  # not a submodule: never trained or saved
    with torch.no_grad():
        tiny_model.model.norm.weight.add_(0.5)
    l1 = l1_delta_norm(tiny_model)
    assert l1.item() == pytest.approx(0.5 * tiny_model.model.norm.weight.numel(), rel=1e-5)
    l1.backward()
    assert torch.all(tiny_model.model.norm.weight.grad == 1.0) and frozen.model.norm.weight.grad is None


def test_full_sft_trains_and_saves_a_loadable_safetensors_folder(data_run, tiny_dir):
    from transformers import AutoModelForCausalLM

    summary, out, logs = _train(data_run, "sft", ["sft.adapter=full"])
    model_dir = out / "model"
    assert summary["adapter"] == "full" and summary["output"] == str(model_dir) and summary["steps"] == 3
    assert (model_dir / "model.safetensors").is_file() and not (out / "adapter").exists()
    trained = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert trained.keys() == base.keys()  # the frozen copy of the base is not saved with it
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert logs[0]["l1_delta"] == 0.0 and logs[-1]["l1_delta"] > 0  # L1 on W - W_base, zero at the start

    from paft.train.branch import branch_done, branch_output

    assert branch_done(out) and branch_output(out) == model_dir


def test_full_preference_reference_is_the_frozen_start_model(data_run):
    summary, out, logs = _train(data_run, "preference", ["preference.adapter=full"])
    assert (out / "model" / "model.safetensors").is_file()
    # step 1: policy == reference, so the DPO loss is log 2 and the reward margin 0
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert summary["reference_cache"]["computed"] > 0


def test_tiny_run_with_full_sft_completes_through_merge_and_eval(tmp_path, paft_cache):
    from paft.pipeline import Run

    out = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={out}", "sft.adapter=full", "sft.max_steps=2", "preference.max_steps=2",
        "run.parallel=false", "run.report_to=[]", "eval.max_examples=4", "eval.harness_tasks=[]"])
    Run(cfg).all()
    assert (out / "sft" / "model" / "model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file() and (out / "sequential" / "model").is_dir()
    merge = json.loads((out / "merged" / "paft_merge.json").read_text())
    assert merge["models"][0]["path"].endswith("sft/model")
    # the sequential stage started from the full SFT model folder
    assert json.loads((out / "sequential" / "train_summary.json").read_text())["init_adapter"].endswith("sft/model")
    assert json.loads((out / "sparsity.json").read_text())["sft"]["kind"] == "full"
    models = json.loads((out / "eval.json").read_text())["models"]
    assert {"base", "sft", "preference", "sequential", "paft"} <= set(models)
    # candidates over a full SFT model and the LoRA sequential adapter on it (closed forms: test_candidates.py)
    cand = {r["name"]: r for r in json.loads((out / "candidates.json").read_text())["models"]}
    assert {"expo_0.5", "average_0.5", "average_blocks_0-1", "paft_dare_ties"} <= set(cand)
    assert cand["expo_0.5"]["metrics"]["sft_nll"] > 0


# --------------------------------------------------------------------------- QLoRA


@needs_bnb
def test_qlora_sft_trains_on_a_4bit_base_and_its_adapter_loads_on_the_float_base(data_run, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paft.models import load_model

    q = load_model(tiny_dir, quantize_4bit=True)
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    del q

    summary, out, logs = _train(data_run, "sft", ["sft.adapter=qlora"])
    adapter = out / "adapter"
    assert summary["adapter"] == "qlora" and (adapter / "adapter_config.json").is_file()
    assert logs[-1]["l1_delta"] > 0  # the PAFT L1 penalty works on the 4-bit model's LoRA layers
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()  # the float base, no bitsandbytes
    delta = merged.model.layers[0].self_attn.q_proj.weight - before
    assert delta.abs().max() > 0


@needs_bnb
def test_qlora_preference_reference_is_the_adapter_disabled_4bit_model(data_run):
    summary, out, logs = _train(data_run, "preference", ["preference.adapter=qlora"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["reference_cache"]["computed"] > 0


@needs_bnb
def test_qlora_start_from_an_adapter_is_the_streamed_merge_of_base_and_adapter(data_run, tiny_dir, tmp_path):
    """The sequential baseline's QLoRA stage starts from base + SFT adapter, merged on disk before 4-bit loading."""
    from safetensors.torch import load_file

    from paft.merge.deltas import LoraDeltas, open_state
    from paft.train.branch import _start_model

    _, sft_out, _ = _train(data_run, "sft", ["sft.adapter=lora"], name="sft-for-qlora-start")
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={data_run.root}", *FAST])
    model = _start_model(cfg, "qlora", tiny_dir, sft_out / "adapter", tmp_path, "cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    start, base = load_file(tmp_path / "start" / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    deltas = LoraDeltas(sft_out / "adapter", open_state(tiny_dir))
    name = next(n for n in deltas.names() if "q_proj" in n)
    assert deltas.delta(name).abs().max() > 1e-5  # the adapter moved the weights, so the check below can fail
    assert torch.allclose(start[name], base[name] + deltas.delta(name).to(base[name].dtype), atol=1e-6)
    assert torch.equal(start["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
