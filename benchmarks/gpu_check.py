"""The GPU check: paft's training paths on one CUDA GPU, offline, in under 10 minutes (an H200's budget).

    bash benchmarks/gpu_check.sh                          # on the GPU machine (installs carried wheels first)
    python benchmarks/gpu_check.py --out runs/gpu-check   # the same, when everything is installed
    python benchmarks/gpu_check.py --dry-run              # its logic on the CPU with a tiny model (~2 min)

No weights can be fetched there, so the model is a randomly initialised one of a real architecture
(``--arch llama-3.2-1b``: Llama-3.2-1B's config, 1.24B parameters, 128k vocabulary; the tokenizer is paft's
locally built byte-level BPE, so the token counts are those of real text of that length, not of Llama's
tokenizer). Data: ``train_bench.make_pairs`` synthetic HH-RLHF-shaped pairs. It measures, each in a fresh
process (``train_bench.run_child``):

1. SFT and DPO tokens/s and peak GPU memory: paft (bf16, its defaults: packing, completion-only logits,
   cached reference) against TRL at its best (bf16, no gradient checkpointing), same batch, LoRA r=16 on every
   linear layer, sequences up to ``--max-length`` (1024);
2. QLoRA: paft SFT steps with the base in 4-bit NF4 (bitsandbytes), tokens/s and peak memory;
3. both branches at once on the one GPU through the pipeline (``Run.train`` with run.parallel true, then
   false): the wall time of the two, and each branch's peak device memory from its train_summary.json;
4. with ``--dry-run`` only: both branches as 2-process groups (``run.processes: 2``, gloo on the CPU; NCCL
   refuses two ranks on one GPU, so a one-GPU machine cannot check the group path).

Writes ``--out``/gpu_check.json. ``--dry-run`` runs every section on the CPU with a tiny model and 3 steps
(sections whose packages are missing, such as bitsandbytes or TRL, are skipped with the reason), so the script is
known to run before it meets a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench  # noqa: E402  (same folder: data, the per-configuration child process, its step clock)

ARCHS = {
    # Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), less the rope scaling (irrelevant at 1024 tokens)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # Qwen2.5-1.5B's sizes on the llama layout (no q/k/v bias): close in cost
    "qwen2.5-1.5b-like": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                              rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True),
}


def build_model(out: Path, arch: str) -> Path:
    """A random-init model of ``arch`` in bf16 safetensors with paft's local tokenizer (no network)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from paft.models import resolve_model_dir

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("tiny"))  # built locally, chat template included
    spec = dict(ARCHS[arch])
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    torch.manual_seed(0)
    config = LlamaConfig(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_data(out: Path, tok, pairs: int) -> dict[str, Path]:
    return train_bench.write_data(out, train_bench.make_pairs(tok, pairs, seed=0))


def missing(*modules: str) -> str | None:
    import importlib.util

    lacking = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(lacking)}" if lacking else None


