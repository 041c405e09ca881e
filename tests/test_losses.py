"""Preference losses: closed forms by hand, numerics at extreme margins, and parity with TRL 1.16.

Closed forms are computed with plain ``math`` from the numbers written out below; the
losses run in float64 there so the comparison is tight. Extreme-margin and gradient checks
run in float32, the dtype training uses.
"""

import inspect
import math
import re
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from paft.errors import ConfigError
from paft.methods.losses import GPO_FUNCTIONS, LOSSES, PairLogps, get_loss, log1mexp

# ------------------------------------------------------------------------------------------
# hand-made batch: (log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l), |y_w|, |y_l|)
#   pair 0: h_w = +1, h_l = -1, Delta = +2; policy above reference on y_w (DPOP penalty 0)
#   pair 1: everything equal,   Delta =  0
#   pair 2: h_w = -1, h_l = +1, Delta = -2; policy 1 nat below reference on y_w (DPOP penalty 1)
PAIRS = [(-10.0, -12.0, -11.0, -11.0, 4, 6),
         (-5.0, -5.0, -5.0, -5.0, 5, 5),
         (-3.0, -1.0, -2.0, -2.0, 3, 2)]
DELTAS = [2.0, 0.0, -2.0]


def _lp(pairs=PAIRS, dtype=torch.float64, grad=False):
    cols = list(zip(*pairs))
    t = [torch.tensor(c, dtype=dtype) for c in cols]
    if grad:
        t[0].requires_grad_(True)
        t[1].requires_grad_(True)
    return PairLogps(*t)


