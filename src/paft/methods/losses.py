"""Preference losses, registered by name.

Each loss is one small function of the sequence log-probabilities of a batch, with
its equation and paper in the docstring, returning the per-example loss (shape [B];
the caller takes ``.mean()``). ``LossSpec.data`` says what a batch holds: ``"pairs"``
(``PairLogps``: chosen and rejected reply per prompt), ``"binary"`` (``UnpairedLogps``:
unpaired completions labelled desirable/undesirable, plus the mismatched "KL" rows),
``"negatives"`` (``UnpairedLogps`` of undesirable completions only) or ``"ranked"``
(``RankedLogps``: a scored list of replies per prompt; lists of different lengths are
padded to [B, K] and masked), ``"online"`` (pairs each round samples and scores) or ``"groups"``
(``RankedLogps`` of the K replies each online round samples per prompt, ``scores`` = rewards). It is
called as ``spec.fn(lp, beta=beta, **kwargs)`` with ``kwargs, schedule = spec.configure(params)``:
``beta`` always comes from the config (``preference.beta``), the other hyper-parameters from the
registry defaults, overridden by ``preference.params`` (those the schedule owns, e.g. sDPO's
``stages``, go to ``LossSpec.schedule``, ``paft.methods.schedules``).

Notation: h(y) = log pi_theta(y|x) - log pi_ref(y|x); y_w chosen, y_l rejected;
Delta = h(y_w) - h(y_l); log pi(y) is the log-prob *summed* over the completion
tokens, |y| the number of completion tokens; sigma the logistic function.

Numerics: every ``log sigma`` is ``F.logsigmoid`` (= -softplus(-x)), so margins of
+-1e4 give finite losses and gradients; the one exponential (GPO ``exponential``)
continues linearly past exp(20); ORPO's log(1 - p) uses a two-branch log1mexp; PRO's
softmax is a masked ``logsumexp``. Padded list entries never reach a loss value or gradient
(they are selected away with ``torch.where``, not multiplied by 0).

Registered (name: reference? defaults):

- ``dpo``: ref; -
- ``ipo``: ref; length_normalize=False (paper: summed log-probs; True = TRL's default)
- ``cdpo``: ref; eps=0.1
- ``rdpo``: ref; eps=0.1 (robust DPO; eps < 0.5)
- ``hinge``: ref; - (TRL's ``hinge``: max(0, 1 - beta Delta))
- ``slic``: free; delta=1.0, lam=0.5 (``beta`` unused)
- ``orpo``: free; - (``beta`` IS the odds-ratio weight lambda, as in TRL's ORPOConfig)
- ``simpo``: free; gamma_beta_ratio=0.5 (paper beta 2.0)
- ``cpo``: free; alpha=1.0 (weight of the mean-token NLL, TRL's ``cpo_alpha``)
- ``r-dpo``: ref; alpha=0.01 (length-regularised DPO, Park et al.)
- ``dpop``: ref; lam=50.0
- ``beta-dpo``: ref; alpha=0.6, m0=0.0, n_sigma=2.0
- ``gpo``: ref; f="logistic" (logistic, squared, hinge, exponential, truncated_quadratic, savage)
- ``kto``: ref, data "binary"; desirable_weight=1.0, undesirable_weight=1.0
- ``npo``: ref, data "negatives"; -
- ``dro``: ref, data "rewarded" (prompt, reply, reward); - (value = detached batch mean, not the paper's
  per-prompt V(x); batches of >= 2 rows)
- ``rrhf``: free, data "ranked"; sft_weight=1.0 (``beta`` unused)
- ``pro``: free, data "ranked"; sft_weight=0.05 (times (n - 1)^2), score_temperature=True (``beta`` unused)
- ``lipo``: ref, data "ranked"; - (LiPO-lambda)
- ``tdpo``: ref, token-level; alpha=0.5, variant=2 (TDPO2; the sequential KL over full distributions)
- ``sdpo``: ref, staged; stages=2 (DPO per stage)
- ``iterative-dpo``, ``self-rewarding``: ref, online; loss="sigmoid"
- ``rso``: ref, online; loss="hinge", rso_beta=0.5, candidates=8, keep=4
- ``rloo``: ref, data "groups" (online), ratio; epsilon=0.2, candidates (KL in the reward)
- ``grpo``: ref, data "groups" (online), token-level, ratio; epsilon=0.2, candidates (paper beta 0.04)
- ``sppo``: ref (the previous round), data "groups" (online); candidates (eta = 1/beta)
- ``ppo``: ref, data "groups" (online), token-level, value head, ratio; epsilon=0.2, gamma=1.0, lam=0.95,
  vf_coef=0.1, value_clip=0.2, candidates (no ptx term)

(``candidates``: replies sampled per prompt, default None = ``preference.online.samples_per_prompt``.)

Note ``rdpo`` (robust DPO, Chowdhury et al.) and ``r-dpo`` (length-regularised DPO,
Park et al.) are different methods; the names follow the literature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from paft.errors import ConfigError, DataError
from paft.methods.schedules import Group, Online, RejectionSampling, Schedule, Staged


@dataclass
class PairLogps:
    """Summed completion log-probs of a batch of pairs (shape [B] each)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None  # completion lengths, for length-aware losses
    rejected_tokens: torch.Tensor | None = None
    # sequential KL sum_t KL(pi_ref(.|x, y<t) || pi_theta(.|x, y<t)) over each reply, for token-level losses
    # (``LossSpec.token_level``: TDPO); carries the policy's gradient
    seq_kl_chosen: torch.Tensor | None = None
    seq_kl_rejected: torch.Tensor | None = None

    def margin(self) -> torch.Tensor:
        """Delta = h(y_w) - h(y_l)."""
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


@dataclass
class UnpairedLogps:
    """Summed completion log-probs of a batch of unpaired completions (shape [B] each).

    ``labels`` is True for a desirable completion, False for an undesirable one. ``policy_kl`` /
    ``ref_kl`` are the log-probs of the mismatched rows (completion i under prompt i+1 mod B), from
    which KTO estimates the KL term; ``tokens`` the completion lengths.
    """

    policy: torch.Tensor
    labels: torch.Tensor
    ref: torch.Tensor | None = None
    policy_kl: torch.Tensor | None = None
    ref_kl: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    rewards: torch.Tensor | None = None  # each completion's scalar reward (data kind "rewarded": DRO)

    def logratio(self) -> torch.Tensor:
        """h(y) = log pi_theta(y|x) - log pi_ref(y|x)."""
        return self.policy - self.ref


