"""The tiny pipeline end to end (real processes, real files), resume, and refusal to overwrite."""

import json
import time

import pytest
import torch
import yaml

from paft.config import load_config
from paft.errors import PaftError
from paft.pipeline import Run

MODELS = {"base", "sft", "preference", "sequential", "paft"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, paft_cache):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={out}"])
    start = time.perf_counter()
    report = Run(cfg).all()
    return cfg, out, report, time.perf_counter() - start


def test_tiny_run_writes_every_output(tiny_run):
    cfg, out, report, wall = tiny_run
    assert wall < 300  # a guard against a hang, not a timing (timings: benchmarks/); shared CI cores vary 5x
    for name in ("config.yaml", "provenance.json", "sparsity.json", "eval.json", "report.md", "report.json",
                 "metrics.png", "training.png", "data/sft_train.jsonl", "merged/model.safetensors"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["eval"]["models"]) == MODELS
    for metrics in rep["eval"]["models"].values():
        assert 0 <= metrics["pref_accuracy"] <= 1 and metrics["sft_nll"] > 0
    assert rep["eval"]["models"]["base"]["reward_margin"] == 0.0
    assert rep["config"]["model"]["name"] == "tiny" and "torch" in rep["versions"]
    assert set(rep["sparsity"]) == {"sft", "preference"}
    assert rep["training"]["sft"]["steps"] == cfg.sft.max_steps
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["inputs"]["sft"]["sha256"] == "demo:seed=0" and prov["model"]["sha256"]["model.safetensors"]
    text = report.read_text()
    assert "| PAFT merge |" in text and "Alignment tax" in text and "![metrics](metrics.png)" in text


CANDIDATE_NAMES = ["expo_0.5", "average_0.5", "average_blocks_0-1", "paft_dare_ties", "paft_task_arithmetic",
                   "paft_linear"]  # the defaults; ties is the run's merge.method (the paft model)


def test_candidates_json_scores_every_candidate_and_costs_it(tiny_run):
    cfg, out, report, _ = tiny_run
    cand = json.loads((out / "candidates.json").read_text())
    rows = {r["name"]: r for r in cand["models"]}
    assert list(rows) == [*sorted(MODELS, key=["base", "sft", "preference", "sequential", "paft"].index),
                          *CANDIDATE_NAMES]
    ev = json.loads((out / "eval.json").read_text())["models"]
    steps = {b: json.loads((out / b / "train_summary.json").read_text())["steps"]
             for b in ("sft", "preference", "sequential")}
    for name, row in rows.items():
        assert set(row["metrics"]) == {"sft_exact_match", "sft_nll", "pref_accuracy", "reward_margin",
                                       "reward_accuracy"}  # held-out only: no harness rows for candidates
        if row["family"] == "main":
            assert row["metrics"] == {k: ev[name][k] for k in row["metrics"]}
        else:
            assert row["metrics"]["sft_nll"] > 0 and row["cost"]["extra_s"] > 0
    assert rows["expo_0.5"]["cost"]["train_steps"] == steps["sft"] + steps["sequential"] \
        == rows["sequential"]["cost"]["train_steps"]
    assert rows["paft_linear"]["cost"]["train_steps"] == steps["sft"] + steps["preference"]
    assert rows["base"]["cost"]["train_steps"] == 0 and rows["average_0.5"]["setting"] == 0.5
    assert "candidates" in json.loads((out / "timings.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in rep["candidates"]["models"]] == list(rows)
    text = report.read_text()
    assert "## Candidates" in text and "| expo_0.5 | expo |" in text and "arXiv 2404.16792" in text


def test_a_changed_candidates_section_redoes_only_candidates_json(tiny_run, tmp_path):
    import shutil

    _, out, _, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    sets = [f"run.output_dir={copy}", "candidates.expo_alpha=[1.0]", "candidates.merge_methods=[]"]
    with pytest.raises(PaftError, match="--force to redo candidates.json, sparsity.json; trained branches are kept"):
        Run(load_config(preset="tiny", overrides=sets)).prepare()
    before = (copy / "eval.json").stat().st_mtime_ns
    Run(load_config(preset="tiny", overrides=[*sets, "run.force=true"])).all()
    assert (copy / "eval.json").stat().st_mtime_ns == before
    names = [r["name"] for r in json.loads((copy / "candidates.json").read_text())["models"]]
    assert names[5:] == ["expo_1", "average_0.5", "average_blocks_0-1"]


def test_branches_ran_in_parallel_processes(tiny_run):
    _, out, _, _ = tiny_run
    sft = json.loads((out / "sft" / "train_summary.json").read_text())
    pref = json.loads((out / "preference" / "train_summary.json").read_text())
    assert sft["threads"] == pref["threads"] == max(1, torch.get_num_threads() // 2)


def test_merged_folder_loads_and_equals_base_plus_merged_deltas(tiny_run, tiny_dir):
    from transformers import AutoModelForCausalLM

    from paft.merge.deltas import LoraDeltas
    from paft.merge.methods import ChunkedRandom, merge_deltas

    cfg, out, _, _ = tiny_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    d_sft = dict(LoraDeltas(out / "sft" / "adapter"))
    d_pref = dict(LoraDeltas(out / "preference" / "adapter"))
    name = "model.layers.0.self_attn.q_proj.weight"
    want = base[name] + merge_deltas(cfg.merge.method, [d_sft[name], d_pref[name]], cfg.merge.weights,
                                     density=cfg.merge.density, generator=ChunkedRandom(cfg.merge.seed, name))
    torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["model.norm.weight"], base["model.norm.weight"])


def test_sequential_model_is_base_plus_both_stage_deltas(tiny_run, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _, _ = tiny_run
    seq = AutoModelForCausalLM.from_pretrained(out / "sequential" / "model").state_dict()
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    m = PeftModel.from_pretrained(m, str(out / "sft" / "adapter")).merge_and_unload()
    m = PeftModel.from_pretrained(m, str(out / "sequential" / "adapter")).merge_and_unload()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(seq[k], v, rtol=0, atol=1e-6)


def test_rerun_resumes_without_retraining(tiny_run):
    cfg, out, _, _ = tiny_run
    before = (out / "sft" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    Run(cfg).all()
    assert time.perf_counter() - start < 60  # nothing retrained (mtime below); a guard against a hang
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_different_config_refused_without_force(tiny_run):
    cfg, out, _, _ = tiny_run
    other = load_config(preset="tiny", overrides=[f"run.output_dir={out}", "sft.learning_rate=0.5"])
    with pytest.raises(PaftError, match="different config.*sft.learning_rate.*--force"):
        Run(other).prepare()
    assert yaml.safe_load((out / "config.yaml").read_text())["sft"]["learning_rate"] == cfg.sft.learning_rate


def test_killed_branch_resumes_from_checkpoint(tmp_path, paft_cache):
    """A branch with a checkpoint and no final adapter continues from the checkpoint's step."""
    from paft.train.branch import train_branch

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}", "sft.max_steps=4", "sft.save_steps=2",
                                                "run.parallel=false", "run.sequential_baseline=false"])
    run = Run(cfg)
    run.prepare()
    run.data()
    args = dict(kind="sft", cfg=cfg, model_dir=run.model_dir, data_path=run.data_dir / "sft_train.jsonl",
                out_dir=tmp_path / "sft")
    train_branch(**args)
    import shutil

    shutil.rmtree(tmp_path / "sft" / "adapter")  # as if killed after the last checkpoint
    steps = []
    train_branch(**args, report=lambda m: steps.append(m["step"]))
    assert steps[0] == 4  # started from checkpoint-4, trained no step again


def test_error_in_a_parallel_branch_reaches_the_user(tmp_path, tiny_dir):
    """A branch process that fails (here: a tokenizer without chat template) stops the run with its message."""
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'run'}", f"model.name={model}"])
    run = Run(cfg)
    run.prepare()
    start = time.perf_counter()
    with pytest.raises(PaftError, match="no chat template"):
        run.train(["sft", "preference"])
    assert time.perf_counter() - start < 120  # the error arrives, not a hang


