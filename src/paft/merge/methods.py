"""Merge kernels on per-tensor deltas (task vectors ``d_i = W_i - W_base``).

Each method maps the deltas of one tensor, one per branch, to a single merged
delta; the engine adds it to the base weight. What a method is (sparsifier,
consensus, defaults, parameters) is its row in :data:`paft.methods.merging.MERGE_METHODS`;
the task-arithmetic family runs :func:`sparsify` per delta and then :func:`combine_`,
the in-place kernel the streaming engine (:mod:`paft.merge.streaming`) runs on row
chunks too, so both paths give the same bits. Semantics follow mergekit's
``generalized_task_arithmetic`` (weights applied before sign election, TIES
normalised by the weights of the agreeing entries), computed in float32.
``slerp`` and ``model_stock`` are functions of their own.

Methods that interpolate whole weights (``slerp``) also need the base tensor; they
take it as ``base=`` and still return a delta, so ``base + merge_deltas(...)`` is the
merged weight for every method. Method keywords (``gamma``, ``epsilon``, ``lambda_``,
``t``) are accepted by every method and used only by those that name them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch

from paft.errors import PaftError
from paft.methods.merging import MERGE_METHODS, PARAM_DEFAULTS, MergeSpec, check_merge_args, densities


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a blake2b hash of the tensor name.

    Each tensor gets its own stream, so DARE masks depend only on (seed, name),
    not on the order in which tensors are visited or on Python's salted ``hash``.
    """
    digest = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little"))


CHUNK_NUMEL = 1 << 20  # entries per chunk of the streaming engine (and of its random streams)


def row_chunks(rows: int, cols: int, numel: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of about ``numel`` (default :data:`CHUNK_NUMEL`) entries, at least one row each, covering ``rows``."""
    step = max(1, (numel or CHUNK_NUMEL) // max(cols, 1))
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)] or [(0, 0)]


def chunk_generator(seed: int, name: str, index: int, start: int) -> torch.Generator:
    """The generator of delta ``index``'s chunk of tensor ``name`` that starts at flat entry ``start``."""
    digest = hashlib.blake2b(f"{int(seed)}\0{name}\0{int(index)}\0{int(start)}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little"))


