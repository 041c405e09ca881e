"""Train one branch (SFT or preference) from the base model into a PEFT LoRA adapter folder.

Runs in the calling process or in a child process of the pipeline; everything it
needs arrives as plain data (config dict, paths), so it pickles under `spawn`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from paft.config import PaftConfig
from paft.io import atomic_dir, write_json_atomic
from paft.models.folders import is_adapter, is_model

Report = Callable[[dict[str, Any]], None]


def _noop(_: dict[str, Any]) -> None:
    pass


def train_branch(kind: str, cfg: PaftConfig, model_dir: Path, data_path: Path, out_dir: Path, *,
                 device: str = "cpu", threads: int | None = None, init_adapter: Path | None = None,
                 report: Report = _noop, name: str | None = None,
                 thread_share: tuple[int, Any] | None = None, reward_dir: Path | None = None) -> dict[str, Any]:
    """Train ``kind`` ("sft" or "preference") and write ``out_dir/adapter`` (PEFT format), or ``out_dir/model``
    (a Hugging Face folder) when the branch's ``adapter`` is ``full``.

    ``init_adapter``: start from this branch output: a LoRA adapter is merged into the base
    first, a full model folder replaces the base (the sequential baseline trains its
    preference stage on the SFT weights). ``qlora`` loads the start model in 4-bit NF4 (an
    adapter start is merged into the float base on disk first, ``out_dir/start``). A run killed
    mid-way resumes from the last checkpoint under ``out_dir/checkpoints`` (staged and online
    methods: from their last finished stage or round, then its checkpoint). ``reward_dir``: the
    run's reward model, the default scorer of online methods.
    """
    from paft.data.collate import BinaryCollator, PairCollator, SFTCollator
    from paft.data.loading import load_examples
    from paft.data.tokenize import encode_completion, encode_pair, encode_sft
    from paft.models import load_tokenizer
    from transformers.trainer_callback import PrinterCallback

    from paft.data.tokenize import IGNORE
    from paft.errors import DataError
    from paft.progress import quiet_libraries
    from paft.train.lora import attach_adapter, keep_frozen_copy
    from paft.train.preference import PreferenceObjective
    from paft.train.sft import SFTObjective
    from paft.train.trainer import (PaftTrainer, ProgressCallback, SaveReferenceCallback, ThreadShareCallback,
                                    check_report_to, last_checkpoint, resolve_bf16, route_tensorboard, training_args)

    quiet_libraries()
    check_report_to(cfg.run.report_to)  # a missing logger fails before the model loads
    if threads:
        torch.set_num_threads(threads)
    name = name or kind
    tcfg = cfg.sft if kind == "sft" else cfg.preference
    nf4 = None  # qlora: the compute dtype of the 4-bit layers
    if tcfg.adapter == "qlora":
        from paft.models.loading import nf4_compute_dtype, require_bitsandbytes

        require_bitsandbytes(f"{'sft' if kind == 'sft' else 'preference'}.adapter")  # before data or model load
        nf4 = str(nf4_compute_dtype(device)).removeprefix("torch.")
    if kind == "sft":
        examples = load_examples(str(data_path), kind).examples
    else:
        # before any model is loaded: the examples in the method's data kind, or a one-line error
        examples = preference_examples(cfg, data_path)
        objective = PreferenceObjective(cfg.preference.method, cfg.preference.beta, cfg.preference.params,
                                        full_logits=not cfg.preference.completion_logits)
        data_kind = objective.spec.data
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    model = _start_model(cfg, tcfg.adapter, model_dir, init_adapter, out_dir, device)
    # full fine-tuning keeps the starting weights: W_base of the L1 penalty, and the reference model
    needs_start = tcfg.adapter == "full" and (
        (kind == "sft" and cfg.sft.l1_lambda > 0) or (kind != "sft" and objective.spec.reference))
    frozen = keep_frozen_copy(model) if needs_start else None
    model = attach_adapter(model, tcfg, cfg.run.seed)

    d = cfg.data
    pack_length = _pack_length(tcfg, model, d.max_length, report, name)
    if kind == "sft":
        encoded = [encode_sft(e, tok, d.max_length) for e in examples]
        rows = [r for r in encoded if any(t != IGNORE for t in r.labels[1:])]
        dropped = len(encoded) - len(rows)  # reply cut off entirely by data.max_length: nothing to learn
        if not rows:
            raise DataError(f"{data_path}: every SFT example's reply lies beyond data.max_length={d.max_length} tokens")
        if dropped:
            report({"branch": name, "warning": f"{dropped} SFT examples have no reply tokens within "
                                               f"data.max_length={d.max_length}; not trained on"})
        objective = SFTObjective(cfg.sft.l1_lambda, full_logits=not tcfg.completion_logits)
        collator = SFTCollator(tok.pad_token_id, pack_length)
    else:
        dropped = 0
        if data_kind in ("pairs", "online"):  # online: each round builds its own pairs
            rows = [encode_pair(e, tok, d.max_length, d.max_prompt_length) for e in examples] \
                if data_kind == "pairs" else []
            collator = PairCollator(tok.pad_token_id, pack_length)
        elif data_kind == "ranked":
            from paft.data.collate import RankedCollator
            from paft.data.tokenize import encode_ranked

            rows = [encode_ranked(e, tok, d.max_length, d.max_prompt_length) for e in examples]
            collator = RankedCollator(tok.pad_token_id, pack_length)
        else:
            rows = [encode_completion(e, tok, d.max_length, d.max_prompt_length) for e in examples]
            collator = BinaryCollator(tok.pad_token_id, kl=data_kind == "binary", max_length=d.max_length)

    bf16 = resolve_bf16(cfg.run.bf16, device)
    schedule = "offline" if kind == "sft" else objective.spec.schedule
    reference = None
    if kind != "sft" and objective.spec.reference:
        from paft.train.reference import ReferenceLogps, reference_cache_path, reference_identity

        path = None
        if cfg.preference.reference_cache:
            # a 4-bit base, and its compute dtype, give other reference log-probs than the float base
            kind_key = f"qlora/{nf4}" if nf4 else tcfg.adapter
            path = reference_cache_path(reference_identity(model_dir, dtype=cfg.model.dtype, bf16=bf16,
                                                           init_adapter=init_adapter, adapter=kind_key))
        reference = objective.reference = ReferenceLogps(path, cache=cfg.preference.reference_cache, model=frozen)
    log_history: list[dict[str, Any]] = []

    def fit(fit_rows: list, fit_collator, ckpt_dir: Path, max_steps: int | None = None) -> dict[str, Any]:
        """One Trainer run over ``fit_rows`` (resuming from ``ckpt_dir``): the only training loop."""
        t = tcfg if max_steps is None else tcfg.model_copy(update={"max_steps": max_steps})
        args = training_args(t, ckpt_dir, seed=cfg.run.seed, device=device, bf16=bf16, n_examples=len(fit_rows),
                             report_to=cfg.run.report_to, run_name=f"{Path(out_dir).resolve().parent.name}/{name}")
        trainer = PaftTrainer(model=model, args=args, train_dataset=fit_rows, data_collator=fit_collator,
                              objective=objective, callbacks=[ProgressCallback(report, name)])
        # TensorBoard events: OUT/tb, or OUT/tb/stages/stage-2 etc. for a staged or online schedule's fits
        rel = Path(ckpt_dir).parent.relative_to(out_dir)
        route_tensorboard(trainer, Path(out_dir) / "tb" / rel)
        if thread_share is not None:
            trainer.add_callback(ThreadShareCallback(*thread_share))
        if reference is not None:
            trainer.add_callback(SaveReferenceCallback(reference))
        trainer.remove_callback(PrinterCallback)  # paft shows progress bars; logs go to log_history.json
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last_checkpoint(ckpt_dir))
        log_history.extend(trainer.state.log_history)
        return {"train_loss": result.training_loss, "steps": trainer.state.global_step,
                "wall_s": round(time.perf_counter() - t0, 2)}

    start = time.perf_counter()
    phases: dict[str, Any] = {}
    if schedule == "staged":
        from paft.train.phases import train_staged

        phases = train_staged(model=model, rows=rows, collator=collator, objective=objective, fit=fit, tcfg=tcfg,
                              out_dir=out_dir, stages=int(objective.kwargs["stages"]), report=report, name=name)
    elif schedule == "online":
        from paft.train.online import train_online, unique_prompts

        scorer = _online_scorer(cfg, objective.spec.name, model_dir, tok, model, device, reward_dir)
        phases = train_online(cfg=cfg, model=model, tok=tok, objective=objective, prompts=unique_prompts(examples),
                              scorer=scorer, fit=fit, out_dir=out_dir, report=report, name=name, collator=collator)
    else:
        phases = fit(rows, collator, out_dir / "checkpoints")
    wall = time.perf_counter() - start
    if reference is not None:
        reference.save()

    output = out_dir / ("model" if tcfg.adapter == "full" else "adapter")
    with atomic_dir(output, force=True) as tmp:
        model.save_pretrained(tmp)  # full: a safetensors model folder; else a PEFT adapter (for the float base)
        tok.save_pretrained(tmp)
    if (out_dir / "start").is_dir():  # qlora's merged start model: only needed while training
        import shutil

        shutil.rmtree(out_dir / "start", ignore_errors=True)
    summary = {
        "branch": name, "kind": kind, "adapter": tcfg.adapter, "output": str(output),
        "data_kind": "sft" if kind == "sft" else data_kind, "schedule": schedule, "steps": phases["steps"],
        "examples": len(rows), "dropped_no_reply_tokens": dropped,
        "train_loss": phases["train_loss"], "wall_s": round(wall, 2), "threads": threads or torch.get_num_threads(),
        "device": device, "bf16": bf16, "init_adapter": str(init_adapter) if init_adapter else None,
    }
    if nf4:
        summary["nf4_compute_dtype"] = nf4
    if schedule != "offline":
        summary["phases"] = phases.get("stages") or phases.get("rounds")
    if reference is not None:
        summary["reference_cache"] = {"path": str(reference.path) if reference.path else None,
                                      "hits": reference.hits, "computed": reference.misses}
    write_json_atomic(out_dir / "log_history.json", log_history)
    write_json_atomic(out_dir / "train_summary.json", summary)
    return summary


def _pack_length(tcfg, model, max_length: int, report: Report, name: str) -> int | None:
    """``tcfg.pack_length`` when the branch packs its batches (a note and the padded layout when the model can't)."""
    if not tcfg.packing:
        return None
    from paft.train.attention import packing_unsupported

    why = packing_unsupported(model, 2 * max_length)  # a pair's prompt + two replies
    if why:
        report({"branch": name, "note": f"packing off: {why}"})
        return None
    return tcfg.pack_length


def _online_scorer(cfg: PaftConfig, method: str, model_dir: Path, tok, model, device: str, reward_dir: Path | None):
    """The scorer of an online method; self-rewarding always judges with the policy itself."""
    from paft.scoring import build_scorer

    scfg = cfg.preference.online.scorer
    if method == "self-rewarding":
        scfg = scfg.model_copy(update={"kind": "judge", "path": None})
    return build_scorer(scfg, base_model_dir=model_dir, tokenizer=tok, policy=model, device=device,
                        default_reward_dir=reward_dir)


def preference_examples(cfg: PaftConfig, data_path: Path, source: str | None = None) -> list:
    """The preference rows of ``data_path`` in the data kind of ``preference.method``.

    ``source``: the name errors give the data (the user's file, when ``data_path`` is the run's copy).

    Pairs convert to unpaired rows for KTO ("binary") and to their rejected replies for NPO
    ("negatives"); unpaired rows given to a pairwise method are a one-line ``DataError`` naming
    the method and the columns it needs. KTO's KL estimate pairs each completion with another
    row's prompt, so it needs at least 2 rows per batch (a ``ConfigError`` otherwise).
    """
    from paft.data.formats import examples_for_method
    from paft.data.loading import load_examples
    from paft.errors import ConfigError
    from paft.train.losses import get_loss

    p = cfg.preference
    spec = get_loss(p.method)
    if spec.data == "binary" and p.batch_size < 2:
        raise ConfigError(f"preference.method {p.method!r} needs preference.batch_size >= 2 (its KL estimate pairs "
                          f"each completion with another row's prompt in the batch); got {p.batch_size}")
    examples = load_examples(str(data_path), "preference").examples
    if spec.data == "online":  # only the prompts are used; each round samples and scores its own replies
        if not examples:
            from paft.errors import DataError

            raise DataError(f"{source or data_path}: no preference rows to take prompts from")
        return examples
    return examples_for_method(examples, spec.data, method=p.method, source=source or str(data_path))


def _start_model(cfg: PaftConfig, adapter: str, model_dir: Path, init: Path | None, out_dir: Path, device: str):
    """The model a branch starts from: the base, or the base with ``init`` (an adapter or a full model folder)
    applied; in 4-bit NF4 for ``qlora``."""
    from paft.models import load_model

    start_dir = model_dir
    init_is_adapter = init is not None and is_adapter(init)
    if init is not None and not init_is_adapter:
        start_dir = Path(init)  # a full fine-tuned model folder is the start model itself
    elif init_is_adapter and adapter == "qlora":
        # a 4-bit model is quantised while loading, so the adapter is merged into the float base on disk first
        from paft.merge.mergekit_config import plan_from_flags
        from paft.merge.standalone import run_merge

        start_dir = out_dir / "start"
        if not is_model(start_dir):
            run_merge(plan_from_flags(model_dir, [init], "task_arithmetic", source="qlora start"), start_dir,
                      force=True)
    model = load_model(start_dir, cfg.model.dtype, device, cfg.model.trust_remote_code,
                       quantize_4bit=adapter == "qlora")
    if init_is_adapter and adapter != "qlora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init)).merge_and_unload()
    return model


def branch_output(out_dir: Path) -> Path:
    """What a branch wrote: ``out_dir/adapter`` (LoRA, QLoRA), else ``out_dir/model`` (full fine-tuning) when
    present. The adapter wins: the pipeline writes the merged sequential baseline to ``sequential/model``."""
    adapter, full = Path(out_dir) / "adapter", Path(out_dir) / "model"
    if is_adapter(adapter) or not is_model(full):
        return adapter
    return full


def branch_done(out_dir: Path) -> bool:
    out = branch_output(out_dir)
    return (is_model(out) if out.name == "model" else is_adapter(out)) and (out_dir / "train_summary.json").is_file()


def read_summary(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "train_summary.json").read_text())
