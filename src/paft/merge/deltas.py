"""Dense weight deltas from PEFT LoRA adapters and from full checkpoints, read lazily.

Both sources compute one delta at a time in float32 (``delta(name)``), or one
block of rows of it into a caller's buffer (``row_delta(name)``), so the
streaming merge never holds more than a chunk per branch in memory. Raw rows
are read with ``pread`` straight from the safetensors files into reused buffers:
no memory map grows the process's resident set, and no tensor-sized temporary
is allocated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from paft.errors import ModelError, PaftError
from paft.models.folders import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, adapter_base, is_adapter,
                                 open_safetensors)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _ST_TORCH.values()}
#: config.json keys that must agree between the base and a full checkpoint
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head")
_VOCAB_NAME = re.compile(r"embed|lm_head|wte|output|word_embeddings|tok_embeddings")
#: ``fn(r0, r1, base_rows, out)``: write rows ``r0:r1`` of a float32 delta into ``out`` ([rows, cols], float32);
#: ``base_rows`` is the base's same rows in float32, same shape.
RowDelta = Callable[[int, int, torch.Tensor, torch.Tensor], None]
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


class StateDir:
    """Lazy view of the tensors in a single-file or sharded safetensors folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if (self.path / SINGLE_FILE).is_file():
            self._files = {SINGLE_FILE: open_safetensors(self.path / SINGLE_FILE)}
            self._where = {k: SINGLE_FILE for k in self._files[SINGLE_FILE].keys()}
        elif index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise PaftError(f"{index}: not a safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise PaftError(f"{index}: shard {missing[0]} is missing")
            self._files = {f: open_safetensors(self.path / f) for f in sorted(set(weight_map.values()))}
            self._where = dict(weight_map)
        else:
            raise PaftError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._data_start = {f: _data_start(self.path / f) for f in self._files}
        self._fds: dict[str, int] = {}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def rows_shape(self, name: str) -> tuple[int, int]:
        """``(rows, cols)`` of ``name`` seen as a matrix: dim 0 by the rest (a 1-D tensor is a column)."""
        shape = self.shape(name)
        n = math.prod(shape)
        rows = shape[0] if shape else 1
        return rows, (n // rows if rows else 0)

    def read_rows(self, name: str, r0: int, r1: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``name`` in its stored dtype, shape ``[r1 - r0, cols]``, read with ``pread``.

        ``buf`` (uint8, at least the bytes needed) is filled and viewed, so
        repeated reads reuse one buffer; without it a new one is allocated.
        """
        f = self._where.get(name)
        if f is None:
            raise PaftError(f"{self.path}: no tensor {name}")
        dtype, cols = self.dtype(name), self.rows_shape(name)[1]
        size = ITEMSIZE[dtype]
        nbytes = (r1 - r0) * cols * size
        start = self._data_start[f] + self._offsets(f)[name] + r0 * cols * size
        raw = torch.empty(nbytes, dtype=torch.uint8) if buf is None else buf[:nbytes]
        if nbytes:
            fd = self._fds.get(f)
            if fd is None:
                fd = self._fds.setdefault(f, os.open(self.path / f, os.O_RDONLY))
            got = os.preadv(fd, [raw.numpy()], start)
            if got != nbytes:
                raise PaftError(f"{self.path / f}: truncated file (tensor {name} needs {nbytes} bytes at {start}, "
                                f"got {got})")
        return raw.view(dtype).view(r1 - r0, cols)

    def _offsets(self, f: str) -> dict[str, int]:
        cache = self.__dict__.setdefault("_offset_cache", {})
        if f not in cache:
            cache[f] = {k: v["data_offsets"][0] for k, v in _header(self.path / f).items() if k != "__metadata__"}
        return cache[f]

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


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        try:
            return json.loads(fh.read(n))
        except ValueError as exc:
            raise PaftError(f"{path}: unreadable safetensors header ({exc})") from None


def _data_start(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def read_model_config(folder: Path) -> dict:
    """A model folder's config.json ({} when it has none)."""
    f = folder / MODEL_CONFIG
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as exc:
        raise ModelError(f"{f}: invalid JSON ({exc})") from None


_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def base_fingerprint(folder: Path, sample: int = 1 << 20) -> tuple:
    """What identifies a model folder cheaply: its config.json (less volatile keys) and, per safetensors file,
    the name, size and SHA-256 of the first and last ``sample`` bytes."""
    cfg = {k: v for k, v in read_model_config(folder).items() if k not in _VOLATILE_CONFIG}
    files = []
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(sample))
            fh.seek(max(size - sample, 0))
            h.update(fh.read(sample))
        files.append((f.name, size, h.hexdigest()))
    return json.dumps(cfg, sort_keys=True), tuple(files)


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

    def __init__(self, adapter_dir: str | Path, base: StateDir | None = None, check_base: bool = False):
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
        self._file = open_safetensors(weights)
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
        if base is not None:
            self._check_shapes(base)
            if check_base:
                self.check_recorded_base(base)

    def _check_shapes(self, base: StateDir) -> None:
        """Every adapted module exists in ``base`` with the shape ``B @ A`` has: else the adapter is another base's."""
        named = self._cfg.get("base_model_name_or_path")
        hint = f" (its adapter_config.json names {named})" if named else ""
        for name, entry in self._lora.items():
            if name not in base:
                raise ModelError(f"{self.path}: adapted module {entry['module']} is not in base {base.path}; the "
                                 f"adapter was trained on another base{hint}")
            a_shape, b_shape = (tuple(self._file.get_slice(entry[k]).get_shape()) for k in ("A", "B"))
            if len(a_shape) != 2 or len(b_shape) != 2:
                continue  # conv LoRA: refused when its delta is computed
            (r_a, cols), (rows, r_b) = a_shape, b_shape
            shape = (cols, rows) if entry["embedding"] or self._cfg.get("fan_in_fan_out") else (rows, cols)
            if r_a != r_b or shape != base.shape(name):
                raise ModelError(f"{self.path}: {entry['module']} delta has shape {shape} but {name} in base "
                                 f"{base.path} has {base.shape(name)}; the adapter was trained on another base{hint}")

    def check_recorded_base(self, base: StateDir) -> None:
        """Refuse when the adapter's recorded base is a local folder whose model differs from ``base``.

        Two folders hold the same base when their ``config.json`` agree and their weight files have the same
        names, sizes and first and last MiB (a hash of that sample; full hashes would read every byte).
        """
        recorded = adapter_base(self._cfg)
        if recorded is None or recorded.resolve() == base.path.resolve():
            return
        if base_fingerprint(recorded) != base_fingerprint(base.path):
            raise ModelError(f"{self.path}: trained on base {recorded} (adapter_config.json "
                             f"base_model_name_or_path) but merged into {base.path}, a different model; pass "
                             "--allow-base-mismatch (YAML: allow_base_mismatch: true) if that is intended")

    def names(self) -> list[str]:
        return [*self._lora, *self._full]

    def _factors(self, entry: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``A``, ``B`` (float32) and ``scale`` of one adapted module."""
        a = self._file.get_tensor(entry["A"]).float()
        b = self._file.get_tensor(entry["B"]).float()
        if a.dim() != 2 or b.dim() != 2:
            raise PaftError(f"{self.path}: {entry['module']} is not a Linear/Embedding LoRA (conv is not supported)")
        cfg, module, rank = self._cfg, entry["module"], a.shape[0]
        r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if r != rank:
            raise PaftError(f"{self.path}: {module} has rank {rank} but the config says r={r}")
        return a, b, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)

    def delta(self, name: str) -> torch.Tensor:
        if name in self._full:
            saved, base = self._file.get_tensor(self._full[name]), self._base.get(name)
            if saved.shape != base.shape:
                raise PaftError(f"{self.path}: {name} has shape {tuple(saved.shape)}, base has {tuple(base.shape)}")
            return saved.float() - base.float()
        entry = self._lora[name]
        a, b, scale = self._factors(entry)
        delta = (b @ a) * scale
        # Embedding LoRA stores A as (r, vocab) and B as (dim, r); Conv1D (fan_in_fan_out) stores W as (in, out).
        return delta.T.contiguous() if entry["embedding"] or self._cfg.get("fan_in_fan_out") else delta

    def row_delta(self, name: str) -> RowDelta:
        """Rows of :meth:`delta` computed block by block: ``B[r0:r1] @ A * scale`` (columns of ``A`` if transposed)."""
        if name in self._full:
            saved_key = self._full[name]
            shape = tuple(self._file.get_slice(saved_key).get_shape())
            if shape != self._base.shape(name):
                raise PaftError(f"{self.path}: {name} has shape {shape}, base has {self._base.shape(name)}")
            saved = self._file.get_tensor(saved_key)  # modules_to_save: small (heads, norms)
            flat = saved.reshape(saved.shape[0], -1) if saved.dim() else saved.reshape(1, 1)

            def full_rows(r0: int, r1: int, base_rows: torch.Tensor, out: torch.Tensor) -> None:
                out.copy_(flat[r0:r1])
                out.sub_(base_rows)
            return full_rows
        entry = self._lora[name]
        a, b, scale = self._factors(entry)
        transposed = entry["embedding"] or self._cfg.get("fan_in_fan_out")
        at, bt = (a.T, b.T) if transposed else (a, b)

        def lora_rows(r0: int, r1: int, base_rows: torch.Tensor, out: torch.Tensor) -> None:
            if transposed:  # rows of (B A)^T are columns of B A
                torch.matmul(at[r0:r1], bt, out=out)
            else:
                torch.matmul(b[r0:r1], a, out=out)
            out.mul_(scale)
        return lora_rows

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.delta(name)


class CheckpointDeltas:
    """``W_model - W_base`` for every floating tensor of a full fine-tuned checkpoint, after shape checks.

    With the base's ``base_cfg`` (config.json) the architectures are compared
    too. A vocabulary-sized tensor (embeddings, lm_head) whose row count differs
    from the base's is refused unless ``resize_vocab``: then only the base's rows
    are merged (extra rows dropped, missing rows get a zero delta), so the output
    keeps the base's vocabulary. ``label`` names the input in errors.
    """

    def __init__(self, model_dir: str | Path, base: StateDir, base_cfg: dict | None = None,
                 label: str | None = None, resize_vocab: bool = False):
        self.path, self.base = Path(model_dir), base
        label = label or str(self.path)
        if base_cfg:
            cfg = read_model_config(self.path)
            for key in ARCH_KEYS:
                if key in cfg and key in base_cfg and cfg[key] != base_cfg[key]:
                    raise ModelError(f"{label}: config.json {key} is {cfg[key]!r} but {base_cfg[key]!r} in base "
                                    f"{base.path}; models of different architectures cannot be merged")
        self.model = open_state(self.path)
        mk, bk = set(self.model.keys()), set(base.keys())
        if extra := sorted(mk - bk):
            raise ModelError(f"{label}: tensor {extra[0]} is not in base {base.path} (another architecture?)")
        if missing := sorted(bk - mk):
            raise ModelError(f"{label}: tensor {missing[0]} of base {base.path} is missing (another architecture?)")
        self.resized: dict[str, tuple[int, int]] = {}
        for name in base.keys():
            ms, bs = self.model.shape(name), base.shape(name)
            if ms == bs:
                continue
            if len(ms) == len(bs) and ms[1:] == bs[1:] and _VOCAB_NAME.search(name):
                if not resize_vocab:
                    raise ModelError(f"{label}: vocabulary of {ms[0]} tokens ({name} has {ms[0]} rows) but base "
                                    f"{base.path} has {bs[0]}; pass --resize-vocab (YAML: resize_vocab: true) "
                                    "to merge the base's rows only")
                self.resized[name] = (ms[0], bs[0])
                continue
            raise ModelError(f"{label}: {name} has shape {ms} but {bs} in base {base.path}")

    def names(self) -> list[str]:
        return self.base.keys()

    def delta(self, name: str) -> torch.Tensor:
        b = self.base.get(name).float()
        if name in self.resized:
            rows, want = self.resized[name]
            if rows >= want:
                m = self.model._file(name).get_slice(name)[:want].float()
            else:
                m = torch.cat([self.model.get(name).float(), b[rows:]])
            return m - b
        return self.model.get(name).float() - b

    def row_delta(self, name: str) -> RowDelta:
        """Rows of :meth:`delta`: the model's rows read into a reused buffer, minus the base's."""
        have = self.resized.get(name, (self.model.rows_shape(name)[0], 0))[0]
        model, buf = self.model, thread_buffer

        def rows(r0: int, r1: int, base_rows: torch.Tensor, out: torch.Tensor) -> None:
            stop = min(r1, have)  # rows past a smaller vocabulary get a zero delta
            if stop > r0:
                raw = model.read_rows(name, r0, stop, buf("model", (stop - r0) * out.shape[1] * 8))
                out[: stop - r0].copy_(raw)
                out[: stop - r0].sub_(base_rows[: stop - r0])
            out[max(stop - r0, 0):].zero_()
        return rows

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            if self.model.dtype(name).is_floating_point:  # integer buffers have no meaningful delta
                yield name, self.delta(name)


_local = threading.local()


def thread_buffer(key: str, nbytes: int) -> torch.Tensor:
    """A uint8 buffer of at least ``nbytes``, one per (thread, key), grown as needed and then reused.

    Reusing buffers matters: a fresh tensor-sized allocation costs a page fault per 4 KiB.
    """
    pool = _local.__dict__.setdefault("buffers", {})
    buf = pool.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = pool[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    return buf


def open_source(path: str | Path, base: StateDir, base_cfg: dict | None = None, label: str | None = None,
                resize_vocab: bool = False, check_base: bool = False) -> LoraDeltas | CheckpointDeltas:
    """The delta source of a folder against ``base``: a PEFT LoRA adapter or a full checkpoint.

    ``base_cfg``, ``label`` and ``resize_vocab`` apply to full checkpoints (see :class:`CheckpointDeltas`);
    ``check_base`` to adapters (see :meth:`LoraDeltas.check_recorded_base`).
    """
    path = Path(path)
    if not path.is_dir():
        raise PaftError(f"{path}: not a folder (give a model folder or a LoRA adapter folder)")
    if is_adapter(path):
        return LoraDeltas(path, base, check_base)
    return CheckpointDeltas(path, base, base_cfg, label, resize_vocab)

