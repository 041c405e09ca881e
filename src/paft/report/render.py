"""Render a run folder's saved JSON into report.json, report.md, report.html and PNG plots.

Reads only files the pipeline wrote, so `paft report RUN_DIR` re-renders without a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from paft.config import PaftConfig
from paft.io import package_versions, write_bytes_atomic, write_json_atomic, write_text_atomic
from paft.methods.remedies import REMEDIES
from paft.report.frontier import frontier, frontier_section
from paft.report.html import page
from paft.report.markdown import to_markdown
from paft.report.metrics import alignment_tax, metric_info, stderr_of
from paft.report.model import Cell, Code, Column, Figure, Section, Table, Text, table
from paft.report.plots import frontier_plot, metric_bars, sparsity_figure, training_curves
from paft.report.style import ARROWS, DIRECTIONS, LABELS, MODELS, SHORT, TONES, fmt, fmt_delta, fmt_value

# the five headline metrics the `paft run` summary table prints: key, header, higher is better
METRICS = [("sft_exact_match", "SFT exact match", True), ("sft_nll", "SFT NLL", False),
           ("pref_accuracy", "pref. accuracy", True), ("reward_margin", "reward margin", True),
           ("reward_accuracy", "reward accuracy", True)]
# the main branches, then the trained remedies (candidates.trained) present in the folder
BRANCHES = ("sft", "preference", "sequential", "reward", *(r.branch for r in REMEDIES.values()))
TAX_MODELS = ("sequential", "paft")  # trained on both objectives: their differences are the alignment tax


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


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
    rep = {
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
        # candidates.json as written: rows "models" (main models, then each candidate) with metrics and cost
        "candidates": _read(root / "candidates.json"),
        # tune/trials.json as written: the trials on the dev split, their front and the pick
        "tune": _read(root / "tune" / "trials.json"),
    }
    rep["frontier"] = frontier(rep, _read(root / "tune" / "eval.json"))
    return rep


def _metric_cell(x: dict[str, Any]) -> Cell:
    higher = x["higher_is_better"]
    return Cell(x["label"] + ARROWS[higher], title=f"{x['key']}: {DIRECTIONS[higher]}")


def _values_table(tax: dict[str, Any], evals: dict[str, Any]) -> Table:
    """Every metric per model; HTML bolds the best model (unless all tie) and shows saved standard errors."""
    models, values = tax["models"], tax["values"]
    rows = []
    for x in tax["metrics"]:
        key, higher = x["key"], x["higher_is_better"]
        present = [values[m][key] for m in models if values[m][key] is not None]
        best = (max(present) if higher else min(present)) if higher is not None and len(set(present)) > 1 else None
        cells = [_metric_cell(x)]
        for m in models:
            v, se = values[m][key], stderr_of(evals.get(m, {}), key)
            cells.append(Cell(fmt_value(v), note=f"± {fmt_value(se)}" if se is not None and v is not None else "",
                              tone="best" if best is not None and v == best else ""))
        rows.append(cells)
    columns = [Column("metric", cls="metric")] + [Column(Cell(LABELS.get(m, m), swatch=m), num=True) for m in models]
    return Table(columns, rows, cls="values")


def _headline(tax: dict[str, Any]) -> Table | None:
    """What each two-objective model gave up on each branch's own task."""
    deltas, better, values = tax["deltas"], tax["better"], tax["values"]
    labels = {x["key"]: x["label"] for x in tax["metrics"]}
    head = [(k, ref) for k, ref in (("sft_exact_match", "sft"), ("pref_accuracy", "preference")) if k in labels]
    rows = [[Cell(LABELS[m], swatch=m)] + [Cell(fmt_delta(deltas[ref][m][k]), note=fmt_value(values[m][k]),
                                                 tone=TONES[better[ref][m][k]]) for k, ref in head]
            for m in TAX_MODELS if m in values]
    columns = [Column("model")] + [Column(f"Δ {labels[k]} vs {LABELS[ref]}", num=True) for k, ref in head]
    return Table(columns, rows, cls="cards") if head and rows and "sft" in deltas and "preference" in deltas else None


