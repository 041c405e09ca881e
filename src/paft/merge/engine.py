"""Merge branch deltas into the base model and write a loadable Hugging Face folder.

The shard layout is fixed up front from the base's shapes (:class:`ShardWriter`),
so results are written at their offsets as they come. Methods of the
task-arithmetic family stream a block of rows at a time on a thread pool
(:mod:`paft.merge.streaming`): memory is a few chunks per thread whatever the
model size. The others (della, slerp, model_stock) and ``--to-lora`` need a
whole tensor: :meth:`MergeJob.run` merges one tensor per thread with a bounded
number of entries in flight (:func:`ordered_map`). Either way the output is
identical for any number of workers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from paft.device import torch_threads as limit_threads
from paft.errors import PaftError
from paft.io import usable_cores
from paft.merge.deltas import INDEX_FILE, SINGLE_FILE, StateDir
from paft.merge.methods import ChunkedRandom, merge_deltas
from paft.merge.streaming import TensorMerge, copy_tensor
from paft.methods.merging import check_merge_args, get_method

SHARD_BYTES = 2 * 10**9  # Hugging Face's default max_shard_size ("2GB")
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                "merges.txt", "tokenizer.model", "added_tokens.json")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = tuple(f for f in COPIED_FILES if f not in CONFIG_FILES)
METADATA_FILE = "paft_merge.json"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def default_workers() -> int:
    """Threads for the tensor pool: the usable cores, at most 4 (each in-flight tensor costs memory)."""
    return max(1, min(4, usable_cores()))


INFLIGHT_NUMEL = 1 << 25  # entries in flight at once (a tensor larger than this runs alone)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                cost: Callable[[Any], int] | None = None, budget: int = INFLIGHT_NUMEL) -> Iterator[Any]:
    """``map(fn, items)`` on a pool of ``workers`` threads, results in input order.

    torch kernels and safetensors reads release the GIL, so tensors really run in
    parallel. At most ``workers`` items are in flight, and with ``cost`` (an
    item's size, e.g. its numel) only while their summed cost stays within
    ``budget`` (an item costlier than the budget runs alone), so peak memory is
    bounded by a few tensors. The first exception is raised in order, after the
    pending tasks are cancelled.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    cost = cost or (lambda _: 0)
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="paft-merge") as pool:
        pending: deque = deque()  # (future, cost)
        inflight, nxt, exhausted = 0, None, False

        def fill() -> None:
            nonlocal inflight, nxt, exhausted
            while len(pending) < workers and not exhausted:
                if nxt is None:
                    nxt = next(it, _END)
                    if nxt is _END:
                        exhausted = True
                        return
                c = cost(nxt)
                if pending and inflight + c > budget:
                    return
                pending.append((pool.submit(fn, nxt), c))
                inflight += c
                nxt = None

        try:
            fill()
            while pending:
                fut, c = pending.popleft()
                result = fut.result()
                inflight -= c
                fill()
                yield result
        finally:
            for fut, _ in pending:
                fut.cancel()


_END = object()


