"""One worker pool for what runs in parallel: a run's branches, a sweep's local cells; and its Ray twin.

A slot runs one job at a time, with its share of the CPU threads and GPUs. A job is a module-level
function and its arguments (they pickle: workers are spawned), plus those it takes from its slot
when it starts (``place``). A finished job's slot goes to the next ready job, in a fresh process
(``fresh``) or in the slot's warm one. The first failure, Ctrl-C or SIGTERM stops every worker
(checkpoints stay for a resume); every worker is terminated, killed if it must be, and joined.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable

from paft.errors import PaftError
from paft.progress import quiet_libraries


@dataclass(frozen=True)
class Slot:
    index: int
    threads: int  # CPU threads of a job in this slot
    gpus: tuple[str, ...] = ()  # GPU ids of this slot


@dataclass(frozen=True)
class Job:
    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    place: Callable[[Slot], dict[str, Any]] = lambda slot: {}  # keyword arguments taken when it starts, in a slot
    after: str | None = None  # a job of the same batch that must end first


class WorkerDied(PaftError):
    """A worker process that ended without a result (killed, or out of memory)."""


class WorkerPool:
    """``with WorkerPool(2, threads) as pool: pool.run(jobs)``: the ``with`` block owns the workers."""

    def __init__(self, slots: int, threads: int, gpus: list[str] | tuple[str, ...] = (), *, fresh: bool = True):
        """``slots`` jobs at once, splitting ``threads`` CPU threads; each slot its share of ``gpus``
        (slots share them round-robin when they outnumber the GPUs)."""
        per = max(1, len(gpus) // slots) if gpus else 0
        self.slots = [Slot(i, max(1, threads // slots),
                           tuple(gpus[(i * per) % len(gpus):][:per]) if gpus else ()) for i in range(slots)]
        self.threads, self.fresh = threads, fresh
        self.ctx = mp.get_context("spawn")
        self._idle: dict[int, tuple[Any, Any]] = {}  # slot index -> (process, pipe) waiting for its next job

    def __enter__(self) -> "WorkerPool":
        self.manager = self.ctx.Manager()  # shared objects that pickle into any job: progress queues, counters
        # jobs running now: a job may re-split ``threads`` by it, so a finished job's cores go to the others
        self.active = self.manager.Value("i", 0)
        return self

    def __exit__(self, *exc) -> None:
        for proc, conn in self._idle.values():
            _retire(proc, conn)
        self._idle.clear()
        self.manager.shutdown()

    def run(self, jobs: list[Job], *, on_start: Callable[[Job], None] = lambda job: None,
            on_done: Callable[[Job, Any], None] = lambda job, result: None,
            on_error: Callable[[Job, Exception], None] | None = None) -> None:
        """Run ``jobs`` in order as slots and their ``after`` jobs allow. A job's error (or its worker's death:
        ``WorkerDied``) is raised, which stops every other job, unless ``on_error`` takes it."""
        pending, free = list(jobs), list(self.slots)
        running: dict[Any, tuple[Job, Slot, Any]] = {}  # pipe -> (job, slot, process)
        with _sigterm_raises():
            try:
                while pending or running:
                    unfinished = {j.name for j in pending} | {r[0].name for r in running.values()}
                    for job in [j for j in pending if j.after not in unfinished][:len(free)]:
                        slot = free.pop(0)
                        proc, conn = self._idle.pop(slot.index, None) or self._spawn(slot)
                        conn.send((job.fn, job.args, {**job.kwargs, **job.place(slot)}))
                        running[conn] = (job, slot, proc)
                        pending.remove(job)
                        self.active.value = len(running)
                        on_start(job)
                    if not running:
                        raise PaftError(f"jobs {[j.name for j in pending]} wait on jobs that never run")
                    ready = set(wait([*running, *(r[2].sentinel for r in running.values())]))
                    for conn, (job, slot, proc) in [(c, r) for c, r in running.items() if {c, r[2].sentinel} & ready]:
                        ok, value = _result(job, proc, conn)
                        del running[conn]
                        free.append(slot)
                        self.active.value = len(running)
                        if ok and not self.fresh:
                            self._idle[slot.index] = (proc, conn)
                        else:
                            _retire(proc, conn)
                        if ok:
                            on_done(job, value)
                        elif on_error:
                            on_error(job, value)
                        else:
                            raise value
            except BaseException:
                _stop([r[2] for r in running.values()] + [proc for proc, _ in self._idle.values()])
                self._idle.clear()
                raise

    def _spawn(self, slot: Slot) -> tuple[Any, Any]:
        conn, child = self.ctx.Pipe()
        # not daemonic: a job may start a pool of its own (a sweep cell runs parallel branches)
        proc = self.ctx.Process(target=_worker, args=(child,), name=f"paft-worker-{slot.index}")
        proc.start()
        child.close()
        return proc, conn


def _worker(conn) -> None:
    """A worker process: run each job it is sent, and send ``(ok, result or error, traceback)`` back.

    Ctrl-C or SystemExit (SIGTERM, in a job that runs a pool of its own) ends the worker.
    """
    quiet_libraries()  # before a job's modules import transformers (and bitsandbytes with it)
    with contextlib.suppress(EOFError, KeyboardInterrupt, SystemExit):
        while (job := conn.recv()) is not None:
            fn, args, kwargs = job
            try:
                msg = (True, fn(*args, **kwargs), None)
            except Exception as exc:
                msg = (False, exc, traceback.format_exc())
            try:
                conn.send(msg)
            except Exception:  # a result or error that does not pickle
                conn.send((False, RuntimeError(f"{type(msg[1]).__name__}: {msg[1]}"), msg[2]))


def _result(job: Job, proc, conn) -> tuple[bool, Any]:
    """A job's result or error; a worker that died without one is a ``WorkerDied`` error."""
    try:
        ok, value, tb = conn.recv() if conn.poll() else (False, None, None)
    except (EOFError, OSError):
        ok, value, tb = False, None, None
    if value is None and not ok:
        proc.join()
        value = WorkerDied(f"{job.name}: the worker process died (exit code {proc.exitcode}; killed, or out of "
                           "memory)")
    elif tb:
        value.__cause__ = Exception(f"in worker {job.name}:\n{tb}")  # its traceback, shown with the error
    return ok, value


