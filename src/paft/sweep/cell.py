"""One sweep cell, in a worker process: an ordinary paft run in its folder, and its ``cell.json`` record."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from paft.config import PaftConfig
from paft.errors import PaftError
from paft.io import write_json_atomic, write_text_atomic
from paft.methods.remedies import REMEDIES
from paft.progress import quiet_libraries


def run_cell(payload: dict[str, Any], gpu: str | None = None) -> dict[str, Any]:
    """Run one cell as a normal paft run in its folder; return (and write) its cell.json record.

    Runs in a fresh worker process (local pool or Ray). Environment first, so that torch,
    imported below, sees the thread count and the GPUs (``gpu``: ids) given to this cell.
    """
    start = time.perf_counter()
    threads = payload.get("threads")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if payload.get("cwd") and Path(payload["cwd"]).is_dir():  # relative data/model paths, as in `paft run`
        os.chdir(payload["cwd"])
    root = Path(payload["config"]["run"]["output_dir"])
    root.mkdir(parents=True, exist_ok=True)
    for stale in ("cell.json", "error.txt"):  # this attempt replaces an earlier failure's record
        (root / stale).unlink(missing_ok=True)
    record = {**new_record(payload), "host": socket.gethostname()}
    try:
        quiet_libraries()
        cfg = PaftConfig.model_validate(payload["config"])
        import torch  # after the environment above

        if threads:
            torch.set_num_threads(threads)  # evaluation too, not only the branches
        from paft.pipeline import Run  # lazy: bitsandbytes (via transformers) queries CUDA on import; after the environment above

        run = Run(cfg)
        if payload["mode"] == "run":
            run.all()
        else:
            run.prepare()
            run.train([payload["mode"]])
        record["status"] = "ok"
    except Exception as exc:  # a cell's failure is data for the sweep, not the end of it
        record["error"] = one_line(exc)
        write_text_atomic(root / "error.txt", traceback.format_exc())
        record["traceback"] = str(root / "error.txt")
    with contextlib.suppress(Exception):  # a failed cell still reports the stages it finished
        record["metrics"] = cell_metrics(root)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(root / "cell.json", record)
    return record


def new_record(payload: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    return {"key": payload["key"], "config_sha256": payload["digest"], "mode": payload["mode"],
            "axes": payload["labels"], "values": payload["values"], "status": "failed", "error": error,
            "traceback": None, "wall_s": None, "metrics": {}, "threads": payload.get("threads"), "host": None}


def crash_record(payload: dict[str, Any], error: str) -> dict[str, Any]:
    """The record of a cell whose worker died before it could write its own."""
    record = {**new_record(payload, error), "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        write_json_atomic(Path(payload["config"]["run"]["output_dir"]) / "cell.json", record)
    return record


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, PaftError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _flatten(prefix: str, obj: Any, out: dict[str, float]) -> None:
    if isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}", v, out)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_metrics(root: Path) -> dict[str, float]:
    """Numbers a run folder holds: eval.json, candidates.json and tune/eval.json as MODEL/METRIC (the first file
    naming a model wins), train/BRANCH/*, sparsity/BRANCH/*."""
    out: dict[str, float] = {}
    models = list(((read_json(root / "eval.json") or {}).get("models") or {}).items())
    models += [(row.get("name"), row.get("metrics") or {})  # the alignment-tax candidates
               for row in (read_json(root / "candidates.json") or {}).get("models") or []]
    models += list(((read_json(root / "tune" / "eval.json") or {}).get("models") or {}).items())  # paft tune's pick
    for model, metrics in models:
        for k, v in metrics.items():
            if isinstance(model, str) and k != "eval_s" and f"{model}/{k}" not in out:
                _flatten(f"{model}/{k}", v, out)
    for branch in ("sft", "preference", "sequential", "reward", *REMEDIES):
        summary = read_json(root / branch / "train_summary.json")
        if not summary:
            continue
        for k in ("train_loss", "steps", "wall_s"):
            if isinstance(summary.get(k), (int, float)):
                out[f"train/{branch}/{k}"] = summary[k]
        logged = [h for h in (read_json(root / branch / "log_history.json") or []) if "loss" in h]
        if logged:  # the last logged values: what the branch ended at, not its average
            for k, v in logged[-1].items():
                if k not in ("learning_rate", "epoch", "step", "grad_norm") and isinstance(v, (int, float)):
                    out[f"train/{branch}/final_{k}"] = v
    for branch, s in (read_json(root / "sparsity.json") or {}).items():
        for k, v in (s.get("overall") or {}).items():
            if k != "numel" and isinstance(v, (int, float)):
                out[f"sparsity/{branch}/{k}"] = v
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}  # strict JSON
