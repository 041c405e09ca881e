"""Merge methods as data: one frozen :class:`MergeSpec` per method, and the argument checks read from it.

Most methods are rows of one task-arithmetic family (mergekit's
``GeneralizedTaskArithmeticMerge``): sparsify each delta, weight it, combine
(plain sum, or TIES' sign election and disjoint sum), normalise, scale by
lambda. A new family member is one row here; the kernels in
:mod:`paft.merge.methods` and the streaming engine read the row. Methods
outside the family (``slerp``, ``model_stock``) have ``family=False`` and a
function of their own in :mod:`paft.merge.methods`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from paft.errors import PaftError


@dataclass(frozen=True)
class Sparsifier:
    """How one delta is thinned before the combine; ``params``: the method keywords it reads."""

    name: str
    params: tuple[str, ...] = ()
    #: entry by entry once a magnitude threshold or a random mask is known, so it streams in row chunks
    streams: bool = True


MAGNITUDE = Sparsifier("magnitude")  # keep the largest |d| (TIES' trim)
RANDOM = Sparsifier("random")  # DARE's Bernoulli drop, survivors rescaled by 1/density
OUTLIERS = Sparsifier("magnitude_outliers", ("gamma",))  # Breadcrumbs: drop the top gamma share, keep the next
DELLA = Sparsifier("della_magprune", ("epsilon",), streams=False)  # keep probabilities ranked within a row


@dataclass(frozen=True)
class MergeSpec:
    """Everything paft knows about a merge method, except its kernel."""

    name: str
    what: str  # what it does, with its paper (its row in docs/merge.md)
    normalize: bool  # default of ``normalize`` (divide by the summed weights of the entries kept)
    family: bool = True  # a task-arithmetic-family row; False: its own function in paft.merge.methods
    sparsifier: Sparsifier | None = None
    consensus: bool = False  # TIES' sign election and disjoint sum instead of the plain weighted sum
    lambda_: bool = False  # the merged delta is scaled by ``lambda_``
    rescale: bool = False  # takes ``rescale: false`` (DARE's survivors unscaled)
    params: tuple[str, ...] = ()  # keywords beyond weights/density/normalize/majority_sign it reads
    needs_base: bool = False  # the kernel needs the base tensor (interpolates full weights)
    reference: bool = True  # deltas are taken from base_model, which must be given and is not an input
    min_models: int = 1
    max_models: int | None = None
    mergekit_normalize: bool | None = None  # mergekit's normalize default, where it differs from paft's

    @property
    def uses(self) -> tuple[str, ...]:
        """The method keywords this method reads (with their defaults in :data:`PARAM_DEFAULTS`)."""
        return (*(self.sparsifier.params if self.sparsifier else ()), *(("lambda_",) if self.lambda_ else ()),
                *self.params)

    @property
    def streams(self) -> bool:
        return self.family and (self.sparsifier is None or self.sparsifier.streams)

    @property
    def needs_base_model(self) -> bool:
        return self.reference or self.needs_base


#: every merge method, by name; ``what`` is its line in docs/merge.md's table. normalize defaults are
#: mergekit's, except dare_ties (normalised, as PEFT's dare_ties; mergekit's is not)
MERGE_METHODS: dict[str, MergeSpec] = {s.name: s for s in (
    MergeSpec("linear", "Weighted average `sum_i w_i d_i / sum_i w_i` (Wortsman et al. 2022, Model Soups, "
              "arXiv 2203.05482).", normalize=True, reference=False),
    MergeSpec("task_arithmetic", "`sum_i w_i d_i` (Ilharco et al. 2023, Editing Models with Task Arithmetic, "
              "arXiv 2212.04089).", normalize=False, lambda_=True),
    MergeSpec("ties", "TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.",
              normalize=True, sparsifier=MAGNITUDE, consensus=True, lambda_=True),
    MergeSpec("dare_linear", "DARE (Yu et al. 2023, Language Models are Super Mario, arXiv 2311.03099), then "
              "task arithmetic.", normalize=False, sparsifier=RANDOM, lambda_=True, rescale=True),
    MergeSpec("dare_ties", "DARE drop-and-rescale (arXiv 2311.03099) followed by TIES sign election and disjoint "
              "merge.", normalize=True, sparsifier=RANDOM, consensus=True, lambda_=True, rescale=True,
              mergekit_normalize=False),
    MergeSpec("magnitude_prune", "TIES' magnitude trim per task, then task arithmetic, with no sign election.",
              normalize=False, sparsifier=MAGNITUDE, lambda_=True),
    MergeSpec("breadcrumbs", "Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795), then task "
              "arithmetic.", normalize=False, sparsifier=OUTLIERS, lambda_=True),
    MergeSpec("breadcrumbs_ties", "Model Breadcrumbs' mask (arXiv 2312.06795), then TIES sign election and "
              "disjoint merge (arXiv 2306.01708).", normalize=False, sparsifier=OUTLIERS, consensus=True,
              lambda_=True),
    MergeSpec("della", "DELLA-Merging (Deep et al. 2024, arXiv 2406.11617): MagPrune, elect sign, disjoint "
              "merge, scale.", normalize=True, sparsifier=DELLA, consensus=True, lambda_=True),
    MergeSpec("della_linear", "DELLA's MagPrune (arXiv 2406.11617) without sign election: "
              "`d = lambda_ * sum_i w_i m_i d_i / p_i`.", normalize=False, sparsifier=DELLA, lambda_=True),
    MergeSpec("sign_consensus", "TIES' sign election and disjoint merge (arXiv 2306.01708) on untrimmed deltas, "
              "summed as in task arithmetic.", normalize=False, consensus=True, lambda_=True),
    MergeSpec("slerp", "Spherical interpolation of the two full weights (Shoemake 1985, Animating Rotation with "
              "Quaternion Curves).", normalize=False, family=False, params=("t",), needs_base=True,
              reference=False, min_models=2, max_models=2),
    MergeSpec("model_stock", "Model Stock (Jang et al. 2024, arXiv 2403.19522): move the average toward the base "
              "by the angle.", normalize=False, family=False, min_models=2),
)}

SIGN_MODES = ("total", "count")
#: method keywords beyond density/normalize/majority_sign/rescale, with mergekit's defaults
PARAM_DEFAULTS: dict[str, float] = {"gamma": 0.01, "epsilon": 0.15, "lambda_": 1.0, "t": 0.5}


def get_method(name: str) -> MergeSpec:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise PaftError(f"unknown merge method {name!r}; known: {', '.join(MERGE_METHODS)}") from None


def densities(density: float | Sequence[float], n_deltas: int) -> list[float]:
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
                     **unknown: object) -> MergeSpec:
    """Validate everything except the tensors, so a merge can fail before reading any; returns the spec.

    Method keywords are range-checked for every method; the checks that couple
    them with ``density`` (``gamma``, ``epsilon``) apply only to the methods
    whose sparsifier reads them, and only when ``density < 1`` (at density 1
    those keep every entry, as in mergekit).
    """
    if unknown:
        raise PaftError(f"unknown merge parameter {next(iter(unknown))!r}; known: normalize, majority_sign, "
                        f"{', '.join(PARAM_DEFAULTS)}, rescale")
    spec = get_method(method)
    if n_deltas == 0:
        raise PaftError("nothing to merge: no deltas given")
    if len(weights) != n_deltas:
        raise PaftError(f"got {len(weights)} weights for {n_deltas} deltas; give one weight per branch")
    per_delta = densities(density, n_deltas)
    for p in per_delta:
        if not 0.0 < p <= 1.0:
            raise PaftError(f"density must be in (0, 1], got {p}")
    if not isinstance(rescale, bool):
        raise PaftError(f"rescale must be true or false, got {rescale!r}")
    if majority_sign not in SIGN_MODES:
        raise PaftError(f"majority_sign must be one of {', '.join(SIGN_MODES)}, got {majority_sign!r}")
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
    for p in per_delta:
        if "gamma" in spec.uses and p < 1.0 and p + gamma > 1.0 + 1e-12:
            raise PaftError(f"gamma + density must be <= 1 (gamma drops the largest entries, density keeps the "
                            f"next ones), got gamma {gamma} + density {p}")
        if "epsilon" in spec.uses and p < 1.0 and not (p - epsilon > 0.0 and p + epsilon <= 1.0 + 1e-12):
            raise PaftError(f"epsilon must keep density +/- epsilon in (0, 1], got density {p} and "
                            f"epsilon {epsilon}")
    if not rescale and not spec.rescale:
        raise PaftError(f"rescale: false applies to {', '.join(n for n, s in MERGE_METHODS.items() if s.rescale)} "
                        f"only, not {method}")
    if spec.max_models is not None and spec.max_models == spec.min_models and n_deltas != spec.min_models:
        raise PaftError(f"{method} interpolates exactly {spec.min_models} models, got {n_deltas}")
    if n_deltas < spec.min_models:
        raise PaftError(f"{method} needs at least {spec.min_models} fine-tuned models, got {n_deltas}")
    return spec
