"""The worker pool: slots handed from a finished job to the next, fail-fast, and no worker outliving the pool."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

from paft.errors import PaftError
from paft.workers import Job, WorkerDied, WorkerPool


# jobs run in spawned processes: module-level functions
def _record(path, *, slot, threads, running=None, wait=0.0):
    (path / f"{os.getpid()}.pid").write_text("")
    time.sleep(wait)
    return {"slot": slot, "threads": threads, "running": running.value if running is not None else None,
            "pid": os.getpid()}


def _fail(path, message):
    for _ in range(600):  # once the other job runs
        if list(path.glob("*.pid")):
            break
        time.sleep(0.05)
    raise PaftError(message)


def _die(path):
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(path):
    return [int(p.stem) for p in path.glob("*.pid")]


@pytest.mark.parametrize("fresh", [True, False])
def test_a_finished_jobs_slot_goes_to_the_next_ready_job(tmp_path, fresh):
    order, results = [], {}
    with WorkerPool(2, 8, gpus=["0", "1", "2", "3"], fresh=fresh) as pool:
        assert [(s.threads, s.gpus) for s in pool.slots] == [(4, ("0", "1")), (4, ("2", "3"))]

        def place(slot):
            return {"slot": slot.index, "threads": slot.threads, "running": pool.active}

        jobs = [Job("a", _record, (tmp_path,), {"wait": 0.5}, place=place),
                Job("b", _record, (tmp_path,), {"wait": 3.0}, place=place),
                Job("c", _record, (tmp_path,), place=place, after="a")]  # starts from a's output
        pool.run(jobs, on_start=lambda job: order.append(("start", job.name, pool.active.value)),
                 on_done=lambda job, res: (order.append(("done", job.name)), results.update({job.name: res})))
        assert pool.active.value == 0
    assert [x for x in order if x[0] == "start"] == [("start", "a", 1), ("start", "b", 2), ("start", "c", 2)]
    assert order.index(("done", "a")) < order.index(("start", "c", 2)) < order.index(("done", "b"))
    assert results["c"]["slot"] == results["a"]["slot"] != results["b"]["slot"]  # a's slot, handed on
    assert results["b"]["running"] >= 1
    # a fresh process per job, or the slot's process taking its next job
    assert (results["c"]["pid"] != results["a"]["pid"]) == fresh and len(_pids(tmp_path)) == 3 - (not fresh)
    assert not any(_alive(p) for p in _pids(tmp_path)) and not multiprocessing.active_children()
    assert [(s.threads, s.gpus) for s in WorkerPool(3, 2, gpus=["0"]).slots] == [(1, ("0",))] * 3  # GPU shared


def test_first_failure_stops_every_worker_at_once(tmp_path):
    place = lambda slot: {"slot": slot.index, "threads": slot.threads}  # noqa: E731
    jobs = [Job("slow", _record, (tmp_path,), {"wait": 60}, place=place),
            Job("bad", _fail, (tmp_path, "no chat template")), Job("never", _record, (tmp_path,), place=place)]
    start = time.perf_counter()
    with pytest.raises(PaftError, match="no chat template") as err, WorkerPool(2, 2) as pool:
        pool.run(jobs)
    assert time.perf_counter() - start < 30
    assert "Traceback" in str(err.value.__cause__)  # the worker's traceback comes along
    assert len(_pids(tmp_path)) == 1 and not _alive(_pids(tmp_path)[0])  # "slow" is gone, "never" never ran
    assert not multiprocessing.active_children()


def test_a_dead_worker_is_an_error_the_caller_may_record(tmp_path):
    errors, done = [], []
    jobs = [Job("killed", _die, (tmp_path,)),
            Job("fine", _record, (tmp_path,), place=lambda slot: {"slot": slot.index, "threads": 1})]
    with WorkerPool(1, 1) as pool:
        pool.run(jobs, on_error=lambda job, exc: errors.append((job.name, exc)),
                 on_done=lambda job, res: done.append(job.name))
    assert done == ["fine"] and errors[0][0] == "killed" and isinstance(errors[0][1], WorkerDied)
    assert "killed: the worker process died (exit code -9" in str(errors[0][1])


def test_sigterm_terminates_the_workers(tmp_path):
    place = lambda slot: {"slot": slot.index, "threads": slot.threads, "wait": 60}  # noqa: E731

    def stop_when_both_run():
        for _ in range(600):
            if len(_pids(tmp_path)) == 2:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_when_both_run, daemon=True).start()
    with pytest.raises(SystemExit) as exc, WorkerPool(2, 2, fresh=False) as pool:
        pool.run([Job(n, _record, (tmp_path,), place=place) for n in "ab"])
    assert exc.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert len(_pids(tmp_path)) == 2 and not any(_alive(p) for p in _pids(tmp_path))
    assert not multiprocessing.active_children()
