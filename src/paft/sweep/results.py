"""A sweep's results: the table of cells (results.csv|parquet), plots, and the report (report.md|html)."""

from __future__ import annotations

import difflib
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paft.errors import ConfigError
from paft.io import write_bytes_atomic, write_text_atomic
from paft.report import table, to_markdown
from paft.report.html import page
from paft.report.model import Figure, Section, Text
from paft.sweep.findings import findings, findings_section
from paft.sweep.seeds import ALPHA, model_summary, summary_tables
from paft.sweep.spec import SEED_AXIS, ExecutionSettings, Sweep

# plotted by default, the first ones present (report.metrics in the sweep file overrides)
DEFAULT_METRICS = ("paft/pref_accuracy", "paft/sft_exact_match", "sft/sft_nll", "sequential/pref_accuracy",
                   "sequential/sft_exact_match", "train/sft/final_loss", "train/preference/final_loss")


@dataclass
class SweepResult:
    out: Path
    sweep: Sweep
    records: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    table: Any = None  # pandas DataFrame, one row per cell
    metrics: list[str] = field(default_factory=list)  # the plotted / headline metric columns
    report: Path | None = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") != "ok"]


def results_table(sweep: Sweep, records: list[dict[str, Any]]):
    """One row per cell: cell key, axis columns, status, wall_s, every metric (sorted), error."""
    import pandas as pd

    metric_cols = sorted({k for r in records for k in (r.get("metrics") or {})})
    rows = []
    for cell, r in zip(sweep.cells, records):
        row = {"cell": cell.key, **cell.labels, "status": r.get("status"), "wall_s": r.get("wall_s")}
        row.update({m: (r.get("metrics") or {}).get(m) for m in metric_cols})
        row["error"] = r.get("error")
        rows.append(row)
    df = pd.DataFrame(rows, columns=["cell", *sweep.columns, "status", "wall_s", *metric_cols, "error"])
    for col in sweep.columns:  # parquet needs one type per column: numbers stay numbers, anything mixed is text
        vals = [v for v in df[col] if v is not None]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) \
                and not all(isinstance(v, bool) for v in vals):
            df[col] = [None if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
                       for v in df[col]]
    for col in metric_cols + ["wall_s"]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def pick_metrics(df, wanted: list[str] | None, source: str) -> list[str]:
    present = [c for c in df.columns if "/" in c]
    if wanted:
        missing = [m for m in wanted if m not in df.columns]
        if missing and present:  # a typo names nothing: say so, with the nearest column
            hint = difflib.get_close_matches(missing[0], present, n=1)
            raise ConfigError(f"{source}: report.metrics: {missing[0]!r} is not a results column"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return [m for m in wanted if m in df.columns]
    chosen = [m for m in DEFAULT_METRICS if m in df.columns][:3]
    return chosen or present[:3]


def write_results(out: Path, df) -> None:
    write_text_atomic(out / "results.csv", df.to_csv(index=False))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    write_bytes_atomic(out / "results.parquet", buf.getvalue())


def _is_numeric_axis(df, col: str) -> bool:
    vals = [v for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return len(set(vals)) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _axis_kinds(df, columns: list[str]) -> tuple[list[str], list[str]]:
    """(numeric, categorical) axes that vary, the seed axis left out (it becomes error bars)."""
    varying = [c for c in columns if c != SEED_AXIS and df[c].nunique(dropna=False) >= 2]
    numeric = [c for c in varying if _is_numeric_axis(df, c)]
    return numeric, [c for c in varying if c not in numeric]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_vs_numeric(df, metric: str, axis: str, groups: list[str]) -> bytes:
    """Metric against a numeric axis, one line per combination of the other axes; mean ± std over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    ok = df[df["status"] == "ok"]
    grouped = ok.groupby(groups, dropna=False) if groups else [((), ok)]
    for name, part in grouped:
        stats = part.groupby(axis)[metric].agg(["mean", "std", "count"]).sort_index()
        label = ", ".join(f"{g}={v}" for g, v in zip(groups, name if isinstance(name, tuple) else (name,))) or metric
        ax.errorbar(stats.index.astype(float), stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                    label=label)
    xs = [float(v) for v in ok[axis].dropna()]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:  # ranks, learning rates, data sizes: a log axis
        ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
        ax.set_xticks(sorted(set(xs)), [fmt(x) for x in sorted(set(xs))])
    ax.set(xlabel=axis, ylabel=metric)
    seeds = SEED_AXIS in df.columns and df[SEED_AXIS].nunique() > 1
    ax.set_title(f"{metric} vs {axis}" + (" (mean ± std over seeds)" if seeds else ""), fontsize=10)
    if groups:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_bars(df, metric: str, axis: str) -> bytes:
    """Metric per value of the one categorical axis; mean ± std over seeds."""
    from matplotlib.figure import Figure

    ok = df[df["status"] == "ok"]
    stats = ok.groupby(axis, sort=False)[metric].agg(["mean", "std"])
    fig = Figure(figsize=(1.5 + 0.9 * len(stats), 3.4))
    ax = fig.subplots()
    ax.bar([str(i) for i in stats.index], stats["mean"], yerr=stats["std"].fillna(0), capsize=3, color="#4c72b0")
    ax.set(xlabel=axis, ylabel=metric)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_title(metric, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_heatmap(df, metric: str, rows: str, cols: str) -> bytes:
    """Mean of a metric over two categorical axes (averaged over seeds and any other axis)."""
    from matplotlib.figure import Figure

    ok = df[df["status"] == "ok"]
    pivot = ok.pivot_table(index=rows, columns=cols, values=metric, aggfunc="mean")
    fig = Figure(figsize=(1.2 + 1.1 * max(2, pivot.shape[1]), 1.0 + 0.6 * max(2, pivot.shape[0])))
    ax = fig.subplots()
    im = ax.imshow(pivot.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(pivot.shape[1]), [str(c) for c in pivot.columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(pivot.shape[0]), [str(r) for r in pivot.index], fontsize=8)
    ax.set(xlabel=cols, ylabel=rows)
    for (i, j), v in zip(itertools.product(range(pivot.shape[0]), range(pivot.shape[1])), pivot.to_numpy().ravel()):
        if v == v:  # not NaN
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(metric, fontsize=10)
    return _png(fig)


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.3f}"
    return str(v)


def summary_rows(df, columns: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """Mean ± std over the seed axis per combination of the other axes (None without a seed axis)."""
    if SEED_AXIS not in columns or df[SEED_AXIS].nunique() < 2:
        return None
    keys = [c for c in columns if c != SEED_AXIS]
    ok = df[df["status"] == "ok"]
    if ok.empty or not metrics:
        return None
    grouped = ok.groupby(keys, dropna=False, sort=False) if keys else [((), ok)]
    header = [*keys, "seeds", *metrics]
    rows = []
    for name, part in grouped:
        name = name if isinstance(name, tuple) else (name,)
        cells = [f"{part[m].mean():.3f} ± {part[m].std(ddof=1) if len(part) > 1 else 0:.3f}" for m in metrics]
        rows.append([*map(str, name), str(len(part)), *cells])
    return header, rows


def _per_model_section(out: Path, df, columns: list[str]) -> Section | None:
    """A seeds-only sweep (``paft run --seeds N``): every model's mean ± std and its difference from the
    sequential baseline with a paired test over seeds (also written to ``seeds_summary.json``)."""
    if columns != [SEED_AXIS]:
        return None
    summary = model_summary(df)
    if summary is None:
        return None
    write_text_atomic(out / "seeds_summary.json", json.dumps(summary, indent=2, allow_nan=False, default=str))
    means, diffs = summary_tables(summary)
    ref = summary["reference"]
    found = findings(df)
    write_text_atomic(out / "findings.json", json.dumps(found, indent=2, allow_nan=False, default=str))
    return Section(f"Per model, mean ± std over {len(summary['seeds'])} seeds", [
        means, *([Text(f"Difference from `{ref}`, mean over seeds, with a paired t-test over seeds: a difference "
                       f"with p ≥ {ALPHA} is within noise."), diffs] if diffs else []), findings_section(found)])


def write_sweep_report(out: Path, res: SweepResult, ex: ExecutionSettings) -> Path:
    df, sweep, metrics = res.table, res.sweep, res.metrics
    numeric, categorical = _axis_kinds(df, sweep.columns)
    plots: list[tuple[str, str]] = []  # (caption, file relative to out)
    ok_any = bool((df["status"] == "ok").any())
    for metric in metrics if ok_any else []:
        if df[metric].notna().sum() == 0:
            continue
        for axis in numeric:
            groups = [c for c in numeric + categorical if c != axis]
            rel = f"plots/{_slug(metric)}__vs__{_slug(axis)}.png"
            write_bytes_atomic(out / rel, plot_vs_numeric(df, metric, axis, groups))
            plots.append((f"{metric} vs {axis}", rel))
        if len(categorical) >= 2:
            rel = f"plots/{_slug(metric)}__{_slug(categorical[0])}_x_{_slug(categorical[1])}.png"
            write_bytes_atomic(out / rel, plot_heatmap(df, metric, categorical[0], categorical[1]))
            plots.append((f"{metric}: {categorical[0]} × {categorical[1]}", rel))
        elif len(categorical) == 1 and not numeric:
            rel = f"plots/{_slug(metric)}__by__{_slug(categorical[0])}.png"
            write_bytes_atomic(out / rel, plot_bars(df, metric, categorical[0]))
            plots.append((f"{metric} by {categorical[0]}", rel))

    n_ok = int((df["status"] == "ok").sum())
    name = sweep.spec.name or Path(sweep.source).stem
    how = f"{ex.workers} local worker{'s' * (ex.workers != 1)}" if ex.backend == "local" else f"Ray, {ex.num_cpus:g} CPU / {ex.num_gpus:g} GPU per cell"
    intro = (f"{len(df)} cells ({n_ok} ok, {len(df) - n_ok} failed), mode `{sweep.spec.mode}`, {how}; "
             f"from `{sweep.source}`. Every cell is a paft run folder under `cells/<key>/`; all metrics are in "
             f"`results.csv` / `results.parquet`.")
    cell_header = ["cell", *sweep.columns, "status", "wall_s", *metrics]
    cell_rows = [[fmt(row[c]) for c in cell_header] for _, row in df.iterrows()]
    summary = summary_rows(df, sweep.columns, metrics)
    failed = [(row["cell"], row["error"]) for _, row in df.iterrows() if row["status"] != "ok"]

    seeds = len(summary[0]) - len(metrics) - 1 if summary else 0  # the seed-count column: numbers from there on
    per_model = _per_model_section(out, df, sweep.columns)
    report = Section(f"Sweep: {name}", [
        Text(intro),
        *([per_model] if per_model else []),
        *([Section("Mean ± std over seeds", [table(*summary, num_from=seeds)])] if summary else []),
        Section("Cells", [table(cell_header, cell_rows, num_from=len(sweep.columns) + 2)]),
        *([Section("Failed cells", [*(Text(f"- `{k}`: {e} (traceback: `cells/{k}/error.txt`)") for k, e in failed),
                                    Text("The same `paft sweep` command retries them.")])] if failed else []),
        *([Section("Plots", [Figure(rel, cap, cap) for cap, rel in plots])] if plots else [])])
    write_text_atomic(out / "report.md", to_markdown(report) + "\n")
    # figures embedded, so the one file can be mailed or attached
    images = {rel: (out / rel).read_bytes() for _, rel in plots}
    write_text_atomic(out / "report.html", page(report, f"{len(df)} cells, mode {sweep.spec.mode}", images))
    return out / "report.md"
