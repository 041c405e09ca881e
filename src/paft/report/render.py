"""Render a run folder's saved JSON into report.json, report.md and plots.

Reads only files the pipeline wrote, so `paft report`-style re-rendering needs no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paft.config import PaftConfig
from paft.io import package_versions, write_json_atomic, write_text_atomic

MODELS = ("base", "sft", "preference", "sequential", "paft")
LABELS = {"base": "base", "sft": "SFT only", "preference": "preference only",
          "sequential": "sequential SFT->pref", "paft": "PAFT merge"}
COLORS = {"base": "#9e9e9e", "sft": "#4c72b0", "preference": "#dd8452", "sequential": "#8172b3", "paft": "#55a868"}
METRICS = [  # key, header, higher is better
    ("sft_exact_match", "SFT exact match", True),
    ("sft_nll", "SFT NLL", False),
    ("pref_accuracy", "pref. accuracy", True),
    ("reward_margin", "reward margin", True),
    ("reward_accuracy", "reward accuracy", True),
]


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _delta(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a - b:+.3f}"


def collect(root: Path, cfg: PaftConfig) -> dict[str, Any]:
    branches = {}
    for name in ("sft", "preference", "sequential"):
        s = _read(root / name / "train_summary.json")
        if s:
            s["log_history"] = _read(root / name / "log_history.json") or []
            branches[name] = s
    sparsity = _read(root / "sparsity.json") or {}
    return {
        "config": cfg.model_dump(mode="json"),
        "versions": (_read(root / "provenance.json") or {}).get("versions") or package_versions(),
        "provenance": _read(root / "provenance.json"),
        "data": _read(root / "data" / "summary.json"),
        "training": branches,
        "sparsity": {k: {"overall": v["overall"], "by_type": v["by_type"]} for k, v in sparsity.items()},
        "merge": _read(root / "merged" / "paft_merge.json"),
        "eval": _read(root / "eval.json"),
        "timings_s": _read(root / "timings.json"),
    }


def _plot_metrics(evals: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in MODELS if m in evals]
    shown = [(k, h) for k, h, _ in METRICS if k != "reward_accuracy"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4))
    for ax, (key, header) in zip(axes, shown):
        vals = [evals[n].get(key) for n in names]
        vals = [float("nan") if v is None else v for v in vals]
        ax.bar(range(len(names)), vals, color=[COLORS.get(n, "#333") for n in names])
        ax.set_xticks(range(len(names)), [LABELS[n].replace(" ", "\n", 1) for n in names], fontsize=7)
        ax.set_title(header + (" (lower better)" if key == "sft_nll" else ""), fontsize=9)
        for i, v in enumerate(vals):
            if v == v:
                ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.15)
    fig.suptitle("Held-out metrics per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _plot_training(training: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, s in training.items():
        hist = [h for h in s["log_history"] if "loss" in h]
        if hist:
            axes[0].plot([h["step"] for h in hist], [h["loss"] for h in hist], marker=".", label=name,
                         color=COLORS.get(name))
        acc = [h for h in s["log_history"] if "rewards/margin" in h]
        if acc:
            axes[1].plot([h["step"] for h in acc], [h["rewards/margin"] for h in acc], marker=".", label=name,
                         color=COLORS.get(name))
    axes[0].set_title("training loss (SFT: NLL + lambda * L1)", fontsize=9)
    axes[1].set_title("preference branches: reward margin", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _markdown(rep: dict[str, Any]) -> str:
    cfg, ev = rep["config"], rep["eval"] or {}
    evals = ev.get("models", {})
    lines = ["# PAFT run report", "",
             f"Model `{cfg['model']['name']}`; SFT data `{cfg['data']['sft']['path']}`, preference data "
             f"`{cfg['data']['preference']['path']}`; preference method `{cfg['preference']['method']}` "
             f"(beta {cfg['preference']['beta']}); merge `{cfg['merge']['method']}` (weights {cfg['merge']['weights']}, "
             f"density {cfg['merge']['density']}); SFT L1 lambda {cfg['sft']['l1_lambda']}.", ""]
    if evals:
        lines += [f"## Held-out metrics ({ev.get('n_sft_eval')} SFT rows, {ev.get('n_pref_eval')} preference pairs)", "",
                  "| model | " + " | ".join(h + (" ↑" if up else " ↓") for _, h, up in METRICS) + " |",
                  "|---|" + "---:|" * len(METRICS)]
        for m in MODELS:
            if m in evals:
                lines.append(f"| {LABELS[m]} | " + " | ".join(_fmt(evals[m].get(k)) for k, _, _ in METRICS) + " |")
        lines += ["", f"Reward margin and accuracy: DPO implicit reward with `{ev.get('reference')}` as reference, "
                  f"beta {ev.get('beta')}. Preference accuracy: the model's own log p(chosen) > log p(rejected).", ""]
        if ev.get("pref_metrics"):
            lines += [f"Preference metrics not computed: {ev['pref_metrics']}.", ""]
        lines += ["![metrics](metrics.png)", ""]
        if "sft" in evals and "preference" in evals:
            lines += ["### Alignment tax", "",
                      "| model | Δ SFT exact match vs SFT only | Δ pref. accuracy vs preference only |", "|---|---:|---:|"]
            for m in ("sequential", "paft"):
                if m in evals:
                    d1 = _delta(evals[m]["sft_exact_match"], evals["sft"]["sft_exact_match"])
                    d2 = _delta(evals[m]["pref_accuracy"], evals["preference"]["pref_accuracy"])
                    lines.append(f"| {LABELS[m]} | {d1} | {d2} |")
            lines.append("")
    if rep["sparsity"]:
        keys = list(next(iter(rep["sparsity"].values()))["overall"])
        share = [k for k in keys if k.startswith(("abs<=", "rel<="))]
        lines += ["## Delta sparsity (share of near-zero entries of B·A·scale)", "",
                  "| branch | " + " | ".join(f"`{k}`" for k in share) + " | mean abs |", "|---|" + "---:|" * (len(share) + 1)]
        for name, s in rep["sparsity"].items():
            o = s["overall"]
            lines.append(f"| {name} | " + " | ".join(f"{o[k]:.3f}" for k in share) + f" | {o['mean_abs']:.2e} |")
        lines += ["", "`rel<=r`: |delta| <= r × RMS of the base weight of its module.", ""]
    if rep["training"]:
        lines += ["## Training", "", "| branch | steps | examples | mean train loss | wall (s) | threads at start | device |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, s in rep["training"].items():
            lines.append(f"| {name} | {s['steps']} | {s['examples']} | {_fmt(s['train_loss'])} | {s['wall_s']} | "
                         f"{s['threads']} | {s['device']} |")
        lines += ["", "![training](training.png)", ""]
    if rep["timings_s"]:
        lines += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in rep["timings_s"].items()]
        lines.append("")
    samples = ev.get("samples", {})
    if samples:
        lines += ["## Sample replies (held-out SFT prompts)", "", "| model | prompt | reply |", "|---|---|---|"]
        for m in MODELS:
            for s in samples.get(m, [])[:2]:
                lines.append(f"| {m} | {s['prompt']} | {s['reply'].replace('|', '/').replace(chr(10), ' ')} |")
        lines.append("")
    v = rep["versions"]
    lines += ["## Versions", "", ", ".join(f"{k} {v[k]}" for k in v), "",
              "The resolved config is `config.yaml`; seeds and input hashes are in `provenance.json`.", ""]
    return "\n".join(lines)


def write_report(root: Path, cfg: PaftConfig) -> Path:
    rep = collect(root, cfg)
    evals = (rep["eval"] or {}).get("models", {})
    if evals:
        _plot_metrics(evals, root / "metrics.png")
    if rep["training"]:
        _plot_training(rep["training"], root / "training.png")
    write_json_atomic(root / "report.json", rep)
    write_text_atomic(root / "report.md", _markdown(rep))
    return root / "report.md"
