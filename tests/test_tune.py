"""Merge tuning (paft tune, paft.eval.tune, paft.methods.objectives): the Pareto front and the pick rules against
closed forms, the dev split disjoint from the test split, a tiny run tuned end to end (the picked model folder loads
and equals its in-memory merge, its dev metrics are reproduced from the folder), a resumed study, the frontier in the
report, and bad input."""

import copy
import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from paft.cli import app
from paft.config import TuneConfig, load_config, read_run_config
from paft.data.loading import load_examples
from paft.data.prepare import carve_dev, prepare_data, prompt_key
from paft.errors import ConfigError, PaftError
from paft.methods.objectives import pareto_front, parse_pick, pick_point

# ---------------------------------------------------------------- the front and the pick rules, closed forms

# (sft_nll: lower is better, pref_accuracy: higher is better)
POINTS = [{"sft_nll": 1.0, "pref_accuracy": 0.50},   # 0: front (best NLL)
          {"sft_nll": 1.2, "pref_accuracy": 0.70},   # 1: front
          {"sft_nll": 1.3, "pref_accuracy": 0.60},   # 2: dominated by 1
          {"sft_nll": 2.0, "pref_accuracy": 0.90},   # 3: front (best accuracy)
          {"sft_nll": 1.2, "pref_accuracy": 0.70},   # 4: equal to 1: on the front too
          {"sft_nll": None, "pref_accuracy": 0.99}]  # 5: missing an objective: never on it
OBJ = ["sft_nll", "pref_accuracy"]


def test_pareto_front_of_mixed_directions():
    assert pareto_front(POINTS, OBJ) == [0, 1, 3, 4]
    # both maximised: (1, 0) and (0, 1) trade off, (0.5, 0.5) too, (0.4, 0.4) is dominated by it
    pts = [{"pref_accuracy": 1, "reward_accuracy": 0}, {"pref_accuracy": 0, "reward_accuracy": 1},
           {"pref_accuracy": 0.5, "reward_accuracy": 0.5}, {"pref_accuracy": 0.4, "reward_accuracy": 0.4}]
    assert pareto_front(pts, ["pref_accuracy", "reward_accuracy"]) == [0, 1, 2]


def test_utopia_picks_the_front_point_nearest_the_normalised_ideal():
    # over the front, NLL spans [1, 2] and accuracy [0.5, 0.9]; normalised (1 = best):
    # 0 -> (1, 0): distance 1; 1 -> (0.8, 0.5): sqrt(0.04 + 0.25) = 0.539; 3 -> (0, 1): distance 1
    assert pick_point("utopia", POINTS, OBJ).index == 1
    # a flat objective (all equal on the front) counts as 1 for every point: the other objective decides
    flat = [{"sft_nll": 1.0, "pref_accuracy": 0.5}, {"sft_nll": 1.0, "pref_accuracy": 0.6}]
    assert pick_point("utopia", flat, OBJ).index == 1


def test_sft_tolerance_takes_the_best_preference_within_x_of_the_sft_branch():
    sft = {"sft_nll": 1.1}
    assert pick_point("sft_tolerance:0.1", POINTS, OBJ, sft).index == 1  # NLL <= 1.2: 0, 1, 4; best accuracy 1
    assert pick_point("sft_tolerance:1", POINTS, OBJ, sft).index == 3    # NLL <= 2.1: everything
    assert pick_point("sft_tolerance:0", POINTS, OBJ, {"sft_nll": 1.0}).index == 0
    none = pick_point("sft_tolerance:0", POINTS, OBJ, {"sft_nll": 0.5})  # nothing within: the best NLL, said so
    assert none.index == 0 and "no point within 0" in none.note


def test_pick_rule_syntax():
    assert parse_pick("sft_tolerance:0.05")[1] == 0.05 and parse_pick("utopia")[1] is None
    for bad, msg in (("nearest", "unknown pick rule 'nearest'"), ("utopia:1", "takes no argument"),
                     ("sft_tolerance", "needs a number"), ("sft_tolerance:-1", ">= 0")):
        with pytest.raises(ValueError, match=msg):
            parse_pick(bad)