@dataclass
class RankedLogps:
    """Summed completion log-probs of a batch of scored reply lists, shape [B, K] each.

    Row b holds the replies to prompt b; K is the longest list of the batch and ``mask`` is
    True for real entries (a shorter list is padded at the end; padded entries may hold any
    finite value and are ignored). ``scores`` are the data's preference scores, higher =
    better (ties allowed); ``tokens`` the completion lengths; ``ref`` the reference log-probs.
    """

    policy: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    # per-token log-probs, [B, K, T] right-padded (0 past each reply's end), for token-level losses
    # (``LossSpec.token_level``): the policy's, the reference's, and True on the real reply tokens
    policy_tokens: torch.Tensor | None = None
    ref_tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    values: torch.Tensor | None = None  # [B, K, T] the value head's V(s_t) (``LossSpec.value_head``: PPO)
    # the sampling policy pi_old of an online round, frozen before the round trained (``LossSpec.ratio``): summed
    # log-probs [B, K], per-token [B, K, T] (token-level losses) and PPO's V_old [B, K, T]; None: the current
    # policy, detached (a single step on fresh samples)
    old: torch.Tensor | None = None
    old_tokens: torch.Tensor | None = None
    old_values: torch.Tensor | None = None


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    data: str  # "pairs", "binary", "negatives", "ranked", "online" or "groups" (paft.data.formats.DATA_KINDS)
    reference: bool
    paper: str
    defaults: dict[str, Any] = field(default_factory=dict)
    # beta the paper recommends, as a hint only: the loss always receives ``preference.beta``
    # (whose default, 0.1, is DPO's). None where the paper uses no beta or no single value.
    paper_beta: float | None = None
    # how training proceeds (paft.methods.schedules): offline, staged (sDPO) or online rounds
    schedule: Schedule = Schedule()
    # the loss reads per-token quantities, not only per-reply sums: per-token log-probs of policy and reference
    # for groups (GRPO), the sequential KL to the reference over each reply for pairs (TDPO)
    token_level: bool = False
    # the policy carries a trained scalar value head (PPO's critic) read at every reply token
    value_head: bool = False
    # the loss has PPO's ratio pi_theta / pi_old: each online round snapshots its sampling policy (RLOO, GRPO, PPO)
    ratio: bool = False

    @property
    def params(self) -> dict[str, Any]:
        """Every hyper-parameter ``preference.params`` can set: the loss's and the schedule's, with defaults."""
        return {**self.defaults, **self.schedule.params}

    def configure(self, params: dict[str, Any]) -> tuple[dict[str, Any], Schedule]:
        """(the loss's keyword arguments, the schedule) for the user's ``preference.params``."""
        schedule, rest = self.schedule.with_params(params)
        return {**self.defaults, **rest}, schedule


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, data: str, reference: bool, paper: str, paper_beta: float | None = None,
                  schedule: Schedule = Schedule(), token_level: bool = False, value_head: bool = False,
                  ratio: bool = False, **defaults: Any):
    def deco(fn):
        LOSSES[name] = LossSpec(name, fn, data, reference, paper, dict(defaults), paper_beta, schedule, token_level,
                                value_head, ratio)
        return fn

    return deco


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preference method {name!r}; known: {', '.join(sorted(LOSSES))}") from None


class LossParamError(ConfigError, ValueError):
    """A preference-loss hyper-parameter out of range (a ``ValueError`` and a ``ConfigError``)."""


# ---------------------------------------------------------------------------------------------
# helpers


def _need_ref(lp: PairLogps, method: str) -> None:
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError(f"{method} needs reference log-probs (ref_chosen / ref_rejected)")


