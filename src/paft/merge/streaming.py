"""The task-arithmetic family merged a block of rows at a time, with the whole-tensor results of ``methods.py``.

The methods whose row streams (``MergeSpec.streams``: no sparsifier, magnitude,
magnitude_outliers or random) act entry by entry once two things are known
per delta: a magnitude threshold (the trim methods) or a random mask (DARE);
the weighting and combine are :func:`paft.merge.methods.combine_`, the same
in-place kernel as the whole-tensor path, on per-thread scratch buffers.
So a tensor is cut into chunks of whole rows (about ``CHUNK_NUMEL`` entries),
the chunks run on a thread pool with per-thread buffers that are reused from
tensor to tensor, and each chunk's result is written straight to its offset in
the output shard. Memory stays at a few chunks per thread whatever the model
size, and no tensor-sized temporary is ever allocated (on Linux each fresh
large allocation costs a page fault per 4 KiB, which dominated the old
whole-tensor path).

Thresholds are exact. The k-th largest ``|d|`` is found by radix selection on
the float's bit pattern (for non-negative floats the order of the bits as
integers is the order of the values): one pass histograms the top 16 bits,
a second histograms the low 16 bits inside the bucket that holds the k-th
value. Entries equal to the threshold are kept in flat-index order, as
:func:`paft.merge.methods.trim_magnitude` does, with a third counting pass only
when such ties straddle the cut (and matter: ties at zero do not change the
result). The chunk results are then bitwise equal to the whole-tensor methods.

DARE's random masks are drawn per chunk, each from its own generator seeded by
``(seed, tensor name, delta index, flat offset)`` (:func:`paft.merge.methods.chunk_generator`),
so a merge is reproducible bit for bit for any number of threads, and
``merge_deltas(..., generator=ChunkedRandom(seed, name))`` draws the same masks on a whole tensor.
"""

from __future__ import annotations

from concurrent.futures import Executor
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from paft.errors import PaftError
from paft.merge.deltas import ITEMSIZE, thread_buffer
from paft.merge.methods import chunk_generator, combine_, row_chunks
from paft.methods.merging import MAGNITUDE, OUTLIERS, PARAM_DEFAULTS, RANDOM, densities, get_method

_HI_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit clear)
_LO_BINS = 1 << 16

@dataclass
class TopK:
    """The ``k`` largest entries of a streamed ``|d|`` (ties broken by lowest flat index), as a per-chunk mask.

    ``value``: the k-th largest magnitude; every entry above it is kept, and the
    first ``need_eq`` entries equal to it. ``eq_before[j]``: entries equal to
    ``value`` in the chunks before chunk ``j`` (only when the tie matters).
    """

    k: int
    n: int
    value: float = 0.0
    need_eq: int = 0
    eq_total: int = 0
    eq_before: list[int] | None = None
    bucket: int = -1
    bucket_need: int = 0

    @property
    def trivial(self) -> bool:
        return self.k <= 0 or self.k >= self.n

    def mask(self, absd: torch.Tensor, j: int) -> torch.Tensor:
        if self.k <= 0:
            return torch.zeros(absd.shape, dtype=torch.bool)
        if self.k >= self.n:
            return torch.ones(absd.shape, dtype=torch.bool)
        keep = absd > self.value
        if self.need_eq == 0:
            return keep
        eq = absd == self.value
        if self.eq_before is None:  # every tied entry is kept, or the tie is at zero (no effect on the result)
            return keep | eq
        flat = eq.reshape(-1)
        rank = torch.cumsum(flat, 0) + self.eq_before[j]
        return keep | (flat & (rank <= self.need_eq)).view(eq.shape)