@pytest.mark.parametrize("key,value,msg", [
    ("tune.objectives", "[sft_nll, judge_win_rate]", "tune.objectives.*judge_win_rate.*needs generation"),
    ("tune.objectives", "[sft_nll]", "tune.objectives.*at least two"),
    ("tune.objectives", "[sft_nll, harness/paft_arith/accc]", "tune.objectives.*harness/paft_arith/accc.*acc_norm"),
    ("tune.methods", "[tiess]", "tune.methods.*cannot search 'tiess'.*did you mean 'ties'"),
    ("tune.methods", "[slerp]", "tune.methods.*slerp.*weights do not scale"),
    ("tune.weight_range", "[1.5, 0]", "tune.weight_range.*low <= high"),
    ("tune.density_range", "[0, 0.5]", "tune.density_range.*0 < low"),
    ("tune.alpha_range", "[0, 20]", "tune.alpha_range.*\\[0, 10\\]"),
    ("tune.pick", "sft_tolerance:abc", "tune.pick.*needs a number"),
    ("tune.sampler", "cmaes", "tune.sampler"),
    ("tune.trials", "-1", "tune.trials"),
])
def test_bad_tune_settings_fail_in_one_line_naming_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        load_config(preset="tiny", overrides=[f"{key}={value}"])
    assert "\n" not in str(err.value)


def test_a_harness_objective_is_read_with_its_metric_s_direction():
    from paft.methods.objectives import harness_objective, higher_is_better

    cfg = load_config(preset="tiny", overrides=[
        "tune.objectives=[sft_nll, pref_accuracy, harness/paft_arith/acc, harness/wikitext/word_perplexity]"])
    assert cfg.tune.objectives[2:] == ["harness/paft_arith/acc", "harness/wikitext/word_perplexity"]
    assert harness_objective("harness/gsm8k/exact_match,strict-match") == ("gsm8k", "exact_match,strict-match")
    assert harness_objective("harness/paft_arith") is None and harness_objective("sft_nll") is None
    assert higher_is_better("harness/paft_arith/acc") and not higher_is_better("harness/wikitext/word_perplexity")
    # front and pick over three objectives, the harness one among them
    pts = [{"sft_nll": 1.0, "pref_accuracy": 0.5, "harness/t/acc": 0.2},
           {"sft_nll": 1.0, "pref_accuracy": 0.5, "harness/t/acc": 0.4},  # dominates 0 on the harness metric alone
           {"sft_nll": 2.0, "pref_accuracy": 0.9, "harness/t/acc": 0.1}]
    assert pareto_front(pts, ["sft_nll", "pref_accuracy", "harness/t/acc"]) == [1, 2]


def test_dev_scorer_adds_the_harness_task_s_metrics(tiny_dir, tiny_tok, tiny_model):
    """A harness objective's value on a trial is lm-eval's number for that model (the suite run directly)."""
    from paft.data.demo import demo_splits
    from paft.eval.harness import HarnessSuite
    from paft.eval.tune import DevScorer

    cfg = load_config(preset="tiny", overrides=["tune.objectives=[sft_nll, pref_accuracy, harness/paft_arith/acc]",
                                                "eval.harness_limit=12"])
    _, sft = demo_splits("sft", 0, 4, 0)
    _, pref = demo_splits("preference", 0, 4, 0)
    scorer = DevScorer(cfg, tiny_tok, sft, pref)
    got = scorer.set_reference(tiny_model)
    want, _ = HarnessSuite.build(["paft_arith"], limit=12).run(tiny_model, tiny_tok)
    assert got["harness/paft_arith/acc"] == want["harness/paft_arith/acc"]
    assert {"sft_nll", "pref_accuracy"} <= set(got)
    cfg_bad = load_config(preset="tiny", overrides=[
        "tune.objectives=[sft_nll, 'harness/paft_arith/word_perplexity,none']", "eval.harness_limit=4"])
    assert cfg_bad.tune.objectives[1] == "harness/paft_arith/word_perplexity"  # lm-eval's ",none" filter dropped
    with pytest.raises(ConfigError, match="harness/paft_arith/word_perplexity.*not a metric the task reports.*"
                                          "harness/paft_arith/acc"):
        DevScorer(cfg_bad, tiny_tok, sft, pref).set_reference(tiny_model)
    with pytest.raises(ConfigError, match="tune.objectives: .*nosuchtask"):
        DevScorer(load_config(preset="tiny", overrides=["tune.objectives=[sft_nll, harness/nosuchtask/acc]"]),
                  tiny_tok, sft, pref)