def _lengths(lp: PairLogps, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion token counts |y_w|, |y_l| (at least 1), in the dtype of the log-probs."""
    if lp.chosen_tokens is None or lp.rejected_tokens is None:
        raise ValueError(f"{method} needs completion token counts (chosen_tokens / rejected_tokens)")
    dt = lp.policy_chosen.dtype
    return lp.chosen_tokens.to(dt).clamp(min=1), lp.rejected_tokens.to(dt).clamp(min=1)


def _check_eps(eps: float, method: str, *, hi: float, hi_ok: bool) -> None:
    ok = 0.0 <= eps and (eps <= hi if hi_ok else eps < hi)
    if not ok:
        raise LossParamError(f"{method}: parameter 'eps' must be in [0, {hi}{']' if hi_ok else ')'}; got {eps}")


_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012).

    Each branch sees only inputs in its own range, so neither produces inf/NaN that a
    ``torch.where`` would pass into the backward pass.
    """
    lo = torch.clamp(x, max=-_LN2)  # x <= -ln2: log1p(-exp(x))
    hi = torch.clamp(x, min=-_LN2)  # -ln2 < x < 0: log(-expm1(x))
    return torch.where(x <= -_LN2, torch.log1p(-torch.exp(lo)), torch.log(-torch.expm1(hi)))


# ---------------------------------------------------------------------------------------------
# reference-based losses


@register_loss("dpo", data="pairs", reference=True,
               paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290)")
def dpo_loss(lp: PairLogps, beta: float) -> torch.Tensor:
    """DPO (sigmoid): L = -log sigma(beta * (h(y_w) - h(y_l))).

    ``logsigmoid`` keeps very large margins finite (no exp overflow).
    """
    return -F.logsigmoid(beta * lp.margin())


@register_loss("ipo", data="pairs", reference=True,
               paper="Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, A General Theoretical Paradigm "
                     "to Understand Learning from Human Preferences (arXiv 2310.12036)",
               length_normalize=False)
def ipo_loss(lp: PairLogps, beta: float, length_normalize: bool = False) -> torch.Tensor:
    """IPO: L = (h(y_w) - h(y_l) - 1/(2 beta))^2, with beta the paper's tau (Eq. 17).

    paft follows the paper's equation: h is built from log-probs *summed* over the
    completion, so the target margin 1/(2 beta) is per sequence and the loss grows with
    length. TRL's ``DPOTrainer(loss_type="ipo")`` instead divides each log-ratio by its
    completion length (h(y)/|y|, an average per token; TRL notes the IPO authors
    confirmed this form). ``length_normalize=True`` does the same, which reproduces TRL:
    ``preference.params: {length_normalize: true}`` (needs the token counts).
    """
    hw = lp.policy_chosen - lp.ref_chosen
    hl = lp.policy_rejected - lp.ref_rejected
    if length_normalize:
        nw, nl = _lengths(lp, "ipo(length_normalize=True)")
        hw, hl = hw / nw, hl / nl
    return (hw - hl - 1.0 / (2.0 * beta)) ** 2


@register_loss("cdpo", data="pairs", reference=True,
               paper="Mitchell 2023, A note on DPO with noisy preferences & relationship to IPO (technical note, "
                     "no arXiv id); conservative DPO = DPO with label smoothing",
               eps=0.1)
def cdpo_loss(lp: PairLogps, beta: float, eps: float = 0.1) -> torch.Tensor:
    """Conservative DPO (label smoothing eps):
    L = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta).

    The expected DPO loss when each label is flipped with probability eps; minimised at a
    finite margin (sigma(beta Delta) = 1 - eps). Same formula as ``label_smoothing`` in TRL's
    CPO/older DPO sigmoid loss. ``eps`` in [0, 0.5]; 0 is DPO.
    """
    _check_eps(eps, "cdpo", hi=0.5, hi_ok=True)
    z = beta * lp.margin()
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_loss("rdpo", data="pairs", reference=True,
               paper="Chowdhury, Kini, Natarajan 2024, Provably Robust DPO: Aligning Language Models with Noisy "
                     "Feedback (arXiv 2403.00409)",
               eps=0.1)
def rdpo_loss(lp: PairLogps, beta: float, eps: float = 0.1) -> torch.Tensor:
    """Robust DPO (noise rate eps):
    L = [(1 - eps)(-log sigma(beta Delta)) - eps(-log sigma(-beta Delta))] / (1 - 2 eps).

    An unbiased estimate of the clean DPO loss under labels flipped with probability eps;
    it is unbounded below as Delta -> +inf (slope -eps beta/(1 - 2 eps)), by design.
    Equals TRL's ``loss_type="robust"`` with ``label_smoothing=eps``. ``eps`` in [0, 0.5).
    """
    _check_eps(eps, "rdpo", hi=0.5, hi_ok=False)
    z = beta * lp.margin()
    return ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register_loss("hinge", data="pairs", reference=True,
               paper="Liu et al. 2023, Statistical Rejection Sampling Improves Preference Optimization "
                     "(arXiv 2309.06657), hinge-norm: the SLiC-HF hinge (Zhao et al. 2023, arXiv 2305.10425) on "
                     "DPO's implicit reward; TRL loss_type='hinge'")
def hinge_loss(lp: PairLogps, beta: float) -> torch.Tensor:
    """Hinge on the implicit reward: L = max(0, 1 - beta Delta).

    SLiC's calibration hinge with the reference-normalised log-ratio in place of raw
    log-probs (1/beta is the margin in Delta units). Identical to TRL's ``hinge``.
    """
    return torch.relu(1.0 - beta * lp.margin())


@register_loss("r-dpo", data="pairs", reference=True,
               paper="Park, Rafailov, Ermon, Finn 2024, Disentangling Length from Quality in Direct Preference "
                     "Optimization (arXiv 2403.19159)",
               alpha=0.01)
def length_regularized_dpo_loss(lp: PairLogps, beta: float, alpha: float = 0.01) -> torch.Tensor:
    """R-DPO (length-regularised DPO):
    L = -log sigma(beta h(y_w) - beta h(y_l) - alpha (|y_w| - |y_l|)).

    A chosen reply longer than the rejected one must earn alpha per extra token of
    implicit reward. The paper tunes alpha per dataset; the default 0.01 is a small
    value of that order, not a universal setting. alpha = 0 is DPO.
    """
    _need_ref(lp, "r-dpo")
    nw, nl = _lengths(lp, "r-dpo")
    return -F.logsigmoid(beta * lp.margin() - alpha * (nw - nl))


@register_loss("dpop", data="pairs", reference=True,
               paper="Pal, Karkhanis, Dooley, Roberts, Naidu, White 2024, Smaug: Fixing Failure Modes of "
                     "Preference Optimisation with DPO-Positive (arXiv 2402.13228)",
               lam=50.0)
def dpop_loss(lp: PairLogps, beta: float, lam: float = 50.0) -> torch.Tensor:
    """DPO-Positive (Smaug):
    L = -log sigma(beta [h(y_w) - h(y_l) - lam max(0, log pi_ref(y_w) - log pi(y_w))]).

    The penalty is active only when the policy's likelihood of the chosen reply falls
    below the reference's, which plain DPO allows; lam = 50 as in the paper.
    """
    _need_ref(lp, "dpop")
    penalty = torch.relu(lp.ref_chosen - lp.policy_chosen)
    return -F.logsigmoid(beta * (lp.margin() - lam * penalty))


@register_loss("beta-dpo", data="pairs", reference=True,
               paper="Wu, Xie, Yang, Wu, Gao, Ding, Wang, He 2024, beta-DPO: Direct Preference Optimization with "
                     "Dynamic beta (arXiv 2407.08639)",
               alpha=0.6, m0=0.0, n_sigma=2.0)
def beta_dpo_loss(lp: PairLogps, beta: float, alpha: float = 0.6, m0: float = 0.0,
                  n_sigma: float = 2.0) -> torch.Tensor:
    """beta-DPO: DPO with a batch-adaptive beta and margin-outlier filtering.

    M_i = h(y_w) - h(y_l) (the per-pair implicit margin, unscaled, as in the authors' code);
    kept_i = |M_i - mean_B(M)| <= n_sigma * std_B(M)  (population std of the batch);
    beta_B = max(1e-3, beta [1 + alpha (mean_{kept} M - m0)]), detached (no gradient);
    L_i = kept_i * B / n_kept * (-log sigma(beta_B Delta_i)),
    so the caller's ``.mean()`` averages over the kept pairs only.

    Simplifications, stated: the paper/code keep M0 (and sigma) as running averages of past
    batches (momentum 0.9) and drop a fixed 20 % of pairs by sampling without replacement
    with Gaussian weights exp(-(M - M0)^2 / 2 sigma^2); paft is state-free and deterministic:
    M0 is the constant ``m0`` (default 0) and pairs beyond ``n_sigma`` batch standard
    deviations of the batch mean are dropped (none are when all margins are equal, and with
    n_sigma = 2 none can be in a batch of 5 pairs or fewer). ``alpha`` = 0.6 is the value of
    the authors' README example; ``n_sigma = inf`` disables filtering; alpha = 0 with no
    filtering is DPO.
    """
    delta = lp.margin()
    m = delta.detach()
    keep = (m - m.mean()).abs() <= n_sigma * m.std(correction=0)
    keep = keep | ~keep.any()  # rounding with all-equal margins must not drop every pair
    keep_f = keep.to(delta.dtype)
    n_kept = keep_f.sum()
    m_batch = (m * keep_f).sum() / n_kept
    beta_b = (beta * (1.0 + alpha * (m_batch - m0))).clamp(min=1e-3).detach()
    return keep_f * (keep.numel() / n_kept) * -F.logsigmoid(beta_b * delta)


_EXP_CAP = 20.0


def _exp_linear(x: torch.Tensor) -> torch.Tensor:
    """exp(x) up to x = 20, then its tangent line: convex, C1, finite for any finite x."""
    capped = torch.clamp(x, max=_EXP_CAP)
    return torch.where(x <= _EXP_CAP, torch.exp(capped), math.exp(_EXP_CAP) * (1.0 + x - _EXP_CAP))


GPO_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logistic": lambda r: -F.logsigmoid(r),  # log(1 + e^-r): DPO
    "squared": lambda r: (r - 1.0) ** 2,  # IPO up to scale, see gpo_loss
    "hinge": lambda r: torch.relu(1.0 - r),  # SLiC / TRL hinge
    "exponential": lambda r: _exp_linear(-r),  # e^-r
    "truncated_quadratic": lambda r: torch.relu(1.0 - r) ** 2,  # max(0, 1 - r)^2
    "savage": lambda r: torch.exp(2.0 * F.logsigmoid(-r)),  # 1 / (1 + e^r)^2
}


@register_loss("gpo", data="pairs", reference=True,
               paper="Tang, Guo, Zheng, Calandriello, Munos, Rowland, Richemond, Valko, Avila Pires, Piot 2024, "
                     "Generalized Preference Optimization: A Unified Approach to Offline Alignment (arXiv 2402.05749)",
               f="logistic")
def gpo_loss(lp: PairLogps, beta: float, f: str = "logistic") -> torch.Tensor:
    """GPO: L = f(beta Delta) for a convex f (``f`` by name), rho = beta Delta:

    - logistic: log(1 + e^-rho)  -> exactly ``dpo``
    - squared: (rho - 1)^2  -> IPO: gpo(squared, beta = 2 tau) = 4 tau^2 * ipo(tau), i.e.
      (2 tau Delta - 1)^2 = 4 tau^2 (Delta - 1/(2 tau))^2: same minimiser and gradient
      direction, a constant scale (which Adam all but ignores)
    - hinge: max(0, 1 - rho)  -> exactly ``hinge`` (SLiC form)
    - exponential: e^-rho, continued linearly beyond e^20 so it stays finite
    - truncated_quadratic: max(0, 1 - rho)^2
    - savage: 1 / (1 + e^rho)^2 (computed as exp(2 log sigma(-rho)))
    """
    fn = GPO_FUNCTIONS.get(f)
    if fn is None:
        raise LossParamError(f"gpo: unknown parameter f={f!r}; known: {', '.join(GPO_FUNCTIONS)}")
    return fn(beta * lp.margin())


