"""`paft eval MODEL...`: evaluate model folders and LoRA adapters that no paft run produced.

Each MODEL is an HF model folder (``config.json``) or a PEFT LoRA adapter folder
(``adapter_config.json``) on ``--base`` (``model.name``), or on the base its adapter config names
when that is a local folder. Models are named by their folder (an ``adapter`` folder by its
parent; parents are added where two share a name); with ``--base`` the base itself is evaluated
too, as ``base``. The metrics are those of a run's eval step (``eval`` section), on the config's
held-out data, written to ``run.output_dir``/eval.json (``runs/eval`` unless ``--out`` says otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from paft.config import PaftConfig
from paft.data.prepare import split_source
from paft.device import resolve_device
from paft.errors import ModelError, PaftError
from paft.eval.models import ModelSpec, evaluate_models, load_eval_tokenizer, needs_chat_template
from paft.io import locked_output, write_json_atomic
from paft.methods.losses import get_loss
from paft.models import resolve_model_dir
from paft.models.folders import adapter_base, adapter_config, check_weights, classify

DEFAULT_OUT = "runs/eval"


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _unique_names(paths: list[Path], taken: set[str]) -> list[str]:
    """Folder names, with parent folders prepended where two inputs (or a taken name) would clash.

    An ``adapter`` folder is named by its parent (a paft run keeps its branches in RUN/NAME/adapter).
    """
    parts = [p.resolve().parts for p in paths]
    parts = [pp[:-1] if pp[-1] == "adapter" and len(pp) > 1 else pp for pp in parts]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if n in taken or names.count(n) > 1]
        grow = [i for i in clash if depth[i] < len(parts[i])]
        if not grow:
            if clash:
                raise PaftError(f"{paths[clash[0]]}: given twice")
            return names
        for i in grow:
            depth[i] += 1


def folder_specs(inputs: list[Path], base: Path | None) -> list[ModelSpec]:
    """Model specs for folders; ``base`` (already resolved) is evaluated first, as ``base``."""
    kinds = []
    for p in inputs:
        if not p.is_dir():
            raise ModelError(f"{p}: not a folder (paft eval takes a run config, or model / LoRA adapter folders)")
        kind = classify(p)
        if kind == "reward":
            raise ModelError(f"{p}: a reward model (SEQ_CLS adapter), not a model to evaluate; "
                             f"use it as the scorer: --set eval.reward_model={p}")
        if kind == "lora":
            conf = adapter_config(p)
            b = base if base is not None else adapter_base(conf)
            if b is None:
                raise ModelError(f"{p}: a LoRA adapter on {conf.get('base_model_name_or_path')!r}, which is not a "
                                 "local model folder; pass --base BASE (the model it was trained from)")
            kinds.append((p, b, p, p if _has_tokenizer(p) else b))
        elif kind == "model":
            tok = p if _has_tokenizer(p) else base
            if tok is None:
                raise ModelError(f"{p}: has no tokenizer files; pass --base BASE to use the base model's tokenizer")
            kinds.append((p, p, None, tok))
        else:
            raise ModelError(f"{p}: neither a model folder (config.json) nor a LoRA adapter folder "
                             "(adapter_config.json)")
    same_as_base = base is not None and any(a is None and _same(p, base) for p, _, a, _ in kinds)
    with_base = base is not None and not same_as_base
    names = _unique_names([k[0] for k in kinds], {"base"} if with_base else set())
    specs = [ModelSpec("base", base, None, base)] if with_base else []
    return specs + [ModelSpec(name, path, adapter, tok) for name, (_, path, adapter, tok) in zip(names, kinds)]


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _heldout_data(cfg: PaftConfig) -> tuple[list, list]:
    """The config's held-out SFT and preference rows, split as a run's data stage splits them."""
    e = cfg.eval
    if not (e.heldout or e.reward_model or e.judge_model):
        return [], []
    ranked = get_loss(cfg.preference.method).data == "ranked"
    return tuple(split_source(cfg.data, kind, seed=cfg.run.seed, ranked=ranked)[1] for kind in ("sft", "preference"))


def evaluate_folders(inputs: list[Path], cfg: PaftConfig, *, base: str | None, force: bool = False,
                     progress: Callable[[str, int, int], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate ``inputs`` (and ``base``) with ``cfg``; write ``run.output_dir``/eval.json atomically."""
    out_dir = Path(cfg.run.output_dir)
    if (out_dir / "config.yaml").is_file() and not force:
        raise PaftError(f"{out_dir}: a paft run folder, whose eval.json belongs to the run (paft eval "
                        f"{out_dir / 'config.yaml'}); pass --force to overwrite it, or choose another --out")
    # the lock first: a file in the way or an unwritable folder fails now, not after the evaluation;
    # one paft process writes a folder at a time, as with `paft run`
    with locked_output(out_dir):
        device = resolve_device(cfg.run.device)
        base_dir = resolve_model_dir(base, cfg.model.revision) if base else None
        specs = folder_specs(inputs, base_dir)
        for s in specs:  # a tokenizer or weights file that cannot serve fails before the data and any model load
            for folder in (s.path, s.adapter):
                if folder is not None:
                    check_weights(folder)
            try:
                load_eval_tokenizer(s.tokenizer, cfg)
            except PaftError as exc:
                hint = ("; for harness tasks alone: --set eval.heldout=false --set eval.harmlessness=false"
                        if needs_chat_template(cfg) else "")
                raise ModelError(f"{s.name}: {exc}{hint}") from None
        sft_eval, pref_eval = _heldout_data(cfg)
        res = evaluate_models(specs, cfg, None, sft_eval, pref_eval, device=device,
                              base_dir=base_dir, progress=progress)
        res["inputs"] = {s.name: {"path": str(s.path), "adapter": str(s.adapter) if s.adapter else None}
                         for s in specs}
        path = out_dir / "eval.json"
        write_json_atomic(path, res)
    return path, res


def print_table(res: dict[str, Any], console) -> None:
    """Metrics x models (no standard errors), as a rich table: one row per metric reads well for many."""
    from rich.table import Table

    models = res["models"]
    keys: list[str] = []
    for row in models.values():
        keys += [k for k, v in row.items() if k not in keys and "stderr" not in k
                 and (v is None or isinstance(v, (int, float)))]
    table = Table(title="eval")
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right", overflow="fold")
    for k in keys:
        table.add_row(k, *["–" if models[m].get(k) is None else f"{models[m][k]:.3f}" for m in models])
    console.print(table)
