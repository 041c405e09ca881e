"""The one merge entry point, :func:`run_merge` on a :class:`~paft.merge.mergekit_config.MergePlan`.

The plan comes from a mergekit YAML (`paft merge CONFIG.yaml`), from flags
(`paft merge --base B --models ...`) or from a run's merge section (the
pipeline, the sequential baseline and the QLoRA start model build it with
:func:`~paft.merge.mergekit_config.plan_from_flags`).

Inputs are full checkpoints (Hugging Face folders, single-file or sharded
safetensors) and PEFT LoRA adapters on the shared base, mixed freely. Everything
that can be checked without reading tensor data is checked first: architecture
(config.json), tensor names and shapes, vocabulary (size and token ids), and
every merged tensor's parameters. Then tensors stream through
:class:`paft.merge.engine.MergeJob` (a thread per core) into sharded
safetensors, written atomically, or into a LoRA adapter (``to_lora``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from paft.errors import ConfigError, ModelError, PaftError
from paft.io import atomic_dir, check_output_dir, package_versions, write_json_atomic
from paft.merge.deltas import LoraDeltas, StateDir, open_source, open_state, read_model_config
from paft.merge.engine import METADATA_FILE, MergeJob, _resolve_dtype, copy_model_files, default_workers
from paft.merge.mergekit_config import MergePlan, evaluate_setting, layer_position
from paft.merge.to_lora import write_lora
from paft.methods.merging import get_method



def _token_ids(folder: Path) -> dict[int, str] | None:
    """id -> token from tokenizer.json (model vocab and added tokens), or None when there is none."""
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        tok = json.loads(f.read_text())
    except ValueError as exc:
        raise ModelError(f"{f}: invalid JSON ({exc})") from None
    vocab = (tok.get("model") or {}).get("vocab")
    ids: dict[int, str] = {}
    if isinstance(vocab, dict):
        ids = {int(i): t for t, i in vocab.items()}
    elif isinstance(vocab, list):  # unigram: [[token, score], ...]
        ids = {i: (e[0] if isinstance(e, list) else str(e)) for i, e in enumerate(vocab)}
    for added in tok.get("added_tokens") or []:
        ids[int(added["id"])] = added["content"]
    return ids


def check_vocab_match(base_dir: Path, other: Path, what: str) -> None:
    """Refuse tokenizers that map a shared id to different tokens (no remapping is done)."""
    a, b = _token_ids(base_dir), _token_ids(other)
    if a is None or b is None:
        return
    for i in sorted(set(a) & set(b)):
        if a[i] != b[i]:
            raise ModelError(f"{what} {other}: token id {i} is {b[i]!r} but {a[i]!r} in base {base_dir}; "
                             "vocabularies differ and paft does not remap them")


class ZeroDeltas:
    """The base itself listed among the models: a zero delta everywhere (it still carries a weight)."""

    def __init__(self, path: Path):
        self.path = path

    def names(self) -> list[str]:
        return []

    def delta(self, name: str) -> torch.Tensor:  # pragma: no cover - never called, names() is empty
        raise KeyError(name)


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _num_layers(base_cfg: dict, base: StateDir) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(base_cfg.get(key), int):
            return base_cfg[key]
    found = [int(m.group(1)) for n in base.keys() if (m := re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", n))]
    return max(found) + 1 if found else 1


class PreparedMerge:
    """Everything resolved and checked: base, one source per merged input, a per-tensor parameter resolver."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        method, spec = plan.method, get_method(plan.method)
        if plan.base is None:
            if spec.needs_base_model:
                raise ConfigError(f"{plan.source}: base_model is required for {method} (it merges deltas "
                                  "from the base); only linear can do without")
            plan.base = plan.models[0].path
        self.base_dir = Path(plan.base)
        self.base = open_state(self.base_dir)
        self.base_cfg = read_model_config(self.base_dir)
        self.num_layers = _num_layers(self.base_cfg, self.base)
        inputs = list(plan.models)
        is_base = [m.adapter is None and _same(m.path, self.base_dir) for m in inputs]
        if spec.needs_base and plan.mergekit_defaults:
            # mergekit: t = 0 is base_model, t = 1 the other model; paft: t = 0 is branch 0
            if len(inputs) != 2 or sum(is_base) != 1:
                raise ConfigError(f"{plan.source}: {method} interpolates base_model with one other model: list "
                                  "exactly two models, one of them base_model")
            order = [is_base.index(True), is_base.index(False)]
            inputs, is_base = [inputs[i] for i in order], [is_base[i] for i in order]
        elif spec.reference:
            # the base is the reference the deltas are taken from, not a task vector
            inputs = [m for m, b in zip(inputs, is_base) if not b]
            is_base = [False] * len(inputs)
        if not inputs:
            raise ConfigError(f"{plan.source}: nothing to merge: every model is the base model")
        self.inputs = inputs
        self.labels = [f"{m.key} ({m.ref})" if m.key else m.ref for m in inputs]
        self.sources: list[Any] = []
        self.kinds: list[str] = []
        for m, b, label in zip(inputs, is_base, self.labels):
            if b:
                self.sources.append(ZeroDeltas(m.path))
                self.kinds.append("base")
            elif m.adapter is not None:
                if not _same(m.path, self.base_dir):
                    raise ConfigError(f"{label}: LoRA on {m.path}, but base_model is {self.base_dir}; only "
                                      "adapters on the shared base can be merged")
                self.sources.append(LoraDeltas(m.adapter, self.base, check_base=not plan.allow_base_mismatch))
                self.kinds.append("lora")
            else:
                src = open_source(m.path, self.base, self.base_cfg, label, plan.resize_vocab,
                                  check_base=not plan.allow_base_mismatch)
                self.sources.append(src)
                if isinstance(src, LoraDeltas):
                    self.kinds.append("lora")
                else:
                    check_vocab_match(self.base_dir, m.path, label)
                    self.kinds.append("full")
        self.tokenizer_dir = self.base_dir if plan.tokenizer_source == "base" else Path(plan.tokenizer_source)
        if not _same(self.tokenizer_dir, self.base_dir):
            tok_cfg = read_model_config(self.tokenizer_dir)
            if "vocab_size" in tok_cfg and "vocab_size" in self.base_cfg and \
                    tok_cfg["vocab_size"] != self.base_cfg["vocab_size"]:
                raise ModelError(f"{plan.source}: tokenizer_source {self.tokenizer_dir} has vocab_size "
                                 f"{tok_cfg['vocab_size']} but the merged model keeps base's "
                                 f"{self.base_cfg['vocab_size']} rows")
            check_vocab_match(self.base_dir, self.tokenizer_dir, "tokenizer_source")
        self.out_dtype = _resolve_dtype(plan.out_dtype)
        if plan.params.get("filter_wise"):
            raise ConfigError(f"{plan.source}: parameters.filter_wise: true is not supported (model_stock "
                              "uses whole-tensor cosines)")

    def resolve(self, name: str) -> dict:
        """Keyword arguments for :func:`merge_deltas` on tensor ``name`` (gradients and filters evaluated)."""
        plan, t = self.plan, layer_position(name, self.num_layers)

        def get(pname: str, own: dict) -> Any:
            for params in (own, plan.params):
                if pname in params:
                    value = evaluate_setting(name, params[pname], t)
                    if value is not None:
                        return value
            return None

        def number(value: Any, what: str) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{plan.source}: {what} must be a number, got {value!r}")
            return float(value)

        out: dict[str, Any] = {"weights": [], "density": []}
        per_model: dict[str, set] = {"gamma": set(), "epsilon": set()}
        for m in self.inputs:
            w, d = get("weight", m.params), get("density", m.params)
            out["weights"].append(1.0 if w is None else number(w, f"{m.key or m.ref} weight"))
            out["density"].append(1.0 if d is None else number(d, f"{m.key or m.ref} density"))
            for p in per_model:
                if (v := get(p, m.params)) is not None:
                    per_model[p].add(number(v, f"{m.key or m.ref} {p}"))
        for p, values in per_model.items():
            if len(values) > 1:
                raise ConfigError(f"{plan.source}: {p} differs between models for {name} ({sorted(values)}); "
                                  f"paft applies one {p} to all models of a tensor")
            if values:
                out[p] = values.pop()
        for key, kw in (("normalize", "normalize"), ("lambda", "lambda_"), ("t", "t"), ("rescale", "rescale"),
                        ("majority_sign", "majority_sign")):
            value = evaluate_setting(name, plan.params[key], t) if key in plan.params else None
            if value is not None:
                out[kw] = value
        mergekit_normalize = get_method(plan.method).mergekit_normalize
        if "normalize" not in out and plan.mergekit_defaults and mergekit_normalize is not None:
            out["normalize"] = mergekit_normalize
        return out

    def job(self) -> MergeJob:
        try:
            return MergeJob(self.base, self.sources, self.plan.method, self.resolve, seed=self.plan.seed,
                            out_dtype=self.out_dtype, labels=self.labels)
        except ConfigError:
            raise
        except PaftError as exc:
            raise ConfigError(f"{self.plan.source}: {exc}") from None


