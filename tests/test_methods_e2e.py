"""Every registered preference method trains as the preference branch of a tiny run (`paft align`)."""

import json
import math

import pytest

from paft.config import load_config
from paft.pipeline import Run
from paft.methods.losses import LOSSES


def _train(tmp_path, method, *extra):
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / method}", f"preference.method={method}",
                                                "preference.max_steps=2", "preference.save_steps=2", *extra])
    run = Run(cfg)
    run.prepare()
    return run, run.train(["preference"])["preference"]


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_method_trains_in_a_tiny_run(tmp_path, method):
    spec = LOSSES[method]
    extra = []
    if spec.schedule.kind == "online":  # a function scorer keeps this test free of reward-model training
        extra = ["preference.online.scorer.kind=function", "preference.online.scorer.function=paft.scoring:demo_reward",
                 "preference.online.rounds=1", "preference.online.prompts_per_round=4"]
    run, s = _train(tmp_path, method, *extra)
    assert s["steps"] == 2 and math.isfinite(s["train_loss"]), s
    assert s["data_kind"] == ("pairs" if spec.data == "pairs" else spec.data) and s["schedule"] == spec.schedule.kind
    adapter = run.adapter("preference")
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_online_method_trains_the_runs_reward_model_first_and_scores_with_it(tmp_path):
    run, s = _train(tmp_path, "iterative-dpo", "preference.online.rounds=1", "preference.online.prompts_per_round=4")
    reward = json.loads((run.root / "reward" / "train_summary.json").read_text())
    assert reward["steps"] == run.cfg.reward.max_steps
    recs = [json.loads(x) for x in
            (run.branch_dir("preference") / "rounds" / "round-1" / "samples.jsonl").read_text().splitlines()]
    scores = [v for r in recs for v in r["scores"]]
    assert len(scores) == 4 * run.cfg.preference.online.samples_per_prompt
    assert len(set(scores)) > 1  # real-valued rewards from the model, not a constant
    assert s["steps"] == 2