def test_sft_rows_without_reply_tokens_are_reported_not_silently_dropped(tmp_path, paft_cache):
    from paft.train.branch import train_branch

    data = tmp_path / "sft.jsonl"
    long_prompt = "word " * 200
    rows = [{"prompt": long_prompt, "completion": "cut"}] + [{"prompt": "hi", "completion": "hello"}] * 4
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}/run", "sft.max_steps=1"])
    run = Run(cfg)
    messages = []
    summary = train_branch("sft", cfg, run.model_dir, data, tmp_path / "sft", report=messages.append)
    assert summary["dropped_no_reply_tokens"] == 1 and summary["examples"] == 4
    assert any("1 SFT examples have no reply tokens" in m.get("warning", "") for m in messages)
    data.write_text(json.dumps({"prompt": long_prompt, "completion": "cut"}) + "\n")
    with pytest.raises(PaftError, match="beyond data.max_length"):
        train_branch("sft", cfg, run.model_dir, data, tmp_path / "sft2")


def test_a_moved_run_folder_is_the_same_run(tmp_path):
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'a'}"])
    Run(cfg).prepare()
    (tmp_path / "a").rename(tmp_path / "b")
    Run(load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'b'}"])).prepare()  # no --force needed
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["run"]["output_dir"] == str(tmp_path / "b")


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path):
    """Issue 16 class 3: ``--force`` on a folder that is not a paft run deleted it, data file included."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "prefs.jsonl").write_text("{}\n")
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={out}", "run.force=true"])
    with pytest.raises(PaftError, match="not a paft run folder.*--force only overwrites paft runs") as e:
        Run(cfg).prepare()
    assert "\n" not in str(e.value)
    assert (out / "prefs.jsonl").read_text() == "{}\n"


def test_force_on_a_run_spares_the_input_files_inside_it(tmp_path):
    out = tmp_path / "run"
    data = out / "inputs" / "sft.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    base = [f"run.output_dir={out}", f"data.sft.path={data}"]
    Run(load_config(preset="tiny", overrides=base)).prepare()  # a folder holding only its inputs is usable
    (out / "sft").mkdir()
    (out / "sft" / "train_summary.json").write_text("{}")
    (out / "inputs" / "stale.txt").write_text("x")
    # a changed training config with --force overwrites the run, and the same config with --force redoes it
    for extra in (["sft.learning_rate=0.001", "run.force=true"], ["sft.learning_rate=0.001", "run.force=true"]):
        Run(load_config(preset="tiny", overrides=[*base, *extra])).prepare()
        assert data.read_text() == '{"prompt": "a", "completion": "b"}\n'
        assert not (out / "sft").exists() and not (out / "inputs" / "stale.txt").exists()
        assert (out / "config.yaml").is_file()
        (out / "sft").mkdir()
        (out / "inputs" / "stale.txt").write_text("x")
