"""Rich progress bars, fed directly or from child processes through a queue."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class ProgressUI:
    """Progress bars on a terminal; elsewhere (a job log) one plain line per task every ``log_every_s`` seconds."""

    def __init__(self, enabled: bool = True, log_every_s: float = 30):
        self.plain = enabled and not console.is_terminal
        self.every = log_every_s
        self._seen: dict[str, list[float]] = {}  # task -> [first time, first completed, last printed time]
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<22}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "ProgressUI":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, name: str, completed: float | None = None, total: float | None = None, info: str = "",
               advance: float | None = None) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, info=info)
        given = {"total": total, "completed": completed, "advance": advance}
        self.progress.update(self.tasks[name], info=info, **{k: v for k, v in given.items() if v is not None})
        if self.plain:
            self._plain_line(name, info)

    def _plain_line(self, name: str, info: str) -> None:
        """A line such as ``train sft: 120/400 (30%), loss 1.2345, 850 tokens/s, 3.1 it/s, ETA 1m30s`` when one
        is due."""
        task = next(t for t in self.progress.tasks if t.id == self.tasks[name])
        now, done, total = time.monotonic(), task.completed, task.total
        seen = self._seen.setdefault(name, [now, done, -1.0])
        finished = total is not None and done >= total
        if not finished and seen[2] >= 0 and now - seen[2] < self.every:
            return
        if finished and seen[2] == float("inf"):
            return  # its last line is printed
        seen[2] = float("inf") if finished else now
        parts = [f"{name}: {done:g}" + (f"/{total:g} ({100 * done / total:.0f}%)" if total else "")]
        if info:
            parts.append(info)
        rate = (done - seen[1]) / (now - seen[0]) if now > seen[0] else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g} it/s")
            if total and not finished:
                parts.append(f"ETA {_duration((total - done) / rate)}")
        self.progress.console.print(", ".join(parts), highlight=False, markup=False, soft_wrap=True)

    def log(self, message: str) -> None:
        self.progress.console.print(message)

    def branch_report(self, msg: dict[str, Any]) -> None:
        """Training progress message from a branch (see train.trainer.ProgressCallback)."""
        if "warning" in msg:
            self.log(f"[yellow]{msg['branch']}: {msg['warning']}")
            return
        if "note" in msg:  # a phase of a staged / online method starts
            self.log(f"{msg['branch']}: {msg['note']}")
            return
        loss, tps = msg.get("loss"), msg.get("tokens_per_s")
        info = ", ".join(([f"loss {loss:.4f}"] if isinstance(loss, (int, float)) else [])
                         + ([f"{tps:.0f} tokens/s"] if isinstance(tps, (int, float)) and tps > 0 else []))
        self.update(f"train {msg['branch']}", msg.get("step"), msg.get("total"), info)

    @contextmanager
    def queue_listener(self, queue) -> Iterator[None]:
        """Drain branch messages sent by child processes until the block exits."""
        def drain():
            while (msg := queue.get()) != "__stop__":
                self.branch_report(msg)

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        try:
            yield
        finally:
            queue.put("__stop__")
            t.join(timeout=5)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def quiet_libraries() -> None:
    """Silence library progress bars and advice; paft shows its own progress."""
    import logging
    import os
    import warnings

    # bitsandbytes (imported by transformers/peft when installed) warns at import, on every CPU with AVX512-BF16,
    # that its optional 4-bit CPU kernel package is missing; paft loads 4-bit only for QLoRA, on CUDA
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_missing_kernel)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("peft").setLevel(logging.ERROR)


def _not_missing_kernel(record) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
