"""Merge branch deltas into the base model and write a loadable Hugging Face folder.

Tensors are processed one at a time (read base, compute each branch's delta,
merge, write), so peak memory is about one shard plus one tensor per branch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from paft.errors import PaftError
from paft.io import atomic_dir, package_versions, write_json_atomic
from paft.merge.deltas import (ADAPTER_CONFIG, INDEX_FILE, SINGLE_FILE, CheckpointDeltas, LoraDeltas,
                               StateDir, open_state)
from paft.merge.methods import check_merge_args, merge_deltas, tensor_generator

SHARD_BYTES = 2 * 10**9  # Hugging Face's default max_shard_size ("2GB")
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                "merges.txt", "tokenizer.model", "added_tokens.json")
METADATA_FILE = "paft_merge.json"


def open_branch(path: str | Path, base: StateDir) -> LoraDeltas | CheckpointDeltas:
    """A LoRA adapter folder (has adapter_config.json) or a full model folder, as a delta source."""
    path = Path(path)
    if not path.is_dir():
        raise PaftError(f"{path}: branch folder does not exist")
    return LoraDeltas(path, base) if (path / ADAPTER_CONFIG).is_file() else CheckpointDeltas(path, base)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise PaftError(f"dtype must be a floating torch dtype such as bfloat16, got {dtype!r}")
    return resolved


class _ShardWriter:
    """Write tensors into shards of at most ``SHARD_BYTES``; name them once the count is known."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.pending_bytes = folder, {}, 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f".shard-{len(self.shards)}", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-0").rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{i}").rename(self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _copy_configs(base_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    for fname in COPIED_FILES:
        if (base_dir / fname).is_file():
            shutil.copy2(base_dir / fname, out / fname)
    config = out / "config.json"
    if dtype is not None and config.is_file():  # keep the declared dtype truthful after a cast
        cfg = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(cfg, indent=2) + "\n")


def merge_into_base(base_dir: str | Path, branches: list[str | Path], weights: list[float], method: str, *,
                    density: float = 1.0, seed: int = 0, out_dir: str | Path, force: bool = False,
                    dtype: torch.dtype | str | None = None,
                    progress: Callable[[int, int], None] | None = None, **params: object) -> dict:
    """Write ``base + merge(deltas of each branch)`` to ``out_dir`` as a Hugging Face model folder.

    A tensor some branch changes is merged with one delta per branch (zero for
    branches that leave it alone, so e.g. ``linear`` averages against them);
    untouched tensors are copied. DARE masks come from ``tensor_generator(seed, name)``,
    so the result is reproducible tensor by tensor. ``dtype`` casts floating
    tensors (default: keep the base's). ``params`` (normalize, majority_sign, gamma,
    epsilon, lambda_, t) go to :func:`merge_deltas`, which also gets each float32
    base tensor (slerp needs it). Returns the summary also written to
    ``paft_merge.json`` (with ``params`` when given).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    weights = [float(w) for w in weights]
    check_merge_args(method, len(branches), weights, density, **params)
    out_dtype = _resolve_dtype(dtype)
    base = open_state(base_dir)
    sources = [open_branch(b, base) for b in branches]
    branch_names = [set(s.names()) for s in sources]
    for src, own in zip(sources, branch_names):
        extra = sorted(n for n in own if n not in base)
        if extra:
            raise PaftError(f"{src.path}: has a delta for {extra[0]}, which base {base_dir} does not have "
                            "(tied embeddings or another architecture?)")
    touched = set().union(*branch_names)
    names = base.keys()
    merged_count = 0
    with atomic_dir(out_dir, force=force) as tmp:
        writer = _ShardWriter(tmp)
        for done, name in enumerate(names, start=1):
            w = base.get(name)
            target = out_dtype if out_dtype is not None and w.is_floating_point() else w.dtype
            if name in touched and w.is_floating_point():
                deltas = [s.delta(name) if name in own else torch.zeros(w.shape)
                          for s, own in zip(sources, branch_names)]
                for src, d in zip(sources, deltas):
                    if d.shape != w.shape:
                        raise PaftError(f"{src.path}: delta for {name} has shape {tuple(d.shape)}, "
                                        f"base has {tuple(w.shape)}")
                base_w = w.float()
                try:
                    mixed = merge_deltas(method, deltas, weights, density=density,
                                         generator=tensor_generator(seed, name), base=base_w, **params)
                except PaftError as exc:  # e.g. "delta 1 contains NaN": say which tensor and branch list
                    raise PaftError(f"{name}: {exc} (branches: {', '.join(map(str, branches))})") from None
                w = (base_w + mixed).to(target)
                if not torch.isfinite(w).all():  # checked after the cast: fp16 can overflow
                    raise PaftError(f"merged tensor {name} contains NaN or inf (in {target})")
                merged_count += 1
            writer.add(name, w.to(target))
            if progress is not None:
                progress(done, len(names))
        writer.close()
        _copy_configs(base_dir, tmp, out_dtype)
        summary = {"method": method, "weights": weights, "density": density, "seed": seed,
                   "tensors_merged": merged_count, "tensors_total": len(names), "out_dir": str(out_dir)}
        if params:
            summary["params"] = dict(params)
        write_json_atomic(tmp / METADATA_FILE, {**summary, "base": str(base_dir),
                                                "branches": [str(b) for b in branches],
                                                "versions": package_versions()})
    return summary