def _deltas_table(tax: dict[str, Any]) -> Table | None:
    deltas, better = tax["deltas"], tax["better"]
    cols = [(ref, m) for ref in deltas for m in tax["models"] if m in deltas[ref]]
    if not cols:
        return None
    columns = [Column("metric", cls="metric")] + [
        Column(Cell(f"{SHORT.get(m, m)} − {SHORT[ref]}", swatch=m), num=True,
               cls=("tax" if m in TAX_MODELS else "ctx") + (" sep" if i and cols[i - 1][0] != ref else ""))
        for i, (ref, m) in enumerate(cols)]
    noise = tax.get("within_noise") or {}

    def quiet(ref: str, m: str, key: str) -> bool:
        return bool(noise.get(ref, {}).get(m, {}).get(key))

    rows = [[_metric_cell(x)] + [Cell(fmt_delta(deltas[ref][m][x["key"]]) + (" ≈" if quiet(ref, m, x["key"]) else ""),
                                      tone=TONES[better[ref][m][x["key"]]],
                                      title=f"{LABELS.get(m, m)} − {LABELS[ref]}, {x['label']}"
                                      + (" (within noise)" if quiet(ref, m, x["key"]) else ""),
                                      delta=deltas[ref][m][x["key"]]) for ref, m in cols]
            for x in tax["metrics"]]
    return Table(columns, rows, cls="deltas")


def _metrics_section(ev: dict[str, Any], tax: dict[str, Any]) -> Section:
    blocks = [_values_table(tax, ev.get("models", {}))]
    cards, deltas = _headline(tax), _deltas_table(tax)
    if cards:
        blocks.append(Section("Alignment tax", [cards], id="tax", nav="Alignment tax"))
    if deltas:
        blocks.append(Section("Differences from the single-objective models", [
            Text("Each column is one model minus the SFT-only or the preference-only model; the sequential and PAFT "
                 "columns are the alignment tax (↑/↓: the better direction)."),
            deltas,
            Text("≈: within noise, the difference is under 1.96 combined standard errors of the two values (shown "
                 "as ± in the table above)."),
            Text("Green: better, red: worse (given the metric's direction), grey: equal, within noise or no better "
                 "direction; bold: the best model on a metric.", only="html")
        ]))
    blocks.append(Text(f"Reward margin and accuracy: DPO implicit reward with `{ev.get('reference')}` as reference, "
                       f"beta {ev.get('beta')}. Preference accuracy: the model's own log p(chosen) > log p(rejected)."))
    if ev.get("pref_metrics"):
        blocks.append(Text(f"Preference metrics not computed: {ev['pref_metrics']}."))
    blocks.append(Figure("metrics.png", "metrics", "Every metric, one panel each; colours as in the tables."))
    return Section(f"Held-out metrics ({ev.get('n_sft_eval')} SFT rows, {ev.get('n_pref_eval')} preference pairs)",
                   blocks, id="metrics", nav="Metrics")


def _sparsity_section(sparsity: dict[str, dict]) -> Section:
    share = [k for k in next(iter(sparsity.values()))["overall"] if k.startswith(("abs<=", "rel<="))]
    rows = [[name, *(f"{s['overall'][k]:.3f}" for k in share), f"{s['overall']['mean_abs']:.2e}"]
            for name, s in sparsity.items()]
    caption = ("Left: distribution of log10 |δ| over all entries (exact zeros in the legend); then the near-zero "
               "share per layer and per module type." if all("histogram" in s for s in sparsity.values()) else
               "Left: share of entries under each saved threshold (this run's sparsity.json predates the "
               "histogram); right: the near-zero share per module type.")
    return Section("Delta sparsity (share of near-zero entries of B·A·scale)", [
        table(["branch", *(f"`{k}`" for k in share), "mean abs"], rows),
        Text("`rel<=r`: |delta| <= r × RMS of the base weight of its module."),
        Figure("sparsity.png", "sparsity", caption)], id="sparsity", nav="Sparsity")


# data summary key -> column: what the data stage dropped or found (docs/data.md, "Degenerate data")
DATA_CHECKS = [("skipped", "invalid rows skipped"), ("equal_pairs", "pairs chosen = rejected, dropped"),
               ("duplicates", "duplicate rows, dropped"), ("eval_overlap", "held-out rows also in train")]