@register_loss("tdpo", data="pairs", reference=True, token_level=True,
               paper="Zeng, Liu, Ma, Yang, Zhang, Wang 2024, Token-level Direct Preference Optimization "
                     "(arXiv 2404.11999)",
               alpha=0.5, variant=2)
def tdpo_loss(lp: PairLogps, beta: float, alpha: float = 0.5, variant: int = 2) -> torch.Tensor:
    """TDPO: DPO's margin corrected by the sequential KL divergence of each reply,
    u = h(y_w) - h(y_l),   D(y) = sum_t KL(pi_ref(.|x, y<t) || pi_theta(.|x, y<t))  (full next-token distributions),
    TDPO1 (``variant: 1``): L = -log sigma(beta [u - (D(y_l) - D(y_w))]),
    TDPO2 (``variant: 2``, the paper's recommended one): L = -log sigma(beta [u - alpha (D(y_l) - sg(D(y_w)))]),

    sg = stop-gradient. alpha = 0.5 is the paper's and the authors' code's default. D needs the reference's
    whole next-token distribution at each reply position, which no cache can hold: TDPO runs the
    adapter-disabled forward every step (the reference sums still come from it, not the cache).
    """
    _need_ref(lp, "tdpo")
    if lp.seq_kl_chosen is None or lp.seq_kl_rejected is None:
        raise ValueError("tdpo needs the sequential KL of each reply (seq_kl_chosen / seq_kl_rejected)")
    if variant not in (1, 2):
        raise LossParamError(f"tdpo: parameter 'variant' must be 1 or 2; got {variant!r}")
    if variant == 1:
        kl_term = lp.seq_kl_rejected - lp.seq_kl_chosen
    else:
        kl_term = alpha * (lp.seq_kl_rejected - lp.seq_kl_chosen.detach())
    return -F.logsigmoid(beta * (lp.margin() - kl_term))


# ---------------------------------------------------------------------------------------------
# reference-free losses


@register_loss("slic", data="pairs", reference=False,
               paper="Zhao, Joshi, Liu, Khalman, Saleh, Liu 2023, SLiC-HF: Sequence Likelihood Calibration with "
                     "Human Feedback (arXiv 2305.10425)",
               delta=1.0, lam=0.5)
def slic_loss(lp: PairLogps, beta: float, delta: float = 1.0, lam: float = 0.5) -> torch.Tensor:
    """SLiC-HF (calibration + regulariser), reference-free:
    L = max(0, delta - log pi(y_w) + log pi(y_l)) - lam log pi(y_w).

    Summed sequence log-probs, as in the paper; the regulariser target y_ref is the chosen
    reply (SLiC-HF-direct on pairs), so its term is the summed NLL of y_w. ``beta`` is not
    used (the margin is ``delta``). delta = 1.0 is the paper's margin; lam = 0.5 is paft's
    choice of regulariser weight (the paper tunes it). The reference-based form of the same
    hinge (TRL's ``hinge``) is registered as ``hinge``.
    """
    return torch.relu(delta - lp.policy_chosen + lp.policy_rejected) - lam * lp.policy_chosen


@register_loss("orpo", data="pairs", reference=False,
               paper="Hong, Lee, Thorne 2024, ORPO: Monolithic Preference Optimization without Reference Model "
                     "(arXiv 2403.07691)",
               paper_beta=0.1)
def orpo_loss(lp: PairLogps, beta: float) -> torch.Tensor:
    """ORPO: L = NLL(y_w) - lambda log sigma(log odds(y_w) - log odds(y_l)), lambda = ``beta``.

    p(y) = exp(log pi(y) / |y|) (length-normalised likelihood), log odds(y) = log p - log(1 - p)
    with log(1 - p) = log1mexp(log p); NLL(y_w) = -log pi(y_w)/|y_w|, the mean token NLL of the
    chosen completion. ``beta`` is ORPO's lambda, as TRL's ORPOConfig.beta is (paper and
    TRL default 0.1, which is also paft's default ``preference.beta``).

    Differs from TRL's ORPOTrainer in the NLL term only: TRL's cross-entropy covers the prompt
    tokens too and averages all chosen tokens of the batch together; paft's covers the
    completion (the paper's L_SFT on y_w) and averages per pair. They agree when the prompt
    contributes no predicted token and the chosen completions have equal lengths.
    """
    nw, nl = _lengths(lp, "orpo")
    aw = lp.policy_chosen / nw
    al = lp.policy_rejected / nl
    # p = 1 exactly (log p = 0) would make log(1 - p) = -inf; such a reply is already at maximum likelihood
    aw_, al_ = aw.clamp(max=-1e-7), al.clamp(max=-1e-7)
    log_odds = (aw_ - al_) - (log1mexp(aw_) - log1mexp(al_))
    return -aw - beta * F.logsigmoid(log_odds)


@register_loss("simpo", data="pairs", reference=False,
               paper="Meng, Xia, Chen 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward "
                     "(arXiv 2405.14734)",
               paper_beta=2.0, gamma_beta_ratio=0.5)
def simpo_loss(lp: PairLogps, beta: float, gamma_beta_ratio: float = 0.5) -> torch.Tensor:
    """SimPO: L = -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma),
    gamma = gamma_beta_ratio * beta.

    The target margin is set as a ratio of beta, like the authors' own trainer
    (``gamma_beta_ratio``; 0.5 with beta = 2.0, i.e. gamma = 1.0, one of the paper's settings),
    so it scales with whatever ``preference.beta`` is (the config default 0.1 is DPO's; set
    beta to about 2.0 for SimPO). TRL's CPOTrainer(loss_type="simpo") takes gamma itself as
    ``simpo_gamma``: TRL's (beta, simpo_gamma) = paft's (beta, gamma_beta_ratio = simpo_gamma/beta)
    with TRL's ``cpo_alpha=0`` (pure SimPO; TRL adds a CPO NLL term otherwise).
    """
    nw, nl = _lengths(lp, "simpo")
    z = beta * (lp.policy_chosen / nw - lp.policy_rejected / nl) - gamma_beta_ratio * beta
    return -F.logsigmoid(z)


@register_loss("cpo", data="pairs", reference=False,
               paper="Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim 2024, Contrastive Preference "
                     "Optimization: Pushing the Boundaries of LLM Performance in Machine Translation "
                     "(arXiv 2401.08417)",
               paper_beta=0.1, alpha=1.0)
def cpo_loss(lp: PairLogps, beta: float, alpha: float = 1.0) -> torch.Tensor:
    """CPO: L = -log sigma(beta log pi(y_w) - beta log pi(y_l)) + alpha NLL(y_w).

    The preference term uses summed log-probs (as TRL's CPO sigmoid loss); NLL(y_w) =
    -log pi(y_w)/|y_w| is the mean token NLL of the chosen completion, as TRL uses (the
    paper writes -log pi(y_w)); alpha is TRL's ``cpo_alpha`` (default 1). TRL averages the
    NLL over all chosen tokens of the batch at once, paft per pair: equal for equal lengths.
    """
    nw, _ = _lengths(lp, "cpo")
    pref = -F.logsigmoid(beta * (lp.policy_chosen - lp.policy_rejected))
    return pref - alpha * lp.policy_chosen / nw


