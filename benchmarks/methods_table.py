"""Train the preference branch alone with several methods on the default demo data and model,
evaluate each against the base, and print a Markdown table.

    python benchmarks/methods_table.py --methods dpo ipo kto orpo simpo r-dpo sdpo pro iterative-dpo --out runs/methods

Each method uses the default preset's budget (16 steps x 8 pairs, lr 5e-4) and its paper's beta
where the registry has one (e.g. SimPO 2.0), else 0.1. Listwise methods train on the ranked demo
(4 graded replies per prompt); online methods on the demo prompts, scored by the reward model the
run trains first (preset: 2 rounds x 32 prompts x 4 samples). Results also go to OUT/methods.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from paft.config import load_config
from paft.io import write_json_atomic
from paft.pipeline import Run
from paft.progress import quiet_libraries
from paft.methods.losses import get_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+",
                    default=["dpo", "ipo", "kto", "orpo", "simpo", "r-dpo", "sdpo", "pro", "iterative-dpo"])
    ap.add_argument("--out", default="runs/methods")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    quiet_libraries()
    results = {}
    for method in args.methods:
        beta = get_loss(method).paper_beta or 0.1
        cfg = load_config(overrides=[f"run.output_dir={Path(args.out) / method}", f"preference.method={method}",
                                     f"preference.beta={beta}", "run.sequential_baseline=false", *args.sets])
        run = Run(cfg)
        run.prepare()
        start = time.perf_counter()
        summary = run.train(["preference"])["preference"]
        ev = run.evaluate()["models"]
        rounds = [r.get("mean_sample_score") for r in summary.get("phases") or [] if "round" in r]
        results[method] = {"beta": beta, "train_s": summary["wall_s"], "total_s": round(time.perf_counter() - start, 1),
                           "base": ev["base"], "trained": ev["preference"], "round_scores": rounds}
        write_json_atomic(Path(args.out) / "methods.json", results)
        print(f"{method}: done in {results[method]['total_s']} s", flush=True)
    print("\n| method | beta | pref. accuracy | reward margin | SFT exact match | SFT NLL | train s | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    base = next(iter(results.values()))["base"]
    print(f"| base | – | {base['pref_accuracy']:.3f} | – | {base['sft_exact_match']:.3f} | {base['sft_nll']:.3f} | – | |")
    for m, r in results.items():
        t = r["trained"]
        print(f"| {m} | {r['beta']} | {t['pref_accuracy']:.3f} | {t['reward_margin']:.3f} | "
              f"{t['sft_exact_match']:.3f} | {t['sft_nll']:.3f} | {r['train_s']} | {_notes(r)} |")


def _notes(r: dict) -> str:
    if r.get("round_scores"):
        return "mean reward of policy samples by round: " + " → ".join(f"{x:.2f}" for x in r["round_scores"])
    return ""


if __name__ == "__main__":
    main()