def _data_section(data: dict[str, dict]) -> Section:
    """Each dataset's source, sizes and the degenerate rows the data stage found (– where not recorded)."""
    def count(s: dict, key: str) -> str:
        v = s.get(key)
        extra = s.get(f"eval_{key}") if key in ("skipped", "equal_pairs") else None  # a separate held-out file's
        return "–" if v is None else f"{v} + {extra} held-out" if extra else str(v)

    rows = [[kind, f"`{s.get('path')}`", s.get("format", "–"), s.get("train"), s.get("eval"),
             *(count(s, k) for k, _ in DATA_CHECKS)] for kind, s in data.items()]
    blocks: list = [Table([Column("data"), Column("source"), Column("format"), Column("train", num=True),
                           Column("held-out", num=True), *(Column(h, num=True) for _, h in DATA_CHECKS)], rows)]
    if any(s.get("format", "").startswith("demo") and (s.get("duplicates") or s.get("eval_overlap"))
           for s in data.values()):
        blocks.append(Text("The built-in demo data is used as drawn (its duplicates counted, not dropped)."))
    return Section("Data", blocks, id="data", nav="Data")


def _training_section(training: dict[str, dict], run_name: str) -> Section:
    def gib(x):
        return "–" if x is None else f"{x:.2f}"

    # peak memory of the branch's (rank 0) process, and of its GPU where it trained on one (train_summary.json)
    rows = [[name, s.get("steps"), s.get("examples", "–"), fmt(s.get("train_loss")), s.get("wall_s"),
             s.get("threads", "–"), s.get("processes", 1), gib(s.get("peak_rss_gib")), gib(s.get("peak_device_gib")),
             s.get("device", "–")] for name, s in training.items()]
    nums = ("steps", "examples", "mean train loss", "wall (s)", "threads at start", "processes", "peak RSS (GiB)",
            "peak GPU memory (GiB)")
    blocks = [Table([Column("branch"), *(Column(h, num=True) for h in nums), Column("device")], rows)]
    tb = [n for n, s in training.items() if s.get("tensorboard")]
    if tb:
        blocks.append(Text(f"TensorBoard logs: {', '.join(f'`{n}/tb`' for n in tb)} "
                           f"(`tensorboard --logdir {run_name}`).", only="html"))
    blocks.append(Figure("training.png", "training", "Loss, SFT NLL, reward margin and reward accuracy as logged by "
                         "each branch's Trainer (log_history.json)."))
    return Section("Training", blocks, id="training", nav="Training")


def _candidates_section(cand: dict[str, Any]) -> Section:
    """Every main model and training-free candidate: held-out metrics and cost, HTML bolding each metric's best."""
    rows, keys = cand["models"], cand["metrics"]
    info = [metric_info(k) for k in keys]
    best = {}
    for x in info:
        present = [r["metrics"].get(x.key) for r in rows if r["metrics"].get(x.key) is not None]
        if x.higher is not None and len(set(present)) > 1:
            best[x.key] = max(present) if x.higher else min(present)
    body = []
    for r in rows:
        c = r["cost"]
        name = Cell(LABELS.get(r["name"], r["name"]), swatch=r["name"] if r["family"] == "main" else "",
                    title=r["what"].replace("`", ""))
        body.append([name, r["family"], *(Cell(fmt_value(r["metrics"].get(x.key)),
                                               tone="best" if r["metrics"].get(x.key) == best.get(x.key) else "")
                                          for x in info),
                     fmt(c["train_steps"]), *("–" if v is None else f"{v:.1f}" for v in (c["train_s"], c["extra_s"]))])
    columns = [Column("model"), Column("family"), *(Column(_metric_cell({"key": x.key, "label": x.label,
                                                                          "higher_is_better": x.higher}), num=True)
                                                    for x in info),
               Column("training steps", num=True), Column("training (s)", num=True), Column("extra (s)", num=True)]
    families = {r["family"]: r["what"] for r in rows if r["family"] != "main"}
    blocks: list = [
        Text(f"Models made from the trained branches without training (docs/candidates.md), and trained remedies "
             f"(docs/trained-candidates.md), scored on "
             f"{cand.get('n_sft_eval')} SFT rows and {cand.get('n_pref_eval')} preference pairs, implicit rewards "
             f"against `{cand.get('reference')}`; {cand.get('note')}."),
        Table(columns, body),
        Text("Training steps and seconds: the trained branches each model needs, summed (the SFT and preference "
             "branches train in parallel, so their seconds overlap in wall time). Extra: a candidate's in-memory "
             "merge and held-out evaluation; the PAFT merge's merge stage."),
        *(Text(f"`{f}`: {what}") for f, what in families.items()),
        *(Text(f"Skipped `{f}`: {why}.") for f, why in (cand.get("skipped") or {}).items()),
    ]
    return Section("Candidates", blocks, id="candidates", nav="Candidates")