# ---------------------------------------------------------------------------------------------
# unpaired losses (UnpairedLogps)


def _need_unpaired_ref(lp: UnpairedLogps, method: str) -> None:
    if lp.ref is None:
        raise ValueError(f"{method} needs reference log-probs (ref)")


@register_loss("kto", data="binary", reference=True,
               paper="Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, KTO: Model Alignment as Prospect "
                     "Theoretic Optimization (arXiv 2402.01306)",
               paper_beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
def kto_loss(lp: UnpairedLogps, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Kahneman-Tversky optimisation), per completion y of prompt x:
    L = lambda_D (1 - sigma(beta (h(y) - z0)))  if y is desirable,
    L = lambda_U (1 - sigma(beta (z0 - h(y))))  if y is undesirable,
    z0 = max(0, mean_B(log pi_theta(y'|x') - log pi_ref(y'|x'))), detached,

    i.e. lambda_y - v(x, y) of the paper's Eq. 8; z0 is the batch estimate of KL(pi_theta || pi_ref)
    from the mismatched rows (each completion under another row's prompt, ``policy_kl``/``ref_kl``),
    clamped at 0 and without gradient, as in the paper and TRL's KTOTrainer. lambda_D = lambda_U = 1
    (``desirable_weight``/``undesirable_weight``) are the paper's and TRL's defaults; the paper
    advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are imbalanced. 1 - sigma(x)
    is computed as sigma(-x): bounded in [0, lambda], finite for any margin. Matches TRL 1.16's
    ``KTOTrainer(loss_type="kto")`` (its batch loss is the mean of these).
    """
    _need_unpaired_ref(lp, "kto")
    if lp.policy_kl is None or lp.ref_kl is None:
        raise ValueError("kto needs the log-probs of the mismatched KL rows (policy_kl / ref_kl)")
    z0 = (lp.policy_kl - lp.ref_kl).mean().clamp(min=0).detach()
    h = lp.logratio()
    desirable = desirable_weight * torch.sigmoid(-beta * (h - z0))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z0 - h))
    return torch.where(lp.labels.bool(), desirable, undesirable)


@register_loss("npo", data="negatives", reference=True,
               paper="Zhang, Lin, Bai, Mei 2024, Negative Preference Optimization: From Catastrophic Collapse to "
                     "Effective Unlearning (arXiv 2404.05868)",
               paper_beta=0.1)
def npo_loss(lp: UnpairedLogps, beta: float) -> torch.Tensor:
    """NPO, per undesirable completion y of prompt x:
    L = (2/beta) log(1 + (pi_theta(y|x) / pi_ref(y|x))^beta) = (2/beta) softplus(beta h(y))
      = -(2/beta) log sigma(-beta h(y)),

    DPO's loss with the chosen term dropped, scaled by 2/beta: it pushes the likelihood of the
    undesirable reply below the reference's, but its gradient fades (weight 2 sigma(beta h)) once the
    policy has moved away, avoiding gradient ascent's collapse (beta -> 0 is gradient ascent up to a
    constant). The paper's beta is 0.1; its retain-set term (NPO+RT) is not part of this loss. Every
    row must be undesirable (data kind "negatives"); ``softplus`` keeps large log-ratios finite.
    """
    _need_unpaired_ref(lp, "npo")
    if bool(lp.labels.any()):
        raise ValueError("npo trains on undesirable completions only; the batch has rows labelled desirable")
    return (2.0 / beta) * F.softplus(beta * lp.logratio())


@register_loss("dro", data="rewarded", reference=True,
               paper="Richemond, Tang, Guo, Calandriello, Azar, Rafailov, Avila Pires, Tarassov, Spangher, Ellsworth, "
                     "Severyn, Mallinson, Shani, Shamir, Joshi, Liu, Munos, Piot 2024, Offline Regularised "
                     "Reinforcement Learning for Large Language Models Alignment (arXiv 2405.19107)")
def dro_loss(lp: UnpairedLogps, beta: float) -> torch.Tensor:
    """DRO (direct reward optimisation), per single trajectory (x, y, r):
    L = 1/2 (r - V - tau h(y))^2,   tau = ``beta``,   V = sg(mean_B(r - tau h)),

    the paper's squared residual of the KL-regularised optimality condition r = V(x) + tau log(pi*/pi_ref).
    **A deviation from the paper**: its V(x) is a per-prompt value, learned by a separate value network;
    paft's V is one number for the whole batch, the batch mean of r - tau h, detached (the constant that
    minimises this loss), which is mis-specified wherever prompts differ in how much reward they allow: a
    hard prompt's replies are all pushed down, an easy prompt's all up. It keeps the adapter free of value
    parameters (PAFT merges it, the sequential baseline reuses it) and needs no state between steps; a
    per-prompt V would need several replies per prompt or a trained value network. A row alone has
    residual - V = 0 and trains nothing, so this data kind needs batches of at least 2 rows (a config
    error below, and an epoch's last, smaller batch is dropped). Its gradient is -tau (r - V - tau h)
    grad log pi(y): replies rewarded above the batch's value are pushed up until tau h(y) accounts for
    the excess.
    """
    _need_unpaired_ref(lp, "dro")
    if lp.rewards is None:
        raise ValueError("dro needs a reward per completion (rewards)")
    r = lp.rewards.to(lp.policy.dtype)
    residual = r - beta * lp.logratio()
    return 0.5 * (residual - residual.mean().detach()) ** 2


# ---------------------------------------------------------------------------------------------
# staged and online methods: a pairwise loss inside a multi-phase schedule (paft.methods.schedules;
# run by paft.train.phases and paft.train.online). The loss is the per-pair loss of each stage / round.


def pair_loss(lp: PairLogps, beta: float, loss: str = "sigmoid") -> torch.Tensor:
    """L = -log sigma(beta Delta) (``loss: sigmoid``, DPO's) or L = max(0, 1 - beta Delta) (``loss: hinge``)."""
    if loss == "sigmoid":
        return dpo_loss(lp, beta)
    if loss == "hinge":
        return hinge_loss(lp, beta)
    raise LossParamError(f"params.loss must be 'sigmoid' or 'hinge', got {loss!r}")


# sDPO: DPO over the data split into ``stages`` chunks trained in sequence, where stage t's pi_ref is the
# model after stage t-1 (stage 1: the start model).
register_loss("sdpo", data="pairs", reference=True, schedule=Staged(),
              paper="Kim et al. 2024, sDPO: Don't Use Your Data All at Once (arXiv 2403.19270)")(dpo_loss)
# Iterative (online) DPO: each round samples replies from the current policy, scores them, pairs best vs worst.
register_loss("iterative-dpo", data="online", reference=True, schedule=Online(),
              paper="Xiong et al. 2024, Iterative Preference Learning from Human Feedback (arXiv 2312.11456); "
                    "Xu et al. 2023 (arXiv 2312.16682)", loss="sigmoid")(pair_loss)
# RSO: candidates from the start (SFT) policy, some accepted by rejection sampling towards pi_sft exp(r / rso_beta),
# pairs among the accepted, the normalised hinge loss (the paper's best variant; ``loss: sigmoid`` gives DPO's).
register_loss("rso", data="online", reference=True, schedule=Online(sample_from="start", selection=RejectionSampling()),
              paper="Liu et al. 2024, Statistical Rejection Sampling Improves Preference Optimization "
                    "(arXiv 2309.06657)", loss="hinge")(pair_loss)
# Self-rewarding: the policy rates its own samples as an LLM judge (expected 1-5 rating,
# ``paft.scoring.JudgeScorer``); round t's reference is the model after round t-1 (M_t -> M_{t+1}).
register_loss("self-rewarding", data="online", reference=True,
              schedule=Online(reference="previous", scorer="self_judge"),
              paper="Yuan et al. 2024, Self-Rewarding Language Models (arXiv 2401.10020)", loss="sigmoid")(pair_loss)


# ---------------------------------------------------------------------------------------------
# listwise losses (RankedLogps)
#
# Notation: list entries i, j of one prompt; psi_i the data's score (higher = better);
# p_i = log pi(y_i) / |y_i| the length-normalised log-prob. Pairs run over real entries only;
# tied scores form no pair.


def _ranked_lengths(lp: RankedLogps, method: str) -> torch.Tensor:
    if lp.tokens is None:
        raise ValueError(f"{method} needs completion token counts (tokens)")
    return lp.tokens.to(lp.policy.dtype).clamp(min=1)


def _strictly_better(lp: RankedLogps) -> torch.Tensor:
    """[B, K, K] bool: entry a is a real entry scored strictly above real entry b (index [b, a, b])."""
    m = lp.mask.bool()
    return m[:, :, None] & m[:, None, :] & (lp.scores[:, :, None] > lp.scores[:, None, :])


def _best(lp: RankedLogps, values: torch.Tensor) -> torch.Tensor:
    """``values`` at each list's top-scored real entry (the first one in list order on a tie), [B]."""
    key = torch.where(lp.mask.bool(), lp.scores, torch.full_like(lp.scores, -math.inf))
    return values.gather(1, key.argmax(dim=1, keepdim=True)).squeeze(1)


@register_loss("rrhf", data="ranked", reference=False,
               paper="Yuan, Yuan, Tan, Wang, Huang, Huang 2023, RRHF: Rank Responses to Align Language Models "
                     "with Human Feedback without tears (arXiv 2304.05302)",
               sft_weight=1.0)
def rrhf_loss(lp: RankedLogps, beta: float, sft_weight: float = 1.0) -> torch.Tensor:
    """RRHF, per list: L = sum_{psi_i < psi_j} max(0, p_i - p_j) + sft_weight * NLL(y_best),

    p_i = log pi(y_i)/|y_i| (the paper's length-normalised score), NLL(y_best) = -p_best, the
    mean-token NLL of the top-scored reply (the first one in list order on a tie). The paper
    writes L = L_rank + L_ft (weight 1, the authors' train.sh ``--rrhf_weight 1``) with L_ft
    summed over tokens; its code averages the best reply's token log-probs, as paft does, so
    both terms are per-token quantities. Reference-free; ``beta`` is not used. Tied scores form
    no pair; a list whose scores are all equal trains on its NLL term only.
    """
    p = lp.policy / _ranked_lengths(lp, "rrhf")
    worse_than = _strictly_better(lp).transpose(1, 2)  # [b, i, j]: psi_i < psi_j
    hinge = torch.relu(p[:, :, None] - p[:, None, :])
    rank = torch.where(worse_than, hinge, torch.zeros_like(hinge)).sum(dim=(1, 2))
    return rank - sft_weight * _best(lp, p)


@register_loss("pro", data="ranked", reference=False,
               paper="Song, Yu, Li, Yu, Huang, Li, Wang 2023, Preference Ranking Optimization for Human "
                     "Alignment (arXiv 2306.17492)",
               sft_weight=0.05, score_temperature=True)
def pro_loss(lp: RankedLogps, beta: float, sft_weight: float = 0.05, score_temperature: bool = True) -> torch.Tensor:
    """PRO (Plackett-Luce over the ranked list), per list of n replies sorted best first:
    L = -sum_{k=1}^{n-1} log[exp(p_k t_kk) / (exp(p_k t_kk) + sum_{i>k} exp(p_i t_ki))]
        + sft_weight (n - 1)^2 NLL(y_1),

    p = log pi(y)/|y| (length-normalised). With ``score_temperature`` (the paper's full method,
    Eq. 7, and the authors' code) t_ki = 1/T_k^i = psi_k - psi_i and t_kk = max_{i>k} t_ki, so a
    reply far below y_k is pushed down harder; without it t = 1 (plain Plackett-Luce, Eq. 5).
    NLL(y_1) = -log pi(y_1), the *summed* NLL of the top-scored reply, weighted
    beta_SFT = 0.05 (n - 1)^2 as in the paper and its ``--sft_weight 0.05`` (paft's n is each
    list's own length). Ties: the candidates of step k are y_k and the replies scored strictly
    below it, so tied replies never compete (identical to the paper for strict rankings;
    the authors' code would give a tie t = 0). Computed with ``logsumexp``; reference-free,
    ``beta`` is not used.
    """
    p = lp.policy / _ranked_lengths(lp, "pro")
    below = _strictly_better(lp)  # [b, k, i]: psi_k > psi_i
    if score_temperature:
        t = torch.where(below, lp.scores[:, :, None] - lp.scores[:, None, :], torch.zeros_like(below, dtype=p.dtype))
    else:
        t = below.to(p.dtype)
    t = t.to(p.dtype)
    own = p * t.amax(dim=2)  # p_k t_kk
    others = torch.where(below, p[:, None, :] * t, torch.full_like(t, -math.inf))
    step = torch.logsumexp(torch.cat([own[:, :, None], others], dim=2), dim=2) - own
    active = below.any(dim=2)  # a step exists for k only when some reply is scored below it
    rank = torch.where(active, step, torch.zeros_like(step)).sum(dim=1)
    n = lp.mask.bool().sum(dim=1).to(p.dtype)
    return rank - sft_weight * (n - 1) ** 2 * _best(lp, lp.policy)


@register_loss("lipo", data="ranked", reference=True,
               paper="Liu, Qin, Wu, Shen, Khalman, Joshi, Zhao, Saleh, Baumgartner, Liu, Liu, Wang 2024, LiPO: "
                     "Listwise Preference Optimization through Learning-to-Rank (arXiv 2402.01878)")
def lipo_loss(lp: RankedLogps, beta: float) -> torch.Tensor:
    """LiPO-lambda, per list: L = -sum_{psi_i > psi_j} Delta_ij log sigma(s_i - s_j),

    s_i = beta h(y_i) (summed log-probs, as DPO), Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|
    the LambdaLoss (NDCG) weight: gain G = 2^psi - 1, discount D(tau) = log2(1 + tau), tau_i the
    1-based rank of y_i among the list's real entries under s, sorted descending and detached
    (ties in s broken by list order). Pairs need psi_i > psi_j, so tied scores form none. The
    weights are not normalised by the ideal DCG (as in the paper's Eq. 11). Gains are computed
    in float64; scores so large that 2^psi overflows (psi > ~1000) or the weights overflow the
    log-prob dtype are a ``DataError`` (rescale the scores). ``beta`` is the paper's beta.
    """
    if lp.ref is None:
        raise ValueError("lipo needs reference log-probs (ref)")
    s = beta * (lp.policy - lp.ref)
    m = lp.mask.bool()
    key = torch.where(m, s.detach(), torch.full_like(s, -math.inf))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    positions = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=torch.float64).expand(s.shape[0], -1)
    tau = torch.empty_like(positions).scatter_(1, order, positions)
    psi = torch.where(m, lp.scores.to(torch.float64), torch.zeros_like(positions))
    gain = torch.exp2(psi) - 1.0
    inv_d = 1.0 / torch.log2(1.0 + tau)
    weight = ((gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()).to(s.dtype)
    better = _strictly_better(lp)
    if not bool(torch.isfinite(torch.where(better, weight, torch.zeros_like(weight))).all()):
        raise DataError(f"lipo: preference scores up to {float(psi.max()):g} make the lambda weights "
                        "|2^psi_i - 2^psi_j| overflow; rescale the scores (e.g. to 0..10)")
    term = weight * F.logsigmoid(s[:, :, None] - s[:, None, :])
    return -torch.where(better, term, torch.zeros_like(term)).sum(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# policy-gradient losses on scored groups (data kind "groups": RankedLogps of K replies sampled per prompt
# in an online round, ``scores`` = the scorer's rewards r). A round takes several optimiser steps on its groups,
# so pi_old is the sampling policy, snapshotted before the round trained (``lp.old``, ``lp.old_tokens``):
# rho = pi_theta / pi_old is 1 at the first step and moves after it, where the clip bounds it. Without a
# snapshot (a single step on fresh samples) pi_old is the current policy, detached: rho = 1 in value with the
# gradient of log pi.


def _clipped_surrogate(logratio: torch.Tensor, adv: torch.Tensor, epsilon: float) -> torch.Tensor:
    """PPO's clipped surrogate, as a loss: -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logratio)."""
    rho = torch.exp(logratio)
    return -torch.minimum(rho * adv, torch.clamp(rho, 1.0 - epsilon, 1.0 + epsilon) * adv)


def _group_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each group's real entries, [B] (padded entries selected away, not multiplied by 0)."""
    m = mask.bool()
    return torch.where(m, values, torch.zeros_like(values)).sum(dim=1) / m.sum(dim=1).clamp(min=1).to(values.dtype)


@register_loss("rloo", data="groups", reference=True, schedule=Online(selection=Group()), ratio=True,
               paper="Ahmadian, Cremer, Galle, Fadaee, Kreutzer, Pietquin, Ustun, Hooker 2024, Back to Basics: "
                     "Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs "
                     "(arXiv 2402.14740)",
               epsilon=0.2)
def rloo_loss(lp: RankedLogps, beta: float, epsilon: float = 0.2) -> torch.Tensor:
    """RLOO (REINFORCE leave-one-out), per group of k replies y_1..y_k to one prompt:
    r~_i = r_i - beta (log pi_old(y_i) - log pi_ref(y_i))       (KL in the reward, sequence level)
    A_i = r~_i - 1/(k - 1) sum_{j != i} r~_j                     (the leave-one-out baseline)
    L = 1/k sum_i -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i),  rho_i = pi(y_i) / pi_old(y_i),

    log pi summed over the reply (sequence-level, as the paper's REINFORCE on whole replies); pi_old the
    round's sampling policy (``lp.old``; the current one, detached, without it). The KL to the reference sits
    in the reward, as in the paper and TRL's RLOOTrainer (its first-order estimate log pi_old - log pi_ref,
    summed over the reply; beta = ``preference.beta``, TRL's default 0.05). At rho = 1 the gradient is
    -A_i grad log pi(y_i), the paper's estimator. ``epsilon`` is TRL's clip (0.2). TRL parity covers the
    loss only: given the same advantages and pi_old, the value and gradient equal TRL 1.16's
    ``RLOOTrainer._compute_loss`` (``normalize_advantages=False``, its default); the reward shaping and
    leave-one-out advantages are computed here and checked against a transcription of TRL's, not its code.
    """
    if lp.ref is None:
        raise ValueError("rloo needs reference log-probs (ref)")
    m = lp.mask.bool()
    n = m.sum(dim=1, keepdim=True).to(lp.policy.dtype)
    old = lp.policy.detach() if lp.old is None else lp.old
    r = lp.scores - beta * (old - lp.ref)
    r = torch.where(m, r, torch.zeros_like(r))
    adv = torch.where(n > 1, r - (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1), torch.zeros_like(r))
    logratio = torch.where(m, lp.policy - old, torch.zeros_like(old))  # padded entries may hold any finite value
    return _group_mean(_clipped_surrogate(logratio, adv.detach(), epsilon), m)


def group_advantages(scores: torch.Tensor, mask: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages: (r_i - mean(r)) / (std(r) + eps) within each group, [B, K] (0 where padded).

    std is the sample (Bessel-corrected) standard deviation, as TRL's ``nanstd``; a group of equal rewards
    gets advantage 0 everywhere.
    """
    m = mask.bool()
    r = torch.where(m, scores, torch.zeros_like(scores))
    n = m.sum(dim=1, keepdim=True).to(scores.dtype)
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
    var = torch.where(m, (scores - mean) ** 2, torch.zeros_like(scores)).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    return torch.where(m, (scores - mean) / (var.sqrt() + eps), torch.zeros_like(scores))


@register_loss("grpo", data="groups", reference=True, schedule=Online(selection=Group()), token_level=True,
               ratio=True,
               paper="Shao, Wang, Zhu, Xu, Song, Zhang, Li, Wu, Guo 2024, DeepSeekMath: Pushing the Limits of "
                     "Mathematical Reasoning in Open Language Models (arXiv 2402.03300)",
               paper_beta=0.04, epsilon=0.2)
def grpo_loss(lp: RankedLogps, beta: float, epsilon: float = 0.2) -> torch.Tensor:
    """GRPO (outcome supervision), per group of G replies o_1..o_G to one prompt (the paper's Eq. 3):
    A_i = (r_i - mean(r)) / (std(r) + 1e-4)        (``group_advantages``; every token of o_i gets A_i)
    L = 1/G sum_i 1/|o_i| sum_t [ -min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) + beta KL_it ],
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | ...)   (pi_old: the round's sampling policy, ``lp.old_tokens``),
    KL_it = pi_ref(o_it|.) / pi(o_it|.) - log(pi_ref(o_it|.) / pi(o_it|.)) - 1   (the k3 estimator, >= 0).

    Per-token log-probs of the policy and the reference (adapter disabled). beta = ``preference.beta``; the
    paper uses 0.04 (TRL's default is 0, no reference). Same as TRL 1.16's ``GRPOTrainer`` with
    ``loss_type="grpo"`` (the paper's per-reply token mean; TRL's default ``dapo`` averages over all tokens of
    the batch instead) and ``scale_rewards="group"``: the parity test runs TRL's ``_compute_loss`` on advantages
    computed as TRL's ``_generate_and_score_completions`` does (transcribed, not called).
    """
    if lp.policy_tokens is None or lp.ref_tokens is None or lp.token_mask is None:
        raise ValueError("grpo needs per-token log-probs (policy_tokens / ref_tokens / token_mask)")
    tm = lp.token_mask.bool()
    adv = group_advantages(lp.scores, lp.mask)[:, :, None].detach()
    logp = torch.where(tm, lp.policy_tokens, torch.zeros_like(lp.policy_tokens))
    old = logp.detach() if lp.old_tokens is None else torch.where(tm, lp.old_tokens, torch.zeros_like(logp))
    d = torch.where(tm, lp.ref_tokens - logp, torch.zeros_like(logp))  # log pi_ref - log pi
    per_token = _clipped_surrogate(logp - old, adv, epsilon) + beta * (torch.exp(d) - d - 1.0)
    per_reply = torch.where(tm, per_token, torch.zeros_like(per_token)).sum(dim=2) / tm.sum(dim=2).clamp(min=1)
    return _group_mean(per_reply, lp.mask)


def win_probabilities(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P(y_i > pi) estimated within each group: mean over the other real replies j of sigma(r_i - r_j), the
    Bradley-Terry probability that y_i beats y_j under the scorer's rewards, [B, K] (0.5 where padded)."""
    m = mask.bool()
    pair = m[:, :, None] & m[:, None, :] & ~torch.eye(m.shape[1], dtype=torch.bool, device=m.device)
    p = torch.sigmoid(scores[:, :, None] - scores[:, None, :])
    n = pair.sum(dim=2).clamp(min=1).to(scores.dtype)
    win = torch.where(pair, p, torch.zeros_like(p)).sum(dim=2) / n
    return torch.where(m & pair.any(dim=2), win, torch.full_like(win, 0.5))


@register_loss("sppo", data="groups", reference=True, schedule=Online(selection=Group(), reference="previous"),
               paper="Wu, Sun, Yuan, Ji, Yang, Gu 2024, Self-Play Preference Optimization for Language Model "
                     "Alignment (arXiv 2405.00675)")
def sppo_loss(lp: RankedLogps, beta: float) -> torch.Tensor:
    """SPPO, per group of K replies sampled from pi_t (the previous round's model, the reference):
    L = 1/K sum_i (log(pi_theta(y_i) / pi_t(y_i)) - eta (P(y_i > pi_t) - 1/2))^2,   eta = 1 / ``beta``,
    P(y_i > pi_t) = 1/(K - 1) sum_{j != i} sigma(r_i - r_j)    (``win_probabilities``).

    The paper's Eq. 3.6 with its win rate estimated from the K samples of the round, as the paper does
    with K = 5; paft's scorers give a reward per reply, so P(y_i > y_j) is Bradley-Terry on those rewards
    (the paper's PairRM gives it directly), and each reply is compared with the other K - 1 (its
    comparison with itself, 1/2, left out). Every sampled reply is trained on (the authors' code keeps
    the best and worst of the K, their "chosen" and "rejected"). The target log-ratio grows with eta:
    with beta = 0.1 a reply that beats every other one is pushed to h = +5 nats.
    """
    if lp.ref is None:
        raise ValueError("sppo needs reference log-probs (ref)")
    target = (win_probabilities(lp.scores, lp.mask) - 0.5) / beta
    return _group_mean((lp.policy - lp.ref - target) ** 2, lp.mask)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al. 2016) along the last dim of right-padded [..., T] tensors:
    delta_t = r_t + gamma V_{t+1} - V_t (V past the reply's end = 0), A_t = delta_t + gamma lam A_{t+1}."""
    m = mask.to(values.dtype)
    v, r = values * m, rewards * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[..., 0])
    for t in reversed(range(v.shape[-1])):
        nxt = v[..., t + 1] if t + 1 < v.shape[-1] else torch.zeros_like(last)
        last = (r[..., t] + gamma * nxt - v[..., t] + gamma * lam * last) * m[..., t]
        adv[..., t] = last
    return adv


@register_loss("ppo", data="groups", reference=True, schedule=Online(selection=Group()), token_level=True,
               value_head=True, ratio=True,
               paper="Ouyang et al. 2022, Training language models to follow instructions with human feedback "
                     "(arXiv 2203.02155); Schulman et al. 2017, Proximal Policy Optimization Algorithms "
                     "(arXiv 1707.06347)",
               epsilon=0.2, gamma=1.0, lam=0.95, vf_coef=0.1, value_clip=0.2)
def ppo_loss(lp: RankedLogps, beta: float, epsilon: float = 0.2, gamma: float = 1.0, lam: float = 0.95,
             vf_coef: float = 0.1, value_clip: float = 0.2) -> torch.Tensor:
    """PPO (RLHF form, InstructGPT without the ptx term), every reply token t of every sampled reply:
    r_t = -beta (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] r(x, y)      (per-token KL penalty + the score)
    A = whiten(GAE(r, V_old; gamma, lam)) over the batch's tokens,  R = GAE + V_old (returns),
    L = mean_t [ -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)
                 + vf_coef 1/2 max((V_t - R_t)^2, (clip(V_t, V_old,t -+ value_clip) - R_t)^2) ],

    mean over all reply tokens of the batch, as TRL's PPOTrainer (0.x) and its defaults (gamma 1, lam 0.95,
    cliprange 0.2, cliprange_value 0.2, vf_coef 0.1; whitening with the unbiased variance). V is a scalar
    head on the policy's last hidden state, trained with the LoRA adapter (the shared-trunk critic of TRL's
    value-head models); pi_old and V_old are the round's sampling policy and its values, snapshotted before
    the round trained (``lp.old_tokens``, ``lp.old_values``; without them this batch's own, detached), so
    the rewards, GAE and returns are the samples' over all of the round's optimiser steps (the whitening is
    per batch) while rho and V move and the clips bound them. The K replies per prompt are independent trajectories. Not done: the ptx term
    (pretraining NLL mix).
    """
    if lp.values is None or lp.policy_tokens is None or lp.ref_tokens is None or lp.token_mask is None:
        raise ValueError("ppo needs per-token log-probs and values (policy_tokens / ref_tokens / token_mask / values)")
    tm = lp.token_mask.bool()
    zero = torch.zeros_like(lp.policy_tokens)
    logp = torch.where(tm, lp.policy_tokens, zero)
    old = logp.detach() if lp.old_tokens is None else torch.where(tm, lp.old_tokens, zero)
    rewards = torch.where(tm, -beta * (old - lp.ref_tokens), zero)
    last = tm & ~torch.cat([tm[..., 1:], torch.zeros_like(tm[..., :1])], dim=-1)  # each reply's last real token
    rewards = rewards + torch.where(last, lp.scores[..., None].to(zero.dtype).expand_as(zero), zero)
    v = torch.where(tm, lp.values, zero)
    v_old = v.detach() if lp.old_values is None else torch.where(tm, lp.old_values, zero)
    adv = gae(rewards, v_old, tm, gamma, lam)
    returns = adv + v_old
    real = adv[tm]
    var = real.var(correction=1) if real.numel() > 1 else torch.zeros_like(real.sum())
    adv = torch.where(tm, (adv - real.mean()) * torch.rsqrt(var + 1e-8), zero).detach()
    pg = _clipped_surrogate(logp - old, adv, epsilon)
    v_clipped = v_old + torch.clamp(v - v_old, -value_clip, value_clip)
    vf = 0.5 * torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2)
    per_token = torch.where(tm, pg + vf_coef * vf, zero)
    # the caller's .mean() over B groups then gives the mean over every reply token of the batch
    return per_token.sum(dim=(1, 2)) * (tm.shape[0] / tm.sum().clamp(min=1))