def test_the_reference_is_scored_with_one_pair_forward(tiny_tok, tiny_model, monkeypatch):
    """set_reference reads the base's own metrics off the same pair log-probs it keeps as the reference: one
    pair forward, a reward margin of exactly 0 against itself, and a trial's margin beta*((a-ra)-(b-rb))."""
    from paft.data.demo import demo_splits
    from paft.eval import tune as tune_mod
    from paft.eval.tune import DevScorer

    cfg = load_config(preset="tiny")
    _, sft = demo_splits("sft", 0, 4, 0)
    _, pref = demo_splits("preference", 0, 6, 0)
    calls = []
    real = tune_mod.heldout_pair_logps
    monkeypatch.setattr(tune_mod, "heldout_pair_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    scorer = DevScorer(cfg, tiny_tok, sft, pref)
    got = scorer.set_reference(tiny_model)
    assert len(calls) == 1 and got["reward_margin"] == 0.0 and got["reward_accuracy"] == 0.0
    ref = scorer.ref_lp.clone()
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    lp = real(other, tiny_tok, scorer._encoded()[1], pref, cfg, fast=cfg.eval.fast, budget=scorer._budget())
    beta = cfg.eval.beta or cfg.preference.beta
    want = (beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))).mean().item()
    assert want != 0 and scorer(other)["reward_margin"] == pytest.approx(want, rel=1e-5) and len(calls) == 2


# ---------------------------------------------------------------- the dev split

def _keys(examples):
    return {prompt_key(e) for e in examples}


def test_dev_split_of_the_demo_shares_no_prompt_with_train_or_test(tmp_path):
    cfg = load_config(preset="tiny")
    summary = prepare_data(cfg.data, tmp_path, seed=0)
    for kind in ("sft", "preference"):
        read = {part: load_examples(str(tmp_path / f"{kind}_{part}.jsonl"), kind).examples
                for part in ("train", "dev", "eval")}
        assert len(read["dev"]) == cfg.data.dev_size == summary[kind]["dev"]
        assert len(read["train"]) + len(read["dev"]) == getattr(cfg.data.demo, f"{kind}_train")
        assert not _keys(read["dev"]) & _keys(read["eval"]) and not _keys(read["dev"]) & _keys(read["train"])


def test_dev_split_with_duplicated_prompts_takes_whole_prompt_groups(tmp_path):
    # 10 prompts, 3 replies each; prompts p0..p2 are also in the held-out file
    rows = [{"messages": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": f"r{i}-{j}"}]}
            for i in range(10) for j in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9:3]))
    cfg = load_config(preset="tiny", overrides=[f"data.sft.path={tmp_path / 'train.jsonl'}", "data.dev_size=7",
                                                f"data.sft.eval_path={tmp_path / 'eval.jsonl'}"])
    summary = prepare_data(cfg.data, tmp_path / "out", seed=3)
    train, dev, held = (load_examples(str(tmp_path / "out" / f"sft_{p}.jsonl"), "sft").examples
                        for p in ("train", "dev", "eval"))
    assert len(dev) == summary["sft"]["dev"] == 6  # two whole groups of 3; a third would overshoot 7
    assert not _keys(dev) & _keys(held) and not _keys(dev) & _keys(train)
    assert len(train) + len(dev) == 30



