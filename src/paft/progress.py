"""Rich progress bars, fed directly or from child processes through a queue."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class ProgressUI:
    def __init__(self, enabled: bool = True):
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
        loss = msg.get("loss")
        self.update(f"train {msg['branch']}", msg.get("step"), msg.get("total"),
                    f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "")

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


def quiet_libraries() -> None:
    """Silence library progress bars and advice; paft shows its own progress."""
    import logging
    import os
    import warnings

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
