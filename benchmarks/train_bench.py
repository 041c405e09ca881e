"""Training throughput: paft's SFT and DPO branches against TRL's SFTTrainer and DPOTrainer.

    python benchmarks/train_bench.py                      # smollm2-135m, 64 pairs, 10 steps of 4, both tools
    python benchmarks/train_bench.py --steps 6 --warmup 2 --pairs 64 --out runs/train-bench

Same model (SmolLM2-135M-Instruct from paft's cache), same LoRA (r=16, alpha=32, every linear layer,
no dropout), same data (``--pairs`` synthetic preference pairs in HH-RLHF's shape: multi-turn prompts of
100-300 tokens, replies of 40-150 tokens; the SFT set is each prompt with its chosen reply), same
batch size, learning rate and sequence limits. The DPO reference is the adapter-disabled base in both.

Every configuration runs in its own child process (peak RSS is that process's ``ru_maxrss`` from
``wait4``), in one sitting: paft (its defaults: ``run.bf16: auto``, reference log-probs cached per row
but cold at the start, so the first epoch still computes them), TRL with its defaults (gradient
checkpointing on, bf16 on) and TRL at its best on this hardware (gradient checkpointing off, fp32 or
bf16, whichever is faster here: both are run). Step times come from the Trainer's step callbacks;
tokens are the real (non-padding) tokens of each step's batch; the figure is the median over the
steps after ``--warmup``. Tokens are the plain layout's: each reply's prompt counted once per reply,
as TRL's rows hold it, so every configuration is measured on the same work. The machine's fp32 and
bf16 GEMM rates are measured in the same run, and each configuration's model FLOP rate (6 x parameters
x those tokens, x 4/3 for DPO's reference forward; a standard estimate) is given as a share of the fp32
peak: an *effective* share, which exceeds 1 where a configuration computes fewer FLOPs than the plain
layout for the same tokens (paft's shared prompt). The levers are measured one at a time from paft's
plain path (``paft-plain``: full-vocabulary logits, padded rows; ``paft-completion-logits``; ``paft``:
its defaults, which add the shared prompt and packing), and the optimised path's per-step losses are
compared with the plain path's.

Writes ``--out``/train_bench.json and ends with ``dpo_speedup_vs_trl=X sft_speedup_vs_trl=Y``
(paft tokens/s over TRL's best). Runs on a CUDA GPU too when one is present (device chosen
automatically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hh_data import make_pairs, token_lengths  # benchmarks/, beside this script

# --- machine peak -------------------------------------------------------------------------------

def gemm_rates(device: str, seconds: float = 2.0, k: int = 2048, n: int = 2048, max_rows: int = 1024,
               dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """Sustained GFLOP/s of an M x k x n matmul in each of ``dtypes`` (default 2048 x 2048: the shapes of a small
    LM's layers; eval_bench passes its model's MLP shape).

    M is ``max_rows``, or smaller where one product would take over 0.2 s (bf16 emulated on a CPU without
    native bf16 runs at a few hundred MFLOP/s: a 1024-row product would take half a minute).
    """
    import torch

    out = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        b = torch.randn(k, n, device=device, dtype=dtype)
        probe = torch.randn(16, k, device=device, dtype=dtype)
        start = time.perf_counter()
        probe @ b
        per_row = (time.perf_counter() - start) / 16
        rows = int(max(16, min(max_rows, 0.2 / max(per_row, 1e-9))))
        a = torch.randn(rows, k, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            calls += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[name] = 2 * rows * k * n * calls / (time.perf_counter() - start) / 1e9
    return out


# --- one configuration, in a child process -------------------------------------------------------

class StepClock:
    """Patches the Trainer's callback handler and training_step: per-step wall time and real tokens."""

    def __init__(self, profile_step: int | None = None, profile_out: Path | None = None):
        self.profile_step, self.profile_out = profile_step, profile_out
        self.begin: list[float] = []
        self.end: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def install(self) -> None:
        from transformers import Trainer
        from transformers.trainer_callback import CallbackHandler

        clock, begin, end, step = self, CallbackHandler.on_step_begin, CallbackHandler.on_step_end, Trainer.training_step

        def on_step_begin(handler, args, state, control):
            clock.begin.append(time.perf_counter())
            clock.tokens.append(0)
            return begin(handler, args, state, control)

        def on_step_end(handler, args, state, control):
            clock.end.append(time.perf_counter())
            return end(handler, args, state, control)

        def training_step(trainer, model, inputs, *a, **kw):
            # real tokens of the plain layout: every sequence's prompt + reply (a packed batch computes a
            # shared prompt once but counts it for each of its replies, as the padded rows hold it)
            if clock.tokens and "sequence_tokens" in inputs:
                clock.tokens[-1] += int(inputs["sequence_tokens"].sum())
            elif clock.tokens and "attention_mask" in inputs:
                clock.tokens[-1] += int(inputs["attention_mask"].sum())
            if clock.profile_step is not None and len(clock.begin) == clock.profile_step + 1:
                import torch

                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    loss = step(trainer, model, inputs, *a, **kw)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                clock.profile_out.write_text(table)
            else:
                loss = step(trainer, model, inputs, *a, **kw)
            clock.losses.append(float(loss.detach()))
            return loss

        CallbackHandler.on_step_begin, CallbackHandler.on_step_end = on_step_begin, on_step_end
        Trainer.training_step = training_step

    def summary(self, warmup: int) -> dict[str, Any]:
        steps = [(e - b, t) for b, e, t in zip(self.begin, self.end, self.tokens)]
        timed = steps[warmup:] or steps
        rates = [t / s for s, t in timed if s > 0]
        return {"steps": len(steps), "step_s": [round(s, 3) for s, _ in steps], "tokens": [t for _, t in steps],
                "tokens_per_s": statistics.median(rates) if rates else None,
                "median_step_s": statistics.median(s for s, _ in timed) if timed else None,
                "losses": self.losses}