def lsig(x):
    """log sigma(x), stable in plain Python."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def run(name, lp, beta, **params):
    spec = get_loss(name)
    return spec.fn(lp, beta=beta, **{**spec.defaults, **params})


def close(got, want, tol=1e-10):
    torch.testing.assert_close(got.detach().double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# registry


EXPECTED = {  # name: (reference?, defaults)
    "dpo": (True, {}),
    "ipo": (True, {"length_normalize": False}),
    "cdpo": (True, {"eps": 0.1}),
    "rdpo": (True, {"eps": 0.1}),
    "hinge": (True, {}),
    "slic": (False, {"delta": 1.0, "lam": 0.5}),
    "orpo": (False, {}),
    "simpo": (False, {"gamma_beta_ratio": 0.5}),
    "cpo": (False, {"alpha": 1.0}),
    "r-dpo": (True, {"alpha": 0.01}),
    "dpop": (True, {"lam": 50.0}),
    "beta-dpo": (True, {"alpha": 0.6, "m0": 0.0, "n_sigma": 2.0}),
    "gpo": (True, {"f": "logistic"}),
}


def test_registry_metadata():
    assert set(EXPECTED) <= set(LOSSES)
    for name, (ref, defaults) in EXPECTED.items():
        spec = LOSSES[name]
        assert spec.data == "pairs" and spec.reference is ref and spec.defaults == defaults, name
        assert "beta" not in spec.defaults, name  # beta always comes from preference.beta
        assert spec.fn.__doc__ and re.search(r"\bL(_i)? = ", spec.fn.__doc__), name  # the equation
        assert "arXiv" in spec.paper and any(str(y) in spec.paper for y in (2023, 2024)), name
        # the function's own keyword defaults are the registry's (one source of truth when called directly)
        sig = inspect.signature(spec.fn)
        assert {k: p.default for k, p in sig.parameters.items() if k not in ("lp", "beta")} == defaults, name
    assert LOSSES["simpo"].paper_beta == 2.0 and LOSSES["orpo"].paper_beta == 0.1
    assert get_loss("R-DPO") is LOSSES["r-dpo"]
    with pytest.raises(ConfigError):
        get_loss("nope")


def test_config_accepts_new_methods():
    from paft.config import PreferenceConfig

    for name in EXPECTED:
        assert PreferenceConfig(method=name).method == name


# ------------------------------------------------------------------------------------------
# closed forms


def test_ipo_closed_form_summed_and_length_normalised():
    beta = 0.5  # target margin 1/(2 beta) = 1
    close(run("ipo", _lp(), beta), [(2.0 - 1) ** 2, (0.0 - 1) ** 2, (-2.0 - 1) ** 2])  # 1, 1, 9
    # TRL's form: h(y)/|y|: pair 0: 1/4 - (-1/6) = 5/12; pair 1: 0; pair 2: -1/3 - 1/2 = -5/6
    close(run("ipo", _lp(), beta, length_normalize=True), [(5 / 12 - 1) ** 2, 1.0, (-5 / 6 - 1) ** 2])


def test_cdpo_closed_form_and_eps_bounds():
    beta, eps = 0.5, 0.1
    want = [-(1 - eps) * lsig(beta * d) - eps * lsig(-beta * d) for d in DELTAS]
    close(run("cdpo", _lp(), beta), want)
    assert run("cdpo", _lp(), beta)[1].item() == pytest.approx(math.log(2))  # Delta = 0
    close(run("cdpo", _lp(), beta, eps=0.0), [-lsig(beta * d) for d in DELTAS])  # eps 0 = DPO
    for bad in (-0.1, 0.6):
        with pytest.raises(ValueError, match="eps"):
            run("cdpo", _lp(), beta, eps=bad)


def test_rdpo_closed_form_and_eps_bounds():
    beta = 0.5
    for eps in (0.1, 0.3):
        want = [((1 - eps) * -lsig(beta * d) - eps * -lsig(-beta * d)) / (1 - 2 * eps) for d in DELTAS]
        close(run("rdpo", _lp(), beta, eps=eps), want)
    # eps = 0.1, Delta = 2: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617
    assert run("rdpo", _lp(), beta)[0].item() == pytest.approx(0.1882617, abs=1e-7)
    close(run("rdpo", _lp(), beta, eps=0.0), [-lsig(beta * d) for d in DELTAS])
    for bad in (0.5, 0.7, -0.01):
        with pytest.raises(ValueError, match="'eps'"):
            run("rdpo", _lp(), beta, eps=bad)
    with pytest.raises(ConfigError):  # also a ConfigError: the CLI prints it as a one-line user error
        run("rdpo", _lp(), beta, eps=0.5)


def test_hinge_closed_form():
    close(run("hinge", _lp(), 0.5), [0.0, 1.0, 2.0])  # max(0, 1 - 0.5 Delta)


def test_slic_closed_form():
    # max(0, 1 - log pi_w + log pi_l) - 0.5 log pi_w
    # pair 0: max(0, 1 + 10 - 12) = 0, + 5;  pair 1: 1 + 2.5;  pair 2: max(0, 1 + 3 - 1) = 3, + 1.5
    close(run("slic", _lp(), 123.0), [5.0, 3.5, 4.5])  # beta is not used
    close(run("slic", _lp(), 0.1, delta=0.0, lam=0.0), [0.0, 0.0, 2.0])


def _orpo_by_hand(pc, pr, nw, nl, lam):
    aw, al = pc / nw, pr / nl
    log_odds = (aw - math.log(-math.expm1(aw))) - (al - math.log(-math.expm1(al)))
    return -aw - lam * lsig(log_odds)


def test_orpo_closed_form_and_length_normalisation():
    lam = 0.1  # = beta
    want = [_orpo_by_hand(pc, pr, nw, nl, lam) for pc, pr, _, _, nw, nl in PAIRS]
    close(run("orpo", _lp(), lam), want)
    # pair 0 written out: a_w = -2.5, a_l = -2; log(1 - e^-2.5) = -0.0856505, log(1 - e^-2) = -0.1454135
    # log odds ratio = (-2.5 + 0.0856505) - (-2 + 0.1454135) = -0.5597630; loss = 2.5 - 0.1 log sigma(-0.5597630)
    assert run("orpo", _lp(), lam)[0].item() == pytest.approx(2.5 + 0.1 * math.log1p(math.exp(0.5597630)), abs=1e-7)
    assert run("orpo", _lp(), lam)[0].item() == pytest.approx(2.6011695, abs=1e-7)
    # equal log-probs and lengths: odds ratio 1, loss = NLL + lam log 2
    assert run("orpo", _lp(), lam)[1].item() == pytest.approx(1.0 + lam * math.log(2))
    # same summed log-probs, different lengths: per-token likelihood decides (chosen 3 tokens, rejected 6)
    short = _lp([(-6.0, -6.0, 0.0, 0.0, 3, 6)])
    got = run("orpo", short, lam).item()
    assert got == pytest.approx(_orpo_by_hand(-6.0, -6.0, 3, 6, lam))
    assert got > 2.0 + lam * math.log(2)  # a_w = -2 < a_l = -1: the chosen reply is worse per token


def test_simpo_closed_form_and_length_normalisation():
    beta, ratio = 2.0, 0.5  # gamma = 1
    want = [-lsig(beta * (pc / nw - pr / nl) - ratio * beta) for pc, pr, _, _, nw, nl in PAIRS]
    close(run("simpo", _lp(), beta), want)
    # pair 0: 2 * (-2.5 - (-2)) - 1 = -2 -> -log sigma(-2) = 2.126928
    assert run("simpo", _lp(), beta)[0].item() == pytest.approx(2.126928, abs=1e-6)
    # equal log-probs and lengths: only the target margin remains, -log sigma(-gamma)
    assert run("simpo", _lp(), beta)[1].item() == pytest.approx(-lsig(-1.0))
    # same summed log-prob, chosen shorter -> lower per-token log-prob -> larger loss
    a = run("simpo", _lp([(-6.0, -6.0, 0, 0, 3, 6)]), beta).item()
    b = run("simpo", _lp([(-6.0, -6.0, 0, 0, 6, 3)]), beta).item()
    assert a == pytest.approx(-lsig(2 * (-2 + 1) - 1)) and b == pytest.approx(-lsig(2 * (-1 + 2) - 1)) and a > b


def test_cpo_closed_form():
    beta = 0.1
    want = [-lsig(beta * (pc - pr)) - pc / nw for pc, pr, _, _, nw, _ in PAIRS]
    close(run("cpo", _lp(), beta), want)
    # pair 1: log 2 + 5/5
    assert run("cpo", _lp(), beta)[1].item() == pytest.approx(math.log(2) + 1.0)
    close(run("cpo", _lp(), beta, alpha=0.0), [-lsig(beta * (pc - pr)) for pc, pr, *_ in PAIRS])


def test_length_regularised_dpo_closed_form():
    beta = 0.5  # alpha defaults to 0.01
    # beta Delta - alpha (|y_w| - |y_l|): 1 + 0.02, 0 - 0, -1 - 0.01
    close(run("r-dpo", _lp(), beta), [-lsig(1.02), math.log(2), -lsig(-1.01)])
    close(run("r-dpo", _lp(), beta, alpha=0.0), [-lsig(beta * d) for d in DELTAS])


def test_dpop_penalty_active_and_inactive():
    beta, lam = 0.5, 50.0
    got = run("dpop", _lp(), beta)
    # pairs 0, 1: log pi(y_w) >= log pi_ref(y_w) -> plain DPO; pair 2: penalty max(0, -2 + 3) = 1
    close(got, [-lsig(1.0), math.log(2), -lsig(0.5 * (-2.0 - lam * 1.0))])
    assert got[2].item() == pytest.approx(26.0, abs=1e-9)  # -log sigma(-26) = 26 + log(1 + e^-26)
    close(run("dpop", _lp(), beta, lam=0.0), [-lsig(beta * d) for d in DELTAS])


def test_beta_dpo_adaptive_beta():
    beta = 0.5
    # margins 2, 0, -2: mean 0 = m0 -> beta unchanged, nothing filtered (3 pairs): DPO
    close(run("beta-dpo", _lp(), beta), [-lsig(beta * d) for d in DELTAS])
    # m0 = -1: beta_B = 0.5 (1 + 0.6 (0 + 1)) = 0.8
    close(run("beta-dpo", _lp(), beta, m0=-1.0), [-lsig(0.8 * d) for d in DELTAS])
    # alpha 0, no filtering: DPO whatever m0
    close(run("beta-dpo", _lp(), beta, alpha=0.0, m0=5.0), [-lsig(beta * d) for d in DELTAS])
    # beta_B is clamped at 1e-3: 0.5 (1 + 0.6 (0 - 10)) < 0
    close(run("beta-dpo", _lp(), beta, m0=10.0), [-lsig(1e-3 * d) for d in DELTAS])


def test_beta_dpo_filters_outlier_margins():
    beta = 0.5
    # six margins 0 and one 10: mean 10/7 = 1.4286, population std 3.4993; |10 - 1.43| = 8.57 > 2 std
    pairs = [(0.0, 0.0, 0.0, 0.0, 1, 1)] * 6 + [(10.0, 0.0, 0.0, 0.0, 1, 1)]
    got = run("beta-dpo", _lp(pairs), beta)
    # kept margins are all 0 -> beta_B = beta; each kept pair weighted 7/6 so the mean is over kept pairs
    close(got, [7 / 6 * math.log(2)] * 6 + [0.0])
    assert got.mean().item() == pytest.approx(math.log(2))
    # n_sigma = inf: no filtering, beta_B = 0.5 (1 + 0.6 * 10/7)
    b = 0.5 * (1 + 0.6 * 10 / 7)
    close(run("beta-dpo", _lp(pairs), beta, n_sigma=math.inf), [math.log(2)] * 6 + [-lsig(b * 10)])


def test_beta_dpo_beta_is_detached():
    lp = _lp(grad=True)
    m0 = -1.0
    run("beta-dpo", lp, 0.5, m0=m0).sum().backward()
    b = 0.8  # see test_beta_dpo_adaptive_beta; with beta constant: dL/d log pi(y_w) = -b sigma(-b Delta)
    want = [-b / (1 + math.exp(b * d)) for d in DELTAS]
    close(lp.policy_chosen.grad, want)
    close(lp.policy_rejected.grad, [-w for w in want])


def test_gpo_variants():
    lp, beta = _lp(), 0.5
    close(run("gpo", lp, beta), run("dpo", lp, beta).tolist())  # logistic = DPO
    close(run("gpo", lp, beta, f="hinge"), run("hinge", lp, beta).tolist())  # hinge = SLiC form (TRL hinge)
    tau = 0.25  # squared with beta = 2 tau is IPO(tau) times 4 tau^2
    close(run("gpo", lp, 2 * tau, f="squared"), (4 * tau ** 2 * run("ipo", lp, tau)).tolist())
    rho = [beta * d for d in DELTAS]  # 1, 0, -1
    close(run("gpo", lp, beta, f="squared"), [(r - 1) ** 2 for r in rho])
    close(run("gpo", lp, beta, f="exponential"), [math.exp(-r) for r in rho])
    close(run("gpo", lp, beta, f="truncated_quadratic"), [max(0.0, 1 - r) ** 2 for r in rho])
    close(run("gpo", lp, beta, f="savage"), [1 / (1 + math.exp(r)) ** 2 for r in rho])
    with pytest.raises(ValueError, match="logistic.*savage"):
        run("gpo", lp, beta, f="cubic")


def test_log1mexp_matches_math():
    xs = [-1e-7, -1e-3, -0.5, -math.log(2), -0.7, -2.0, -30.0, -1e4]
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    close(got, [math.log(-math.expm1(x)) for x in xs], tol=1e-12)


# ------------------------------------------------------------------------------------------
# extreme margins: finite values, right asymptotes, finite gradients (float32)

BIG = 1e4


def _extreme(sign):
    """Pairs with Delta = sign * 2e4 for reference losses and a huge gap in raw log-probs for the others.

    Reference-free losses see log pi(y_w) = -1e-3 vs log pi(y_l) = -2e4 (sign +) or the reverse;
    reference losses see the same policy numbers with a reference that puts Delta at +-2e4.
    """
    if sign > 0:
        return PairLogps(torch.tensor([-1e-3]), torch.tensor([-2 * BIG]), torch.tensor([-1e-3 - BIG]),
                         torch.tensor([-BIG]), torch.tensor([4.0]), torch.tensor([4.0]))
    return PairLogps(torch.tensor([-2 * BIG]), torch.tensor([-1e-3]), torch.tensor([-BIG]),
                     torch.tensor([-1e-3 - BIG]), torch.tensor([4.0]), torch.tensor([4.0]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_margins_finite_values_and_gradients(name, sign):
    lp = _extreme(sign)
    lp.policy_chosen.requires_grad_(True)
    lp.policy_rejected.requires_grad_(True)
    fs = list(GPO_FUNCTIONS) if name == "gpo" else [None]
    for f in fs:
        lp.policy_chosen.grad = lp.policy_rejected.grad = None
        loss = run(name, lp, 0.5, **({"f": f} if f else {}))
        assert torch.isfinite(loss).all(), (name, f, loss)
        loss.sum().backward()
        for g in (lp.policy_chosen.grad, lp.policy_rejected.grad):
            assert g is not None and torch.isfinite(g).all(), (name, f, g)


def test_extreme_margin_asymptotes():
    beta, d = 0.5, 2 * BIG
    pos, neg = _extreme(1), _extreme(-1)
    v = lambda name, lp, **kw: run(name, lp, beta, **kw).item()  # noqa: E731
    assert v("dpo", pos) == 0.0 and v("dpo", neg) == pytest.approx(beta * d)
    assert v("ipo", pos) == pytest.approx((d - 1) ** 2, rel=1e-6)
    assert v("cdpo", pos) == pytest.approx(0.1 * beta * d, rel=1e-6)
    assert v("cdpo", neg) == pytest.approx(0.9 * beta * d, rel=1e-6)
    assert v("rdpo", pos) == pytest.approx(-0.1 * beta * d / 0.8, rel=1e-6)  # unbounded below, by design
    assert v("rdpo", neg) == pytest.approx(0.9 * beta * d / 0.8, rel=1e-6)
    assert v("hinge", pos) == 0.0 and v("hinge", neg) == pytest.approx(1 + beta * d, rel=1e-6)
    assert v("r-dpo", pos) == 0.0 and v("r-dpo", neg) == pytest.approx(beta * d, rel=1e-6)
    assert v("dpop", pos) == 0.0  # policy above reference on y_w: no penalty
    # neg: log pi_ref(y_w) - log pi(y_w) = 1e4 -> beta (2e4 + 50 * 1e4)
    assert v("dpop", neg) == pytest.approx(beta * (d + 50 * BIG), rel=1e-6)
    assert v("beta-dpo", pos) == 0.0 and v("beta-dpo", neg) == pytest.approx(1e-3 * d, rel=1e-5)  # beta clamped
    assert v("gpo", pos, f="exponential") == 0.0
    assert v("gpo", neg, f="exponential") == pytest.approx(math.exp(20) * (1 + beta * d - 20), rel=1e-5)
    assert v("gpo", neg, f="savage") == pytest.approx(1.0) and v("gpo", pos, f="savage") == 0.0
    assert v("slic", pos) == pytest.approx(0.5e-3, rel=1e-3)  # hinge 0, NLL 1e-3 * 0.5
    assert v("slic", neg) == pytest.approx(1 + 2 * BIG + 0.5 * 2 * BIG, rel=1e-6)
    # orpo pos: chosen mean log-prob -2.5e-4 -> odds ratio huge, loss = NLL 2.5e-4
    assert v("orpo", pos) == pytest.approx(2.5e-4, rel=1e-3)
    assert v("orpo", neg) > BIG / 2
    assert v("simpo", pos) == 0.0 and v("simpo", neg) == pytest.approx(beta * BIG / 2 + beta * 0.5, rel=1e-5)
    assert v("cpo", pos) == pytest.approx(2.5e-4, rel=1e-3)
    assert v("cpo", neg) == pytest.approx(beta * d + BIG / 2, rel=1e-5)


def test_orpo_at_probability_one_is_finite():
    lp = PairLogps(torch.tensor([0.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True),
                   chosen_tokens=torch.tensor([2.0]), rejected_tokens=torch.tensor([3.0]))
    loss = run("orpo", lp, 0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(lp.policy_chosen.grad).all()
    assert torch.isfinite(lp.policy_rejected.grad).all()


def test_length_aware_losses_need_token_counts():
    lp = _lp()
    lp.chosen_tokens = lp.rejected_tokens = None
    for name in ("orpo", "simpo", "cpo", "r-dpo"):
        with pytest.raises(ValueError, match="token counts"):
            run(name, lp, 0.1)


# ------------------------------------------------------------------------------------------
# parity with TRL 1.16 (TRL's own loss code, called on the same log-probs)


class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m):
        return m


class _TokenLogpModel(torch.nn.Module):
    """Stands in for the policy in DPOTrainer._compute_loss: returns fixed per-token log-probs."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def forward(self, **kwargs):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


