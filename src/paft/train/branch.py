"""Train one branch (SFT or preference) from the base model into a PEFT LoRA adapter folder.

Runs in the calling process or in a child process of the pipeline; everything it
needs arrives as plain data (config dict, paths), so it pickles under `spawn`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

from paft.config import PaftConfig, TrainConfig, set_dotted, validate_config
from paft.data.formats import examples_for_method, unique_prompts
from paft.data.loading import load_examples
from paft.device import autocast, resolve_bf16
from paft.errors import ConfigError, DataError
from paft.merge.mergekit_config import plan_from_flags
from paft.merge.standalone import run_merge
from paft.methods.losses import get_loss
from paft.methods.remedies import REMEDIES, Remedy
from paft.methods.schedules import Online, Schedule
from paft.models import load_model, load_tokenizer
from paft.models.folders import is_adapter, is_model
from paft.models.loading import nf4_compute_dtype, require_bitsandbytes
from paft.models.attention import packing_unsupported
from paft.scoring import build_scorer
from paft.train.joint import JointObjective, joint_collator, joint_rows
from paft.train.lora import attach_adapter, keep_frozen_copy
from paft.train.online import train_online
from paft.train.online_merge import OnlineMerge, online_start, trainable
from paft.train.phases import train_staged
from paft import ranks
from paft.train.preference import DATA_KINDS, PreferenceObjective, attach_value_head
from paft.models.reference import ReferenceLogps, reference_cache_path, reference_identity
from paft.train.sft import SFTObjective
from paft.train.trainer import Harness, Objective, Report, no_report, start_training


@dataclass
class Branch:
    """What one branch kind trains: its config section, examples in its data kind, objective and schedule."""

    tcfg: TrainConfig
    data: str  # a key of DATA_KINDS
    examples: list
    objective: Objective
    schedule: Schedule
    reference: bool  # the objective needs reference log-probs
    keeps_start: bool  # full fine-tuning needs a frozen copy of the start weights (L1's W_base, the reference)
    value_head: bool = False  # the objective trains a value head beside the adapter (PPO)
    sft_examples: list | None = None  # a joint branch's SFT rows: each preference row trains with one (train.joint)


def _sft_branch(cfg: PaftConfig, data_path: Path) -> Branch:
    s = cfg.sft
    return Branch(s, "sft", load_examples(str(data_path), "sft").examples,
                  SFTObjective(s.l1_lambda, full_logits=not s.completion_logits), Schedule(), reference=False,
                  keeps_start=s.l1_lambda > 0)


def _preference_branch(cfg: PaftConfig, data_path: Path) -> Branch:
    p = cfg.preference
    examples = preference_examples(cfg, data_path)  # before any model is loaded: a one-line error
    objective = PreferenceObjective(p.method, p.beta, p.params, full_logits=not p.completion_logits)
    return Branch(p, objective.spec.data, examples, objective, objective.schedule, reference=objective.spec.reference,
                  keeps_start=objective.spec.reference, value_head=objective.spec.value_head)


def _offline(branch: Branch, what: str) -> Branch:
    if branch.schedule.kind != "offline" or branch.value_head:
        raise ConfigError(f"candidates.trained.names: {what} trains with an offline preference.method (one fit on the "
                          f"file's rows); {branch.objective.method!r} is {branch.schedule.kind}")
    return branch


def _joint_branch(cfg: PaftConfig, data_path: Path) -> Branch:
    """The preference branch with an NLL term on the run's SFT split (``data_path``'s folder: RUN/data)."""
    b = _offline(_preference_branch(cfg, data_path), "joint")
    sft = load_examples(str(Path(data_path).parent / "sft_train.jsonl"), "sft").examples
    nll = SFTObjective(0.0, full_logits=not cfg.preference.completion_logits)
    return replace(b, objective=JointObjective(b.objective, nll, cfg.candidates.trained.joint_gamma), sft_examples=sft)


BRANCH_KINDS: dict[str, Callable[[PaftConfig, Path], Branch]] = {"sft": _sft_branch, "preference": _preference_branch,
                                                                  "joint": _joint_branch}


def remedy_config(cfg: PaftConfig, remedy: Remedy) -> PaftConfig:
    """``cfg`` with the remedy's ``overrides`` set (no_l1: ``sft.l1_lambda = 0``)."""
    if not remedy.overrides:
        return cfg
    data = cfg.model_dump(mode="json")
    for key, value in remedy.overrides:
        set_dotted(data, key, value)
    return validate_config(data, f"candidates.trained {remedy.name}")