def build_report(rep: dict[str, Any]) -> Section:
    """The report as one level-1 section, from report.json's content (``collect``)."""
    cfg, ev = rep["config"], rep.get("eval") or {}
    run_name = str(rep.get("run_dir") or cfg["run"]["output_dir"])
    sections = []
    if ev.get("models"):
        sections.append(_metrics_section(ev, rep.get("alignment_tax") or alignment_tax(ev["models"])))
    if (rep.get("candidates") or {}).get("models"):
        sections.append(_candidates_section(rep["candidates"]))
    if rep.get("frontier"):
        sections.append(frontier_section(rep["frontier"], rep.get("tune")))
    if rep.get("sparsity"):
        sections.append(_sparsity_section(rep["sparsity"]))
    if rep.get("data"):
        sections.append(_data_section(rep["data"]))
    if rep.get("training"):
        sections.append(_training_section(rep["training"], run_name))
    if rep.get("timings_s"):
        sections.append(Section("Wall time per stage (s)", [table(["stage", "seconds"], rep["timings_s"].items())],
                                id="timings", nav="Timings"))
    if ev.get("samples"):
        rows = [[m, s["prompt"], s["reply"]] for m in MODELS for s in ev["samples"].get(m, [])[:2]]
        sections.append(Section("Sample replies (held-out SFT prompts)", [table(["model", "prompt", "reply"], rows, 3)],
                                id="samples", nav="Samples"))
    v = rep.get("versions") or {}
    sections.append(Section("Versions", [
        Text(", ".join(f"{k} {v[k]}" for k in v)),
        Text("The resolved config is `config.yaml`; seeds and input hashes are in `provenance.json`."),
        Code("Resolved config", yaml.safe_dump(cfg, sort_keys=False))], id="versions", nav="Versions"))
    m, p = cfg["merge"], cfg["preference"]
    setup = (f"Model `{cfg['model']['name']}`; SFT data `{cfg['data']['sft']['path']}`, preference data "
             f"`{cfg['data']['preference']['path']}`; preference method `{p['method']}` (beta {p['beta']}); merge "
             f"`{m['method']}` (weights {m['weights']}, density {m['density']}); SFT L1 lambda "
             f"{cfg['sft']['l1_lambda']}.")
    return Section("PAFT run report", [
        Text(setup), Text("The same report with its plots in one file: `report.html`.", only="md"), *sections])


def render_images(rep: dict[str, Any]) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by file name; a figure without data is left out."""
    out = {}
    if rep.get("alignment_tax"):
        out["metrics.png"] = metric_bars(rep["alignment_tax"])
    if rep.get("training"):
        out["training.png"] = training_curves(rep["training"])
    if rep.get("sparsity"):
        out["sparsity.png"] = sparsity_figure(rep["sparsity"])
    if rep.get("frontier"):
        out["frontier.png"] = frontier_plot(rep["frontier"], rep.get("tune"))
    return {k: v for k, v in out.items() if v}


def write_report(root: Path, cfg: PaftConfig | dict[str, Any]) -> Path:
    """Write report.json, report.md, report.html and the PNGs into ``root``; returns report.md's path."""
    root = Path(root)
    rep = collect(root, cfg)
    images = render_images(rep)
    for name, png in images.items():
        write_bytes_atomic(root / name, png)
    write_json_atomic(root / "report.json", rep)
    report = build_report(rep)
    write_text_atomic(root / "report.md", to_markdown(report) + "\n")
    write_text_atomic(root / "report.html", page(report, rep["run_dir"], images))
    return root / "report.md"
