"""Issue 16: the run-folder lock, plain progress lines in job logs, no bitsandbytes noise, umask permissions."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paft.errors import PaftError
from paft.io import LOCK_NAME, atomic_dir, lock_folder, unlock_folder, write_text_atomic
from paft.progress import ProgressUI

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--preset", "tiny", "--set", "run.report_to=[]"]


LAUNCH = """import pathlib, sys, time
import paft.cli, paft.pipeline  # the slow imports happen before the race
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.05)
sys.argv = ["paft", *sys.argv[2:]]
paft.cli.main()
"""


def _paft(go, *args):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", LAUNCH, str(go), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_second_run_into_a_locked_folder_fails_at_once(tmp_path, paft_cache):
    from paft.models import resolve_model_dir

    resolve_model_dir("tiny")  # built once here, not by both processes
    out, steps = tmp_path / "run", 120
    args = ["sft", *TINY, "--set", f"sft.max_steps={steps}", "--out", str(out)]
    first, second = _paft(tmp_path / "go1", *args), _paft(tmp_path / "go2", *args)
    (tmp_path / "go1").touch()
    lock = out / LOCK_NAME
    deadline = time.monotonic() + 180
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go2").touch()
    text, _ = second.communicate(timeout=120)
    assert first.poll() is None  # the holder was still running, and is not disturbed
    assert second.returncode == 1, text
    assert "Traceback" not in text
    line = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(line) == 1 and f"pid {first.pid}" in line[0] and str(out) in line[0], text
    text, _ = first.communicate(timeout=600)
    assert first.returncode == 0, text
    assert json.loads((out / "sft" / "train_summary.json").read_text())["steps"] == steps


def test_stale_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("pid 999999: paft run (killed)\n")  # a holder that died: no flock held
    lock_folder(folder, "paft test")
    try:
        assert (folder / LOCK_NAME).read_text() == f"pid {os.getpid()}: paft test\n"
        lock_folder(folder)  # re-entrant in the holder
        code = ("import sys; from paft.io import lock_folder; from paft.errors import PaftError\n"
                f"try: lock_folder({str(folder)!r})\nexcept PaftError as e: print(e); sys.exit(3)")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": SRC})
        assert p.returncode == 3 and f"pid {os.getpid()}" in p.stdout and "Traceback" not in p.stderr
    finally:
        unlock_folder(folder)
    lock_folder(folder)  # released: free again
    unlock_folder(folder)


def test_lock_on_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PaftError, match="is a file"):
        lock_folder(f)


def test_plain_progress_lines_in_a_job_log(tmp_path, monkeypatch):
    import paft.progress as progress
    from rich.console import Console

    log = (tmp_path / "job.log").open("w")
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=False, width=120))
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with ProgressUI(enabled=True, log_every_s=30) as ui:
        for step in range(0, 101):
            clock[0] = step * 1.0  # one step a second
            ui.branch_report({"branch": "sft", "step": step, "total": 100, "loss": 2.0 - step / 100})
    log.close()
    lines = [ln for ln in (tmp_path / "job.log").read_text().splitlines() if ln.startswith("train sft:")]
    assert lines[0].startswith("train sft: 0/100 (0%)")
    assert [ln.split()[2] for ln in lines] == ["0/100", "30/100", "60/100", "90/100", "100/100"]
    assert "loss 1.7000" in lines[1] and "1 it/s" in lines[1] and "ETA 1m10s" in lines[1]
    assert "ETA" not in lines[-1]


def test_no_plain_lines_on_a_terminal(monkeypatch):
    import paft.progress as progress
    from rich.console import Console

    monkeypatch.setattr(progress, "console", Console(force_terminal=True))
    assert not ProgressUI(enabled=True).plain


def test_bitsandbytes_kernel_warning_is_silenced():
    code = "from paft.progress import quiet_libraries; quiet_libraries(); import peft, transformers"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert p.returncode == 0 and "gemm_4bit_forward" not in p.stdout + p.stderr
    import logging

    from paft.progress import quiet_libraries

    quiet_libraries()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no kernels")
        logger.error("a real error")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a real error"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE((tmp_path / p).stat().st_mode)  # noqa: E731
    assert mode("a.json") == 0o666 & ~mask == mode("plain.txt")
    assert mode("model") == 0o777 & ~mask == mode("plain")


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    code = f"import time; from paft.io import lock_folder; lock_folder({str(folder)!r}, 'paft run'); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(PaftError, match=f"pid {holder.pid}: paft run"):
        lock_folder(folder)
    holder.kill()
    holder.wait()
    lock_folder(folder, "paft again")  # SIGKILL released the flock; the stale file is rewritten
    try:
        assert (folder / LOCK_NAME).read_text() == f"pid {os.getpid()}: paft again\n"
    finally:
        unlock_folder(folder)


def _holder(folder):
    """A process holding ``folder``'s lock until killed."""
    code = f"import time; from paft.io import lock_folder; lock_folder({str(folder)!r}, 'paft run'); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    assert holder.stdout.readline().strip() == "held"
    return holder


def _one_error_line(result, pid):
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert len(lines) == 1 and f"pid {pid}: paft run" in text and "in use by another paft process" in text, lines


def test_standalone_merge_takes_the_output_folder_lock(tmp_path):
    from typer.testing import CliRunner

    from paft.cli import app
    from paft.models.folders import is_model
    from paft.models.tiny import build_tiny

    runner = CliRunner()
    base = build_tiny(tmp_path / "base", seed=0, hidden=32, layers=2, vocab=300)
    other = build_tiny(tmp_path / "other", seed=1, hidden=32, layers=2, vocab=300)
    out = tmp_path / "merged"
    args = ["merge", "--base", str(base), "--models", f"{other},{other}", "--method", "task_arithmetic",
            "--out", str(out)]
    holder = _holder(out)
    try:
        _one_error_line(runner.invoke(app, args), holder.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside the holder
    finally:
        holder.kill()
        holder.wait()
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert is_model(out) and (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}:")
    again = runner.invoke(app, [*args, "--force"])  # the output folder is swapped whole; its lock goes along
    assert again.exit_code == 0, again.output
    assert is_model(out) and (out / LOCK_NAME).is_file() and not list(tmp_path.glob(".old-*"))
    lock_folder(out, "paft next")  # released when the command ended
    unlock_folder(out)
    holder = _holder(tmp_path / "sp")  # `paft sparsity --base ... --out` the same
    try:
        _one_error_line(runner.invoke(app, ["sparsity", str(other), "--base", str(base), "--out",
                                            str(tmp_path / "sp")]), holder.pid)
    finally:
        holder.kill()
        holder.wait()
    sp = runner.invoke(app, ["sparsity", str(other), "--base", str(base), "--out", str(tmp_path / "sp")])
    assert sp.exit_code == 0 and (tmp_path / "sp" / "sparsity.json").is_file(), sp.output
    failed = runner.invoke(app, ["merge", "--base", str(base), "--models", str(tmp_path / "missing"),
                                 "--out", str(tmp_path / "m2")])
    assert failed.exit_code == 1 and not (tmp_path / "m2").exists()  # no empty folder left by the lock


def test_standalone_eval_takes_the_output_folder_lock(tmp_path):
    from typer.testing import CliRunner

    from paft.cli import app

    out = tmp_path / "eval"
    holder = _holder(out)
    try:
        result = CliRunner().invoke(app, ["eval", str(tmp_path / "some-model"), "--preset", "tiny", "--out", str(out)])
        _one_error_line(result, holder.pid)
        assert not (out / "eval.json").exists()
    finally:
        holder.kill()
        holder.wait()