def run_merge(plan: MergePlan, out_dir: str | Path, *, force: bool = False, to_lora: int | None = None,
              workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Merge per ``plan`` into ``out_dir`` (a model folder, or with ``to_lora`` a LoRA adapter folder)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    start = time.perf_counter()
    prep = PreparedMerge(plan)
    job = prep.job()
    workers = default_workers() if workers is None else max(1, int(workers))
    summary: dict[str, Any] = {
        "method": plan.method, "base": str(prep.base_dir), "config": plan.source,
        "models": [{"ref": m.ref, "path": str(m.adapter or m.path), "kind": k}
                   for m, k in zip(prep.inputs, prep.kinds)],
        "params": plan.params, "model_params": [m.params for m in prep.inputs], "seed": plan.seed,
        "dtype": str(prep.out_dtype).removeprefix("torch.") if prep.out_dtype else None,
        "tokenizer_source": str(prep.tokenizer_dir), "tensors_merged": len(job.merged_names),
        "tensors_total": len(job.names), "workers": workers, "out_dir": str(out_dir)}
    with atomic_dir(out_dir, force=force) as tmp:
        if to_lora is not None:
            summary["to_lora"] = write_lora(job, tmp, to_lora, prep.base_dir, workers=workers, progress=progress)
            copy_model_files(prep.base_dir, prep.tokenizer_dir, tmp, None)
            (tmp / "config.json").unlink(missing_ok=True)  # an adapter folder, not a model folder
            (tmp / "generation_config.json").unlink(missing_ok=True)
        else:
            summary["bytes"] = job.write(tmp, workers=workers, progress=progress)
            copy_model_files(prep.base_dir, prep.tokenizer_dir, tmp, prep.out_dtype)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        write_json_atomic(tmp / METADATA_FILE, {**summary, "versions": package_versions()})
    return summary
