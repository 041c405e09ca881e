"""Render a run folder's saved JSON into report.json, report.md, report.html and PNG plots.

Reads only files the pipeline wrote, so `paft report RUN_DIR` re-renders without a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paft.config import PaftConfig
from paft.io import package_versions, write_bytes_atomic, write_json_atomic, write_text_atomic
from paft.report.metrics import LABELS, MODELS, SHORT, alignment_tax, fmt_delta, fmt_value

# the five headline metrics (the `paft run` summary table prints these)
METRICS = [  # key, header, higher is better
    ("sft_exact_match", "SFT exact match", True),
    ("sft_nll", "SFT NLL", False),
    ("pref_accuracy", "pref. accuracy", True),
    ("reward_margin", "reward margin", True),
    ("reward_accuracy", "reward accuracy", True),
]
BRANCHES = ("sft", "preference", "sequential", "reward")
IMAGES = {"metrics": "metrics.png", "training": "training.png", "sparsity": "sparsity.png"}


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def collect(root: Path, cfg: PaftConfig | dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, from the run folder's saved JSON."""
    branches = {}
    for name in BRANCHES:
        s = _read(root / name / "train_summary.json")
        if s:
            s["log_history"] = _read(root / name / "log_history.json") or []
            s["tensorboard"] = (root / name / "tb").is_dir()
            branches[name] = s
    sparsity = _read(root / "sparsity.json") or {}
    ev = _read(root / "eval.json")
    keep = ("overall", "by_type", "by_layer", "histogram")  # not the per-tensor rows: they are in sparsity.json
    return {
        "config": cfg.model_dump(mode="json") if isinstance(cfg, PaftConfig) else cfg,
        "run_dir": str(root),
        "versions": (_read(root / "provenance.json") or {}).get("versions") or package_versions(),
        "provenance": _read(root / "provenance.json"),
        "data": _read(root / "data" / "summary.json"),
        "training": branches,
        "sparsity": {k: {kk: v[kk] for kk in keep if kk in v} for k, v in sparsity.items()},
        "merge": _read(root / "merged" / "paft_merge.json"),
        "eval": ev,
        "alignment_tax": alignment_tax(ev["models"]) if ev and ev.get("models") else None,
        "timings_s": _read(root / "timings.json"),
    }


def _setup_line(cfg: dict[str, Any]) -> str:
    m, p = cfg["merge"], cfg["preference"]
    return (f"Model `{cfg['model']['name']}`; SFT data `{cfg['data']['sft']['path']}`, preference data "
            f"`{cfg['data']['preference']['path']}`; preference method `{p['method']}` (beta {p['beta']}); merge "
            f"`{m['method']}` (weights {m['weights']}, density {m['density']}); SFT L1 lambda {cfg['sft']['l1_lambda']}.")


def _eval_note(ev: dict[str, Any]) -> str:
    return (f"Reward margin and accuracy: DPO implicit reward with `{ev.get('reference')}` as reference, beta "
            f"{ev.get('beta')}. Preference accuracy: the model's own log p(chosen) > log p(rejected).")