def _bits(absd: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of a non-negative float32 tensor, flat, in place (a view of ``absd``)."""
    bits = absd.reshape(-1).view(torch.int32)
    return bits.bitwise_and_(0x7FFFFFFF)  # abs() clears the sign, NaN included; this keeps bincount's input >= 0


def _buf(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor (reused across chunks and tensors; contents undefined)."""
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    return thread_buffer(key, nbytes)[:nbytes].view(dtype).view(shape)


def _top_bucket(counts: torch.Tensor, k: int) -> tuple[int, int, int]:
    """``(bucket, entries above it, rank of the k-th largest inside it)`` for a histogram in ascending order."""
    ge = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # ge[b] = entries in buckets >= b
    bucket = int(torch.nonzero(ge >= k).max())
    above = int(ge[bucket] - counts[bucket])
    return bucket, above, k - above


class TensorMerge:
    """One tensor of a :class:`paft.merge.engine.MergeJob` merged chunk by chunk on ``pool``."""

    def __init__(self, job: Any, name: str, pool: Executor | None):
        self.job, self.name, self.pool = job, name, pool
        self.rows, self.cols = job.base.rows_shape(name)
        self.n = self.rows * self.cols
        self.chunks = row_chunks(self.rows, self.cols)
        params = dict(job.resolve(name))
        self.weights, density = params.pop("weights"), params.pop("density")
        self.densities = densities(density, len(job.sources))
        self.params = params
        self.spec = get_method(job.method)
        self.sparsifier = self.spec.sparsifier
        self.fns = [src.row_delta(name) if name in own else None for src, own in zip(job.sources, job.own)]
        self.tops: list[list[TopK]] = [[] for _ in self.fns]  # per delta: 1 threshold (magnitude) or 2 (outliers)
        for i, p in enumerate(self.densities):
            if p >= 1.0 or self.fns[i] is None or self.sparsifier not in (MAGNITUDE, OUTLIERS):
                continue
            k = max(1, int(p * self.n))
            if self.sparsifier is MAGNITUDE:
                self.tops[i] = [TopK(k, self.n)]
            else:  # breadcrumbs: drop the top ``gamma`` share, keep the next ``density`` share
                top = min(int(params.get("gamma", PARAM_DEFAULTS["gamma"]) * self.n), self.n - k)
                self.tops[i] = [TopK(top, self.n), TopK(top + k, self.n)]

    # -- passes over the chunks ------------------------------------------------------------------
    def _map(self, fn: Callable[[int], Any]) -> list[Any]:
        idx = range(len(self.chunks))
        return list(self.pool.map(fn, idx)) if self.pool is not None and len(self.chunks) > 1 else list(map(fn, idx))

    def _base_rows(self, j: int) -> torch.Tensor:
        r0, r1 = self.chunks[j]
        c = (r1 - r0) * self.cols
        raw = self.job.base.read_rows(self.name, r0, r1, thread_buffer("base", c * 8))
        return _buf("base32", (r1 - r0, self.cols), torch.float32).copy_(raw)

    def _deltas(self, j: int, which: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stacked deltas [len(fns), rows, cols], base rows)`` of chunk ``j``; only ``which`` are computed."""
        r0, r1 = self.chunks[j]
        base = self._base_rows(j)
        stacked = _buf("deltas", (len(self.fns), r1 - r0, self.cols), torch.float32)
        for i in which:
            if self.fns[i] is None:
                stacked[i].zero_()
            else:
                self.fns[i](r0, r1, base, stacked[i])
        return stacked, base

    def _abs(self, d: torch.Tensor) -> torch.Tensor:
        return torch.abs(d, out=_buf("abs", tuple(d.shape), torch.float32))

    def select(self) -> None:
        """Find every threshold: top-16-bit histograms, then low-16-bit ones in the chosen buckets."""
        todo = [i for i, t in enumerate(self.tops) if any(not x.trivial for x in t)]
        if not todo:
            return

        def hist_hi(j: int) -> list[torch.Tensor]:
            stacked, _ = self._deltas(j, todo)
            out = []
            for i in todo:
                bits = _bits(self._abs(stacked[i]))
                hi = torch.bitwise_right_shift(bits, 16, out=_buf("idx", tuple(bits.shape), torch.int32))
                out.append(torch.bincount(hi, minlength=_HI_BINS))
            return out

        hists = [sum(h) for h in zip(*self._map(hist_hi))]
        for i, h in zip(todo, hists):
            if int(h[0x7F80:].sum()):  # exponent all ones: inf or NaN
                raise PaftError(f"{self.name}: delta {i} contains NaN or inf (input {self.job.labels[i]})")
            for t in self.tops[i]:
                if not t.trivial:
                    t.bucket, _, t.bucket_need = _top_bucket(h, t.k)

        def hist_lo(j: int) -> list[list[torch.Tensor]]:
            stacked, _ = self._deltas(j, todo)
            out = []
            for i in todo:
                bits = _bits(self._abs(stacked[i]))
                idx = _buf("idx", tuple(bits.shape), torch.int32)
                hists = []
                for t in self.tops[i]:
                    if t.trivial:
                        continue
                    # bucket entries -> 1..65536 (their low 16 bits + 1); below -> 0, above -> 65537
                    torch.sub(bits, (t.bucket << 16) - 1, out=idx).clamp_(0, _LO_BINS + 1)
                    hists.append(torch.bincount(idx, minlength=_LO_BINS + 2)[1:_LO_BINS + 1])
                out.append(hists)
            return out

        per_chunk = self._map(hist_lo)
        tied: list[tuple[int, TopK]] = []
        for pos, i in enumerate(todo):
            live = [t for t in self.tops[i] if not t.trivial]
            for q, t in enumerate(live):
                counts = sum(chunk[pos][q] for chunk in per_chunk)
                low, above, need = _top_bucket(counts, t.bucket_need)
                bits = (t.bucket << 16) | low
                t.value = float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))
                t.need_eq, t.eq_total = need, int(counts[low])
                if t.need_eq < t.eq_total and bits != 0:  # a tie straddles the cut: keep the first ones in order
                    tied.append((i, t))
        if tied:
            def count_eq(j: int) -> list[int]:
                stacked, _ = self._deltas(j, sorted({i for i, _ in tied}))
                return [int((self._abs(stacked[i]) == t.value).sum()) for i, t in tied]

            counts_eq = self._map(count_eq)
            for q, (_, t) in enumerate(tied):
                run, t.eq_before = 0, []
                for chunk in counts_eq:
                    t.eq_before.append(run)
                    run += chunk[q]

    def merged_rows(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base rows, merged delta rows)`` of chunk ``j``, both float32."""
        k = len(self.fns)
        stacked, base = self._deltas(j, range(k))
        for i, p in enumerate(self.densities):
            if self.fns[i] is None or p >= 1.0:
                continue
            if self.sparsifier in (MAGNITUDE, OUTLIERS):
                tops = self.tops[i]
                keep = tops[0].mask(self._abs(stacked[i]), j)
                if len(tops) == 2:
                    keep = tops[1].mask(self._abs(stacked[i]), j) & ~keep
                stacked[i].mul_(keep)
            elif self.sparsifier is RANDOM:
                r0, r1 = self.chunks[j]
                gen = chunk_generator(self.job.seed, self.name, i, r0 * self.cols)
                u = torch.rand(stacked[i].shape, generator=gen)
                stacked[i].mul_(u < p)
                if self.params.get("rescale", True):
                    stacked[i].div_(p)
        merged = combine_(self.spec, stacked, self.weights, normalize=self.params.get("normalize"),
                          majority_sign=self.params.get("majority_sign", "total"),
                          lambda_=self.params.get("lambda_", PARAM_DEFAULTS["lambda_"]), scratch=_buf)
        return base, merged

    def write(self, writer: Any) -> None:
        self.select()
        target = self.job.target_dtype(self.name)

        def one(j: int) -> None:
            base, merged = self.merged_rows(j)
            out = (base + merged).to(target)
            if not torch.isfinite(out).all():
                self._explain_nonfinite(j, target)
            writer.write_rows(self.name, self.chunks[j][0], out)

        self._map(one)

    def _explain_nonfinite(self, j: int, target: torch.dtype) -> None:
        stacked, base = self._deltas(j, range(len(self.fns)))
        if not torch.isfinite(base).all():
            raise PaftError(f"{self.name}: base tensor contains NaN or inf (in {self.job.base.path})")
        for i in range(len(self.fns)):
            if not torch.isfinite(stacked[i]).all():
                raise PaftError(f"{self.name}: delta {i} contains NaN or inf (input {self.job.labels[i]})")
        raise PaftError(f"merged tensor {self.name} contains NaN or inf (in {target})")


def copy_tensor(job: Any, name: str, writer: Any, pool: Executor | None) -> None:
    """An unmerged tensor, chunk by chunk: cast to the output dtype, checked for NaN/inf when floating."""
    rows, cols = job.base.rows_shape(name)
    parts = row_chunks(rows, cols)
    target = job.target_dtype(name)

    def one(j: int) -> None:
        r0, r1 = parts[j]
        raw = job.base.read_rows(name, r0, r1, thread_buffer("base", (r1 - r0) * cols * 8))
        if raw.is_floating_point() and not torch.isfinite(raw).all():
            raise PaftError(f"{name}: base tensor contains NaN or inf (in {job.base.path})")
        writer.write_rows(name, r0, raw if raw.dtype == target else raw.to(target))

    idx = range(len(parts))
    list(pool.map(one, idx)) if pool is not None and len(parts) > 1 else list(map(one, idx))
