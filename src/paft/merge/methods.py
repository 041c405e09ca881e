"""Merge methods on per-tensor deltas (task vectors ``d_i = W_i - W_base``).

Each method maps the deltas of one tensor, one per branch, to a single merged
delta; the engine adds it to the base weight. Semantics follow mergekit's
``generalized_task_arithmetic`` (weights applied before sign election, TIES
normalised by the weights of the agreeing entries), computed in float32.

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

MergeFn = Callable[..., torch.Tensor]
MERGE_METHODS: dict[str, MergeFn] = {}

_NORMALIZE_DEFAULT: dict[str, bool] = {}
_SIGN_MODES = ("total", "count")
#: method keywords beyond density/normalize/majority_sign, with mergekit's defaults
PARAM_DEFAULTS: dict[str, float] = {"gamma": 0.01, "epsilon": 0.15, "lambda_": 1.0, "t": 0.5}
_GAMMA_METHODS = ("breadcrumbs", "breadcrumbs_ties")
_RESCALE_METHODS = ("dare_linear", "dare_ties")
_EPSILON_METHODS = ("della", "della_linear")
_NEEDS_BASE = ("slerp",)
_LAMBDA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
                   "breadcrumbs_ties")


def _register(name: str, *, normalize: bool) -> Callable[[MergeFn], MergeFn]:
    """Register a method with its ``normalize`` default (mergekit's, except dare_ties)."""
    def wrap(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name], _NORMALIZE_DEFAULT[name] = fn, normalize
        return fn
    return wrap


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a blake2b hash of the tensor name.

    Each tensor gets its own stream, so DARE masks depend only on (seed, name),
    not on the order in which tensors are visited or on Python's salted ``hash``.
    """
    digest = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little"))
    return gen


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


def _densities(density: float | Sequence[float], n_deltas: int) -> list[float]:
    """One density per delta: a number applies to all, a sequence gives one each (mergekit's per-model density)."""
    if isinstance(density, (int, float)) and not isinstance(density, bool):
        return [float(density)] * n_deltas
    if isinstance(density, (list, tuple)) and all(isinstance(d, (int, float)) and not isinstance(d, bool)
                                                  for d in density):
        if len(density) != n_deltas:
            raise PaftError(f"got {len(density)} densities for {n_deltas} deltas; give one, or one per branch")
        return [float(d) for d in density]
    raise PaftError(f"density must be a number or a list of numbers, got {density!r}")


def check_merge_args(method: str, n_deltas: int, weights: list[float], density: float | Sequence[float],
                     majority_sign: str = "total", *, normalize: bool | None = None, rescale: bool = True,
                     gamma: float = PARAM_DEFAULTS["gamma"], epsilon: float = PARAM_DEFAULTS["epsilon"],
                     lambda_: float = PARAM_DEFAULTS["lambda_"], t: float = PARAM_DEFAULTS["t"],
                     **unknown: object) -> None:
    """Validate everything except the tensors, so the engine can fail before reading any.

    Method keywords are range-checked for every method; the checks that couple
    them with ``density`` (breadcrumbs' ``gamma``, DELLA's ``epsilon``) apply only
    to the methods that use them, and only when ``density < 1`` (at density 1
    those methods keep every entry, as in mergekit).
    """
    if unknown:
        raise PaftError(f"unknown merge parameter {next(iter(unknown))!r}; known: normalize, majority_sign, "
                        f"{', '.join(PARAM_DEFAULTS)}, rescale")
    if method not in MERGE_METHODS:
        raise PaftError(f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    if n_deltas == 0:
        raise PaftError("nothing to merge: no deltas given")
    if len(weights) != n_deltas:
        raise PaftError(f"got {len(weights)} weights for {n_deltas} deltas; give one weight per branch")
    densities = _densities(density, n_deltas)
    for density in densities:
        if not 0.0 < density <= 1.0:
            raise PaftError(f"density must be in (0, 1], got {density}")
    if not isinstance(rescale, bool):
        raise PaftError(f"rescale must be true or false, got {rescale!r}")
    if majority_sign not in _SIGN_MODES:
        raise PaftError(f"majority_sign must be one of {', '.join(_SIGN_MODES)}, got {majority_sign!r}")
    if normalize is not None and not isinstance(normalize, bool):
        raise PaftError(f"normalize must be true, false or unset, got {normalize!r}")
    for name, value in (("gamma", gamma), ("epsilon", epsilon), ("lambda_", lambda_), ("t", t)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PaftError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= gamma < 1.0:
        raise PaftError(f"gamma must be in [0, 1), got {gamma}")
    if not 0.0 <= epsilon < 1.0:
        raise PaftError(f"epsilon must be in [0, 1), got {epsilon}")
    if not 0.0 <= t <= 1.0:
        raise PaftError(f"t must be in [0, 1], got {t}")
    if not math.isfinite(lambda_):
        raise PaftError(f"lambda_ must be a finite number, got {lambda_}")
    for density in densities:
        if method in _GAMMA_METHODS and density < 1.0 and density + gamma > 1.0 + 1e-12:
            raise PaftError(f"gamma + density must be <= 1 (gamma drops the largest entries, density keeps the "
                            f"next ones), got gamma {gamma} + density {density}")
        if method in _EPSILON_METHODS and density < 1.0 and not (density - epsilon > 0.0
                                                                 and density + epsilon <= 1.0 + 1e-12):
            raise PaftError(f"epsilon must keep density +/- epsilon in (0, 1], got density {density} and "
                            f"epsilon {epsilon}")
    if not rescale and method not in _RESCALE_METHODS:
        raise PaftError(f"rescale: false applies to {', '.join(_RESCALE_METHODS)} only, not {method}")
    if method == "slerp" and n_deltas != 2:
        raise PaftError(f"slerp interpolates exactly 2 models, got {n_deltas}")
    if method == "model_stock" and n_deltas < 2:
        raise PaftError(f"model_stock needs at least 2 fine-tuned models, got {n_deltas}")


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
    ``lambda_``: final scale of the merged delta (task-arithmetic family and della*, as
    mergekit; linear, slerp and model_stock ignore it); ``t``: slerp's interpolation factor.
    ``base`` is the base tensor, needed by slerp and ignored by the others.
    """
    check_merge_args(method, len(deltas), weights, density, majority_sign, normalize=normalize, gamma=gamma,
                     epsilon=epsilon, lambda_=lambda_, t=t, rescale=rescale)
    densities = _densities(density, len(deltas))
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
    elif method in _NEEDS_BASE:
        raise PaftError(f"{method} interpolates full weights: pass the base tensor as base=")
    stacked = torch.stack([d.to(torch.float32) for d in deltas])
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device).view(-1, *([1] * len(shape)))
    norm = _NORMALIZE_DEFAULT[method] if normalize is None else normalize
    merged = MERGE_METHODS[method](stacked, w, density=densities, generator=generator, normalize=norm,
                                   majority_sign=majority_sign, gamma=gamma, epsilon=epsilon, lambda_=lambda_,
                                   t=t, base=base, rescale=rescale)
    # mergekit scales the merged delta by ``lambda`` in every task-arithmetic-family method (della* do it themselves)
    return lambda_ * merged if lambda_ != 1.0 and method in _LAMBDA_METHODS else merged


# --- building blocks ---------------------------------------------------------------------------

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


def elect_sign(weighted: torch.Tensor, majority_sign: str = "total") -> torch.Tensor:
    """TIES sign election over stacked weighted deltas (dim 0 = branch); ties elect +1.

    ``total`` takes the sign of the summed mass (the paper's rule); ``count``
    takes the sign held by more branches.
    """
    score = weighted.sum(dim=0) if majority_sign == "total" else weighted.sign().sum(dim=0)
    return torch.where(score >= 0, 1.0, -1.0)


def _disjoint_sum(weighted: torch.Tensor, w: torch.Tensor, normalize: bool, majority_sign: str) -> torch.Tensor:
    """Sum the entries that agree with the elected sign; optionally divide by their weights.

    Zero entries (trimmed or dropped) never agree, so they add neither mass nor weight.
    Entries where no branch agrees get divisor 1 and hence a zero delta.
    """
    agree = weighted.sign() == elect_sign(weighted, majority_sign)
    merged = (weighted * agree).sum(dim=0)
    if not normalize:
        return merged
    divisor = (w * agree).sum(dim=0)
    return merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _weighted_sum(stacked: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    merged = (stacked * w).sum(dim=0)
    if not normalize:
        return merged
    total = float(w.sum())
    if abs(total) < 1e-8:
        raise PaftError("weights sum to zero; cannot normalize (pass normalize=False)")
    return merged / total


_CHUNK = 1 << 22


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` accumulated in float64, chunk by chunk (no float64 copy of a whole embedding)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(a[i:i + _CHUNK].double(), b[i:i + _CHUNK].double()))
               for i in range(0, a.numel(), _CHUNK))


# --- methods: each takes deltas stacked on dim 0 and weights shaped to broadcast against them ---

@_register("linear", normalize=True)
def linear(stacked: torch.Tensor, w: torch.Tensor, *, normalize: bool, **_: object) -> torch.Tensor:
    """Weighted average ``sum_i w_i d_i / sum_i w_i`` (Wortsman et al. 2022, Model Soups, arXiv 2203.05482).

    On deltas this equals averaging the full weights, since ``W_base + avg(d) = avg(W)``.
    """
    return _weighted_sum(stacked, w, normalize)


@_register("task_arithmetic", normalize=False)
def task_arithmetic(stacked: torch.Tensor, w: torch.Tensor, *, normalize: bool, **_: object) -> torch.Tensor:
    """``sum_i w_i d_i`` (Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089)."""
    return _weighted_sum(stacked, w, normalize)


@_register("ties", normalize=True)
def ties(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float], normalize: bool, majority_sign: str,
         **_: object) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.

    ``t_i = top_density(|d_i|)``; ``s = sign(sum_i w_i t_i)``; ``A_i = [sign(w_i t_i) = s]``;
    ``d = sum_i A_i w_i t_i / sum_i A_i w_i`` (denominator only with ``normalize``).

    Matches mergekit. PEFT's ``merge_utils.ties`` differs: it elects the sign on
    the unweighted trimmed deltas and divides by the *count* of agreeing
    branches, not by their weights, so with unequal weights PEFT returns the
    mean of ``w_i t_i`` where mergekit and paft return their weighted average.
    """
    trimmed = torch.stack([trim_magnitude(d, p) for d, p in zip(stacked, density)])
    return _disjoint_sum(trimmed * w, w, normalize, majority_sign)


@_register("dare_linear", normalize=False)
def dare_linear(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float],
                generator: torch.Generator | None, normalize: bool, rescale: bool = True,
                **_: object) -> torch.Tensor:
    """DARE (Yu et al. 2023, Language Models are Super Mario, arXiv 2311.03099), then task arithmetic.

    ``d = sum_i w_i (m_i * d_i) / density`` with ``m_i ~ Bernoulli(density)``.
    """
    dropped = torch.stack([dare_drop(d, p, generator, rescale, i) for i, (d, p) in enumerate(zip(stacked, density))])
    return _weighted_sum(dropped, w, normalize)


@_register("dare_ties", normalize=True)
def dare_ties(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float],
              generator: torch.Generator | None, normalize: bool, majority_sign: str, rescale: bool = True,
              **_: object) -> torch.Tensor:
    """DARE drop-and-rescale (arXiv 2311.03099) followed by TIES sign election and disjoint merge.

    Normalised by default, like ties and PEFT's dare_ties; mergekit's dare_ties
    defaults to ``normalize=False`` (pass it explicitly for mergekit parity).
    """
    dropped = torch.stack([dare_drop(d, p, generator, rescale, i) for i, (d, p) in enumerate(zip(stacked, density))])
    return _disjoint_sum(dropped * w, w, normalize, majority_sign)


@_register("magnitude_prune", normalize=False)
def magnitude_prune(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float], normalize: bool,
                    **_: object) -> torch.Tensor:
    """TIES' magnitude trim per task, then task arithmetic, with no sign election.

    ``d = sum_i w_i top_density(|d_i|)`` (trim from Yadav et al. 2023, TIES-Merging,
    arXiv 2306.01708). Same as PEFT's ``merge_utils.magnitude_prune`` and mergekit's
    task arithmetic with ``magnitude`` sparsification; unnormalised by default.
    """
    trimmed = torch.stack([trim_magnitude(d, p) for d, p in zip(stacked, density)])
    return _weighted_sum(trimmed, w, normalize)


@_register("breadcrumbs", normalize=False)
def breadcrumbs(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float], gamma: float, normalize: bool,
                **_: object) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795), then task arithmetic.

    Per task, rank |d_i|, drop the top ``gamma`` share (outliers) and everything
    below the next ``density`` share: ``d = sum_i w_i m_i * d_i`` with
    ``m_i = [gamma n <= rank_desc(|d_i|) < (gamma + density) n]`` (see :func:`drop_outliers`).
    mergekit's ``breadcrumbs`` (sparsification ``magnitude_outliers``, no consensus,
    normalize False, gamma 0.01).
    """
    kept = torch.stack([drop_outliers(d, p, gamma) for d, p in zip(stacked, density)])
    return _weighted_sum(kept, w, normalize)


@_register("breadcrumbs_ties", normalize=False)
def breadcrumbs_ties(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float], gamma: float, normalize: bool,
                     majority_sign: str, **_: object) -> torch.Tensor:
    """Model Breadcrumbs' mask (arXiv 2312.06795), then TIES sign election and disjoint merge (arXiv 2306.01708).

    ``t_i = m_i * d_i``; ``s = sign(sum_i w_i t_i)``; ``d = sum_i [sign(w_i t_i) = s] w_i t_i``
    (divided by the agreeing weights only with ``normalize``). mergekit's
    ``breadcrumbs_ties``: unlike ties it is *not* normalised by default.
    """
    kept = torch.stack([drop_outliers(d, p, gamma) for d, p in zip(stacked, density)])
    return _disjoint_sum(kept * w, w, normalize, majority_sign)


@_register("della", normalize=True)
def della(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float], epsilon: float, lambda_: float,
          generator: torch.Generator | None, normalize: bool, majority_sign: str, **_: object) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024, arXiv 2406.11617): MagPrune, elect sign, disjoint merge, scale.

    ``t_i = m_i * d_i / p_i`` with ``m_i ~ Bernoulli(p_i)`` and ``p_i`` spread by
    within-row magnitude rank over ``[density - epsilon, density + epsilon]``
    (:func:`della_keep_probs`); then TIES' election and disjoint merge as in
    :func:`ties`; ``d = lambda_ * merged``. mergekit's ``della`` (normalize True,
    epsilon 0.15, lambda 1; see :func:`della_drop` for the rescale). mergekit
    requires ``density + epsilon < 1``; paft allows ``= 1`` (the largest entry of
    each row is then always kept). Tasks draw their masks in order from ``generator``.
    """
    dropped = torch.stack([della_drop(d, p, epsilon, generator, i) for i, (d, p) in enumerate(zip(stacked, density))])
    return lambda_ * _disjoint_sum(dropped * w, w, normalize, majority_sign)


@_register("della_linear", normalize=False)
def della_linear(stacked: torch.Tensor, w: torch.Tensor, *, density: list[float], epsilon: float, lambda_: float,
                 generator: torch.Generator | None, normalize: bool, **_: object) -> torch.Tensor:
    """DELLA's MagPrune (arXiv 2406.11617) without sign election: ``d = lambda_ * sum_i w_i m_i d_i / p_i``.

    mergekit's ``della_linear`` (no consensus, normalize False). Unbiased:
    ``E[d] = lambda_ * sum_i w_i d_i``.
    """
    dropped = torch.stack([della_drop(d, p, epsilon, generator, i) for i, (d, p) in enumerate(zip(stacked, density))])
    return lambda_ * _weighted_sum(dropped, w, normalize)


_COLINEAR_DOT = 0.9995  # mergekit's DOT_THRESHOLD
_TINY_NORM = 1e-8


@_register("slerp", normalize=False)
def slerp(stacked: torch.Tensor, w: torch.Tensor, *, t: float, base: torch.Tensor, **_: object) -> torch.Tensor:
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


@_register("model_stock", normalize=False)
def model_stock(stacked: torch.Tensor, w: torch.Tensor, **_: object) -> torch.Tensor:
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
