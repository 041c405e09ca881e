"""Where a sweep's cells run: the local worker pool (one fresh process per cell), or Ray tasks."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from paft.errors import PaftError
from paft.io import usable_cores
from paft.sweep.cell import crash_record, one_line, run_cell
from paft.sweep.spec import ExecutionSettings
from paft.workers import Job, WorkerPool

Record = Callable[[dict[str, Any]], None]


def _visible_gpus() -> list[str]:
    """GPU ids a local worker may be pinned to (respecting the caller's CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch  # heavy: only when a cell may use a GPU

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def run_local(payloads: list[dict[str, Any]], workers: int, done: Record, started: Record) -> None:
    """Cells on the worker pool, ``workers`` at once, each in a fresh process with its slot's share of the GPUs.

    A worker that dies fails only its cell; Ctrl-C stops them all (each resumes from its checkpoints).
    """
    gpus = _visible_gpus() if any(p["config"]["run"]["device"] in ("auto", "cuda") for p in payloads) else []
    jobs = [Job(p["key"], run_cell, (p,), place=lambda slot: {"gpu": ",".join(slot.gpus) or None})
            for p in payloads]
    with WorkerPool(workers, usable_cores(), gpus) as pool:
        pool.run(jobs, on_start=lambda job: started(job.args[0]), on_done=lambda job, rec: done(rec),
                 on_error=lambda job, exc: done(crash_record(job.args[0], one_line(exc))))


def import_ray():
    try:
        import ray
    except ImportError:
        raise PaftError("sweep.backend 'ray' needs Ray: pip install 'paft[ray]' (or pip install ray)") from None
    return ray


def run_ray(payloads: list[dict[str, Any]], ex: ExecutionSettings, done: Record, started: Record) -> None:
    """Each cell a Ray task with its CPUs/GPUs; a new worker process per cell (max_calls=1)."""
    ray = import_ray()
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
                    done(crash_record(p, f"ray: {one_line(exc)}"))
    except BaseException:
        for ref in list(refs):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if own:
            ray.shutdown()