def pipeline_pair(model: Path, data: dict[str, Path], work: Path, *, parallel: bool, steps: int, batch: int,
                  max_length: int, device: str, processes: int = 1) -> dict[str, Any]:
    """SFT and DPO branches through ``Run.train`` (both at once on the one device when ``parallel``)."""
    from paft.config import load_config
    from paft.pipeline import Run

    sets = [f"model.name={model}", f"data.sft.path={data['sft']}", f"data.preference.path={data['dpo']}",
            f"data.max_length={max_length}", f"data.max_prompt_length={max_length * 5 // 8}",
            f"run.output_dir={work}", f"run.parallel={str(parallel).lower()}", "run.report_to=[]", "run.force=true",
            f"run.device={device}", f"run.processes={processes}"]
    sets += [f"{b}.{k}={v}" for b in ("sft", "preference") for k, v in
             (("max_steps", steps), ("batch_size", batch), ("save_steps", 10_000), ("lora.r", 16),
              ("lora.alpha", 32))]
    run = Run(load_config(None, overrides=sets))
    run.prepare()
    run.data()
    t0 = time.perf_counter()
    summaries = run.train(["sft", "preference"])
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "branches": {b: {k: s.get(k) for k in ("wall_s", "steps", "peak_device_gib", "peak_rss_gib", "processes",
                                                   "bf16", "device")} for b, s in summaries.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU with a tiny model, 3 steps")
    args = ap.parse_args()
    import torch

    if args.dry_run:
        args.arch, args.steps, args.warmup, args.batch, args.pairs, args.max_length = "tiny", 3, 1, 4, 16, 256
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU")
        device = "cuda"
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.out / f"model-{args.arch}", args.arch)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    data = write_data(args.out, tok, args.pairs)
    report: dict[str, Any] = {
        "verified_on_gpu": not args.dry_run, "dry_run": args.dry_run, "arch": args.arch, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate")},
        "settings": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "max_length": args.max_length,
                     "lora_r": 16}, "results": {}, "skipped": {}}
    results, skipped = report["results"], report["skipped"]

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    def measure(name: str, tool: str, task: str, bf16, paft_sets: dict | None = None, variant: str = "best") -> None:
        spec = {"tool": tool, "variant": variant, "bf16": bf16, "task": task, "steps": args.steps,
                "warmup": args.warmup, "batch": args.batch, "lr": 5e-5, "max_length": args.max_length,
                "max_prompt_length": args.max_length * 5 // 8, "device": device, "model": str(model),
                "data": {k: str(v) for k, v in data.items()}, "work": str(args.out / f"{task}-{name}"),
                "paft_sets": paft_sets or {}}
        t0 = time.perf_counter()
        res = train_bench.run_child(spec)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res.pop("step_s", None), res.pop("tokens", None)
        results[f"{task}/{name}"] = res
        shown = (f"{res['tokens_per_s']:.0f} tokens/s, peak GPU {res.get('peak_gpu_gib')} GiB"
                 if res.get("tokens_per_s") else res.get("error", "")[:200])
        print(f"{task:>4} {name:<12} {shown} ({res['wall_s']} s)", flush=True)
        save()

    bf16 = device == "cuda"  # the CPU dry run: fp32 (bf16 is emulated on most CPUs)
    trl_missing = missing("trl", "datasets")
    for task in ("sft", "dpo"):
        measure("paft", "paft", task, bf16)
        if trl_missing:
            skipped[f"{task}/trl-best"] = trl_missing
        else:
            measure("trl-best", "trl", task, bf16)
        ours, theirs = (results.get(f"{task}/{k}", {}).get("tokens_per_s") for k in ("paft", "trl-best"))
        if ours and theirs:
            results[f"{task}/speedup_vs_trl_best"] = round(ours / theirs, 2)
    qlora_missing = missing("bitsandbytes") or (None if device == "cuda" else "QLoRA needs CUDA")
    if qlora_missing:
        skipped["sft/paft-qlora"] = qlora_missing
    else:
        measure("paft-qlora", "paft", "sft", bf16, {"adapter": "qlora"})
    for parallel in (True, False):
        key = f"branches/{'parallel' if parallel else 'one-after-the-other'}"
        t0 = time.perf_counter()
        try:
            results[key] = pipeline_pair(model, data, args.out / key.replace("/", "-"), parallel=parallel,
                                         steps=args.steps, batch=args.batch, max_length=args.max_length, device=device)
        except Exception as exc:  # a section's failure is a result too; the others still run
            results[key] = {"error": f"{type(exc).__name__}: {exc}"[:500], "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{key}: {results[key]}", flush=True)
        save()
    if args.dry_run:
        try:
            results["branches/2-process-groups"] = pipeline_pair(
                model, data, args.out / "branches-ddp", parallel=False, steps=args.steps, batch=args.batch,
                max_length=args.max_length, device=device, processes=2)
        except Exception as exc:
            results["branches/2-process-groups"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"branches/2-process-groups: {results['branches/2-process-groups']}", flush=True)
    save()
    print(f"wrote {args.out / 'gpu_check.json'} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