class ChunkedRandom:
    """The merge engine's random stream for one tensor, keyed by ``(seed, name)``.

    Delta ``index``'s uniforms are drawn chunk by chunk (:func:`row_chunks` of
    its rows), each chunk from :func:`chunk_generator`, so the streaming engine
    can draw any chunk on any thread and still give the same masks as a whole
    tensor drawn here. Pass it as ``generator=`` to :func:`merge_deltas` to
    reproduce ``paft merge``'s DARE/DELLA masks exactly.
    """

    def __init__(self, seed: int, name: str):
        self.seed, self.name = int(seed), name

    def uniform(self, index: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        rows = shape[0] if len(shape) else 1
        cols = n // rows if rows else 0
        parts = [torch.rand((r1 - r0) * cols, generator=chunk_generator(self.seed, self.name, index, r0 * cols))
                 for r0, r1 in row_chunks(rows, cols)]
        return torch.cat(parts).view(shape) if parts else torch.empty(shape)


def _keep(probs: torch.Tensor | float, shape: torch.Size, generator, index: int) -> torch.Tensor:
    """A keep mask with ``P(keep) = probs``: Bernoulli from a generator, or ``u < probs`` from a ChunkedRandom."""
    if isinstance(generator, ChunkedRandom):
        return generator.uniform(index, shape) < probs
    if not isinstance(probs, torch.Tensor):
        probs = torch.full(shape, probs, dtype=torch.float32)
    return torch.bernoulli(probs.to(generator.device if generator is not None else "cpu"), generator=generator)


def merge_deltas(method: str, deltas: list[torch.Tensor], weights: list[float], *,
                 density: float | Sequence[float] = 1.0, rescale: bool = True,
                 generator: torch.Generator | None = None, normalize: bool | None = None,
                 majority_sign: str = "total", gamma: float = PARAM_DEFAULTS["gamma"],
                 epsilon: float = PARAM_DEFAULTS["epsilon"], lambda_: float = PARAM_DEFAULTS["lambda_"],
                 t: float = PARAM_DEFAULTS["t"], base: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one tensor's deltas with ``method``; returns a float32 delta of the same shape.

    ``density`` is the share of entries kept per delta by the sparsifying methods
    (ties, dare_*, magnitude_prune, breadcrumbs*, della*): one number for all deltas
    or one per delta. ``rescale=False`` (dare_* only, mergekit's ``rescale``) keeps
    DARE's survivors unscaled instead of dividing them by the density. ``normalize=None`` takes
    the method's default. ``generator`` drives DARE's and DELLA's random drops (use
    :func:`tensor_generator` for reproducible merges); ``None`` uses torch's global
    RNG. ``gamma``: breadcrumbs' outlier share; ``epsilon``: DELLA's probability spread;
    ``lambda_``: final scale of the merged delta (the task-arithmetic family except
    linear, as mergekit); ``t``: slerp's interpolation factor.
    ``base`` is the base tensor, needed by slerp and ignored by the others.
    """
    spec = check_merge_args(method, len(deltas), weights, density, majority_sign, normalize=normalize, gamma=gamma,
                            epsilon=epsilon, lambda_=lambda_, t=t, rescale=rescale)
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.shape != shape:
            raise PaftError(f"delta {i} has shape {tuple(d.shape)}, delta 0 has {tuple(shape)}")
        if not torch.isfinite(d).all():
            raise PaftError(f"delta {i} contains NaN or inf")
    if base is not None:
        if base.shape != shape:
            raise PaftError(f"base has shape {tuple(base.shape)}, the deltas have {tuple(shape)}")
        base = base.to(torch.float32)
    elif spec.needs_base:
        raise PaftError(f"{method} interpolates full weights: pass the base tensor as base=")
    stacked = torch.stack([d.to(torch.float32) for d in deltas])
    if not spec.family:
        return OWN_FUNCTIONS[method](stacked, t=t, base=base)
    for i, p in enumerate(densities(density, len(deltas))):
        stacked[i] = sparsify(spec, stacked[i], p, index=i, generator=generator, gamma=gamma, epsilon=epsilon,
                              rescale=rescale)
    return combine_(spec, stacked, weights, normalize=normalize, majority_sign=majority_sign, lambda_=lambda_)


# --- sparsifiers: each thins one delta ------------------------------------------------------------

def _top_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of the flat ``mag``; ties go to the lowest flat index.

    That makes the kept set a prefix of one fixed order (descending magnitude,
    then index), so ``_top_mask(mag, j)`` is inside ``_top_mask(mag, k)`` for ``j <= k``.
    """
    n = mag.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=mag.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=mag.device)
    # O(n) selection of the k-th largest magnitude instead of a full sort (~10x faster on 1M entries)
    thr = torch.kthvalue(mag.float().cpu(), n - k + 1).values.to(mag.device, mag.dtype)
    mask = mag > thr
    need = k - int(mask.sum())
    if need > 0:  # ties at the threshold: keep the lowest flat indices, as a stable sort would
        mask[torch.nonzero(mag == thr).flatten()[:need]] = True
    return mask


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``floor(density * numel)`` entries of largest |delta| (at least one), zero the rest.

    A stable order breaks ties by flat index, so equal magnitudes are kept
    deterministically (mergekit's argsort and PEFT's topk leave ties unspecified).
    Keeping at least one entry stops a small tensor (a norm, say) from being
    silently zeroed when ``density * numel < 1``; mergekit asserts there, PEFT zeroes.
    """
    if density >= 1.0:
        return delta
    mag = delta.abs().flatten()
    return delta * _top_mask(mag, max(1, int(density * mag.numel()))).view(delta.shape)


def drop_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: drop the ``floor(gamma * n)`` largest |delta|, keep the next ``floor(density * n)``.

    Everything below those is zeroed too. As in mergekit's ``magnitude_outliers``
    (0.1.5; same masks on tie-free data) the outlier count shrinks if both would
    not fit, and density 1 keeps the delta unchanged. paft also keeps at least one
    entry and breaks ties by flat index. (mergekit before 0.1 sliced
    ``indices[n_bot:-n_top]``, which is empty when ``floor(gamma * n) = 0``.)
    """
    if density >= 1.0:
        return delta
    mag = delta.abs().flatten()
    n = mag.numel()
    k = max(1, int(density * n))
    top = min(int(gamma * n), n - k)
    keep = _top_mask(mag, top + k) & ~_top_mask(mag, top)
    return delta * keep.view(delta.shape)


def della_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities: ``p = density - epsilon + 2 epsilon r / (n - 1)``.

    ``r`` in ``0..n-1`` is the rank of |delta| within its row (ascending, ties by
    index), so the largest entry of a row gets ``density + epsilon`` and the
    smallest ``density - epsilon``; the row mean is ``density``. Rows are the first
    dimension (``delta.reshape(shape[0], -1)``); a 1-D tensor is one row. mergekit
    ranks along dim 1 of the raw tensor, which is the same for 1-D and 2-D
    tensors; a one-entry row (where mergekit divides 0 by 0) gets ``density``.
    """
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=order.device).expand_as(order).contiguous())
    probs = (density - epsilon) + (2.0 * epsilon) * (ranks.to(torch.float32) / (n - 1))
    return probs.clamp_(max=1.0).reshape(delta.shape)


def della_drop(delta: torch.Tensor, density: float, epsilon: float,
               generator: "torch.Generator | ChunkedRandom | None", index: int = 0) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with :func:`della_keep_probs`, rescale survivors by ``1/p``.

    ``E[della_drop(d)] = d`` entry by entry. The mask is drawn on the generator's
    device (CPU), like :func:`dare_drop`; with ``epsilon = 0`` it is DARE's mask.
    The ``1/p`` rescale is the paper's (and mergekit's before 0.1); mergekit 0.1.5's
    ``rescale`` instead scales the masked delta back to its original L1 norm.
    """
    if density >= 1.0:
        return delta
    probs = della_keep_probs(delta, density, epsilon)
    mask = _keep(probs, delta.shape, generator, index)
    return (delta * mask.to(delta.device)) / probs.to(delta.device)


def dare_drop(delta: torch.Tensor, density: float, generator: "torch.Generator | ChunkedRandom | None",
              rescale: bool = True, index: int = 0) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``, scale survivors by ``1/density``.

    ``rescale=False`` (mergekit's ``rescale: false``) keeps the survivors as they are.
    The mask is a Bernoulli draw from a ``torch.Generator`` (on its device,
    CPU, then moved to the delta's, so a merge is reproducible wherever it
    runs), or ``uniform < density`` from a :class:`ChunkedRandom` (the engine's
    stream; ``index`` picks the delta's stream).
    """
    if density >= 1.0:
        return delta
    mask = _keep(density, delta.shape, generator, index).to(delta.device)
    return delta * mask / density if rescale else delta * mask


#: the whole-tensor kernel of each sparsifier (the streaming engine draws the same masks chunk by chunk)
_SPARSIFY: dict[str, Callable[..., torch.Tensor]] = {
    "magnitude": lambda d, p, **_: trim_magnitude(d, p),
    "magnitude_outliers": lambda d, p, *, gamma, **_: drop_outliers(d, p, gamma),
    "random": lambda d, p, *, generator, rescale, index, **_: dare_drop(d, p, generator, rescale, index),
    "della_magprune": lambda d, p, *, epsilon, generator, index, **_: della_drop(d, p, epsilon, generator, index),
}


def sparsify(spec: MergeSpec, delta: torch.Tensor, density: float, **kw: object) -> torch.Tensor:
    """``delta`` thinned by ``spec``'s sparsifier (unchanged without one); ``kw``: index, generator, gamma, ..."""
    return delta if spec.sparsifier is None else _SPARSIFY[spec.sparsifier.name](delta, density, **kw)


# --- the family's combine: weight, consensus, normalize, lambda ------------------------------------

Scratch = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]


def _fresh(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _sum0(x: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``x.sum(dim=0)`` into scratch (the same additions in the same order)."""
    if x.shape[0] == 1:
        return x[0]
    out = scratch("sum", tuple(x.shape[1:]), torch.float32)
    return torch.add(x[0], x[1], out=out) if x.shape[0] == 2 else torch.sum(x, 0, out=out)


def elect_sign(weighted: torch.Tensor, majority_sign: str = "total", scratch: Scratch = _fresh) -> torch.Tensor:
    """TIES sign election over stacked weighted deltas (dim 0 = branch): +1 or -1 per entry; ties elect +1.

    ``total`` takes the sign of the summed mass (the paper's rule); ``count``
    takes the sign held by more branches.
    """
    shape = tuple(weighted.shape[1:])
    score = _sum0(weighted if majority_sign == "total" else torch.sign(weighted), scratch)
    elected = scratch("elected", shape, torch.float32)
    return elected.copy_(torch.ge(score, 0, out=scratch("agree", shape, torch.bool))).mul_(2.0).sub_(1.0)


def combine_(spec: MergeSpec, x: torch.Tensor, weights: Sequence[float], *, normalize: bool | None = None,
             majority_sign: str = "total", lambda_: float = PARAM_DEFAULTS["lambda_"],
             scratch: Scratch = _fresh) -> torch.Tensor:
    """The family's merge of sparsified deltas stacked on dim 0: weight, combine, normalise, scale.

    ``x`` (float32) is overwritten; temporaries come from ``scratch`` (the
    streaming engine passes per-thread buffers: a fresh allocation per chunk
    costs more than the merge). Without consensus: ``d = sum_i w_i t_i``, divided
    by ``sum_i w_i`` with ``normalize``. With consensus (TIES): ``s = sign(sum_i w_i t_i)``
    (or of the sign count), ``A_i = [sign(w_i t_i) = s]``, ``d = sum_i A_i w_i t_i``,
    divided by ``sum_i A_i w_i`` with ``normalize``; zero entries never agree, and
    entries where none agrees stay 0. This is mergekit's rule; PEFT's ``ties`` elects
    on unweighted deltas and divides by the agreeing *count*, so it differs with
    unequal weights. Finally ``d *= lambda_`` where the spec scales.
    """
    normalize = spec.normalize if normalize is None else normalize
    for i, w in enumerate(weights):
        x[i].mul_(w)
    if not spec.consensus:
        merged = _sum0(x, scratch)
        if normalize:
            total = float(torch.tensor(weights, dtype=torch.float32).sum())
            if abs(total) < 1e-8:
                raise PaftError("weights sum to zero; cannot normalize (pass normalize=False)")
            merged.div_(total)
    else:
        shape = tuple(x.shape[1:])
        elected = elect_sign(x, majority_sign, scratch)
        agree, tmp = scratch("agree", shape, torch.bool), scratch("tmp", shape, torch.float32)
        divisor = scratch("divisor", shape, torch.float32).zero_() if normalize else None
        for i, w in enumerate(weights):  # sign(x_i) == s  <=>  x_i * s > 0, with s = +-1
            torch.gt(torch.mul(x[i], elected, out=tmp), 0, out=agree)
            x[i].mul_(agree)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        merged = _sum0(x, scratch)
        if divisor is not None:
            merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if spec.lambda_ and lambda_ != 1.0:
        merged.mul_(lambda_)
    return merged


# --- methods of their own -------------------------------------------------------------------------

_CHUNK = 1 << 22


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` accumulated in float64, chunk by chunk (no float64 copy of a whole embedding)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(a[i:i + _CHUNK].double(), b[i:i + _CHUNK].double()))
               for i in range(0, a.numel(), _CHUNK))


_COLINEAR_DOT = 0.9995  # mergekit's DOT_THRESHOLD
_TINY_NORM = 1e-8


def slerp(stacked: torch.Tensor, *, t: float, base: torch.Tensor, **_: object) -> torch.Tensor:
    """Spherical interpolation of the two full weights (Shoemake 1985, Animating Rotation with Quaternion Curves).

    With ``v_i = base + d_i`` flattened, ``cos theta = <v_0, v_1> / (|v_0| |v_1|)``:
    ``merged = sin((1-t) theta)/sin theta * v_0 + sin(t theta)/sin theta * v_1``,
    returned as ``merged - base``. ``t = 0`` gives branch 0, ``t = 1`` branch 1.
    Like mergekit, the coefficients multiply the unnormalised vectors, and
    ``|cos theta| > 0.9995`` (nearly colinear) falls back to the lerp
    ``(1-t) v_0 + t v_1``. Weights are ignored (mergekit's slerp has none). paft
    differs in two small ways: the dot product accumulates in float64, and a
    zero-norm side falls back to lerp (mergekit leaves it unnormalised, so
    ``cos = 0`` and it scales the other side by ``sin(t pi/2)``). mergekit's
    first input is its ``base_model``; paft's are the two branches.
    """
    d0, d1 = stacked[0], stacked[1]
    v0, v1 = base + d0, base + d1
    n0, n1 = math.sqrt(_dot64(v0, v0)), math.sqrt(_dot64(v1, v1))
    dot = _dot64(v0, v1) / (n0 * n1) if n0 > _TINY_NORM and n1 > _TINY_NORM else 1.0
    if abs(dot) > _COLINEAR_DOT:
        return (1.0 - t) * d0 + t * d1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s0, s1 = math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    # s0 v0 + s1 v1 - base, written so the base cancels exactly where s0 + s1 = 1
    return s0 * d0 + s1 * d1 + (s0 + s1 - 1.0) * base


def model_stock(stacked: torch.Tensor, **_: object) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, arXiv 2403.19522): move the average toward the base by the angle.

    ``cos`` is the mean pairwise cosine of the k deltas (whole tensor, mergekit's
    default ``filter_wise: false``), ``t = k cos / (1 + (k-1) cos)`` and
    ``merged = t mean_i(W_i) + (1-t) W_base``, i.e. the delta ``t mean_i(d_i)``
    (the base cancels, so no base tensor is needed). Identical deltas give t = 1,
    orthogonal ones t = 0. Weights are ignored, as in mergekit. paft differs
    from mergekit in two places: ``cos`` is clamped at 0, so anti-correlated
    deltas give the base (mergekit extrapolates with t < 0, reversing the
    fine-tuning direction, and keeps the base only at the pole
    ``cos = -1/(k-1)``), and a zero delta has cosine 0 while tiny non-zero ones
    keep their exact cosine (mergekit clamps the norm product at 1e-6, which
    pushes deltas with norms below ~1e-3 toward t = 0). A zero delta (a branch that
    leaves this tensor alone) therefore pulls the tensor toward the base.
    """
    k = stacked.shape[0]
    norms = [math.sqrt(_dot64(d, d)) for d in stacked]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            denom = norms[i] * norms[j]
            cosines.append(max(-1.0, min(1.0, _dot64(stacked[i], stacked[j]) / denom)) if denom > 0 else 0.0)
    cos = max(0.0, sum(cosines) / len(cosines))
    t = k * cos / (1.0 + (k - 1) * cos)
    return t * stacked.mean(dim=0)


#: the methods outside the task-arithmetic family (``family=False`` rows), each with its own function
OWN_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"slerp": slerp, "model_stock": model_stock}
assert set(OWN_FUNCTIONS) == {n for n, s in MERGE_METHODS.items() if not s.family}
