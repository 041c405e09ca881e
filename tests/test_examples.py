"""Every example config validates (`paft config`), the scale-out recipes say their computed GPU memory and time
per step, and each accelerate config they name exists and is one that paft accepts for its branch."""

from pathlib import Path

import pytest

from paft.config import load_config
from paft.errors import ConfigError
from paft.train.launch import check_accelerate_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "examples" / "tiny.yaml", *sorted((ROOT / "examples").glob("*mistral-7b*.yaml"))]
RECIPES = [p for p in EXAMPLES if "mistral-7b" in p.name]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # accelerate config paths are relative to the repository
    cfg = load_config(path)
    for name, kind in (("sft", "sft"), ("preference", "preference"), ("sequential", "preference")):
        check_accelerate_config(cfg, name, kind)


def test_the_recipes_state_computed_memory_and_step_time():
    assert {p.name for p in RECIPES} == {"paper-mistral-7b.yaml", "paper-mistral-7b-8gpu.yaml",
                                         "paper-mistral-7b-2nodes-ray.yaml", "tradeoffs-mistral-7b.yaml"}
    for p in RECIPES:
        text = p.read_text()
        assert "COMPUTED, not measured" in text and "GB" in text and "s/step" in text, p.name


def test_the_8gpu_recipe_splits_the_node_and_the_2node_recipe_uses_ray(monkeypatch):
    monkeypatch.chdir(ROOT)
    c = load_config(ROOT / "examples" / "paper-mistral-7b-8gpu.yaml").run
    assert [c.processes_for(b) for b in ("sft", "preference", "sequential")] == [4, 4, 4]
    assert c.accelerate_config_for("sft") is None  # DDP: the L1 term needs whole LoRA factors
    r = load_config(ROOT / "examples" / "paper-mistral-7b-2nodes-ray.yaml").run
    assert r.backend == "ray" and r.processes_for("sft") == 8


def test_a_sharded_strategy_is_refused_for_sft_with_l1(monkeypatch):
    monkeypatch.chdir(ROOT)
    for f in ("fsdp.yaml", "deepspeed-zero3.yaml"):
        cfg = load_config(overrides=["run.processes=2", f"run.accelerate_config=examples/accelerate/{f}"])
        with pytest.raises(ConfigError, match="L1 term needs whole LoRA factors"):
            check_accelerate_config(cfg, "sft", "sft")
        check_accelerate_config(cfg, "preference", "preference")  # DPO may shard
    cfg = load_config(overrides=["run.accelerate_config=examples/accelerate/deepspeed-zero2.yaml"])
    check_accelerate_config(cfg, "sft", "sft")


def test_a_missing_accelerate_config_is_one_line():
    cfg = load_config(overrides=["run.accelerate_config={sft: nowhere.yaml}"])
    with pytest.raises(ConfigError, match="nowhere.yaml: accelerate config"):
        check_accelerate_config(cfg, "sft", "sft")
    assert check_accelerate_config(cfg, "preference", "preference") is None
