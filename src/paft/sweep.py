"""Sweeps: many paft runs from one YAML file, resumable, on a local process pool or on Ray.

A sweep file names a base config (``preset``, ``base_config``, inline ``base``) and either
``axes`` (dotted config keys -> lists of values; the grid is their product) or ``cells``
(an explicit list of ``{dotted key: value}``). Every cell's PaftConfig is built and
validated before anything runs. A cell is keyed by the sha256 of its resolved config
(execution-only keys left out), runs as an ordinary paft run folder in
``OUT/cells/<key>/`` and records ``cell.json`` there when it ends, so a second call skips
finished cells and retries failed ones. ``OUT/results.csv|parquet`` has one row per cell
and ``OUT/report.md|html`` tables and plots them.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as _dt
import difflib
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from paft.config import PRESETS, PaftConfig, _deep_update, format_validation_error, load_config, parse_override
from paft.errors import ConfigError, PaftError
from paft.io import write_bytes_atomic, write_json_atomic, write_text_atomic

MODES = ("run", "sft", "preference")
SEED_AXIS = "run.seed"
# keys that change how a cell executes, not what it computes: left out of the cell key
# (the same set the run folder ignores when it checks that a config matches, plus the folder itself)
_EXECUTION_KEYS = {"output_dir", "force", "parallel", "threads", "device", "report_to"}
# plotted by default, the first ones present (report.metrics in the sweep file overrides)
DEFAULT_METRICS = ("paft/pref_accuracy", "paft/sft_exact_match", "sft/sft_nll", "sequential/pref_accuracy",
                   "sequential/sft_exact_match", "train/sft/final_loss", "train/preference/final_loss")


# --------------------------------------------------------------------------- the sweep file

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RaySettings(_Strict):
    address: str | None = Field(None, description="a Ray cluster (ray://host:10001 or auto); unset: a local instance")


class ExecutionSettings(_Strict):
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(1, gt=0, description="local: cells at once; the CPU threads are split between them")
    num_cpus: float = Field(1, gt=0, description="ray: CPUs per cell (also its torch threads)")
    num_gpus: float = Field(0, ge=0, description="ray: GPUs per cell")
    ray: RaySettings = RaySettings()


class ReportSettings(_Strict):
    metrics: list[str] | None = Field(None, description="results columns to plot; default: PAFT's headline metrics")


class SweepSpec(_Strict):
    name: str | None = None
    preset: str | None = None
    base_config: str | None = Field(None, description="a paft config file, relative to the sweep file")
    base: dict[str, Any] = Field(default_factory=dict, description="config applied over preset / base_config")
    axes: dict[str, list[Any]] | None = None
    cells: list[dict[str, Any]] | None = None
    mode: Literal["run", "sft", "preference"] = "run"
    sweep: ExecutionSettings = ExecutionSettings()
    report: ReportSettings = ReportSettings()

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {', '.join(PRESETS)}")
        return v

    @field_validator("axes")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        for key, values in (v or {}).items():
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> "SweepSpec":
        if (self.axes is None) == (self.cells is None):
            raise ValueError("give either `axes` (a grid) or `cells` (a list), not both and not neither")
        if self.cells is not None and not self.cells:
            raise ValueError("`cells` is empty")
        return self


@dataclass
class Cell:
    key: str  # first 12 hex digits of digest: the folder name
    digest: str  # sha256 of the resolved config without execution-only keys
    labels: dict[str, Any]  # column -> value shown in tables (an axis value's label when it has one)
    values: dict[str, Any]  # dotted config key -> the value applied
    config: dict[str, Any]  # the resolved config (JSON), run.output_dir not yet set


@dataclass
class Sweep:
    spec: SweepSpec
    source: str  # the sweep file (for messages)
    columns: list[str]  # axis columns, in file order
    cells: list[Cell]


def _label(v: Any) -> tuple[Any, Any]:
    """(label, value) of an axis entry: ``{label: ..., value: ...}`` or a bare value."""
    if isinstance(v, dict) and set(v) == {"label", "value"}:
        return v["label"], v["value"]
    if isinstance(v, (dict, list)):  # unlabelled structure: a compact, stable column value
        return json.dumps(v, sort_keys=True, separators=(",", ":")), v
    return v, v


def _model_of(annotation: Any) -> Any:
    """The pydantic section class behind a field annotation; dict for free-form mappings; None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is dict or annotation is dict or annotation is Any:
        return dict
    for arg in get_args(annotation):  # Optional[Section], Section | None
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_key(key: str, source: str) -> None:
    """A dotted key must name a config field (or lie under a free-form mapping like preference.params)."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"{source}: {key!r}: empty part in a dotted config key")
    cur: Any = PaftConfig
    for i, part in enumerate(parts):
        if cur is dict:
            return
        prefix = ".".join(parts[:i])
        if cur is None:
            raise ConfigError(f"{source}: {key!r}: {prefix!r} is a value, not a section")
        fields = cur.model_fields
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            where = f"{prefix}.{hint[0]}" if prefix and hint else (hint[0] if hint else "")
            raise ConfigError(f"{source}: {key!r}: unknown config key" + (f" (did you mean {where!r}?)" if hint else ""))
        cur = _model_of(fields[part].annotation)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key; a mapping is merged into the section there, so its other keys keep their values."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _deep_update(node[parts[-1]], copy.deepcopy(value))
    else:
        node[parts[-1]] = copy.deepcopy(value)


def _get(data: dict[str, Any], key: str) -> Any:
    for p in key.split("."):
        if not isinstance(data, dict) or p not in data:
            return None
        data = data[p]
    return data


def config_digest(config: PaftConfig | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved config, execution-only keys left out."""
    d = config.model_dump(mode="json") if isinstance(config, PaftConfig) else copy.deepcopy(config)
    for k in _EXECUTION_KEYS:
        d.get("run", {}).pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Parse and validate a sweep file and build every cell's config (nothing runs)."""
    path = Path(path)
    raw = _read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base, axes or cells, mode, sweep), got {type(raw).__name__}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = list(SweepSpec.model_fields) if len(e["loc"]) == 1 else []
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{msg}") from None
    return expand(spec, path, overrides)


