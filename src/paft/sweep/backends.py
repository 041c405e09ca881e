"""Where a sweep's cells run: the local worker pool (one fresh process per cell), or Ray tasks (``RayPool``, the
code a run's branches use on Ray)."""

from __future__ import annotations

from typing import Any, Callable

from paft.io import usable_cores
from paft.sweep.cell import crash_record, one_line, run_cell
from paft.sweep.spec import ExecutionSettings
from paft.workers import Job, RayPool, WorkerPool, visible_gpus

Record = Callable[[dict[str, Any]], None]


def run_local(payloads: list[dict[str, Any]], workers: int, done: Record, started: Record) -> None:
    """Cells on the worker pool, ``workers`` at once, each in a fresh process with its slot's share of the GPUs.

    A worker that dies fails only its cell; Ctrl-C stops them all (each resumes from its checkpoints).
    """
    gpus = visible_gpus() if any(p["config"]["run"]["device"] in ("auto", "cuda") for p in payloads) else []
    jobs = [Job(p["key"], run_cell, (p,), place=lambda slot: {"gpu": ",".join(slot.gpus) or None})
            for p in payloads]
    with WorkerPool(workers, usable_cores(), gpus) as pool:
        pool.run(jobs, on_start=lambda job: started(job.args[0]), on_done=lambda job, rec: done(rec),
                 on_error=lambda job, exc: done(crash_record(job.args[0], one_line(exc))))


def run_ray(payloads: list[dict[str, Any]], ex: ExecutionSettings, done: Record, started: Record) -> None:
    """Each cell a Ray task with its CPUs/GPUs (``RayPool``, as a run's branches); a cell whose task fails gets
    a crash record."""
    jobs = [Job(p["key"], run_cell, (p,)) for p in payloads]
    with RayPool(ex.ray.address, "sweep.backend") as pool:
        pool.run(jobs, lambda job: (ex.num_cpus, ex.num_gpus), on_start=lambda job: started(job.args[0]),
                 on_done=lambda job, rec: done(rec),
                 on_error=lambda job, exc: done(crash_record(job.args[0], f"ray: {one_line(exc)}")))
