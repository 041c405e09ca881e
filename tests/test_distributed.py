"""Data parallelism on the CPU: a branch of 2 processes x 1 thread (``accelerate launch``, gloo) against 1 process
at the same global batch. The Trainer gives the ranks consecutive micro-batches of one seeded order, so the
global batches, and so the losses and the trained adapter, match to float rounding (gloo sums the ranks'
gradients in another order): 1e-5 here. Also: gradient accumulation matches the larger batch, a killed
2-rank branch resumes on 1 rank, the reference log-prob cache is computed once per row over the ranks and
written by one, and `paft run` with 2 processes per branch, and on a local Ray instance, finishes."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from paft.config import load_config

TOL = 1e-5
FAST = ["run.report_to=[]", "sft.logging_steps=1", "preference.logging_steps=1", "sft.l1_lambda=0.01",
        "run.threads=2"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, paft_cache):
    from paft.pipeline import Run

    out = tmp_path_factory.mktemp("dist") / "run"
    run = Run(load_config(preset="tiny", overrides=[f"run.output_dir={out}", *FAST]))
    run.prepare()
    run.data()
    return run


def train(data_run, kind, name, overrides, threads=2):
    """Train ``kind`` into RUN/``name`` through the pipeline's entry (``run_branch``: a process group when
    run.processes > 1); its summary and logged steps."""
    from paft.train.launch import run_branch

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={data_run.root}", *FAST, *overrides])
    out = data_run.root / name
    summary = run_branch(kind=kind, cfg=cfg, name=kind, model_dir=data_run.model_dir,
                         data_path=data_run.data_dir / f"{kind}_train.jsonl", out_dir=out, threads=threads)
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    return summary, out, logs


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_training(a, b):
    (sa, oa, la), (sb, ob, lb) = a, b
    assert sa["steps"] == sb["steps"] and len(la) == len(lb) >= 3
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], abs=TOL), (la, lb)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=TOL, rel=TOL), (la, lb)
    wa, wb = adapter(oa), adapter(ob)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=TOL)
    # the adapter trained: a test of two untrained adapters would pass trivially
    assert max((wa[k].abs().max() for k in wa if "lora_B" in k)) > 0
    print(f"{oa.name} vs {ob.name}: max |loss diff| {max(abs(x['loss'] - y['loss']) for x, y in zip(la, lb)):.1e}, "
          f"max |grad-norm diff| {max(abs(x['grad_norm'] - y['grad_norm']) for x, y in zip(la, lb)):.1e}, "
          f"max |adapter diff| {max(float((wa[k] - wb[k]).abs().max()) for k in wa):.1e} over {len(la)} steps")


def test_grad_accumulation_matches_the_larger_batch(data_run):
    """2 micro-batches of 2 rows accumulated = 1 batch of 4 (global batch 4 both times): same loss, gradient
    norm and adapter. SFT's NLL averages over the optimizer step's completion tokens, so uneven micro-batches
    weigh the same as in the one batch; the L1 term counts once. (transformers' default would have taken the
    objective's loss as already scaled for accumulation: twice the loss and gradient here.)"""
    steps = ["sft.max_steps=3", "sft.batch_size=4"]
    one = train(data_run, "sft", "ga1", [*steps, "sft.grad_accum=1"], threads=1)
    two = train(data_run, "sft", "ga2", [*steps, "sft.grad_accum=2"], threads=1)
    assert_same_training(one, two)
    assert one[2][0]["l1_delta"] == 0 and one[2][-1]["l1_delta"] > 0  # the L1 term is on: B starts at zero


def test_two_ranks_sft_with_l1_match_one_process(data_run):
    steps = ["sft.max_steps=3", "sft.batch_size=4"]
    one = train(data_run, "sft", "sft-1", steps)
    two = train(data_run, "sft", "sft-2", [*steps, "run.processes=2"])
    assert one[0]["processes"] == 1 and two[0]["processes"] == 2
    assert_same_training(one, two)
    assert not (data_run.root / "sft-2" / "checkpoints" / ".tmp-checkpoint-2").exists()


@pytest.mark.slow
def test_two_ranks_dpo_packed_with_reference_cache_match_one_process(data_run, tmp_path, monkeypatch):
    """DPO on packed pairs: the reference log-probs of each row are computed once over both ranks (each rank
    its own rows), gathered, and written to the cache file by rank 0; a second run reads them all."""
    steps = ["preference.max_steps=3", "preference.batch_size=4", "preference.packing=true"]
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache-1"))
    one = train(data_run, "preference", "dpo-1", steps)
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache-2"))
    two = train(data_run, "preference", "dpo-2", [*steps, "run.processes=2"])
    assert_same_training(one, two)
    rows = 3 * 4 * 2  # steps x global batch x (chosen, rejected): each sequence computed once
    # the tiny training split (after the dev rows) is shorter than 12 pairs: a row seen again is a cache hit
    computed = one[0]["reference_cache"]["computed"]
    for s in (one[0], two[0]):
        assert s["reference_cache"]["computed"] == computed and s["reference_cache"]["hits"] == rows - computed
    files = list((tmp_path / "cache-2" / "reference").glob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["logps"]) == computed
    again = train(data_run, "preference", "dpo-2b", [*steps, "run.processes=2"])
    assert again[0]["reference_cache"] == {**two[0]["reference_cache"], "hits": rows, "computed": 0}


def _run_branch_in_child(root, overrides):
    from paft.pipeline import Run
    from paft.train.launch import run_branch

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={root}", *FAST, *overrides])
    run = Run(cfg)
    run_branch(kind="sft", cfg=cfg, name="sft", model_dir=run.model_dir, data_path=run.data_dir / "sft_train.jsonl",
               out_dir=root / "killed", threads=2)


@pytest.mark.slow
def test_a_killed_two_rank_branch_resumes_on_one(data_run):
    """The group is stopped (its worker gets SIGTERM, which ends the launcher and its ranks) once a checkpoint
    exists; the branch then resumes from it on one process and ends where an uninterrupted run ends."""
    steps = ["sft.max_steps=24", "sft.batch_size=4", "sft.save_steps=2", "sft.lr_scheduler=constant"]
    ckpts = data_run.root / "killed" / "checkpoints"
    proc = mp.get_context("spawn").Process(target=_run_branch_in_child,
                                           args=(data_run.root, [*steps, "run.processes=2"]))
    proc.start()
    deadline = time.time() + 300
    while not any(ckpts.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline and proc.is_alive():
        time.sleep(0.1)
    proc.terminate()
    proc.join(60)
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*"))
    assert done and done[-1] < 24, done  # stopped mid-way
    assert not (data_run.root / "killed" / "adapter").exists()
    # no rank outlives the group: nothing holds the launch's port or keeps writing checkpoints
    time.sleep(2)
    assert sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*")) == done
    resumed = train(data_run, "sft", "killed", steps, threads=1)
    whole = train(data_run, "sft", "whole", steps, threads=1)
    assert resumed[0]["steps"] == 24
    # the 2-rank steps sum gradients in another order than one process (gloo all-reduce), and Adam's
    # normalisation lifts those float differences to ~1e-4 over 24 steps of entries near zero
    for k, v in adapter(whole[1]).items():
        torch.testing.assert_close(adapter(resumed[1])[k], v, rtol=0, atol=3e-4)


def _paft(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "paft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=1200, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_paft_run_with_two_processes_per_branch(tmp_path):
    """The whole tiny run with both branches as 2-rank groups at once (and the sequential baseline on SFT's
    slot when SFT ends); every branch had 2 ranks and the report is written."""
    out = tmp_path / "run"
    t0 = time.time()
    p = _paft(["run", "--preset", "tiny", "--out", str(out), "--set", "run.processes=2", "--set", "run.threads=2",
               "--set", "run.report_to=[]"], tmp_path)
    wall = time.time() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    for b in ("sft", "preference", "sequential"):
        s = json.loads((out / b / "train_summary.json").read_text())
        assert s["processes"] == 2 and s["steps"] == 8
    assert (out / "report.html").is_file()
    print(f"paft run --preset tiny, 2 processes per branch: {wall:.0f} s")


@pytest.mark.slow
def test_ray_backend_trains_the_branches_as_groups(tmp_path):
    """run.backend ray on a local Ray instance (4 logical CPUs: both 2-rank branches fit at once): each branch is
    a Ray task that launches its group; the sequential branch starts after SFT, from SFT's adapter."""
    ray = pytest.importorskip("ray")
    from paft.pipeline import Run

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'run'}", *FAST, "run.backend=ray",
                                                    "run.processes=2", "sft.max_steps=3", "preference.max_steps=3"])
        run = Run(cfg)
        run.prepare()
        t0 = time.time()
        summaries = run.train(["sft", "preference", "sequential"])
        wall = time.time() - t0
    finally:
        ray.shutdown()
    for b, s in summaries.items():
        assert s["processes"] == 2 and s["steps"] == 3, b
    assert summaries["sequential"]["init_adapter"] == str(tmp_path / "run" / "sft" / "adapter")
    print(f"run.backend ray, 3 branches x 2 processes: {wall:.0f} s")