def build_rows(branch: Branch, tok, cfg: PaftConfig, data_path: Path, report: Report, name: str) -> tuple[list, int]:
    """The encoded training rows of ``branch`` and how many examples were dropped (nothing left to learn)."""
    kind, d = DATA_KINDS[branch.data], cfg.data
    if kind.from_samples is not None:  # online: each round builds its own rows
        return [], 0
    encoded = [kind.encode(e, tok, d) for e in branch.examples]
    rows = [r for r in encoded if kind.keep(r)]
    dropped = len(encoded) - len(rows)  # only SFT drops: a reply cut off entirely by data.max_length
    if not rows:
        raise DataError(f"{data_path}: every SFT example's reply lies beyond data.max_length={d.max_length} tokens")
    if dropped:
        report({"branch": name, "warning": f"{dropped} SFT examples have no reply tokens within "
                                           f"data.max_length={d.max_length}; not trained on"})
    return rows, dropped


def train_branch(kind: str, cfg: PaftConfig, model_dir: Path, data_path: Path, out_dir: Path, *,
                 device: str = "cpu", threads: int | None = None, init_adapter: Path | None = None,
                 report: Report = no_report, name: str | None = None,
                 thread_share: tuple[int, Any] | None = None, reward_dir: Path | None = None,
                 remedy: str | None = None) -> dict[str, Any]:
    """Train ``kind`` ("sft" or "preference") and write ``out_dir/adapter`` (PEFT format), or ``out_dir/model``
    (a Hugging Face folder) when the branch's ``adapter`` is ``full``.

    ``init_adapter``: start from this branch output: a LoRA adapter is merged into the base
    first, a full model folder replaces the base (the sequential baseline trains its
    preference stage on the SFT weights). ``qlora`` loads the start model in 4-bit NF4 (an
    adapter start is merged into the float base on disk first, ``out_dir/start``). A run killed
    mid-way resumes from the last checkpoint under ``out_dir/checkpoints`` (staged and online
    methods: from their last finished stage or round, then its checkpoint). ``reward_dir``: the
    run's reward model, the default scorer of online methods. ``remedy``: a trained alignment-tax remedy
    (``paft.methods.remedies.REMEDIES``): its config overrides, objective and per-step online merge.
    """
    start_training(threads, cfg.run.report_to)  # a missing logger fails before the model loads
    name = name or kind
    row = REMEDIES[remedy] if remedy else None
    cfg = remedy_config(cfg, row) if row else cfg
    section = row.section if row else kind  # the config section of its training knobs
    nf4 = None  # qlora: the compute dtype of the 4-bit layers
    if getattr(cfg, section).adapter == "qlora" and not (row and row.online):
        require_bitsandbytes(f"{section}.adapter")  # before data or model load
        nf4 = str(nf4_compute_dtype(device)).removeprefix("torch.")
    branch = BRANCH_KINDS[row.objective if row else kind](cfg, data_path)
    if row and row.online:
        branch = _offline(branch, row.name)
    tcfg, objective, schedule = branch.tcfg, branch.objective, branch.schedule
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    callbacks = []
    if row and row.online:  # continues the SFT branch's parameters; every step merged with the SFT delta
        t = cfg.candidates.trained
        model, frozen, tau = online_start(
            tcfg.adapter, model_dir, init_adapter,
            lambda: _start_model(cfg, tcfg.adapter, model_dir, init_adapter, out_dir, device),
            dtype=cfg.model.dtype, device=device, trust_remote_code=cfg.model.trust_remote_code, seed_name=row.name)
        callbacks.append(OnlineMerge(trainable(model), tau, row.online, t.online_density, t.online_tau_weight,
                                     cfg.run.seed))
    else:
        model = _start_model(cfg, tcfg.adapter, model_dir, init_adapter, out_dir, device)
        frozen = keep_frozen_copy(model) if tcfg.adapter == "full" and branch.keeps_start else None
        model = attach_adapter(model, tcfg, cfg.run.seed)
    if branch.value_head:
        attach_value_head(model)

    pack_length = _pack_length(tcfg, model, cfg.data.max_length, report, name)
    rows, dropped = build_rows(branch, tok, cfg, data_path, report, name)
    collator = DATA_KINDS[branch.data].collator(tok.pad_token_id, pack_length, cfg.data.max_length)
    if branch.sft_examples is not None:  # joint: each preference row trains with an SFT row, in one batch
        sft_branch = replace(branch, data="sft", examples=branch.sft_examples)
        rows = joint_rows(rows, build_rows(sft_branch, tok, cfg, data_path, report, name)[0])
        collator = joint_collator(branch.data)(tok.pad_token_id, pack_length, cfg.data.max_length)

    bf16 = resolve_bf16(cfg.run.bf16, device)
    reference = None
    if branch.reference:
        path = None
        if cfg.preference.reference_cache:
            # a 4-bit base, and its compute dtype, give other reference log-probs than the float base
            kind_key = f"qlora/{nf4}" if nf4 else tcfg.adapter  # online LoRA: the SFT model, as the sequential one
            path = reference_cache_path(reference_identity(model_dir, dtype=cfg.model.dtype, bf16=bf16,
                                                           init_adapter=init_adapter, adapter=kind_key))
        reference = objective.reference = ReferenceLogps(path, cache=cfg.preference.reference_cache, model=frozen,
                                                         precision=partial(autocast, device, bf16))
    h = Harness(model, objective, tcfg, out_dir, name, report, cfg.run.seed, device, bf16, threads=threads,
                report_to=cfg.run.report_to, thread_share=thread_share, reference=reference,
                drop_last=DATA_KINDS[branch.data].batch_estimate is not None, callbacks=callbacks)
    if schedule.kind == "staged":
        phases = train_staged(model=model, rows=rows, collator=collator, objective=objective, fit=h.fit, tcfg=tcfg,
                              out_dir=out_dir, stages=int(schedule.stages), report=report, name=name)
    elif schedule.kind == "online":
        scorer = _online_scorer(cfg, schedule, model_dir, tok, model, device, reward_dir)
        phases = train_online(cfg=cfg, model=model, tok=tok, objective=objective,
                              prompts=unique_prompts(e.prompt for e in branch.examples), scorer=scorer, fit=h.fit, out_dir=out_dir,
                              report=report, name=name, collator=collator)
    else:
        phases = h.fit(rows, collator, out_dir / "checkpoints")
    if reference is not None:
        reference.save()

    output = h.save(out_dir / ("model" if tcfg.adapter == "full" else "adapter"), tok)  # full: a model folder
    shutil.rmtree(out_dir / "start", ignore_errors=True)  # qlora's merged start model: only needed while training
    summary = {
        "branch": name, "kind": kind, "adapter": tcfg.adapter, "output": str(output), "data_kind": branch.data,
        "schedule": schedule.kind, "steps": phases["steps"], "examples": len(rows), "dropped_no_reply_tokens": dropped,
        "train_loss": phases["train_loss"], "init_adapter": str(init_adapter) if init_adapter else None,
    }
    if row:
        summary["remedy"] = row.name
    if nf4:
        summary["nf4_compute_dtype"] = nf4
    if schedule.kind != "offline":
        summary["phases"] = phases.get("stages") or phases.get("rounds")
    if reference is not None:
        summary["reference_cache"] = {"path": str(reference.path) if reference.path else None,  # over all ranks
                                      "hits": int(ranks.all_sum(reference.hits)),
                                      "computed": int(ranks.all_sum(reference.misses))}
    return h.finish(summary)