def _base_dict(spec: SweepSpec, sweep_path: Path, overrides: list[str] | None) -> dict[str, Any]:
    """preset <- base_config <- inline base <- --set, as `paft run` resolves a file (validated here once)."""
    if spec.base_config:
        base_path = Path(spec.base_config)
        if not base_path.is_absolute():
            base_path = sweep_path.parent / base_path
        cfg = load_config(base_path, preset=spec.preset)
    elif spec.preset or not spec.base:
        cfg = load_config(None, preset=spec.preset or "default")
    else:  # an inline base is a config file of its own: over the schema's defaults, not the demo budget
        cfg = PaftConfig()
    data = cfg.model_dump(mode="json")
    _deep_update(data, copy.deepcopy(spec.base))
    for item in overrides or []:
        parts, value = parse_override(item)
        check_key(".".join(parts), f"--set {item!r}")
        _set(data, ".".join(parts), value)
    try:
        PaftConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{sweep_path}: base")) from None
    return data


def expand(spec: SweepSpec, sweep_path: Path, overrides: list[str] | None = None) -> Sweep:
    base = _base_dict(spec, sweep_path, overrides)
    if spec.axes is not None:
        columns = list(spec.axes)
        for key in columns:
            check_key(key, f"{sweep_path}: axes")
        entries = [[_label(v) for v in spec.axes[k]] for k in columns]
        combos = [dict(zip(columns, combo)) for combo in itertools.product(*entries)]
    else:
        columns = list(dict.fromkeys(k for c in spec.cells for k in c))
        for i, c in enumerate(spec.cells):
            for key in c:
                check_key(key, f"{sweep_path}: cells[{i}]")
        combos = [{k: _label(v) for k, v in c.items()} for c in spec.cells]
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for i, combo in enumerate(combos):
        data = copy.deepcopy(base)
        for key, (_, value) in combo.items():
            _set(data, key, value)
        desc = ", ".join(f"{k}={lab}" for k, (lab, _) in combo.items())
        try:
            cfg = PaftConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{sweep_path}: cell {i + 1} ({desc})")) from None
        resolved = cfg.model_dump(mode="json")
        digest = config_digest(resolved)
        if digest in seen:
            raise ConfigError(f"{sweep_path}: cells {seen[digest] + 1} and {i + 1} ({desc}) resolve to the same config "
                              f"(they differ only in execution keys run.{'/'.join(sorted(_EXECUTION_KEYS))})")
        seen[digest] = i
        # a key a cell does not set shows the value it resolved to (cells: lists may set different keys)
        labels = {k: combo[k][0] if k in combo else _get(resolved, k) for k in columns}
        cells.append(Cell(digest[:12], digest, labels, {k: v for k, (_, v) in combo.items()}, resolved))
    return Sweep(spec, str(sweep_path), columns, cells)


# --------------------------------------------------------------------------- one cell (in a worker)

