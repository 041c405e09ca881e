"""One transformers Trainer subclass for every branch; the objective is pluggable.

An objective maps (model, batch) to (loss, metrics). The Trainer brings the
optimizer, schedule, gradient accumulation, bf16 autocast, checkpoints and resume,
devices and accelerate/DeepSpeed/FSDP; paft brings only the objectives.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from safetensors import SafetensorError
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import rotate_checkpoints

from paft.config import TrainConfig
from paft.data.packing import real_tokens
from paft.errors import ConfigError, PaftError
from paft.io import atomic_dir, save_error, write_json_atomic
from paft.progress import quiet_libraries
from paft import ranks


Report = Callable[[dict[str, Any]], None]  # a progress sink: a rich progress bar, or a queue from a child process


def no_report(_: dict[str, Any]) -> None:
    pass


class Objective(Protocol):
    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


class TrainingDiverged(PaftError):
    """A NaN or infinite training loss: the branch stops at that step."""


class PaftTrainer(Trainer):
    # the objectives return a per-micro-batch mean: ``training_step`` divides it by the accumulation steps (left
    # to transformers' default, a model that accepts loss kwargs would mark it pre-scaled, and grad_accum=k would
    # train with k times the gradient)
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: Objective, name: str = "training", **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self._staging: str | None = None  # the folder a checkpoint is being written into
        self.branch = name
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._tokens: torch.Tensor | int = 0  # real tokens trained on, summed on the batches' device

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._tokens = self._tokens + real_tokens(inputs)  # a device tensor: no host sync per step
        return super().training_step(model, inputs, num_items_in_batch)

    def tokens_seen(self) -> int:
        """Real (non-pad) tokens of this ``train()``'s batches so far, over all ranks (a collective: every rank
        calls it, at the Trainer's log steps); syncs with the device, so read it rarely."""
        return int(ranks.all_sum(int(self._tokens)))

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """The scored tokens of an optimizer step's micro-batches on every rank, for objectives that normalise by
        them (``tokens``: SFT's token mean over the whole step, whatever the ranks and accumulation split)."""
        count = getattr(self.objective, "count", None)
        if count is None:
            return None
        return ranks.all_sum(sum(count(b) for b in batch_samples))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kw = {}
        if num_items_in_batch is not None:
            # gradients are averaged over (accumulation steps x ranks) micro-batches: each normalises by its share
            kw["tokens"] = num_items_in_batch / (self.current_gradient_accumulation_steps
                                                 * self.accelerator.num_processes)
        # accelerate's bf16/fp16 autocast wraps only model.forward; the objectives call the decoder and the LM head
        # themselves (completion positions, packed rows), so without this they would run in fp32
        with self.accelerator.autocast():
            loss, metrics = _wrapped_call(model, lambda inner: self.objective(inner, inputs, **kw))
        if model.training and not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"{self.branch}: loss is {float(loss.detach().float().mean())} at step "
                                   f"{self.state.global_step + 1}; training diverged (lower the learning rate, "
                                   "or check the data)")
        for k, v in metrics.items():
            self._metrics[k].append(float(v))
        return (loss, None) if return_outputs else loss

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Complete or absent: the Trainer writes ``checkpoint-N`` into ``.tmp-checkpoint-N``, renamed when whole;
        then the old checkpoints are rotated out. (Several ranks share the folder: they write in place, and the
        resume's ``last_checkpoint`` check covers them.)"""
        if self.args.world_size > 1 or trial is not None:
            return super()._save_checkpoint(model, trial)
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        tmp = run_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        self._staging = str(tmp)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as exc:
            # disk full, mostly (torch.save and safetensors raise their own types for it): the half-written
            # checkpoint goes at once, the last complete one stays
            err = save_error(run_dir / name, exc, run_dir)  # before the removal frees the space it measures
            shutil.rmtree(tmp, ignore_errors=True)
            if err is None:
                raise
            raise err from None
        finally:
            self._staging = None
        shutil.rmtree(run_dir / name, ignore_errors=True)
        os.replace(tmp / name, run_dir / name)
        tmp.rmdir()
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # objective metrics averaged over the steps since the last log line
        for k, vals in self._metrics.items():
            if vals:
                logs[k] = sum(vals) / len(vals)
        self._metrics.clear()
        super().log(logs, start_time)


def _wrapped_call(model, run: Callable[[Any], Any]) -> Any:
    """``run(inner)`` as the forward of a DDP/FSDP-wrapped ``model``: the objectives call the decoder and LM head
    themselves, and a wrapper only syncs gradients (DDP) or gathers shards (FSDP) around its own forward, so the
    objective runs as that forward, with ``inner`` the PEFT model it wraps. Unwrapped: ``run(model)``."""
    inner = getattr(model, "module", None)
    if inner is None:
        return run(model)
    saved = inner.__dict__.get("forward")  # accelerate's autocast may have patched the instance's forward
    inner.forward = lambda: run(inner)
    try:
        return model()
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


class ProgressCallback(TrainerCallback):
    """Forwards step, loss and real tokens per second to a ``Report`` sink.

    ``tokens``: reads the trainer's token count (``PaftTrainer.tokens_seen``); it is read at the Trainer's log
    steps, where the loss is read from the device anyway, so the rate costs no extra sync per step.
    """

    def __init__(self, report: Report, name: str, tokens: Callable[[], int] = lambda: 0):
        self.report, self.name, self.tokens = report, name, tokens
        self.last: dict[str, float] = {}
        self.tokens_per_s: float | None = None
        self.t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        if state.is_world_process_zero:
            self.report({"branch": self.name, "step": state.global_step, "total": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            self.last = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        n, dt = self.tokens(), time.perf_counter() - self.t0  # every rank: the token count is a collective
        self.tokens_per_s = n / dt if n > 0 and dt > 0 else None

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero:  # one progress line per branch, not one per rank
            self.report({"branch": self.name, "step": state.global_step, "total": state.max_steps,
                         "loss": self.last.get("loss"), "tokens_per_s": self.tokens_per_s})


class ThreadShareCallback(TrainerCallback):
    """Re-split the CPU threads each step by the number of branches still running.

    Two branches start with half the cores each; when one finishes, the other
    takes all of them instead of leaving a core idle. ``active`` is a shared
    counter (a multiprocessing Value proxy) that the scheduler keeps current.
    """

    def __init__(self, total_threads: int, active):
        self.total, self.active = total_threads, active

    def on_step_begin(self, args, state, control, **kw):
        want = max(1, self.total // max(1, self.active.value))
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


class SaveReferenceCallback(TrainerCallback):
    """Persist the reference log-prob memo at every checkpoint, so a killed run keeps what it computed."""

    def __init__(self, reference):
        self.reference = reference

    def on_save(self, args, state, control, **kw):
        self.reference.save()


# run.report_to integration -> the modules it can use (any one of them)
_INTEGRATION_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                        "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                        "trackio": ("trackio",)}


def check_report_to(report_to: Iterable[str]) -> None:
    """One config error for a requested logger that is not installed (the Trainer would fail later, less clearly)."""
    for name in report_to:
        mods = _INTEGRATION_MODULES.get(name, (name,))
        if not any(importlib.util.find_spec(m) for m in mods):
            raise ConfigError(f"run.report_to includes {name!r}, but {mods[0]} is not installed: "
                              f"`pip install {mods[0]}`, or leave it out (--set run.report_to=[])")


class BranchTensorBoard(TensorBoardCallback):
    """The Trainer's TensorBoard logger, writing to a fixed folder (RUN/BRANCH/tb) instead of output_dir/runs/DATE.

    A run resumed from a checkpoint at step N purges the events after step N that the
    killed run logged after that checkpoint, so the curves do not double back.
    """

    def __init__(self, log_dir: Path):
        super().__init__()
        self.logging_dir = str(log_dir)
        self._purge_step: int | None = None

    def on_train_begin(self, args, state, control, **kw):
        # global_step is restored from the checkpoint before this call; steps up to it are kept
        self._purge_step = state.global_step + 1 if state.global_step else None
        super().on_train_begin(args, state, control, **kw)

    def _init_summary_writer(self, args):
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self._purge_step)


def route_tensorboard(trainer: Trainer, log_dir: Path) -> None:
    """Swap the TensorBoard callback that ``report_to`` made for one that logs under ``log_dir``."""
    if any(isinstance(cb, TensorBoardCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(TensorBoardCallback)
        trainer.add_callback(BranchTensorBoard(log_dir))


def training_args(cfg: TrainConfig, out_dir: Path, *, seed: int, device: str, bf16: bool,
                  n_examples: int, report_to: Iterable[str] = (), run_name: str | None = None,
                  drop_last: bool = False) -> TrainingArguments:
    """``drop_last``: skip an epoch's last, smaller batch (an objective that estimates across a batch's rows)."""
    report_to = list(report_to)
    check_report_to(report_to)
    # cfg.batch_size is the global batch of an optimizer step (the config checks it divides evenly)
    steps_per_epoch = max(1, n_examples // cfg.batch_size if drop_last else math.ceil(n_examples / cfg.batch_size))
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=max(1, cfg.batch_size // (ranks.world_size() * cfg.grad_accum)),
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs)),
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        report_to=report_to or "none",
        run_name=run_name,  # the W&B / MLflow run name
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_drop_last=drop_last,
    )


# what a Trainer checkpoint holds besides trainer_state.json, which ``Trainer._save_checkpoint`` writes last:
# the weights (a PEFT adapter or a full model, whole or sharded) and the optimizer state (a DeepSpeed checkpoint
# keeps it in a global_stepN folder)
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_problem(d: Path) -> str | None:
    """Why the Trainer checkpoint folder ``d`` (``checkpoint-N``) cannot be resumed from, or None when it is complete."""
    try:
        step = json.loads((d / "trainer_state.json").read_text())["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json (killed while it was being written)"
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is truncated or not a Trainer state (killed while it was being written)"
    if f"checkpoint-{step}" != d.name:
        return f"trainer_state.json is for step {step}"
    if not any((d / w).is_file() for w in _WEIGHTS):
        return "no model or adapter weights"
    if not ((d / "optimizer.pt").is_file() or any(d.glob("global_step*")) or any(d.glob("optimizer*"))):
        return "no optimizer state"
    return None


def last_checkpoint(out_dir: Path, report: Report = no_report, name: str = "") -> str | None:
    """The newest complete ``checkpoint-N`` in ``out_dir``; an incomplete newer one (a run killed while writing it)
    is reported in one line and removed, so that the resume and the next save of step N start clean."""
    out_dir = Path(out_dir)
    for tmp in out_dir.glob(".tmp-checkpoint-*"):  # a checkpoint a killed run was writing (PaftTrainer)
        shutil.rmtree(tmp, ignore_errors=True)
    found = sorted((int(m.group(1)), p) for p in out_dir.glob("checkpoint-*")
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, d in reversed(found):
        why = checkpoint_problem(d)
        if why is None:
            return str(d)
        report({"branch": name, "warning": f"skipping incomplete checkpoint {d}: {why}; removed"})
        shutil.rmtree(d, ignore_errors=True)
    return None


def trained_loss(log_history: list[dict[str, Any]]) -> float:
    """The mean training loss over the steps that ``log_history``'s "loss" entries cover (each weighted by the
    steps since the entry before), for a fit that finished at a checkpoint and has nothing left to train."""
    total = steps = 0
    last = 0
    for e in log_history:
        if "loss" in e and "step" in e:
            total += e["loss"] * (e["step"] - last)
            steps += e["step"] - last
            last = e["step"]
    return total / steps if steps else float("nan")


def start_training(threads: int | None, report_to: Iterable[str]) -> None:
    """Before any data or model loads: quiet library logs, fail on a missing logger, set the CPU threads."""
    quiet_libraries()
    check_report_to(report_to)
    if threads:
        torch.set_num_threads(threads)


@dataclass
class Harness:
    """The one fit loop of every branch and of the reward model: a ``PaftTrainer`` per ``fit`` with progress,
    thread-share and reference-cache callbacks, TensorBoard under ``out_dir/tb``, resume from the last
    checkpoint; then an atomic save of the result and the summary files."""

    model: Any
    objective: Objective
    tcfg: TrainConfig
    out_dir: Path
    name: str
    report: Report
    seed: int
    device: str
    bf16: bool
    threads: int | None = None
    report_to: Iterable[str] = ()
    thread_share: tuple[int, Any] | None = None
    reference: Any = None  # a ReferenceLogps whose memo is saved at every checkpoint
    drop_last: bool = False  # skip each epoch's last, smaller batch (``DataKind.batch_estimate``)
    callbacks: list = field(default_factory=list)  # more TrainerCallbacks of every fit (online merging)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def fit(self, rows: list, collator, ckpt_dir: Path, max_steps: int | None = None) -> dict[str, Any]:
        """One Trainer run over ``rows`` (resuming from ``ckpt_dir``): the only training loop."""
        t = self.tcfg if max_steps is None else self.tcfg.model_copy(update={"max_steps": max_steps})
        out_dir = Path(self.out_dir)
        args = training_args(t, ckpt_dir, seed=self.seed, device=self.device, bf16=self.bf16, n_examples=len(rows),
                             report_to=self.report_to, run_name=f"{out_dir.resolve().parent.name}/{self.name}",
                             drop_last=self.drop_last)
        progress = ProgressCallback(self.report, self.name)
        trainer = PaftTrainer(model=self.model, args=args, train_dataset=rows, data_collator=collator,
                              objective=self.objective, name=self.name, callbacks=[progress, *self.callbacks])
        progress.tokens = trainer.tokens_seen
        # TensorBoard events: OUT/tb, or OUT/tb/stages/stage-2 etc. for a staged or online schedule's fits
        route_tensorboard(trainer, out_dir / "tb" / Path(ckpt_dir).parent.relative_to(out_dir))
        if self.thread_share is not None:
            trainer.add_callback(ThreadShareCallback(*self.thread_share))
        if self.reference is not None:
            trainer.add_callback(SaveReferenceCallback(self.reference))
        trainer.remove_callback(PrinterCallback)  # paft shows progress bars; logs go to log_history.json
        self.trainer = trainer
        t0 = time.perf_counter()
        # rank 0 removes an incomplete checkpoint before the others look
        ckpt = last_checkpoint(ckpt_dir, self.report, self.name) if ranks.is_main() else None
        ranks.barrier()
        if not ranks.is_main():
            ckpt = last_checkpoint(ckpt_dir)
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text()) if ckpt else {}
        if state.get("global_step", 0) >= args.max_steps:
            # killed after its final checkpoint: the Trainer would train one step past max_steps, so load it instead
            trainer._load_from_checkpoint(ckpt)
            self.log_history.extend(state["log_history"])
            self.report({"branch": self.name, "step": state["global_step"], "total": args.max_steps})
            return {"train_loss": trained_loss(state["log_history"]), "steps": state["global_step"],
                    "wall_s": round(time.perf_counter() - t0, 2)}
        result = trainer.train(resume_from_checkpoint=ckpt)
        self.log_history.extend(trainer.state.log_history)
        return {"train_loss": result.training_loss, "steps": trainer.state.global_step,
                "wall_s": round(time.perf_counter() - t0, 2)}

    def save(self, output: Path, tok) -> Path:
        """The model (a PEFT adapter, or a full model folder) and its tokenizer, written atomically to ``output``
        by rank 0 (FSDP / ZeRO-3 shards are gathered first, by every rank)."""
        trainer = getattr(self, "trainer", None)
        state = None
        if trainer is not None and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
            state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective
        if ranks.is_main():
            with atomic_dir(output, force=True) as tmp:
                self.model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
                tok.save_pretrained(tmp)
        ranks.barrier()
        return output

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``summary`` plus wall time, threads, device, bf16, processes and peak device memory, written with the
        log history to ``out_dir`` (by rank 0)."""
        summary = {**summary, "wall_s": round(time.perf_counter() - self.t0, 2),
                   "threads": self.threads or torch.get_num_threads(), "device": self.device, "bf16": self.bf16,
                   "processes": ranks.world_size(), **memory_peaks(self.device)}
        if ranks.is_main():
            write_json_atomic(Path(self.out_dir) / "log_history.json", self.log_history)
            write_json_atomic(Path(self.out_dir) / "train_summary.json", summary)
        ranks.barrier()
        return summary


def memory_peaks(device: str) -> dict[str, float]:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory (GiB; the largest rank's
    in a process group)."""
    import resource

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["peak_device_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if ranks.world_size() > 1:
        out = {k: max(v[k] for v in ranks.gather(out)) for k in out}
    return out