def _lora_kwargs() -> dict[str, Any]:
    return {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "bias": "none",
            "task_type": "CAUSAL_LM"}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    clock = StepClock(spec.get("profile_step"), work / "profile.txt")
    clock.install()
    if spec["tool"] == "paft":
        # a cold reference cache (no head start from an earlier run), the usual converted model
        from paft.io import cache_root

        models = cache_root() / "models"
        cache = work / "paft-cache"
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / "models").exists():
            (cache / "models").symlink_to(models)
        os.environ["PAFT_CACHE"] = str(cache)
        from paft.config import load_config
        from paft.train.branch import train_branch

        kind = "sft" if spec["task"] == "sft" else "preference"
        sets = [f"{s}.max_steps={spec['steps']}" for s in ("sft", "preference")] + [
            f"{s}.batch_size={spec['batch']}" for s in ("sft", "preference")] + [
            f"{s}.learning_rate={spec['lr']}" for s in ("sft", "preference")] + [
            f"{s}.warmup_ratio=0.0" for s in ("sft", "preference")] + [
            f"{s}.save_steps=100000" for s in ("sft", "preference")] + [
            f"{s}.lora.r=16" for s in ("sft", "preference")] + [
            f"{s}.lora.alpha=32" for s in ("sft", "preference")] + [
            f"data.max_length={spec['max_length']}", f"data.max_prompt_length={spec['max_prompt_length']}",
            f"sft.l1_lambda={spec.get('l1', 0.0)}", "preference.method=dpo", "preference.beta=0.1",
            f"run.bf16={spec['bf16']}", "run.report_to=[]", f"run.output_dir={work / 'run'}",
            f"model.name={spec.get('model', 'smollm2-135m')}"]
        sets += [f"{s}.{k}={v}" for s in ("sft", "preference") for k, v in spec.get("paft_sets", {}).items()]
        cfg = load_config(None, overrides=sets)
        from paft.models import resolve_model_dir

        model_dir = resolve_model_dir(cfg.model.name)
        train_branch(kind, cfg, model_dir, Path(spec["data"][spec["task"]]), work / "out",
                     device=spec["device"], threads=spec.get("threads"))
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from paft.models import resolve_model_dir

        model_dir = resolve_model_dir(spec.get("model", "smollm2-135m"))  # gpu_check.py: a random-init folder
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(spec["device"])
        rows = [json.loads(line) for line in Path(spec["data"]["trl_" + spec["task"]]).read_text().splitlines()]
        common = dict(output_dir=str(work / "trl"), per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                      learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1,
                      save_strategy="no", report_to="none", seed=0, data_seed=0, disable_tqdm=True,
                      use_cpu=spec["device"] == "cpu", dataloader_num_workers=0, max_length=spec["max_length"])
        if spec["variant"] == "best":
            common.update(gradient_checkpointing=False, bf16=spec["bf16"] is True)
        elif spec["variant"] == "default-fp32":
            common.update(bf16=False)  # TRL's defaults otherwise (gradient checkpointing on)
        if spec["task"] == "sft":
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(**common, completion_only_loss=True)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok, peft_config=LoraConfig(**_lora_kwargs()))
        else:
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common, beta=0.1)
            trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok, peft_config=LoraConfig(**_lora_kwargs()))
        trainer.train()
    out = clock.summary(spec["warmup"])
    if spec["device"].startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process; its peak RSS from wait4."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    result = Path(fh.name + ".out")
    shutil.rmtree(spec["work"], ignore_errors=True)  # no checkpoint or warm cache left by an earlier sitting
    log = Path(spec["work"]) / "log.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", fh.name, "--child-out", str(result)],
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text()[-2000:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    res = json.loads(result.read_text())
    res["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    return res


def write_data(out: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """The same pairs as paft's files (pairs, SFT chats) and TRL's conversational formats (the same messages, so
    both tools apply the same chat template); gpu_check.py writes its data with it too."""
    data = {"dpo": out / "pairs.jsonl", "sft": out / "sft.jsonl", "trl_dpo": out / "trl_pairs.jsonl",
            "trl_sft": out / "trl_sft.jsonl"}
    data["dpo"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["sft"].write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]})
                                   + "\n" for r in rows))
    data["trl_dpo"].write_text("".join(json.dumps({"prompt": r["prompt"],
                                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]})
                                       + "\n" for r in rows))
    data["trl_sft"].write_text("".join(json.dumps({"prompt": r["prompt"],
                                                   "completion": [{"role": "assistant", "content": r["chosen"]}]})
                                       + "\n" for r in rows))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=320)
    ap.add_argument("--tasks", nargs="+", default=["dpo", "sft"], choices=["dpo", "sft"])
    ap.add_argument("--configs", nargs="+", default=None,
                    help="subset of: paft, trl-default, trl-default-fp32, trl-best-fp32, trl-best-bf16 (default: "
                         "paft, TRL's defaults and TRL's best; bf16 ones only where bf16 GEMMs are fast)")
    ap.add_argument("--out", type=Path, default=Path("runs/train-bench"))
    ap.add_argument("--profile-step", type=int, default=None,
                    help="profile this step (0-based) of each configuration with torch.profiler: WORK/profile.txt")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.child_out).write_text(json.dumps(child(spec)))
        return

    import torch
    from transformers import AutoTokenizer

    from paft.models import resolve_model_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    rows = make_pairs(tok, args.pairs, seed=0)
    data = write_data(args.out, rows)
    lengths = token_lengths(tok, rows)
    print(f"data: {len(rows)} pairs; prompt tokens median {lengths['prompt_median']} "
          f"({lengths['prompt_min']}-{lengths['prompt_max']}), reply {lengths['reply_median']} "
          f"({lengths['reply_min']}-{lengths['reply_max']})", flush=True)
    peak = gemm_rates(device)
    print(f"GEMM peak on {device}: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s", flush=True)

    # paft's levers, one at a time from the plain path: full-vocabulary logits, padded rows
    levers = {"paft-plain": {"packing": "false", "completion_logits": "false"},
              "paft-completion-logits": {"packing": "false", "completion_logits": "true"},
              "paft": {}}
    configs = {"paft": ("paft", "default", "auto"), "paft-fp32": ("paft", "default", False),
               "paft-plain": ("paft", "plain", "auto"),
               "paft-completion-logits": ("paft", "completion-logits", "auto"),
               "trl-default": ("trl", "default", None),
               "trl-default-fp32": ("trl", "default-fp32", False),
               "trl-best-fp32": ("trl", "best", False), "trl-best-bf16": ("trl", "best", True)}
    slow_bf16 = peak["bf16"] < peak["fp32"] / 4 and device == "cpu"
    skipped: dict[str, str] = {}
    if args.configs:
        chosen = args.configs
    elif slow_bf16:
        # TRL's defaults turn bf16 on; where bf16 GEMMs are emulated a step would take hours, so its
        # defaults run with fp32 only (gradient checkpointing still on), and TRL's best is fp32
        chosen = ["paft-plain", "paft-completion-logits", "paft", "trl-default-fp32", "trl-best-fp32"]
        for name in ("trl-default", "trl-best-bf16"):
            skipped[name] = (f"bf16 GEMMs run at {peak['bf16']:.1f} GFLOP/s here vs {peak['fp32']:.1f} in fp32 "
                             "(no native bf16 on this CPU)")
    else:
        # paft-fp32: the same defaults with run.bf16 off, which shows what bf16 buys paft on this hardware
        chosen = ["paft-plain", "paft-completion-logits", "paft", "paft-fp32", "trl-default", "trl-best-fp32",
                  "trl-best-bf16"]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    n_params = 134_515_008  # SmolLM2-135M; 6 N flops per token (forward + backward), LoRA adds ~1%
    for task in args.tasks:
        for name in chosen:
            tool, variant, bf16 = configs[name]
            spec = {"tool": tool, "variant": variant, "bf16": bf16, "task": task, "steps": args.steps,
                    "warmup": args.warmup, "batch": args.batch, "lr": args.lr, "max_length": args.max_length,
                    "max_prompt_length": args.max_prompt_length, "device": device,
                    "data": {k: str(v) for k, v in data.items()}, "work": str(args.out / f"{task}-{name}"),
                    "paft_sets": levers.get(name, {}), "profile_step": args.profile_step}
            start = time.perf_counter()
            res = run_child(spec)
            res["wall_s"] = round(time.perf_counter() - start, 1)
            if res.get("tokens_per_s"):
                flops = 6 * n_params * res["tokens_per_s"] * (4 / 3 if task == "dpo" else 1)  # DPO: + ref forward
                res["share_of_fp32_peak"] = round(flops / (peak["fp32"] * 1e9), 3)
                res["share_of_bf16_peak"] = round(flops / (peak["bf16"] * 1e9), 3)
            results[f"{task}/{name}"] = res
            shown = f"{res['tokens_per_s']:.1f} tokens/s, peak RSS {res['peak_rss_gib']} GiB, " \
                    f"{res['share_of_fp32_peak']:.0%} of the fp32 peak, {res['share_of_bf16_peak']:.0%} of bf16" \
                if res.get("tokens_per_s") else res.get("error")
            print(f"{task:>4} {name:<22} {shown}  ({res['wall_s']} s)", flush=True)

    def best_trl(task: str) -> tuple[str | None, float | None]:
        cands = [(k, v["tokens_per_s"]) for k, v in results.items()
                 if k.startswith(f"{task}/trl-best") and v.get("tokens_per_s")]
        return max(cands, key=lambda x: x[1]) if cands else (None, None)

    ratios = {}
    for task in args.tasks:
        key, trl = best_trl(task)
        ours = results.get(f"{task}/paft", {}).get("tokens_per_s")
        ratios[task] = round(ours / trl, 2) if ours and trl else None
        if key:
            print(f"{task}: paft / TRL best ({key.split('/')[1]}) = {ratios[task]}")
    # the levers one at a time, and the optimised path's losses against the plain path's (same data, seed, steps)
    lever_table: dict[str, list[dict[str, Any]]] = {}
    loss_check: dict[str, Any] = {}
    for task in args.tasks:
        rows, prev = [], None
        for name in levers:
            res = results.get(f"{task}/{name}", {})
            tps = res.get("tokens_per_s")
            if not tps:
                continue
            rows.append({"config": name, "tokens_per_s": round(tps, 1), "peak_rss_gib": res.get("peak_rss_gib"),
                         "vs_previous": round(tps / prev, 2) if prev else None})
            prev = tps
        lever_table[task] = rows
        for row in rows:
            print(f"  {task} {row['config']:<24} {row['tokens_per_s']:>7.1f} tokens/s  x{row['vs_previous'] or 1:.2f}"
                  f"  peak RSS {row['peak_rss_gib']} GiB")
        fp32, ours = (results.get(f"{task}/{n}", {}).get("losses") for n in ("paft-fp32", "paft"))
        if fp32 and ours and len(fp32) == len(ours):
            rel = max(abs(a - b) / abs(b) for a, b in zip(ours, fp32))
            loss_check[f"{task}-bf16"] = {"max_rel_loss_diff_vs_fp32": rel, "final_fp32": fp32[-1], "final_paft": ours[-1]}
            print(f"  {task} losses, bf16 vs fp32: max relative diff over {len(ours)} steps {rel:.2e}")
        plain, ours = (results.get(f"{task}/{n}", {}).get("losses") for n in ("paft-plain", "paft"))
        if plain and ours and len(plain) == len(ours):
            diff = max(abs(a - b) for a, b in zip(plain, ours))
            loss_check[task] = {"max_abs_loss_diff": diff, "final_plain": plain[-1], "final_paft": ours[-1]}
            print(f"  {task} losses, optimised vs plain path: max |diff| over {len(ours)} steps {diff:.2e} "
                  f"(final {ours[-1]:.5f} vs {plain[-1]:.5f})")
    from paft.device import cpu_has_bf16

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    report = {"machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "device": device,
                          "cpu_native_bf16": cpu_has_bf16(), "gemm_gflops": peak}, "data": lengths, "args": {k: str(v) for k, v in vars(args).items()},
              "results": results, "skipped": skipped, "speedup_vs_trl_best": ratios, "levers": lever_table,
              "loss_check": loss_check}
    (args.out / "train_bench.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'train_bench.json'}")
    print(f"dpo_speedup_vs_trl={ratios.get('dpo')} sft_speedup_vs_trl={ratios.get('sft')}")


if __name__ == "__main__":
    main()