class _LogitsModel(torch.nn.Module):
    """Stands in for the policy in CPO/ORPO concatenated_forward: returns fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.logits)


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
        from trl.trainer.dpo_trainer import DPOTrainer
    return SimpleNamespace(DPOTrainer=DPOTrainer, CPOTrainer=CPOTrainer, ORPOTrainer=ORPOTrainer)


def _trl_dpo(trl, loss_type, beta, pairs, label_smoothing=0.0, counts=None):
    """TRL DPOTrainer._compute_loss on a batch whose summed log-probs and completion lengths are ``pairs``.

    The stub model spreads each summed log-prob evenly over the row's completion tokens; the
    reference log-probs go in as precomputed ones. ``counts`` overrides the completion lengths TRL sees.
    """
    pc, pr, rc, rr, nc, nr = (list(c) for c in zip(*pairs))
    n = counts or (nc + nr)
    logps = torch.tensor(pc + pr)
    b, t = len(pc), max(n) + 2
    cmask = torch.zeros(2 * b, t, dtype=torch.long)
    per_token = torch.zeros(2 * b, t - 1)
    for i, k in enumerate(n):
        cmask[i, 1:1 + k] = 1  # position 0 is the prompt
        per_token[i, :k] = logps[i] / k
    trainer = object.__new__(trl.DPOTrainer)
    model = _TokenLogpModel(per_token)
    vars(trainer).update(model=model, accelerator=_Accel(), ld_alpha=None, precompute_ref_logps=True,
                         f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                         label_smoothing=label_smoothing, use_weighting=False, aux_loss_enabled=False,
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                         _tp_size=1)
    ones = torch.ones(2 * b, t, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones,
              "completion_mask": cmask, "ref_chosen_logps": torch.tensor(rc), "ref_rejected_logps": torch.tensor(rr)}
    return trainer._compute_loss(model, inputs, False)


# a batch with varied margins and lengths (float32, like TRL's)
TRL_PAIRS = [(-10.0, -12.0, -11.0, -11.0, 4, 6),
             (-5.0, -5.0, -5.0, -5.0, 5, 5),
             (-3.0, -1.0, -2.0, -2.0, 3, 2),
             (-20.5, -31.25, -22.0, -27.0, 9, 12),
             (-7.75, -4.5, -6.0, -6.5, 7, 3)]


def _paft_mean(name, beta, pairs=TRL_PAIRS, **params):
    return run(name, _lp(pairs, dtype=torch.float32), beta, **params).mean()


def _assert_trl(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_trl_dpo_sigmoid_hinge_robust(trl, beta):
    _assert_trl(_paft_mean("dpo", beta), _trl_dpo(trl, "sigmoid", beta, TRL_PAIRS))
    _assert_trl(_paft_mean("hinge", beta), _trl_dpo(trl, "hinge", beta, TRL_PAIRS))
    _assert_trl(_paft_mean("gpo", beta, f="hinge"), _trl_dpo(trl, "hinge", beta, TRL_PAIRS))
    for eps in (0.1, 0.3):
        _assert_trl(_paft_mean("rdpo", beta, eps=eps), _trl_dpo(trl, "robust", beta, TRL_PAIRS, label_smoothing=eps))
    for pair in TRL_PAIRS:  # per pair, not only the batch mean
        _assert_trl(_paft_mean("dpo", beta, [pair]), _trl_dpo(trl, "sigmoid", beta, [pair]))
        _assert_trl(_paft_mean("rdpo", beta, [pair]), _trl_dpo(trl, "robust", beta, [pair], label_smoothing=0.1))


def test_trl_ipo_length_normalisation(trl):
    beta = 0.1
    # TRL divides each log-ratio by its completion length: paft's length_normalize=True
    _assert_trl(_paft_mean("ipo", beta, length_normalize=True), _trl_dpo(trl, "ipo", beta, TRL_PAIRS))
    # paft's default (the paper's summed log-probs) is TRL's IPO when TRL sees one-token completions
    # carrying the same summed log-probs: equivalent inputs, the normalisation becomes a no-op
    ones = [1] * (2 * len(TRL_PAIRS))
    _assert_trl(_paft_mean("ipo", beta), _trl_dpo(trl, "ipo", beta, TRL_PAIRS, counts=ones))
    assert not torch.allclose(_paft_mean("ipo", beta), _trl_dpo(trl, "ipo", beta, TRL_PAIRS))


def _cpo_trainer(trl, **kw):
    t = object.__new__(trl.CPOTrainer)
    vars(t).update(dict(accelerator=_Accel(), alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
                        simpo_gamma=0.5, cpo_alpha=1.0, is_encoder_decoder=False, pad_token_id=0,
                        aux_loss_enabled=False), **kw)
    return t


def _orpo_trainer(trl, beta):
    t = object.__new__(trl.ORPOTrainer)
    vars(t).update(accelerator=_Accel(), beta=beta, is_encoder_decoder=False, padding_value=0,
                   aux_loss_enabled=False)
    return t


def test_trl_cdpo_is_label_smoothed_sigmoid(trl):
    # TRL 1.16's DPOTrainer sigmoid loss has no label smoothing any more; the same conservative
    # formula lives in CPOTrainer.cpo_loss(label_smoothing), which we feed the log-ratios h(y_w), h(y_l)
    lp = _lp(TRL_PAIRS, dtype=torch.float32)
    hw, hl = lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected
    for beta, eps in ((0.1, 0.1), (0.5, 0.25)):
        want, _, _ = _cpo_trainer(trl, beta=beta, label_smoothing=eps).cpo_loss(hw, hl)
        _assert_trl(run("cdpo", lp, beta, eps=eps), want)


def test_trl_cpo_and_simpo_pair_terms(trl):
    lp = _lp(TRL_PAIRS, dtype=torch.float32)
    nw, nl = lp.chosen_tokens, lp.rejected_tokens
    # CPO preference term on summed log-probs (TRL's NLL term is tested with the full forward below)
    want, _, _ = _cpo_trainer(trl, beta=0.1).cpo_loss(lp.policy_chosen, lp.policy_rejected)
    _assert_trl(run("cpo", lp, 0.1, alpha=0.0), want)
    # SimPO: TRL takes average log-probs and gamma itself; paft gamma_beta_ratio = simpo_gamma / beta
    for beta, gamma in ((2.0, 1.0), (2.5, 0.5), (0.1, 0.5)):
        t = _cpo_trainer(trl, loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0)
        want, _, _ = t.cpo_loss(lp.policy_chosen / nw, lp.policy_rejected / nl)
        _assert_trl(run("simpo", lp, beta, gamma_beta_ratio=gamma / beta), want)


def test_trl_orpo_odds_ratio_term(trl):
    lp = _lp(TRL_PAIRS, dtype=torch.float32)
    aw, al = lp.policy_chosen / lp.chosen_tokens, lp.policy_rejected / lp.rejected_tokens
    for beta in (0.1, 0.25):
        ratio_term, *_ = _orpo_trainer(trl, beta).odds_ratio_loss(aw, al)  # = lambda log sigma(log odds ratio)
        _assert_trl(run("orpo", lp, beta), -aw - ratio_term)  # paft = NLL(y_w) - that


def _logit_batch(chosen_lens, rejected_lens, vocab=11, seed=0):
    """TRL-style chosen/rejected batch (1 prompt token, then the completion, then padding) plus fixed logits.

    Returns (batch, logits [2B, T, V], paft PairLogps from the same logits).
    """
    g = torch.Generator().manual_seed(seed)
    b, t = len(chosen_lens), max(chosen_lens + rejected_lens) + 1
    batch, rows = {}, []
    for side, lens in (("chosen", chosen_lens), ("rejected", rejected_lens)):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        att = torch.zeros(b, t, dtype=torch.long)
        lab = torch.full((b, t), -100)
        for i, n in enumerate(lens):
            att[i, :1 + n] = 1
            lab[i, 1:1 + n] = ids[i, 1:1 + n]
            ids[i, 1 + n:] = 0
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_labels": lab})
        rows.append(lab)
    logits = torch.randn(2 * b, t, vocab, generator=g) * 2
    labels = torch.cat(rows)
    logp = logits.log_softmax(-1)
    sums, counts = [], []
    for r in range(2 * b):  # token t is predicted at position t - 1
        pos = [k for k in range(1, t) if labels[r, k] != -100]
        sums.append(sum(logp[r, k - 1, labels[r, k]] for k in pos))
        counts.append(float(len(pos)))
    s, c = torch.stack(sums), torch.tensor(counts)
    lp = PairLogps(s[:b], s[b:], chosen_tokens=c[:b], rejected_tokens=c[b:])
    return batch, logits, lp


def test_trl_orpo_full_loss(trl):
    # equal chosen lengths and a one-token prompt: TRL's prompt+response, batch-pooled NLL is paft's per-pair one
    batch, logits, lp = _logit_batch([4, 4, 4], [2, 6, 5])
    for beta in (0.1, 0.3):
        want, _ = _orpo_trainer(trl, beta).get_batch_loss_metrics(_LogitsModel(logits), batch)
        _assert_trl(run("orpo", lp, beta).mean(), want)
    # unequal chosen lengths: TRL pools all chosen tokens of the batch, paft averages per pair (documented)
    batch, logits, lp = _logit_batch([2, 7, 4], [3, 3, 3], seed=1)
    want, metrics = _orpo_trainer(trl, 0.1).get_batch_loss_metrics(_LogitsModel(logits), batch)
    pooled = -lp.policy_chosen.sum() / lp.chosen_tokens.sum()
    per_pair = (-lp.policy_chosen / lp.chosen_tokens).mean()
    assert metrics["nll_loss"] == pytest.approx(pooled.item(), rel=1e-5)
    _assert_trl(run("orpo", lp, 0.1).mean() - per_pair + pooled, want)


def test_trl_cpo_and_simpo_full_loss(trl):
    batch, logits, lp = _logit_batch([5, 5], [3, 8])
    model = _LogitsModel(logits)
    for beta in (0.1, 0.5):  # CPO: pair term + cpo_alpha * NLL (mean over chosen tokens)
        want, _ = _cpo_trainer(trl, beta=beta, cpo_alpha=1.0).get_batch_loss_metrics(model, batch)
        _assert_trl(run("cpo", lp, beta).mean(), want)
    t = _cpo_trainer(trl, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)  # pure SimPO
    want, _ = t.get_batch_loss_metrics(model, batch)
    _assert_trl(run("simpo", lp, 2.0).mean(), want)  # default gamma_beta_ratio 0.5 -> gamma 1.0


# ------------------------------------------------------------------------------------------
# end to end: every method through PreferenceObjective on the tiny model with a LoRA adapter


def test_every_method_trains_through_the_objective(tiny_model, tiny_tok):
    from paft.config import LoraConfig
    from paft.data.collate import PairCollator
    from paft.data.formats import PreferenceExample
    from paft.data.tokenize import encode_pair
    from paft.train.lora import attach_lora
    from paft.train.preference import PreferenceObjective

    model = attach_lora(tiny_model, LoraConfig(r=4, alpha=8), 0)
    exs = [PreferenceExample(prompt=[{"role": "user", "content": f"question {i}"}], chosen="yes " * (i + 1),
                             rejected="no " * (3 - i)) for i in range(3)]
    batch = PairCollator(tiny_tok.pad_token_id)([encode_pair(e, tiny_tok, 128, 64) for e in exs])
    for name in sorted(EXPECTED):
        for f in (list(GPO_FUNCTIONS) if name == "gpo" else [None]):
            model.zero_grad()
            obj = PreferenceObjective(name, LOSSES[name].paper_beta or 0.1, {"f": f} if f else {})
            loss, metrics = obj(model, batch)
            loss.backward()
            grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
            assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads), (name, f)
            assert ("rewards/margin" in metrics) is LOSSES[name].reference, name