class ShardWriter:
    """Safetensors shards whose layout is fixed up front, filled by ``pwrite`` at each tensor's offset.

    ``plan`` lists ``(name, shape, dtype)`` in file order; shards hold at most
    ``shard_bytes`` (a larger tensor gets a shard of its own). One shard is named
    ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with an index.
    Headers are written first, so whole tensors (:meth:`write`) and blocks of rows
    (:meth:`write_rows`) can arrive in any order and from several threads;
    :meth:`close` checks that every byte of every tensor was written.
    """

    def __init__(self, folder: Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int):
        self.folder = Path(folder)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            if dtype not in _ST_DTYPES:
                raise PaftError(f"{name}: dtype {dtype} cannot be written to safetensors")
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_bytes = sum(e[3] for shard in self.shards for e in shard)
        self._where: dict[str, tuple[int, int, int, torch.dtype, tuple[int, ...]]] = {}  # fd, start, nbytes, ...
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fds: list[int] = []
        for i, shard in enumerate(self.shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(self.folder / self.files[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            start = 8 + len(raw)
            os.ftruncate(fd, start + offset)
            for name, shape, dtype, nbytes in shard:
                self._where[name] = (fd, start + header[name]["data_offsets"][0], nbytes, dtype, shape)
                self._written[name] = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._where and tuple(tensor.shape) != self._where[name][4]:
            raise PaftError(f"writer expected {name} of shape {self._where[name][4]}, got {tuple(tensor.shape)}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, r0: int, rows: torch.Tensor) -> None:
        """Rows ``r0:r0 + len(rows)`` of ``name`` (any shape with the tensor's dtype; placed by flat offset)."""
        if name not in self._where:
            raise PaftError(f"writer has no tensor {name} in its plan")
        fd, start, nbytes, dtype, shape = self._where[name]
        if rows.dtype != dtype:
            raise PaftError(f"writer expected {name} in {dtype}, got {rows.dtype}")
        data = rows.detach().contiguous().reshape(-1).view(torch.uint8)
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        offset = r0 * row_bytes
        if offset + data.numel() > nbytes:
            raise PaftError(f"writer: rows from {r0} overflow {name} ({data.numel()} bytes at {offset} of {nbytes})")
        if data.numel():
            done = os.pwrite(fd, data.numpy(), start + offset)
            if done != data.numel():
                raise PaftError(f"{self.folder}: short write for {name} (disk full?)")
        with self._lock:
            self._written[name] += data.numel()

    def abort(self) -> None:
        """Close the files (after a failure the caller discards the atomic folder)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> None:
        try:
            for name, (_, _, nbytes, _, _) in self._where.items():
                if self._written[name] != nbytes:
                    raise PaftError(f"writer got {self._written[name]} of {nbytes} bytes of {name}")
        finally:
            self.abort()
        if len(self.files) > 1:
            weight_map = {e[0]: self.files[i] for i, shard in enumerate(self.shards) for e in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise PaftError(f"dtype must be a floating torch dtype such as bfloat16, got {dtype!r}")
    return resolved


def copy_model_files(config_dir: Path, tokenizer_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Copy config files from ``config_dir`` and tokenizer files from ``tokenizer_dir``; fix the declared dtype."""
    for src, names in ((config_dir, CONFIG_FILES), (tokenizer_dir, TOKENIZER_FILES)):
        for fname in names:
            if (Path(src) / fname).is_file():
                shutil.copy2(Path(src) / fname, out / fname)
    config = out / "config.json"
    if dtype is not None and config.is_file():  # keep the declared dtype truthful after a cast
        cfg = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(cfg, indent=2) + "\n")


class MergeJob:
    """One merge, tensor by tensor: ``base + merge(deltas)`` with parameters resolved per tensor.

    ``sources`` give ``names()`` and ``delta(name)`` (float32, the base's shape);
    a tensor a source does not name gets a zero delta from it. ``resolve(name)``
    returns the keyword arguments of :func:`check_merge_args` for that tensor
    (``weights``, ``density`` (one or one per source) and method parameters), so
    layer gradients and per-module filters work; every merged tensor's
    parameters are checked before any tensor is read. ``labels`` name the
    sources in error messages.
    """

    def __init__(self, base: StateDir, sources: Sequence[Any], method: str, resolve: Callable[[str], dict], *,
                 seed: int = 0, out_dtype: torch.dtype | None = None, labels: Sequence[str] | None = None):
        self.base, self.sources, self.method, self.resolve = base, list(sources), method, resolve
        self.seed, self.out_dtype = int(seed), out_dtype
        self.labels = [str(x) for x in labels] if labels is not None else [str(s.path) for s in self.sources]
        self.own = [set(s.names()) for s in self.sources]
        for label, own in zip(self.labels, self.own):
            if extra := sorted(n for n in own if n not in base):
                raise PaftError(f"{label}: has a delta for {extra[0]}, which base {base.path} does not have "
                                "(tied embeddings or another architecture?)")
        touched = set().union(*self.own) if self.own else set()
        self.names = base.keys()
        self.merged_names = [n for n in self.names if n in touched and base.dtype(n).is_floating_point]
        for name in self.merged_names:
            try:
                check_merge_args(method, len(self.sources), **resolve(name))
            except PaftError as exc:
                raise PaftError(f"{name}: {exc}") from None
        self._merged = set(self.merged_names)

    def target_dtype(self, name: str) -> torch.dtype:
        dtype = self.base.dtype(name)
        return self.out_dtype if self.out_dtype is not None and dtype.is_floating_point else dtype

    def plan(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(n, self.base.shape(n), self.target_dtype(n)) for n in self.names]

    def work(self, name: str, keep_delta: bool = False) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """``(name, output tensor, float32 merged delta or None)``; NaN/inf in inputs or output is refused."""
        w = self.base.get(name)
        target = self.target_dtype(name)
        if not w.is_floating_point():
            return name, w, None
        if not torch.isfinite(w).all():
            raise PaftError(f"{name}: base tensor contains NaN or inf (in {self.base.path})")
        if name not in self._merged:
            return name, w.to(target), None
        base_w = w.float()
        deltas = []
        for i, (src, own, label) in enumerate(zip(self.sources, self.own, self.labels)):
            d = src.delta(name) if name in own else torch.zeros(w.shape)
            if d.shape != w.shape:
                raise PaftError(f"{label}: delta for {name} has shape {tuple(d.shape)}, base has {tuple(w.shape)}")
            if not torch.isfinite(d).all():
                raise PaftError(f"{name}: delta {i} contains NaN or inf (input {label})")
            deltas.append(d)
        params = dict(self.resolve(name))
        weights, density = params.pop("weights"), params.pop("density")
        try:
            mixed = merge_deltas(self.method, deltas, weights, density=density,
                                 generator=ChunkedRandom(self.seed, name), base=base_w, **params)
        except PaftError as exc:
            raise PaftError(f"{name}: {exc} (inputs: {', '.join(self.labels)})") from None
        out = (base_w + mixed).to(target)
        if not torch.isfinite(out).all():  # checked after the cast: fp16 can overflow
            raise PaftError(f"merged tensor {name} contains NaN or inf (in {target})")
        return name, out, (mixed if keep_delta else None)

    def run(self, fn: Callable[[str], Any] | None = None, workers: int | None = None,
            torch_threads: int | None = None) -> Iterator[Any]:
        """``fn(name)`` (default :meth:`work`) for every base tensor, in order, on ``workers`` threads."""
        workers = default_workers() if workers is None else max(1, int(workers))
        if torch_threads is None and workers > 1:
            torch_threads = max(1, torch.get_num_threads() // workers)
        with limit_threads(torch_threads if workers > 1 else None):
            yield from ordered_map(fn or self.work, self.names, workers,
                                   cost=lambda n: math.prod(self.base.shape(n)) if n in self._merged else 0)

    def write(self, folder: Path, workers: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> int:
        """Write every tensor into safetensors shards under ``folder``; returns the bytes written.

        Methods of the task-arithmetic family stream chunk by chunk
        (:mod:`paft.merge.streaming`), a tensor at a time with its chunks on
        ``workers`` threads; the others (della, slerp, model_stock) need whole
        tensors and run a tensor per thread.
        """
        writer = ShardWriter(folder, self.plan(), SHARD_BYTES)
        total = len(self.names)
        progress = progress or (lambda done, n: None)
        workers = default_workers() if workers is None else max(1, int(workers))
        try:
            if get_method(self.method).streams:
                with ThreadPoolExecutor(workers, thread_name_prefix="paft-merge") as pool, \
                        limit_threads(1 if workers > 1 else None):
                    for done, name in enumerate(self.names, start=1):
                        if name in self._merged:
                            TensorMerge(self, name, pool).write(writer)
                        else:
                            copy_tensor(self, name, writer, pool)
                        progress(done, total)
            else:
                for done, (name, tensor, _) in enumerate(self.run(workers=workers), start=1):
                    writer.write(name, tensor)
                    progress(done, total)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return writer.total_bytes
