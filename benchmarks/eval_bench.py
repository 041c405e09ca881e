"""Evaluation cost: paft's fast evaluation path against the plain one, side by side in one process.

    PYTHONPATH=$PWD/src python benchmarks/eval_bench.py --pairs 200 --sft 48 --models 5 --repeats 1
    PYTHONPATH=$PWD/src python benchmarks/eval_bench.py --pairs 16 --sft 8 --models 2   # a smoke run

The models are those of a run on the default model (SmolLM2-135M-Instruct from paft's cache): the base, then
LoRA adapters (r=16 on every linear layer, B drawn at random so each model differs) and, from four models up,
an in-memory TIES merge of the first two adapters (``ModelSpec.plan``: how candidates and merge searches are
scored). The data: ``--pairs`` HH-RLHF-shaped preference pairs (``hh_data.make_pairs``: multi-turn prompts of
100-300 tokens, replies of 40-150) and ``--sft`` held-out demo SFT rows (the run's exact-match / NLL set).

Each repeat evaluates every model with ``evaluate_models(..., fast=False)`` (the plain path: padded rows,
``eval.batch_size`` rows per forward, ``model.generate``) and ``fast=True`` twice: cold (an empty reference
cache, as a run's first evaluation) and warm (the cache the cold call wrote, as every later evaluation on the same
data: candidates.json, a merge search); the order of the paths alternates between repeats. Wall time of each
whole call, its process CPU time (steadier than wall time on a shared machine; about threads x wall on a
quiet one) and each model's ``eval_s`` are recorded; the figure is the median over repeats. The fast path's
metrics are compared with the plain path's (they must agree: same accuracies, NLL and margins to float
rounding). ``--components`` also times pair log-probs, NLL and exact match apart on the base model, with what
bounds the pair path (``pair_ceiling``: each path's tokens and FLOPs, the fp32 GEMM rate, the fastest the packed path
could be at that rate); ``--components-only`` does only that (a few minutes at 200 pairs):

    PYTHONPATH=$PWD/src python benchmarks/eval_bench.py --components-only

Writes ``--out``/eval_bench-cpu.json (or -cuda) with the machine (lscpu model, native bf16, cores, threads)
and ends with ``eval_speedup_cold=X eval_speedup_warm=Y per_model_speedup=Z``.
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

from hh_data import make_pairs, preference_examples, token_lengths  # benchmarks/, beside this script

from paft.methods.objectives import HELDOUT_METRICS

HEADLINE = HELDOUT_METRICS  # the held-out metrics compared between the paths


def machine(device: str) -> dict[str, Any]:
    import torch

    from paft.device import cpu_has_bf16
    from paft.io import usable_cores

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        model = None
    return {"platform": platform.platform(), "cpu": model or platform.processor(), "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(), "torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_bf16(),
            "device": device, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}


def make_models(base: Path, n: int, work: Path) -> list:
    """The base, n - 1 others: LoRA adapters (random B), and from 4 models an in-memory merge of two adapters."""
    import torch

    from paft.config import LoraConfig
    from paft.eval.models import ModelSpec
    from paft.merge.mergekit_config import plan_from_flags
    from paft.models import load_model
    from paft.train.lora import attach_lora

    specs = [ModelSpec("base", base)]
    adapters = max(0, n - 1 - (1 if n >= 4 else 0))
    for i in range(adapters):
        model = attach_lora(load_model(base), LoraConfig(r=16, alpha=32), i)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
        model.save_pretrained(work / f"adapter{i}")
        specs.append(ModelSpec(f"lora{i}", base, work / f"adapter{i}"))
    if n >= 4:
        plan = plan_from_flags(base, [work / "adapter0", work / "adapter1"], "ties", density=0.5,
                               source="eval_bench merge")
        specs.append(ModelSpec("merge", base, plan=plan))
    return specs


def compare(plain: dict, fast: dict) -> dict[str, float]:
    """Largest |fast - plain| of each headline metric over the models (0 for identical accuracies)."""
    out = {}
    for key in HEADLINE:
        diffs = [abs(fast["models"][m][key] - plain["models"][m][key]) for m in plain["models"]
                 if plain["models"][m].get(key) is not None]
        out[key] = max(diffs) if diffs else None
    out["samples_equal"] = plain["samples"] == fast["samples"]
    return out


def components(spec, cfg, tok, sft, pairs, device: str) -> dict[str, dict[str, float]]:
    """Seconds of each held-out metric on one model, plain vs fast (reference cache not used)."""
    from paft.data.tokenize import encode_pair, encode_sft
    from paft.eval.metrics import completion_nll, exact_match, sorted_nll, packed_pair_logps, pair_logps
    from paft.eval.models import load_spec

    e, d = cfg.eval, cfg.data
    budget = e.batch_size * d.max_length
    model = load_spec(spec, cfg, device)
    out: dict[str, dict[str, float]] = {}

    def clock(name, path, fn):
        start = time.perf_counter()
        fn()
        out.setdefault(name, {})[path] = round(time.perf_counter() - start, 2)

    clock("tokenize", "plain", lambda: ([encode_sft(x, tok, d.max_length) for x in sft],
                                        [encode_pair(x, tok, d.max_length, d.max_prompt_length) for x in pairs]))
    sft_rows = [encode_sft(x, tok, d.max_length) for x in sft]
    pair_rows = [encode_pair(x, tok, d.max_length, d.max_prompt_length) for x in pairs]
    clock("pair_logps", "plain", lambda: pair_logps(model, tok, pairs, max_length=d.max_length,
                                                    max_prompt_length=d.max_prompt_length, batch_size=e.batch_size))
    clock("pair_logps", "fast", lambda: packed_pair_logps(model, pair_rows, pad_id=tok.pad_token_id,
                                                          token_budget=budget, pack_length=2 * d.max_length))
    out["pair_ceiling"] = pair_ceiling(model, tok, cfg, pair_rows, out["pair_logps"], device)
    clock("sft_nll", "plain", lambda: completion_nll(model, tok, sft, max_length=d.max_length,
                                                     batch_size=e.batch_size))
    clock("sft_nll", "fast", lambda: sorted_nll(model, sft_rows, pad_id=tok.pad_token_id, token_budget=budget))
    gen = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, max_prompt_tokens=d.max_prompt_length)
    clock("exact_match", "plain", lambda: exact_match(model, tok, sft, **gen))
    clock("exact_match", "fast", lambda: exact_match(model, tok, sft, **gen, token_budget=budget))
    # the evaluation's fast path: NLL and exact match from one forward (its argmax), generating the rows it leaves
    # open and the report's samples
    clock("sft_nll+exact_match", "fast", lambda: exact_match(
        model, tok, sft, **gen, token_budget=budget,
        teacher=(sft_rows, sorted_nll(model, sft_rows, pad_id=tok.pad_token_id, token_budget=budget,
                                      argmax=True).argmax)))
    return out


def pair_ceiling(model, tok, cfg, pair_rows, seconds: dict[str, float], device: str) -> dict[str, float]:
    """What bounds the pair log-probs here: each path's tokens through the decoder (the plain path's padded rows,
    the packed path's rows) and label positions through the LM head, their FLOPs (2 x parameters per token), this
    device's fp32 GEMM rate at the model's MLP shape, and so the fastest the packed path could be (all its FLOPs at
    that rate) and the largest speedup over the measured plain path it could then reach."""
    from train_bench import gemm_rates  # benchmarks/, beside this script

    from paft.data.collate import PairCollator, packed_batches

    e, d = cfg.eval, cfg.data
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings().weight
    decoder = sum(p.numel() for n, p in inner.get_decoder().named_parameters() if "embed" not in n)
    labels = sum(len(r.chosen_ids) + len(r.rejected_ids) for r in pair_rows)  # completion positions
    pairs_per = max(1, e.batch_size // 2)  # the plain path's batches: rows padded to the batch's longest
    plain = sum(2 * len(b) * max(len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in b)
                for b in (pair_rows[i:i + pairs_per] for i in range(0, len(pair_rows), pairs_per)))
    collate = PairCollator(tok.pad_token_id, 2 * d.max_length)
    lengths = [len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in pair_rows]
    packed = sum(collate([pair_rows[i] for i in idx])["input_ids"].numel()
                 for idx in packed_batches(lengths, e.batch_size * d.max_length))
    hidden = head.shape[1]
    gemm = gemm_rates(device, seconds=3.0, k=hidden, n=4 * hidden if hidden < 1024 else hidden, max_rows=4096,
                      dtypes=("fp32",))["fp32"]
    flops = {path: (2 * decoder * tokens + 2 * head.numel() * labels) / 1e9
             for path, tokens in (("plain", plain), ("fast", packed))}
    ideal = flops["fast"] / gemm
    return {"decoder_params": decoder, "label_positions": labels, "plain_tokens": plain, "packed_tokens": packed,
            "plain_gflop": round(flops["plain"]), "fast_gflop": round(flops["fast"]),
            "gemm_gflops": round(gemm, 1),
            "plain_gflops": round(flops["plain"] / seconds["plain"], 1),
            "fast_gflops": round(flops["fast"] / seconds["fast"], 1),
            "fast_at_peak_s": round(ideal, 1), "max_pair_speedup": round(seconds["plain"] / ideal, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--sft", type=int, default=48)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=512, help="data.max_length (real HH lengths fit)")
    ap.add_argument("--max-prompt-length", type=int, default=384)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="eval.max_new_tokens")
    ap.add_argument("--batch-size", type=int, default=16, help="eval.batch_size")
    ap.add_argument("--harmlessness", action="store_true", help="also the 36 harmlessness replies per model")
    ap.add_argument("--components", action="store_true", help="also time each held-out metric on the base")
    ap.add_argument("--components-only", action="store_true",
                    help="only that, plus the pair path's FLOP ceiling (eval_bench-components-*.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="paft-eval-bench-"))
    from paft.io import cache_root

    models = cache_root() / "models"  # the converted models stay where they are; the reference cache starts empty
    os.environ["PAFT_CACHE"] = str(work / "cache")
    (cache_root() / "models").mkdir(parents=True)
    if models.is_dir():
        for m in models.iterdir():
            (cache_root() / "models" / m.name).symlink_to(m)
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    import torch

    from paft.config import load_config
    from paft.data.demo import demo_splits
    from paft.device import resolve_device
    from paft.eval.models import ModelSpec, evaluate_models
    from paft.models import load_tokenizer, resolve_model_dir
    from paft.progress import quiet_libraries

    quiet_libraries()
    device = resolve_device("auto")
    base = resolve_model_dir(args.model)
    tok = load_tokenizer(base)
    rows = make_pairs(tok, args.pairs, seed=args.seed)
    pairs = preference_examples(rows)
    _, sft = demo_splits("sft", 0, args.sft, args.seed)
    cfg = load_config(overrides=[
        f"model.name={args.model}", "eval.harness_tasks=[]", f"eval.harmlessness={str(args.harmlessness).lower()}",
        f"eval.max_examples={max(args.pairs, args.sft)}", f"eval.max_new_tokens={args.max_new_tokens}",
        f"eval.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_prompt_length}"])
    lengths = token_lengths(tok, rows)
    if args.components_only:  # the base model's metrics one by one, and the pair path's FLOP ceiling
        parts = components(ModelSpec("base", base), cfg, tok, sft, pairs, device)
        print(f"components on the base model ({len(pairs)} pairs, {len(sft)} SFT rows): {json.dumps(parts)}")
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"eval_bench-components-{'cuda' if device.startswith('cuda') else 'cpu'}.json"
        out.write_text(json.dumps({"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()},
                                   "data": lengths, "components_s": parts}, indent=2) + "\n")
        c = parts["pair_ceiling"]
        print(f"wrote {out}\npair_speedup={parts['pair_logps']['plain'] / parts['pair_logps']['fast']:.2f} "
              f"max_pair_speedup_at_gemm_peak={c['max_pair_speedup']} (fast path at {c['fast_gflops']} of "
              f"{c['gemm_gflops']} GFLOP/s)")
        return
    specs = make_models(base, args.models, work)
    print(f"{len(specs)} models ({', '.join(s.name for s in specs)}), {len(pairs)} pairs (prompt median "
          f"{lengths['prompt_median']} tokens, reply median {lengths['reply_median']}), {len(sft)} SFT rows, "
          f"device {device}, {torch.get_num_threads()} torch threads", flush=True)
    ref_cache = Path(os.environ["PAFT_CACHE"]) / "reference"
    times: dict[str, list[float]] = {"plain": [], "fast_cold": [], "fast_warm": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}  # process CPU time: steadier than wall on a shared machine
    per_model: dict[str, dict[str, list[float]]] = {k: {} for k in times}
    results: dict[str, dict] = {}
    for r in range(args.repeats):
        order = ["plain", "fast_cold", "fast_warm"] if r % 2 == 0 else ["fast_cold", "fast_warm", "plain"]
        for path in order:
            if path == "fast_cold":
                shutil.rmtree(ref_cache, ignore_errors=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            res = evaluate_models(specs, cfg, tok, sft, pairs, device=device, fast=path != "plain")
            wall = time.perf_counter() - start
            times[path].append(wall)
            cpu[path].append(time.process_time() - cpu_start)
            for name, row in res["models"].items():
                per_model[path].setdefault(name, []).append(row["eval_s"])
            results[path] = res
            print(f"  repeat {r + 1}/{args.repeats} {path:9s} {wall:8.1f} s ({cpu[path][-1]:.1f} s CPU)  "
                  + " ".join(f"{n}={row['eval_s']:.1f}" for n, row in res["models"].items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    model_med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in per_model.items()}
    others = [n for n in model_med["plain"] if n != "base"]  # evaluated models beside the reference

    def per_model_ratio(path: str) -> float | None:
        if not others:
            return None
        return round(statistics.median(model_med["plain"][n] for n in others)
                     / statistics.median(model_med[path][n] for n in others), 2)

    ratios = {"cold": round(med["plain"] / med["fast_cold"], 2), "warm": round(med["plain"] / med["fast_warm"], 2),
              "per_model": per_model_ratio("fast_cold"),
              "cold_cpu": round(cpu_med["plain"] / cpu_med["fast_cold"], 2),
              "warm_cpu": round(cpu_med["plain"] / cpu_med["fast_warm"], 2)}
    check = compare(results["plain"], results["fast_cold"])
    parts = components(specs[0], cfg, tok, sft, pairs, device) if args.components else None
    print(f"median wall: plain {med['plain']:.1f} s, fast cold {med['fast_cold']:.1f} s, fast warm "
          f"{med['fast_warm']:.1f} s; CPU: plain {cpu_med['plain']:.1f} s, fast cold {cpu_med['fast_cold']:.1f} s, "
          f"fast warm {cpu_med['fast_warm']:.1f} s")
    print(f"metrics, fast vs plain, largest |difference| over models: {check}")
    if parts:
        print("components on the base model (s): " + ", ".join(f"{k} {v}" for k, v in parts.items()))
    report = {"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()}, "data": lengths,
              "models": [s.name for s in specs], "wall_s": times, "median_wall_s": med, "cpu_s": cpu,
              "median_cpu_s": cpu_med, "per_model_median_s": model_med,
              "speedup": ratios, "metric_check": check, "components_s": parts,
              "metrics": {k: results[k]["models"] for k in ("plain", "fast_cold")}}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"eval_bench-{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"eval_speedup_cold={ratios['cold']} eval_speedup_warm={ratios['warm']} "
          f"per_model_speedup={ratios['per_model']} (CPU time: cold {ratios['cold_cpu']}, warm {ratios['warm_cpu']})")


if __name__ == "__main__":
    sys.exit(main())
