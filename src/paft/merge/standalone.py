"""`paft merge CONFIG.yaml --out DIR` / `paft merge --base B --models ...`: merge your own checkpoints.

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
from paft.io import atomic_dir, package_versions, write_json_atomic
from paft.merge.deltas import ADAPTER_CONFIG, CheckpointDeltas, LoraDeltas, StateDir, open_state
from paft.merge.engine import METADATA_FILE, MergeJob, _resolve_dtype, copy_model_files, default_workers
from paft.merge.mergekit_config import (MERGEKIT_NORMALIZE, MergeSpec, ModelInput, evaluate_setting,
                                        layer_position, resolve_model_ref)



def _read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as exc:
        raise ModelError(f"{f}: invalid JSON ({exc})") from None


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


def spec_from_flags(base: str, models: list[str], method: str, *, weights: list[float] | None = None,
                    density: list[float] | None = None, params: dict | None = None, dtype: str | None = None,
                    tokenizer_source: str | None = None, seed: int = 0, resize_vocab: bool = False) -> MergeSpec:
    """The :class:`MergeSpec` of ``--base B --models M1 M2 ...`` (weights default to 1, density to 1)."""
    from paft.merge.methods import MERGE_METHODS

    if method not in MERGE_METHODS:
        raise ConfigError(f"--method: unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    if not models:
        raise ConfigError("--models: give at least one model or adapter folder")
    n = len(models)
    for flag, values in (("--weights", weights), ("--density", density)):
        if values is not None and len(values) not in (1, n):
            raise ConfigError(f"{flag}: got {len(values)} values for {n} models; give one, or one per model")
    inputs = []
    for i, ref in enumerate(models):
        p: dict[str, Any] = {}
        if weights is not None:
            p["weight"] = weights[i if len(weights) == n else 0]
        if density is not None:
            p["density"] = density[i if len(density) == n else 0]
        if "+" in ref and not Path(ref).exists():
            m, a = ref.split("+", 1)
            inputs.append(ModelInput(ref, resolve_model_ref(m, None, f"--models[{i}]"),
                                     resolve_model_ref(a, None, f"--models[{i}]"), p, f"--models[{i}]"))
        else:
            inputs.append(ModelInput(ref, resolve_model_ref(ref, None, f"--models[{i}]"), None, p, f"--models[{i}]"))
    tok = tokenizer_source or "base"
    if tok != "base":
        tok = str(resolve_model_ref(tok, None, "--tokenizer-source"))
    return MergeSpec(method=method, base=resolve_model_ref(base, None, "--base"), models=inputs,
                     params=dict(params or {}), out_dtype=dtype, tokenizer_source=tok, seed=seed,
                     resize_vocab=resize_vocab, source="command line")


class PreparedMerge:
    """Everything resolved and checked: base, one source per merged input, a per-tensor parameter resolver."""

    def __init__(self, spec: MergeSpec):
        self.spec = spec
        method = spec.method
        if spec.base is None:
            if method != "linear":
                raise ConfigError(f"{spec.source}: base_model is required for {method} (it merges deltas "
                                  "from the base); only linear can do without")
            spec.base = spec.models[0].path
        self.base_dir = Path(spec.base)
        self.base = open_state(self.base_dir)
        self.base_cfg = _read_config(self.base_dir)
        self.num_layers = _num_layers(self.base_cfg, self.base)
        inputs = list(spec.models)
        is_base = [m.adapter is None and _same(m.path, self.base_dir) for m in inputs]
        if method == "slerp" and spec.mergekit_defaults:
            # mergekit: t = 0 is base_model, t = 1 the other model; paft: t = 0 is branch 0
            if len(inputs) != 2 or sum(is_base) != 1:
                raise ConfigError(f"{spec.source}: slerp interpolates base_model with one other model: list "
                                  "exactly two models, one of them base_model")
            order = [is_base.index(True), is_base.index(False)]
            inputs, is_base = [inputs[i] for i in order], [is_base[i] for i in order]
        elif method not in ("linear", "slerp"):
            # task-arithmetic family and model_stock: the base is the reference, not a task vector
            inputs = [m for m, b in zip(inputs, is_base) if not b]
            is_base = [False] * len(inputs)
        if not inputs:
            raise ConfigError(f"{spec.source}: nothing to merge: every model is the base model")
        self.inputs = inputs
        self.sources: list[Any] = []
        self.kinds: list[str] = []
        for m, b in zip(inputs, is_base):
            label = f"{m.key} ({m.ref})" if m.key else m.ref
            if b:
                self.sources.append(ZeroDeltas(m.path))
                self.kinds.append("base")
            elif m.adapter is not None or (m.path / ADAPTER_CONFIG).is_file():
                adapter = m.adapter if m.adapter is not None else m.path
                if m.adapter is not None and not _same(m.path, self.base_dir):
                    raise ConfigError(f"{label}: LoRA on {m.path}, but base_model is {self.base_dir}; only "
                                      "adapters on the shared base can be merged")
                self.sources.append(LoraDeltas(adapter, self.base))
                self.kinds.append("lora")
            else:
                self.sources.append(CheckpointDeltas(m.path, self.base, self.base_cfg, label, spec.resize_vocab))
                check_vocab_match(self.base_dir, m.path, label)
                self.kinds.append("full")
        self.labels = [f"{m.key} ({m.ref})" if m.key else m.ref for m in inputs]
        self.tokenizer_dir = self.base_dir if spec.tokenizer_source == "base" else Path(spec.tokenizer_source)
        if not _same(self.tokenizer_dir, self.base_dir):
            tok_cfg = _read_config(self.tokenizer_dir)
            if "vocab_size" in tok_cfg and "vocab_size" in self.base_cfg and \
                    tok_cfg["vocab_size"] != self.base_cfg["vocab_size"]:
                raise ModelError(f"{spec.source}: tokenizer_source {self.tokenizer_dir} has vocab_size "
                                 f"{tok_cfg['vocab_size']} but the merged model keeps base's "
                                 f"{self.base_cfg['vocab_size']} rows")
            check_vocab_match(self.base_dir, self.tokenizer_dir, "tokenizer_source")
        self.out_dtype = _resolve_dtype(spec.out_dtype)
        if spec.params.get("filter_wise"):
            raise ConfigError(f"{spec.source}: parameters.filter_wise: true is not supported (model_stock "
                              "uses whole-tensor cosines)")

    def resolve(self, name: str) -> dict:
        """Keyword arguments for :func:`merge_deltas` on tensor ``name`` (gradients and filters evaluated)."""
        spec, t = self.spec, layer_position(name, self.num_layers)

        def get(pname: str, own: dict) -> Any:
            for params in (own, spec.params):
                if pname in params:
                    value = evaluate_setting(name, params[pname], t)
                    if value is not None:
                        return value
            return None

        def number(value: Any, what: str) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{spec.source}: {what} must be a number, got {value!r}")
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
                raise ConfigError(f"{spec.source}: {p} differs between models for {name} ({sorted(values)}); "
                                  f"paft applies one {p} to all models of a tensor")
            if values:
                out[p] = values.pop()
        for key, kw in (("normalize", "normalize"), ("lambda", "lambda_"), ("t", "t"), ("rescale", "rescale"),
                        ("majority_sign", "majority_sign")):
            value = evaluate_setting(name, spec.params[key], t) if key in spec.params else None
            if value is not None:
                out[kw] = value
        if "normalize" not in out and spec.mergekit_defaults and spec.method in MERGEKIT_NORMALIZE:
            out["normalize"] = MERGEKIT_NORMALIZE[spec.method]
        return out

    def job(self) -> MergeJob:
        try:
            return MergeJob(self.base, self.sources, self.spec.method, self.resolve, seed=self.spec.seed,
                            out_dtype=self.out_dtype, labels=self.labels)
        except ConfigError:
            raise
        except PaftError as exc:
            raise ConfigError(f"{self.spec.source}: {exc}") from None


def run_merge(spec: MergeSpec, out_dir: str | Path, *, force: bool = False, to_lora: int | None = None,
              workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Merge per ``spec`` into ``out_dir`` (a model folder, or with ``to_lora`` a LoRA adapter folder)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise PaftError(f"{out_dir}: output exists; pass --force to overwrite")
    start = time.perf_counter()
    prep = PreparedMerge(spec)
    job = prep.job()
    workers = default_workers() if workers is None else max(1, int(workers))
    summary: dict[str, Any] = {
        "method": spec.method, "base": str(prep.base_dir), "config": spec.source,
        "models": [{"ref": m.ref, "path": str(m.adapter or m.path), "kind": k}
                   for m, k in zip(prep.inputs, prep.kinds)],
        "params": spec.params, "model_params": [m.params for m in prep.inputs], "seed": spec.seed,
        "dtype": str(prep.out_dtype).removeprefix("torch.") if prep.out_dtype else None,
        "tokenizer_source": str(prep.tokenizer_dir), "tensors_merged": len(job.merged_names),
        "tensors_total": len(job.names), "workers": workers, "out_dir": str(out_dir)}
    with atomic_dir(out_dir, force=force) as tmp:
        if to_lora is not None:
            from paft.merge.to_lora import write_lora

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