def _tax_markdown(tax: dict[str, Any]) -> list[str]:
    models, metrics, values = tax["models"], tax["metrics"], tax["values"]
    lines = ["| metric | " + " | ".join(LABELS.get(m, m) for m in models) + " |", "|---|" + "---:|" * len(models)]
    for x in metrics:
        arrow = {True: " ↑", False: " ↓", None: ""}[x["higher_is_better"]]
        lines.append(f"| {x['label']}{arrow} | " + " | ".join(fmt_value(values[m][x["key"]]) for m in models) + " |")
    lines.append("")
    deltas = tax["deltas"]
    if "sft" in deltas and "preference" in deltas:
        # the headline: what each two-objective model gave up on each branch's own task
        head = [(k, ref) for k, ref in (("sft_exact_match", "sft"), ("pref_accuracy", "preference"))
                if any(x["key"] == k for x in metrics)]
        if head:
            lines += ["### Alignment tax", "",
                      "| model | " + " | ".join(f"Δ {_label(metrics, k)} vs {LABELS[ref]}" for k, ref in head) + " |",
                      "|---|" + "---:|" * len(head)]
            for m in ("sequential", "paft"):
                if m in values:
                    lines.append(f"| {LABELS[m]} | " + " | ".join(fmt_delta(deltas[ref][m][k]) for k, ref in head)
                                 + " |")
            lines.append("")
    cols = [(ref, m) for ref in deltas for m in models if m in deltas[ref]]
    if cols:
        lines += ["### Differences from the single-objective models", "",
                  "Each column is one model minus the SFT-only or the preference-only model; the sequential and "
                  "PAFT columns are the alignment tax (↑/↓: the better direction).", "",
                  "| metric | " + " | ".join(f"{SHORT.get(m, m)} − {SHORT[ref]}" for ref, m in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for x in metrics:
            arrow = {True: " ↑", False: " ↓", None: ""}[x["higher_is_better"]]
            lines.append(f"| {x['label']}{arrow} | " + " | ".join(fmt_delta(deltas[ref][m][x["key"]]) for ref, m in cols)
                         + " |")
        lines.append("")
    return lines


def _label(metrics: list[dict], key: str) -> str:
    return next(x["label"] for x in metrics if x["key"] == key)


def sparsity_columns(sparsity: dict[str, dict]) -> list[str]:
    keys = list(next(iter(sparsity.values()))["overall"])
    return [k for k in keys if k.startswith(("abs<=", "rel<="))]


def _markdown(rep: dict[str, Any]) -> str:
    cfg, ev = rep["config"], rep.get("eval") or {}
    evals = ev.get("models", {})
    lines = ["# PAFT run report", "", _setup_line(cfg), "",
             "The same report with its plots in one file: `report.html`.", ""]
    if evals:
        tax = rep.get("alignment_tax") or alignment_tax(evals)
        lines += [f"## Held-out metrics ({ev.get('n_sft_eval')} SFT rows, {ev.get('n_pref_eval')} preference pairs)", ""]
        lines += _tax_markdown(tax)
        lines += [_eval_note(ev), ""]
        if ev.get("pref_metrics"):
            lines += [f"Preference metrics not computed: {ev['pref_metrics']}.", ""]
        lines += ["![metrics](metrics.png)", ""]
    if rep.get("sparsity"):
        share = sparsity_columns(rep["sparsity"])
        lines += ["## Delta sparsity (share of near-zero entries of B·A·scale)", "",
                  "| branch | " + " | ".join(f"`{k}`" for k in share) + " | mean abs |", "|---|" + "---:|" * (len(share) + 1)]
        for name, s in rep["sparsity"].items():
            o = s["overall"]
            lines.append(f"| {name} | " + " | ".join(f"{o[k]:.3f}" for k in share) + f" | {o['mean_abs']:.2e} |")
        lines += ["", "`rel<=r`: |delta| <= r × RMS of the base weight of its module.", "", "![sparsity](sparsity.png)",
                  ""]
    if rep.get("training"):
        lines += ["## Training", "", "| branch | steps | examples | mean train loss | wall (s) | threads at start | device |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, s in rep["training"].items():
            lines.append(f"| {name} | {s.get('steps')} | {s.get('examples', '–')} | {_fmt(s.get('train_loss'))} | "
                         f"{s.get('wall_s')} | {s.get('threads', '–')} | {s.get('device', '–')} |")
        lines += ["", "![training](training.png)", ""]
    if rep.get("timings_s"):
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
    v = rep.get("versions") or {}
    lines += ["## Versions", "", ", ".join(f"{k} {v[k]}" for k in v), "",
              "The resolved config is `config.yaml`; seeds and input hashes are in `provenance.json`.", ""]
    return "\n".join(lines)


def render_images(rep: dict[str, Any]) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by IMAGES key; a figure without data is left out."""
    from paft.report import plots

    out = {}
    if rep.get("alignment_tax"):
        out["metrics"] = plots.metric_bars(rep["alignment_tax"])
    if rep.get("training"):
        out["training"] = plots.training_curves(rep["training"])
    if rep.get("sparsity"):
        out["sparsity"] = plots.sparsity_figure(rep["sparsity"])
    return {k: v for k, v in out.items() if v}


def write_report(root: Path, cfg: PaftConfig | dict[str, Any]) -> Path:
    """Write report.json, report.md, report.html and the PNGs into ``root``; returns report.md's path."""
    from paft.report.html import render_html

    root = Path(root)
    rep = collect(root, cfg)
    images = render_images(rep)
    for key, png in images.items():
        write_bytes_atomic(root / IMAGES[key], png)
    write_json_atomic(root / "report.json", rep)
    write_text_atomic(root / "report.md", _markdown(rep))
    write_text_atomic(root / "report.html", render_html(rep, images))
    return root / "report.md"