# --------------------------------------------------------------------------- config and launch command (fast)


def test_the_global_batch_must_divide_by_processes_and_accumulation():
    from paft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sft.batch_size 6 is the global batch: it must divide by run.processes "
                                          r"\(2 for sft\) x sft.grad_accum \(2\); use a multiple of 4"):
        load_config(preset="tiny", overrides=["sft.batch_size=6", "sft.grad_accum=2", "run.processes={sft: 2}"])
    with pytest.raises(ConfigError, match="run.processes"):
        load_config(preset="tiny", overrides=["run.processes={reward: 2}"])  # the reward model trains in one
    with pytest.raises(ConfigError, match="at least 1"):
        load_config(preset="tiny", overrides=["run.processes=0"])
    c = load_config(preset="tiny", overrides=["run.processes={sft: 2, sequential: 4}"]).run
    assert [c.processes_for(b) for b in ("sft", "preference", "sequential")] == [2, 1, 4]


def test_scale_out_keys_do_not_change_a_runs_identity():
    """A run folder resumes under another process count, launcher config or backend."""
    from paft.config import config_identity

    a = load_config(preset="tiny")
    b = load_config(preset="tiny", overrides=["run.processes=2", "run.backend=ray", "run.ray_address=h:6379",
                                              "run.accelerate_config=x.yaml"])
    assert config_identity(a) == config_identity(b)


