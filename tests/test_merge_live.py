"""paft.merge.live: a plan applied to a model in memory equals the folder `paft merge` writes."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from paft.errors import PaftError
from paft.merge.live import LiveMerge
from paft.merge.mergekit_config import plan_from_flags
from paft.merge.standalone import run_merge


def _lora(base, out, seed, modules):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=modules))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from paft.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("live")
    base = build_tiny(root / "base", seed=0, hidden=32, layers=3, vocab=300)
    return {"base": base, "a": _lora(base, root / "a", 1, ["q_proj", "up_proj"]),
            "b": _lora(base, root / "b", 2, ["q_proj", "v_proj"]), "root": root}


@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                                       ("task_arithmetic", {"weights": [1.0, 1.5]}),
                                       ("della", {"density": 0.6}), ("linear", {"weights": [0.3, 0.7]})])
def test_live_equals_written_folder(folders, method, kw):
    base = folders["base"]
    model = AutoModelForCausalLM.from_pretrained(base)
    live = LiveMerge(model, base)
    # a previous plan touching other tensors (up_proj, v_proj) must leave no trace
    live.apply(plan_from_flags(base, [folders["a"]], "task_arithmetic", weights=[3.0]))
    plan = plan_from_flags(base, [folders["a"], folders["b"]], method, seed=3, **kw)
    live.apply(plan)
    out = folders["root"] / f"out-{method}"
    run_merge(plan_from_flags(base, [folders["a"], folders["b"]], method, seed=3, **kw), out)
    written = load_file(out / "model.safetensors")
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    changed = sum(not torch.equal(written[n], t) for n, t in load_file(base / "model.safetensors").items())
    assert changed > 0


def test_reset_restores_the_base(folders):
    base = folders["base"]
    model = AutoModelForCausalLM.from_pretrained(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = LiveMerge(model, base)
    live.apply(plan_from_flags(base, [folders["a"], folders["b"]], "ties", density=0.5))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    live.reset()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and live.plan is None


def test_other_base_is_refused(folders, tmp_path):
    from paft.models.tiny import build_tiny

    other = build_tiny(tmp_path / "other", seed=5, hidden=32, layers=3, vocab=300)
    live = LiveMerge(AutoModelForCausalLM.from_pretrained(other), other)
    with pytest.raises(PaftError, match="live model is"):
        live.apply(plan_from_flags(folders["base"], [folders["a"]], "task_arithmetic"))


def test_model_spec_with_a_plan_loads_the_merged_model(folders):
    from paft.config import PaftConfig
    from paft.eval.models import ModelSpec, load_spec

    base = folders["base"]
    plan = plan_from_flags(base, [folders["a"], folders["b"]], "ties", density=0.5)
    model = load_spec(ModelSpec("cand", base, plan=plan), PaftConfig(), "cpu")
    reference = LiveMerge(AutoModelForCausalLM.from_pretrained(base), base).apply(plan)
    want = reference.state_dict()
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