def test_a_prompt_under_another_system_turn_is_the_same_prompt():
    from paft.data.formats import SFTExample

    def row(system, reply):
        return SFTExample(messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": reply}])

    train = [row("a", "x"), row("b", "y"), row("a", "z"), row("b", "w")]
    assert prompt_key(train[0]) == prompt_key(train[1])
    rest, dev = carve_dev(train, [], 2, 0)
    assert dev == [] and rest == train  # one group of 4 would take more than half the rows
    rest, dev = carve_dev(train, [row("c", "q")], 8, 0)
    assert dev == []  # the only prompt is also held out


def test_a_run_dev_size_of_zero_writes_an_empty_dev_split(tmp_path):
    cfg = load_config(preset="tiny", overrides=["data.dev_size=0"])
    summary = prepare_data(cfg.data, tmp_path, seed=0)
    assert summary["sft"]["dev"] == 0 and summary["sft"]["train"] == cfg.data.demo.sft_train


# ---------------------------------------------------------------- a tiny run, tuned end to end

def _add_lora(base, out, seed):
    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    peft.save_pretrained(out)


SETS = ["eval.harness_tasks=[]", "eval.harmlessness=false", "eval.max_examples=8", "eval.max_new_tokens=4", "candidates.enabled=false", "run.force=true",
        "tune.methods=[ties, task_arithmetic]"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A run folder with trained-looking SFT and preference adapters (no training), evaluated, then `paft tune
    --trials 4` through the CLI. The run was made with --force: its config.yaml records run.force: true."""
    from paft.models.tiny import build_tiny
    from paft.pipeline import Run

    tmp = tmp_path_factory.mktemp("tune")
    base = build_tiny(tmp / "base", seed=0, hidden=32, layers=2, vocab=300)
    root = tmp / "run"
    cfg = load_config(preset="tiny", overrides=[f"model.name={base}", f"run.output_dir={root}", *SETS])
    run = Run(cfg)
    run.prepare()
    _add_lora(base, root / "sft" / "adapter", 1)
    _add_lora(base, root / "preference" / "adapter", 2)
    run.merge()
    run.evaluate()
    assert yaml.safe_load((root / "config.yaml").read_text())["run"]["force"] is True
    res = CliRunner().invoke(app, ["tune", str(root), "--trials", "4"])
    assert res.exit_code == 0, res.output
    return base, root, res.output


def test_tune_writes_the_picked_model_and_its_test_metrics(tuned):
    from paft.pipeline import Run

    base, root, output = tuned
    assert (root / "sft" / "adapter").is_dir() and (root / "eval.json").is_file()  # run.force was not replayed
    trials = json.loads((root / "tune" / "trials.json").read_text())
    assert len(trials["trials"]) == 4 and trials["pick"]["rule"] == "utopia"
    assert trials["trials"][0]["default"] and trials["trials"][0]["params"] == {
        "method": "ties", "w_sft": 1.0, "w_pref": 1.0, "density": 0.5}  # the run's own merge is trial 0
    points = [t["metrics"] for t in trials["trials"]]
    assert [t["on_front"] for t in trials["trials"]] == [i in pareto_front(points, OBJ) for i in range(4)]
    assert trials["pick"]["trial"] == pick_point("utopia", points, OBJ).index
    assert all(t["seconds"] > 0 for t in trials["trials"])
    ev = json.loads((root / "tune" / "eval.json").read_text())
    assert list(ev["models"]) == ["paft_tuned"] and ev["n_sft_eval"] == 8 and ev["reference"] == "base"
    assert ev["pick"]["trial"] == trials["pick"]["trial"] and ev["cost"]["trials"] == 4
    assert f"picked trial {ev['pick']['trial']} of 4 by utopia" in output
    # the folder loads back, equals the in-memory merge of the picked parameters, and reproduces its dev metrics
    cfg = load_config(root / "config.yaml")
    run = Run(cfg)
    folder = AutoModelForCausalLM.from_pretrained(root / "tune" / "model")
    from paft.eval.tune import DevScorer
    from paft.merge.live import LiveMerge

    live = LiveMerge(AutoModelForCausalLM.from_pretrained(base), base).apply(run._tune_plan(ev["pick"]["params"], "t"))
    for k, v in folder.state_dict().items():
        torch.testing.assert_close(live.state_dict()[k], v, rtol=0, atol=1e-6)
    dev = {k: load_examples(str(root / "data" / f"{k}_dev.jsonl"), k).examples for k in ("sft", "preference")}
    scorer = DevScorer(cfg, run.tokenizer, dev["sft"], dev["preference"])
    scorer.set_reference(AutoModelForCausalLM.from_pretrained(base).eval())
    got = scorer(folder.eval())
    for k, v in trials["pick"]["dev_metrics"].items():
        assert got[k] == pytest.approx(v, abs=1e-5), k


def test_the_report_draws_the_frontier_with_every_model(tuned):
    _, root, _ = tuned
    rep = json.loads((root / "report.json").read_text())
    fr = rep["frontier"]
    names = [p["name"] for p in fr["points"]]
    assert names == ["base", "sft", "preference", "paft", "paft_tuned"]
    assert [p["on_front"] for p in fr["points"]] == [
        i in pareto_front([p["metrics"] for p in fr["points"]], OBJ) for i in range(5)]
    assert fr["points"][1]["cost"]["train_steps"] is None  # the fixture's adapters were not trained: no summary
    assert (root / "frontier.png").stat().st_size > 10_000
    text = (root / "report.md").read_text()
    assert "## Alignment-tax frontier" in text and "![frontier](frontier.png)" in text and "| paft_tuned | tuned |" in text


def test_more_trials_extend_the_study_and_a_changed_search_needs_force(tuned, tmp_path):
    import shutil

    _, root, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    before = json.loads((copy / "tune" / "trials.json").read_text())["trials"]
    res = CliRunner().invoke(app, ["tune", str(copy), "--trials", "6"])  # no --force: trials only extend
    assert res.exit_code == 0, res.output
    after = json.loads((copy / "tune" / "trials.json").read_text())["trials"]
    assert len(after) == 6 and [t["params"] for t in after[:4]] == [t["params"] for t in before]
    res = CliRunner().invoke(app, ["tune", str(copy), "--set", "tune.methods=[linear]"])
    assert res.exit_code == 1 and "differs at tune.methods" in res.output and "redo tune" in res.output
    res = CliRunner().invoke(app, ["tune", str(copy), "--set", "tune.methods=[linear]", "--trials", "2", "--force"])
    assert res.exit_code == 0, res.output
    again = json.loads((copy / "tune" / "trials.json").read_text())["trials"]
    assert len(again) == 2 and {t["params"]["method"] for t in again} == {"linear"}
    assert (copy / "eval.json").is_file() and (copy / "sft" / "adapter").is_dir()


def test_a_killed_study_resumes_with_its_finished_trials(tmp_path):
    """A process killed mid-trial leaves that trial running in the journal: it is failed, the others kept."""
    from paft.eval.tune import run_study

    t = TuneConfig(trials=3, methods=["task_arithmetic"], seed=1)
    calls = []

    def score(params):
        calls.append(params)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second trial
        return {"sft_nll": params["w_sft"], "pref_accuracy": params["w_pref"]}

    with pytest.raises(KeyboardInterrupt):
        run_study(tmp_path / "j.journal", t, score)
    trials = run_study(tmp_path / "j.journal", t, score)
    assert [tr.state.name for tr in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].params == calls[0] and len(calls) == 3
    assert trials[2].values == [calls[2]["w_sft"], calls[2]["w_pref"]]


def test_a_failed_merge_fails_its_trial_not_the_tune(tmp_path):
    from paft.eval.tune import run_study

    t = TuneConfig(trials=3, methods=["ties"])

    def score(params):
        if params["density"] > 0.6:
            raise PaftError("density too high for this test")
        return {"sft_nll": 1.0, "pref_accuracy": params["density"]}

    trials = run_study(tmp_path / "j.journal", t, score)
    assert len(trials) == 3
    for tr in trials:
        assert (tr.state.name == "FAIL") == (tr.params["density"] > 0.6)
        if tr.state.name == "FAIL":
            assert tr.user_attrs["error"] == "density too high for this test"


def test_a_recorded_run_force_is_not_read_back(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": {"force": True, "seed": 3}}))
    assert read_run_config(tmp_path) == {"run": {"seed": 3}}


def test_tune_without_trials_or_dev_split_says_what_to_do(tmp_path):
    from paft.pipeline import Run

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="tune.trials: 0 trials"):
        Run(cfg).tune()
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    res = CliRunner().invoke(app, ["tune", str(tmp_path)])
    assert res.exit_code == 1 and "tune.trials" in res.output and "--trials N" in res.output
