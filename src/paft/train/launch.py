"""A branch of several processes: ``accelerate launch`` as its own process group, run from the caller's worker.

``run_branch`` is what the pipeline calls for every branch: with ``run.processes`` 1 it trains in the calling
process (``train_branch``); above 1 it writes the branch's arguments to ``OUT/launch.json`` and starts
``accelerate launch --num_processes N [--config_file F] -m paft.train.launch OUT/launch.json`` (torchrun
underneath: NCCL on GPUs, gloo on the CPU). Every rank runs the same ``train_branch``; the Trainer shards the
batches (per-device batch = global batch / N / grad_accum), rank 0 writes the outputs and sends the progress
lines, which the caller reads from the group's stdout and forwards to its own progress sink. The group's
other output goes to ``OUT/launch.log``. The caller's worker ending (an error elsewhere, Ctrl-C, SIGTERM)
ends the group: it runs in a session of its own, which is terminated, then killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from paft import errors
from paft.config import PaftConfig, read_yaml
from paft.device import resolve_bf16, resolve_device
from paft.errors import ConfigError, PaftError
from paft.io import write_json_atomic
from paft.methods.losses import get_loss
from paft import ranks
from paft.train.branch import train_branch
from paft.train.trainer import Report, no_report

PROGRESS, ERROR = "PAFT-PROGRESS ", "PAFT-ERROR "  # rank 0's stdout lines the caller parses


def run_branch(*, kind: str, cfg: PaftConfig, name: str, out_dir: Path, device: str = "cpu",
               threads: int | None = None, gpus: tuple[str, ...] = (), report: Report = no_report,
               thread_share: tuple[int, Any] | None = None, **branch_args) -> dict[str, Any]:
    """Train branch ``name`` with its ``run.processes``: in this process, or as an accelerate process group on
    ``gpus`` (CUDA) or on ``threads`` CPU threads split between its ranks."""
    n = cfg.run.processes_for(name)
    device = resolve_device(device)  # a Ray task resolves run.device on its own node
    if n == 1:
        return train_branch(kind=kind, cfg=cfg, name=name, out_dir=out_dir, device=device, threads=threads,
                            report=report, thread_share=thread_share, **branch_args)
    return launch_branch(n, kind=kind, cfg=cfg, name=name, out_dir=out_dir, device=device, threads=threads,
                         gpus=gpus, report=report, **branch_args)


def accelerate_command(n: int, args_path: Path, *, cpu: bool, threads: int, bf16: bool,
                       config_file: str | None = None, port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line of a branch group of ``n`` processes; paft's process count wins
    over the config file's. Without a config file it is accelerate's multi-process (DDP) launch; on the CPU the
    Trainer's ``use_cpu`` makes it gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--main_process_port", str(port or free_port()), "--num_cpu_threads_per_process", str(threads),
           "--mixed_precision", "bf16" if bf16 else "no", "--dynamo_backend", "no"]
    cmd += ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    return cmd + ["-m", "paft.train.launch", str(args_path)]


def check_accelerate_config(cfg: PaftConfig, name: str, kind: str) -> str | None:
    """The branch's accelerate config file, checked: it exists, and a sharded-parameter strategy (FSDP, ZeRO-3)
    is refused for an SFT branch with L1, whose term reads whole LoRA factors outside the wrapped forward."""
    path = cfg.run.accelerate_config_for(name)
    if path is None:
        return None
    data = read_yaml(Path(path), "accelerate config (run.accelerate_config)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not an accelerate config (a YAML mapping); write one with `accelerate config`")
    sharded = data.get("distributed_type") == "FSDP" or \
        (data.get("deepspeed_config") or {}).get("zero_stage") == 3
    if kind == "sft" and cfg.sft.l1_lambda > 0 and sharded:
        raise ConfigError(f"run.accelerate_config for {name}: {path} shards the parameters (FSDP / ZeRO-3), but the "
                          "L1 term needs whole LoRA factors; use DDP or ZeRO-2 for the SFT branch (LoRA's trainable "
                          "weights are small), or set sft.l1_lambda: 0")
    return path


def launch_branch(n: int, *, kind: str, cfg: PaftConfig, name: str, out_dir: Path, device: str,
                  threads: int | None, gpus: tuple[str, ...], report: Report, **branch_args) -> dict[str, Any]:
    config_file = check_accelerate_config(cfg, name, kind)
    if kind == "preference" and get_loss(cfg.preference.method).schedule.kind == "online":
        # each rank would sample and score every round's prompts itself: not sharded yet
        raise ConfigError(f"run.processes: {name} uses the online method {cfg.preference.method!r}, which trains in "
                          f"one process for now; set run.processes: {{{name}: 1}}")
    cuda = device.startswith("cuda")
    if cuda and gpus and len(gpus) < n:
        raise ConfigError(f"run.processes: branch {name} asks for {n} processes, one per GPU, but has "
                          f"{len(gpus)} GPU(s) ({','.join(gpus)}); lower run.processes for it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args_path = out_dir / "launch.json"
    write_json_atomic(args_path, {"kind": kind, "cfg": cfg.model_dump(mode="json"), "name": name,
                                  "out_dir": str(out_dir), "device": "cuda" if cuda else device,
                                  **{k: str(v) if v is not None else None for k, v in branch_args.items()}})
    per_rank = max(1, (threads or os.cpu_count() or 1) // n)
    cmd = accelerate_command(n, args_path, cpu=not cuda, threads=per_rank, bf16=resolve_bf16(cfg.run.bf16, device),
                             config_file=config_file)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "PYTHONUNBUFFERED": "1"}
    if cuda and gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:n])
    elif not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU branch group never initialises CUDA
    error: dict[str, str] | None = None
    with open(out_dir / "launch.log", "a") as log, _group_process(cmd, env, log) as proc:
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                report(json.loads(line[len(PROGRESS):]))
            elif line.startswith(ERROR):
                error = json.loads(line[len(ERROR):])
            else:
                log.write(line)
        rc = proc.wait()
    if error:  # the rank's own error class (ConfigError, DataError, ...), in one line
        cls = getattr(errors, error["type"], PaftError)
        raise (cls if isinstance(cls, type) and issubclass(cls, PaftError) else PaftError)(error["message"])
    if rc != 0:  # the last line the ranks wrote (stderr goes straight to the log): the error, mostly
        lines = (out_dir / "launch.log").read_text(errors="replace").splitlines()
        last = next((t for t in reversed(lines) if t.strip() and "Warning" not in t), "")
        raise PaftError(f"branch {name}: accelerate launch of {n} processes exited with code {rc} ({last[-300:]}); "
                        f"all ranks' output: {out_dir / 'launch.log'}")
    return json.loads((out_dir / "train_summary.json").read_text())


@contextlib.contextmanager
def _group_process(cmd: list[str], env: dict[str, str], log):
    """The launcher in a session of its own, with its stderr in ``log``; terminated (then killed) with its ranks
    when the block exits early, and when this process is sent SIGTERM (which then ends it as ``SystemExit``)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=_die_with_parent)
    old = signal.getsignal(signal.SIGTERM)
    main = _in_main_thread()
    if main:
        signal.signal(signal.SIGTERM, _exit)
    try:
        yield proc
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:
            _kill_group(proc)


def _exit(signum, frame):
    raise SystemExit(128 + signum)


def _kill_group(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:
    """Linux: the launcher gets SIGTERM when the worker that started it dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(args_path: str) -> None:
    """One rank of a branch group: ``train_branch`` with progress lines (rank 0) on stdout."""
    spec = json.loads(Path(args_path).read_text())
    cfg = PaftConfig.model_validate(spec.pop("cfg"))
    device = spec.pop("device")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    paths = {k: Path(v) if v is not None else None for k, v in spec.items() if k not in ("kind", "name")}

    def report(msg: dict[str, Any]) -> None:
        if ranks.is_main():
            print(PROGRESS + json.dumps(msg), flush=True)

    try:
        train_branch(spec["kind"], cfg, device=device, threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
                     report=report, name=spec["name"], **paths)
    except PaftError as exc:  # a one-line error for the caller, as a single-process branch would raise it
        if ranks.is_main():
            print(ERROR + json.dumps({"type": type(exc).__name__, "message": str(exc)}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