def _retire(proc, conn) -> None:
    """Tell a worker to return, and join it (stopped if it has not within 5 s)."""
    with contextlib.suppress(OSError):
        conn.send(None)
    proc.join(5)
    _stop([proc])


def _stop(procs: list) -> None:
    """Terminate, then kill what is left, and join: no worker outlives the pool."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM ends the parent through the pool's cleanup (the default would leave its workers running)."""
    main = threading.current_thread() is threading.main_thread()  # the only thread that may set a handler
    old = signal.signal(signal.SIGTERM, _exit) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _exit(signum, frame):
    raise SystemExit(128 + signum)


def visible_gpus() -> list[str]:
    """GPU ids a local worker may be pinned to (respecting the caller's CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch  # heavy: only when a job may use a GPU

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def import_ray(key: str):
    try:
        import ray
    except ImportError:
        raise PaftError(f"{key} 'ray' needs Ray: pip install 'paft[ray]' (or pip install ray)") from None
    return ray


def _call(fn, args, kwargs):
    quiet_libraries()
    return fn(*args, **kwargs)


class RayPool:
    """The worker pool's jobs as Ray tasks on a cluster: ``with RayPool(address, key) as pool: pool.run(jobs,
    resources)``. Each job is a task with its CPUs and GPUs (Ray sets its CUDA_VISIBLE_DEVICES; a task of
    several GPUs lands on one node), in a fresh worker process (``max_calls=1``); ``after`` orders jobs as
    in ``WorkerPool``. ``address``: the cluster's (else RAY_ADDRESS), else a Ray instance of this machine, which
    the pool starts and stops. Outputs must go to storage every node sees."""

    def __init__(self, address: str | None, key: str):
        self.ray = import_ray(key)
        self.address = address or os.environ.get("RAY_ADDRESS")

    def __enter__(self) -> "RayPool":
        self.own = not self.ray.is_initialized()
        if self.own:
            self.ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.own:
            self.ray.shutdown()

    def queue(self):
        """A queue that pickles into a task on any node (progress messages), read with ``get()`` here."""
        from ray.util.queue import Queue

        return Queue()

    def run(self, jobs: list[Job], resources: Callable[[Job], tuple[float, float]], *,
            on_start: Callable[[Job], None] = lambda job: None,
            on_done: Callable[[Job, Any], None] = lambda job, result: None,
            on_error: Callable[[Job, Exception], None] | None = None) -> None:
        """Run ``jobs`` as ``after`` allows, each with ``resources(job)`` = (CPUs, GPUs); a job's error is raised
        (a ``PaftError`` as itself, in one line) unless ``on_error`` takes it; any error cancels the others."""
        ray = self.ray
        pending, running = list(jobs), {}
        try:
            while pending or running:
                unfinished = {j.name for j in pending} | {j.name for j in running.values()}
                for i, job in enumerate([j for j in pending if j.after not in unfinished]):
                    cpus, gpus = resources(job)
                    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1)(_call)
                    slot = Slot(i, max(1, int(cpus)))  # the GPUs: Ray's CUDA_VISIBLE_DEVICES in the task
                    running[task.remote(job.fn, job.args, {**job.kwargs, **job.place(slot)})] = job
                    pending.remove(job)
                    on_start(job)
                if not running:
                    raise PaftError(f"jobs {[j.name for j in pending]} wait on jobs that never run")
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        value = ray.get(ref)
                    except Exception as exc:  # RayTaskError wraps the job's own error; a dead worker has none
                        cause = getattr(exc, "cause", None)
                        err = cause if isinstance(cause, PaftError) else exc
                        if on_error is None:
                            raise err from None
                        on_error(job, err)
                    else:
                        on_done(job, value)
        except BaseException:
            for ref in list(running):
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