def test_the_accelerate_command(tmp_path):
    from paft.train.launch import accelerate_command

    cmd = accelerate_command(2, tmp_path / "launch.json", cpu=True, threads=1, bf16=False, port=29555)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-3:] == ["-m", "paft.train.launch",
                                                                         str(tmp_path / "launch.json")]
    cmd = accelerate_command(4, tmp_path / "l.json", cpu=False, threads=4, bf16=True, config_file="fsdp.yaml")
    assert "--multi_gpu" not in cmd and cmd[cmd.index("--config_file") + 1] == "fsdp.yaml"
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"


@pytest.mark.slow
def test_a_ranks_one_line_error_reaches_the_caller(data_run):
    """A bad input found inside the group (here: a missing accelerate config is caught before; a missing data
    file inside the ranks) is the same one-line error a single process raises."""
    from paft.errors import DataError
    from paft.train.launch import run_branch

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={data_run.root}", *FAST, "run.processes=2"])
    with pytest.raises(DataError, match="nowhere.jsonl"):
        run_branch(kind="sft", cfg=cfg, name="sft", model_dir=data_run.model_dir,
                   data_path=data_run.root / "nowhere.jsonl", out_dir=data_run.root / "bad", threads=2)


def test_an_online_method_is_refused_as_a_group(tmp_path):
    from paft.errors import ConfigError
    from paft.train.launch import launch_branch

    cfg = load_config(preset="tiny", overrides=["preference.method=iterative-dpo", "run.processes=2"])
    with pytest.raises(ConfigError, match=r"online method 'iterative-dpo'.*run.processes: \{preference: 1\}"):
        launch_branch(2, kind="preference", cfg=cfg, name="preference", out_dir=tmp_path, device="cpu", threads=2,
                      gpus=(), report=print)
