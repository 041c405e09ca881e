"""Sweeps: many paft runs from one YAML file, resumable, on the local worker pool or on Ray.

A sweep file names a base config (``preset``, ``base_config``, inline ``base``) and either
``axes`` (dotted config keys -> lists of values; the grid is their product) or ``cells``
(an explicit list of ``{dotted key: value}``). Every cell's PaftConfig is built and
validated before anything runs (``spec``). A cell is keyed by the sha256 of its resolved config
(execution-only keys left out), runs as an ordinary paft run folder in
``OUT/cells/<key>/`` (``cell``) and records ``cell.json`` there when it ends, so a second call skips
finished cells and retries failed ones. ``OUT/results.csv|parquet`` has one row per cell
and ``OUT/report.md|html`` tables and plots them (``results``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from paft.config import format_validation_error
from paft.errors import ConfigError, PaftError
from paft.io import lock_folder, usable_cores, write_text_atomic
from paft.models import resolve_model_dir
from paft.progress import ProgressUI
from paft.sweep.backends import run_local, run_ray
from paft.sweep.cell import read_json
from paft.sweep.results import SweepResult, pick_metrics, results_table, write_results, write_sweep_report
from paft.sweep.spec import Cell, ExecutionSettings, Sweep, load_sweep
from paft.workers import import_ray

def _finished(root: Path, cell: Cell, mode: str) -> dict[str, Any] | None:
    rec = read_json(root / "cell.json")
    if isinstance(rec, dict) and rec.get("status") == "ok" and rec.get("config_sha256") == cell.digest \
            and rec.get("mode") == mode:
        return rec
    return None


def run_sweep(path: str | Path | Sweep, out: str | Path | None = None, *, overrides: list[str] | None = None,
              backend: str | None = None, workers: int | None = None, ui=None) -> SweepResult:
    """Run the cells of a sweep file (or a loaded Sweep) that have not finished, then write results and report."""
    sweep = path if isinstance(path, Sweep) else load_sweep(path, overrides)
    spec = sweep.spec
    given = {k: v for k, v in (("backend", backend), ("workers", workers)) if v is not None}
    try:
        ex = ExecutionSettings.model_validate({**spec.sweep.model_dump(), **given})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "paft sweep", ExecutionSettings, "option")) from None
    if ex.backend == "ray":
        import_ray("sweep.backend")  # a missing Ray fails before anything runs
    out = Path(out or Path("sweeps") / (spec.name or Path(sweep.source).stem)).resolve()
    ui = ui or ProgressUI(enabled=False)
    lock_folder(out)  # a second sweep into this folder stops here, naming the holder

    threads = max(1, usable_cores() // ex.workers if ex.backend == "local" else int(ex.num_cpus))
    payloads, records, skipped = [], {}, []
    for cell in sweep.cells:
        root = out / "cells" / cell.key
        prior = _finished(root, cell, spec.mode)
        if prior is not None:
            records[cell.key] = prior
            skipped.append(cell.key)
            continue
        cfg = copy.deepcopy(cell.config)
        cfg["run"]["output_dir"] = str(root)
        if cfg["run"].get("threads") is None:  # a thread count set in the config is the user's choice
            cfg["run"]["threads"] = threads
            if threads < 2:  # no cores to split between parallel branches: they would only compete
                cfg["run"]["parallel"] = False
        payloads.append({"key": cell.key, "digest": cell.digest, "labels": cell.labels, "values": cell.values,
                         "mode": spec.mode, "config": cfg, "threads": cfg["run"]["threads"], "cwd": os.getcwd()})

    write_text_atomic(out / "sweep.yaml", yaml.safe_dump(
        {"source": sweep.source, **spec.model_dump(mode="json", exclude_none=True)}, sort_keys=False))
    total = len(sweep.cells)
    counts = {"ok": 0, "failed": 0, "skipped": len(skipped), "running": 0}
    desc = {c.key: ", ".join(f"{k}={v}" for k, v in c.labels.items()) for c in sweep.cells}

    def refresh() -> None:
        ui.update("cells", counts["ok"] + counts["failed"] + counts["skipped"], total,
                  f"ok {counts['ok']} · failed {counts['failed']} · skipped {counts['skipped']}"
                  + (f" · in flight {counts['running']}" if counts["running"] else ""))

    def started(p: dict[str, Any]) -> None:
        counts["running"] += 1
        refresh()

    def done(rec: dict[str, Any]) -> None:
        counts["running"] -= 1
        records[rec["key"]] = rec
        ok = rec["status"] == "ok"
        counts["ok" if ok else "failed"] += 1
        wall = f"{rec['wall_s']:.0f} s" if rec.get("wall_s") is not None else ""
        ui.log(f"{'[green]ok' if ok else '[red]failed'}[/] {rec['key']} ({desc[rec['key']]}) {wall}"
               + ("" if ok else f": {rec['error']}"))
        refresh()

    refresh()
    if payloads:
        if ex.backend == "local" or not ex.ray.address:
            _resolve_models(payloads, ui)
        if ex.backend == "local":
            run_local(payloads, ex.workers, done, started)
        else:
            run_ray(payloads, ex, done, started)

    ordered = [records[c.key] for c in sweep.cells]
    res = SweepResult(out, sweep, ordered, ran=[p["key"] for p in payloads], skipped=skipped)
    res.table = results_table(sweep, ordered)
    res.metrics = pick_metrics(res.table, spec.report.metrics, sweep.source)
    write_results(out, res.table)
    res.report = write_sweep_report(out, res, ex)
    return res


def _resolve_models(payloads: list[dict[str, Any]], ui) -> None:
    """Resolve (convert, build) each base model once here, not in several cells at the same time."""
    for name, rev in dict.fromkeys((p["config"]["model"]["name"], p["config"]["model"]["revision"]) for p in payloads):
        with contextlib.suppress(PaftError):  # a model that cannot be resolved fails its cells, with the reason
            resolve_model_dir(name, rev, progress=ui.log)