def _pack_length(tcfg, model, max_length: int, report: Report, name: str) -> int | None:
    """``tcfg.pack_length`` when the branch packs its batches (a note and the padded layout when the model can't)."""
    if not tcfg.packing:
        return None
    why = packing_unsupported(model, 2 * max_length)  # a pair's prompt + two replies
    if why:
        report({"branch": name, "note": f"packing off: {why}"})
        return None
    return tcfg.pack_length


def _online_scorer(cfg: PaftConfig, schedule: Online, model_dir: Path, tok, model, device: str,
                   reward_dir: Path | None):
    """The scorer of an online method: the configured one, or the policy itself (``scorer: self_judge``)."""
    scfg = cfg.preference.online.scorer
    if schedule.scorer == "self_judge":
        scfg = scfg.model_copy(update={"kind": "judge", "path": None})
    return build_scorer(scfg, base_model_dir=model_dir, tokenizer=tok, policy=model, device=device,
                        default_reward_dir=reward_dir)


def preference_examples(cfg: PaftConfig, data_path: Path, source: str | None = None) -> list:
    """The preference rows of ``data_path`` in the data kind of ``preference.method``.

    ``source``: the name errors give the data (the user's file, when ``data_path`` is the run's copy).

    Pairs convert to unpaired rows for KTO ("binary") and to their rejected replies for NPO
    ("negatives"); unpaired rows given to a pairwise method are a one-line ``DataError`` naming
    the method and the columns it needs; online methods take the prompts of any rows. Data kinds whose
    loss estimates across a batch's rows (``DataKind.batch_estimate``: KTO's KL, DRO's value) need
    preference.batch_size >= 2 (a ``ConfigError``) and at least that many rows (a ``DataError``); their
    last, smaller batch of an epoch is dropped.
    """
    p = cfg.preference
    spec = get_loss(p.method)
    batch_estimate = DATA_KINDS[spec.data].batch_estimate
    # the estimate runs over one process's micro-batch: batch_size / processes / grad_accum rows
    split = max(cfg.run.processes_for(b) for b in ("preference", "sequential")) * p.grad_accum
    if batch_estimate and p.batch_size < 2 * split:
        raise ConfigError(f"preference.method {p.method!r} needs micro-batches of >= 2 rows ({batch_estimate}): "
                          f"preference.batch_size >= 2 x run.processes x preference.grad_accum = {2 * split}; "
                          f"got {p.batch_size}")
    examples = load_examples(str(data_path), "preference").examples
    rows = examples_for_method(examples, spec.data, method=p.method, source=source or str(data_path))
    if batch_estimate and len(rows) < p.batch_size:  # every batch of fewer rows is dropped: nothing would train
        raise DataError(f"{source or data_path}: {p.method} needs at least preference.batch_size={p.batch_size} rows "
                        f"(batches are full: {batch_estimate}); got {len(rows)}")
    return rows


def _start_model(cfg: PaftConfig, adapter: str, model_dir: Path, init: Path | None, out_dir: Path, device: str):
    """The model a branch starts from: the base, or the base with ``init`` (an adapter or a full model folder)
    applied; in 4-bit NF4 for ``qlora``."""
    from peft import PeftModel  # lazy: peft's import is slow and the pipeline imports this module early

    m = cfg.model
    start_dir = model_dir
    init_is_adapter = init is not None and is_adapter(init)
    if init is not None and not init_is_adapter:
        start_dir = Path(init)  # a full fine-tuned model folder is the start model itself
    elif init_is_adapter and adapter == "qlora":
        # a 4-bit model is quantised while loading, so the adapter is merged into the float base on disk first
        start_dir = out_dir / "start"
        if not is_model(start_dir):  # the streaming merge: never two float models in memory
            run_merge(plan_from_flags(model_dir, [init], "task_arithmetic", source="qlora start"), start_dir,
                      force=True)
    model = load_model(start_dir, m.dtype, device, m.trust_remote_code, quantize_4bit=adapter == "qlora")
    if init_is_adapter and adapter != "qlora":
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
