"""Dense weight deltas from PEFT LoRA adapters and from full checkpoints, read lazily.

Both sources compute one delta at a time in float32, so merging a model never
holds more than one tensor per branch in memory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from paft.errors import PaftError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


class StateDir:
    """Lazy view of the tensors in a single-file or sharded safetensors folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if (self.path / SINGLE_FILE).is_file():
            self._files = {SINGLE_FILE: safe_open(self.path / SINGLE_FILE, framework="pt")}
            self._where = {k: SINGLE_FILE for k in self._files[SINGLE_FILE].keys()}
        elif index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise PaftError(f"{index}: not a safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise PaftError(f"{index}: shard {missing[0]} is missing")
            self._files = {f: safe_open(self.path / f, framework="pt") for f in sorted(set(weight_map.values()))}
            self._where = dict(weight_map)
        else:
            raise PaftError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str):
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise PaftError(f"{self.path}: no tensor {name}") from None

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, read from the header (no tensor data is loaded)."""
        code = self._file(name).get_slice(name).get_dtype()
        try:
            return _ST_TORCH[code]
        except KeyError:
            raise PaftError(f"{self.path}: tensor {name} has unsupported dtype {code}") from None


def open_state(path: str | Path) -> StateDir:
    """Open a model folder's safetensors (single file or sharded) without loading any tensor."""
    return StateDir(path)


def _pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """PEFT's rank/alpha_pattern lookup: the first pattern matching a dotted suffix of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraDeltas:
    """Dense ``ΔW = B @ A * scale`` per adapted module of a PEFT LoRA adapter folder.

    ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with per-module
    ``rank_pattern``/``alpha_pattern`` matched as PEFT does. Full tensors the
    adapter stores (``modules_to_save``) become ``W_saved - W_base`` when a
    base is given, and are refused otherwise.
    """

    def __init__(self, adapter_dir: str | Path, base: StateDir | None = None):
        self.path = Path(adapter_dir)
        cfg_path, weights = self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS
        for f in (cfg_path, weights):
            if not f.is_file():
                raise PaftError(f"{self.path}: not a PEFT adapter folder, {f.name} is missing")
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as exc:
            raise PaftError(f"{cfg_path}: invalid JSON ({exc})") from exc
        if cfg.get("peft_type") != "LORA":
            raise PaftError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise PaftError(f"{cfg_path}: DoRA adapters are not supported (their magnitude vector makes the "
                            "delta depend on the base weight); train with use_dora=false")
        if cfg.get("lora_bias"):
            raise PaftError(f"{cfg_path}: lora_bias=true is not supported")
        self._cfg = cfg
        self._base = base
        self._file = safe_open(weights, framework="pt")
        self._lora: dict[str, dict] = {}  # base weight name -> {"module", "A", "B", "embedding"}
        self._full: dict[str, str] = {}   # base weight name -> adapter key of a full tensor
        for key in self._file.keys():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = _LORA_KEY.match(name)
            if m:
                part = m["part"]
                entry = self._lora.setdefault(f"{m['module']}.weight", {"module": m["module"]})
                entry[part[-1]] = key
                entry["embedding"] = part.startswith("lora_embedding")
            elif "lora_magnitude_vector" in name:
                raise PaftError(f"{weights}: DoRA tensors found ({key}); DoRA adapters are not supported")
            elif ".lora_" in name or "trainable_tokens" in name:
                raise PaftError(f"{weights}: unsupported adapter tensor {key}")
            else:
                self._full[name] = key
        for entry in self._lora.values():
            if "A" not in entry or "B" not in entry:
                raise PaftError(f"{weights}: {entry['module']} has only one of lora_A/lora_B")
        if self._full and base is None:
            raise PaftError(f"{weights}: stores full tensors ({next(iter(self._full))}, from modules_to_save); "
                            "give the base model to diff them")
        if both := sorted(set(self._full) & set(self._lora)):
            raise PaftError(f"{weights}: {both[0]} has both LoRA and full weights")

    def names(self) -> list[str]:
        return [*self._lora, *self._full]

    def _scale(self, module: str, rank: int) -> float:
        cfg = self._cfg
        r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if r != rank:
            raise PaftError(f"{self.path}: {module} has rank {rank} but the config says r={r}")
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def delta(self, name: str) -> torch.Tensor:
        if name in self._full:
            saved, base = self._file.get_tensor(self._full[name]), self._base.get(name)
            if saved.shape != base.shape:
                raise PaftError(f"{self.path}: {name} has shape {tuple(saved.shape)}, base has {tuple(base.shape)}")
            return saved.float() - base.float()
        entry = self._lora[name]
        a = self._file.get_tensor(entry["A"]).float()
        b = self._file.get_tensor(entry["B"]).float()
        if a.dim() != 2 or b.dim() != 2:
            raise PaftError(f"{self.path}: {entry['module']} is not a Linear/Embedding LoRA (conv is not supported)")
        delta = (b @ a) * self._scale(entry["module"], a.shape[0])
        # Embedding LoRA stores A as (r, vocab) and B as (dim, r); Conv1D (fan_in_fan_out) stores W as (in, out).
        return delta.T.contiguous() if entry["embedding"] or self._cfg.get("fan_in_fan_out") else delta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.delta(name)


class CheckpointDeltas:
    """``W_model - W_base`` for every floating tensor of a full fine-tuned checkpoint."""

    def __init__(self, model_dir: str | Path, base: StateDir):
        self.model, self.base = open_state(model_dir), base
        self.path = self.model.path
        model_keys, base_keys = set(self.model.keys()), set(base.keys())
        if extra := sorted(model_keys - base_keys):
            raise PaftError(f"{self.model.path}: tensor {extra[0]} is not in base {base.path}")
        if missing := sorted(base_keys - model_keys):
            raise PaftError(f"{self.model.path}: tensor {missing[0]} of base {base.path} is missing")
        for name in base.keys():
            if self.model.shape(name) != base.shape(name):
                raise PaftError(f"{name}: shape {self.model.shape(name)} in {self.model.path} "
                                f"but {base.shape(name)} in base {base.path}")

    def names(self) -> list[str]:
        return self.base.keys()

    def delta(self, name: str) -> torch.Tensor:
        return self.model.get(name).float() - self.base.get(name).float()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            w = self.model.get(name)
            if w.is_floating_point():  # integer buffers have no meaningful delta
                yield name, w.float() - self.base.get(name).float()


def lora_deltas(adapter_dir: str | Path, base_dir: str | Path | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(base weight name, ΔW)`` for a PEFT LoRA adapter, one float32 tensor at a time.

    The adapter is validated when called (not on first iteration), so bad input fails early.

    ``base_dir`` is only needed for adapters that also store full tensors
    (``modules_to_save``), whose delta is taken against the base.
    """
    return iter(LoraDeltas(adapter_dir, open_state(base_dir) if base_dir is not None else None))


def checkpoint_deltas(model_dir: str | Path, base_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, W_model - W_base)`` in float32 for every floating tensor, streaming.

    Missing/extra tensors and shape mismatches are refused up front, before any delta is read.
    """
    return iter(CheckpointDeltas(model_dir, open_state(base_dir)))