def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one cell as a normal paft run in its folder; return (and write) its cell.json record.

    Runs in a fresh worker process (local pool or Ray). Environment first, so that torch,
    imported below, sees the thread count and the GPU given to this cell.
    """
    start = time.perf_counter()
    threads = payload.get("threads")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    if payload.get("gpu") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(payload["gpu"])
    if payload.get("cwd") and Path(payload["cwd"]).is_dir():  # relative data/model paths, as in `paft run`
        os.chdir(payload["cwd"])
    root = Path(payload["config"]["run"]["output_dir"])
    root.mkdir(parents=True, exist_ok=True)
    for stale in ("cell.json", "error.txt"):  # this attempt replaces an earlier failure's record
        (root / stale).unlink(missing_ok=True)
    record = {"key": payload["key"], "config_sha256": payload["digest"], "mode": payload["mode"],
              "axes": payload["labels"], "values": payload["values"], "status": "failed", "error": None,
              "traceback": None, "wall_s": None, "metrics": {}, "threads": threads, "host": socket.gethostname()}
    try:
        from paft.progress import quiet_libraries

        quiet_libraries()
        cfg = PaftConfig.model_validate(payload["config"])
        import torch

        if threads:
            torch.set_num_threads(threads)  # evaluation too, not only the branches
        _adopt_folder(root, cfg)
        from paft.pipeline import Run

        run = Run(cfg)
        if payload["mode"] == "run":
            run.all()
        else:
            run.prepare()
            run.train([payload["mode"]])
        record["status"] = "ok"
    except Exception as exc:  # a cell's failure is data for the sweep, not the end of it
        record["error"] = _one_line(exc)
        write_text_atomic(root / "error.txt", traceback.format_exc())
        record["traceback"] = str(root / "error.txt")
    with contextlib.suppress(Exception):  # a failed cell still reports the stages it finished
        record["metrics"] = cell_metrics(root)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(root / "cell.json", record)
    return record


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, PaftError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _adopt_folder(root: Path, cfg: PaftConfig) -> None:
    """A cell folder from a moved sweep folder: its config.yaml names the old path; same key, so take it over."""
    path = root / "config.yaml"
    if not path.is_file():
        return
    with contextlib.suppress(yaml.YAMLError, OSError):
        old = yaml.safe_load(path.read_text()) or {}
        if isinstance(old.get("run"), dict) and old["run"].get("output_dir") != cfg.run.output_dir:
            old["run"]["output_dir"] = cfg.run.output_dir
            write_text_atomic(path, yaml.safe_dump(old, sort_keys=False))


def _flatten(prefix: str, obj: Any, out: dict[str, float]) -> None:
    if isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}", v, out)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_metrics(root: Path) -> dict[str, float]:
    """Numbers a run folder holds: eval.json as MODEL/METRIC, train/BRANCH/*, sparsity/BRANCH/*."""
    out: dict[str, float] = {}
    ev = _read_json(root / "eval.json") or {}
    for model, metrics in (ev.get("models") or {}).items():
        for k, v in metrics.items():
            if k != "eval_s":
                _flatten(f"{model}/{k}", v, out)
    for branch in ("sft", "preference", "sequential", "reward"):
        summary = _read_json(root / branch / "train_summary.json")
        if not summary:
            continue
        for k in ("train_loss", "steps", "wall_s"):
            if isinstance(summary.get(k), (int, float)):
                out[f"train/{branch}/{k}"] = summary[k]
        logged = [h for h in (_read_json(root / branch / "log_history.json") or []) if "loss" in h]
        if logged:  # the last logged values: what the branch ended at, not its average
            for k, v in logged[-1].items():
                if k not in ("learning_rate", "epoch", "step", "grad_norm") and isinstance(v, (int, float)):
                    out[f"train/{branch}/final_{k}"] = v
    for branch, s in (_read_json(root / "sparsity.json") or {}).items():
        for k, v in (s.get("overall") or {}).items():
            if k != "numel" and isinstance(v, (int, float)):
                out[f"sparsity/{branch}/{k}"] = v
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}  # strict JSON


# --------------------------------------------------------------------------- backends

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _visible_gpus() -> list[str]:
    """GPU ids a local worker may be pinned to (respecting the caller's CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def _crash_record(payload: dict[str, Any], error: str) -> dict[str, Any]:
    """The record of a cell whose worker died before it could write its own."""
    root = Path(payload["config"]["run"]["output_dir"])
    record = {"key": payload["key"], "config_sha256": payload["digest"], "mode": payload["mode"],
              "axes": payload["labels"], "values": payload["values"], "status": "failed", "error": error,
              "traceback": None, "wall_s": None, "metrics": {}, "threads": payload.get("threads"),
              "host": None, "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        write_json_atomic(root / "cell.json", record)
    return record


def _run_local(payloads: list[dict[str, Any]], workers: int, done: Callable[[dict[str, Any]], None],
               started: Callable[[dict[str, Any]], None]) -> None:
    """A bounded pool of spawned processes, one fresh process per cell (memory and global state start clean)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    gpus = _visible_gpus() if any(p["config"]["run"]["device"] in ("auto", "cuda") for p in payloads) else []
    pending = deque(payloads)
    running: dict[Any, tuple[dict[str, Any], int]] = {}
    slots = list(range(workers))

    def new_pool():
        return ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1)

    pool = new_pool()
    try:
        while pending or running:
            while pending and slots:
                slot, p = slots.pop(0), pending.popleft()
                if gpus:  # each worker slot its share of the GPUs (shared round-robin when workers outnumber them)
                    per = max(1, len(gpus) // workers)
                    first = (slot * per) % len(gpus)
                    p = {**p, "gpu": ",".join(gpus[first:first + per])}
                running[pool.submit(run_cell, p)] = (p, slot)
                started(p)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                p, slot = running.pop(fut)
                slots.append(slot)
                try:
                    done(fut.result())
                except BrokenProcessPool:
                    broken = True
                    done(_crash_record(p, "the worker process died (killed, or out of memory)"))
            if broken:  # every cell of a broken pool fails; the cells still pending get a new pool
                for fut, (p, slot) in list(running.items()):
                    try:
                        done(fut.result())
                    except BrokenProcessPool:
                        done(_crash_record(p, "the worker process died (killed, or out of memory)"))
                    slots.append(slot)
                running.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        # Ctrl-C or a bug: stop the cells now; each resumes from its checkpoints on the next call
        from paft.pipeline import terminate_workers

        terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise PaftError("sweep.backend 'ray' needs Ray: pip install 'paft[ray]' (or pip install ray)") from None
    return ray


def _run_ray(payloads: list[dict[str, Any]], ex: ExecutionSettings, done: Callable[[dict[str, Any]], None],
             started: Callable[[dict[str, Any]], None]) -> None:
    """Each cell a Ray task with its CPUs/GPUs; a new worker process per cell (max_calls=1)."""
    ray = _import_ray()
    own = not ray.is_initialized()
    if own:
        if ex.ray.address:
            ray.init(address=ex.ray.address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    refs: dict[Any, dict[str, Any]] = {}
    try:
        task = ray.remote(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_calls=1)(run_cell)
        for p in payloads:
            refs[task.remote(p)] = p
            started(p)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                p = refs.pop(ref)
                try:
                    done(ray.get(ref))
                except Exception as exc:  # the task's process died (RayTaskError wraps what run_cell did not catch)
                    done(_crash_record(p, f"ray: {_one_line(exc)}"))
    except BaseException:
        for ref in list(refs):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if own:
            ray.shutdown()


# --------------------------------------------------------------------------- the sweep

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


def _finished(root: Path, cell: Cell, mode: str) -> dict[str, Any] | None:
    rec = _read_json(root / "cell.json")
    if isinstance(rec, dict) and rec.get("status") == "ok" and rec.get("config_sha256") == cell.digest \
            and rec.get("mode") == mode:
        return rec
    return None


def run_sweep(path: str | Path | Sweep, out: str | Path | None = None, *, overrides: list[str] | None = None,
              backend: str | None = None, workers: int | None = None, ui=None) -> SweepResult:
    """Run the cells of a sweep file (or a loaded Sweep) that have not finished, then write results and report."""
    from paft.progress import ProgressUI

    sweep = path if isinstance(path, Sweep) else load_sweep(path, overrides)
    spec = sweep.spec
    ex = spec.sweep.model_copy(deep=True)
    if backend is not None:
        if backend not in ("local", "ray"):
            raise ConfigError(f"--backend {backend!r}: expected local or ray")
        ex.backend = backend
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers {workers}: expected a positive number")
        ex.workers = workers
    if ex.backend == "ray":
        _import_ray()  # a missing Ray fails before anything runs
    out = Path(out or Path("sweeps") / (spec.name or Path(sweep.source).stem)).resolve()
    ui = ui or ProgressUI(enabled=False)

    if ex.backend == "local":
        threads = max(1, _cores() // ex.workers)
    else:
        threads = max(1, int(ex.num_cpus))
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
    counts = {"ok": 0, "failed": 0, "skipped": len(skipped)}
    desc = {c.key: ", ".join(f"{k}={v}" for k, v in c.labels.items()) for c in sweep.cells}

    def refresh(running: int = 0) -> None:
        ui.update("cells", counts["ok"] + counts["failed"] + counts["skipped"], total,
                  f"ok {counts['ok']} · failed {counts['failed']} · skipped {counts['skipped']}"
                  + (f" · in flight {running}" if running else ""))

    live = {"n": 0}

    def started(p: dict[str, Any]) -> None:
        live["n"] += 1
        refresh(live["n"])

    def done(rec: dict[str, Any]) -> None:
        live["n"] -= 1
        records[rec["key"]] = rec
        ok = rec["status"] == "ok"
        counts["ok" if ok else "failed"] += 1
        wall = f"{rec['wall_s']:.0f} s" if rec.get("wall_s") is not None else ""
        ui.log(f"{'[green]ok' if ok else '[red]failed'}[/] {rec['key']} ({desc[rec['key']]}) {wall}"
               + ("" if ok else f": {rec['error']}"))
        refresh(live["n"])

    refresh()
    if payloads:
        if ex.backend == "local" or not ex.ray.address:
            _resolve_models(payloads, ui)
        if ex.backend == "local":
            _run_local(payloads, ex.workers, done, started)
        else:
            _run_ray(payloads, ex, done, started)

    ordered = [records[c.key] for c in sweep.cells]
    res = SweepResult(out, sweep, ordered, ran=[p["key"] for p in payloads], skipped=skipped)
    res.table = results_table(sweep, ordered)
    res.metrics = pick_metrics(res.table, spec.report.metrics, sweep.source)
    write_results(out, res.table)
    res.report = write_sweep_report(out, res, ex)
    return res


def _resolve_models(payloads: list[dict[str, Any]], ui) -> None:
    """Resolve (convert, build) each base model once here, not in several cells at the same time."""
    from paft.models import resolve_model_dir

    for name, rev in dict.fromkeys((p["config"]["model"]["name"], p["config"]["model"]["revision"]) for p in payloads):
        with contextlib.suppress(PaftError):  # a model that cannot be resolved fails its cells, with the reason
            resolve_model_dir(name, rev, progress=ui.log)


# --------------------------------------------------------------------------- results and report

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
        ax.set_xticks(sorted(set(xs)), [_fmt(x) for x in sorted(set(xs))])
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
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
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
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
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    for (i, j), v in zip(itertools.product(range(pivot.shape[0]), range(pivot.shape[1])), pivot.to_numpy().ravel()):
        if v == v:  # not NaN
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(metric, fontsize=10)
    return _png(fig)


def _fmt(v: Any) -> str:
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
    cell_rows = [[_fmt(row[c]) for c in cell_header] for _, row in df.iterrows()]
    summary = summary_rows(df, sweep.columns, metrics)
    failed = [(row["cell"], row["error"]) for _, row in df.iterrows() if row["status"] != "ok"]

    def md_table(header, rows):
        esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
        return "\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(r) + " |" for r in esc[1:])])

    md = [f"# Sweep: {name}", "", intro, ""]
    if summary:
        md += ["## Mean ± std over seeds", "", md_table(*summary), ""]
    md += ["## Cells", "", md_table(cell_header, cell_rows), ""]
    if failed:
        md += ["## Failed cells", "", *(f"- `{k}`: {e} (traceback: `cells/{k}/error.txt`)" for k, e in failed),
               "", "The same `paft sweep` command retries them.", ""]
    if plots:
        md += ["## Plots", "", *(f"![{cap}]({rel})\n" for cap, rel in plots)]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")

    def html_table(header, rows):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>Sweep: {html.escape(name)}</h1>", f"<p>{html.escape(intro)}</p>"]
    if summary:
        parts += ["<h2>Mean ± std over seeds</h2>", html_table(*summary)]
    parts += ["<h2>Cells</h2>", html_table(cell_header, cell_rows)]
    if failed:
        parts += ["<h2>Failed cells</h2><ul>",
                  *(f"<li><code>{html.escape(k)}</code>: {html.escape(str(e))}</li>" for k, e in failed), "</ul>"]
    if plots:  # embedded, so the one file can be mailed or attached
        parts.append("<h2>Plots</h2>")
        for cap, rel in plots:
            data = base64.b64encode((out / rel).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
             "font-size:0.9em}td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}"
             "th{background:#f3f3f3}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep: {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    write_text_atomic(out / "report.html", page)
    return out / "report.md"
