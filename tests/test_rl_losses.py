"""Policy-gradient and token-level objectives (RLOO, GRPO): closed forms on hand-made numbers, parity with
TRL 1.16's own loss code, the scored-group data path, and per-token reference log-probs."""

import json
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from paft.methods.losses import LOSSES, RankedLogps, get_loss, group_advantages


def run(name, lp, beta, **params):
    spec = get_loss(name)
    return spec.fn(lp, beta=beta, **{**spec.defaults, **params})


# ------------------------------------------------------------------------------------------ RLOO
# group 0: 3 replies, rewards 1, 2, 6; log pi = -3, -4, -5; log pi_ref = -3, -5, -4
# beta 0.5: r~ = r - 0.5 (log pi - log pi_ref) = 1, 1.5, 6.5
# A_i = r~_i - mean of the others = 1 - 4 = -3, 1.5 - 3.75 = -2.25, 6.5 - 1.25 = 5.25 (sum 0: the loss value is 0)
# group 1: 2 replies and one padded entry (any finite value): rewards 0, 1, same log-probs: A = -1, +1


def _rloo_lp(grad=True):
    policy = torch.tensor([[-3.0, -4.0, -5.0], [-2.0, -2.0, 99.0]], dtype=torch.float64, requires_grad=grad)
    return RankedLogps(policy=policy, scores=torch.tensor([[1.0, 2.0, 6.0], [0.0, 1.0, 7.0]], dtype=torch.float64),
                       mask=torch.tensor([[True, True, True], [True, True, False]]),
                       ref=torch.tensor([[-3.0, -5.0, -4.0], [-2.0, -2.0, 5.0]], dtype=torch.float64))


def test_rloo_leave_one_out_gradient_closed_form():
    lp = _rloo_lp()
    loss = run("rloo", lp, 0.5)
    torch.testing.assert_close(loss.detach(), torch.zeros(2, dtype=torch.float64))  # advantages sum to 0 per group
    loss.mean().backward()
    # d(mean over 2 groups of the group mean of -A_i log pi_i) / d log pi_i = -A_i / (2 k)
    want = torch.tensor([[3.0 / 6, 2.25 / 6, -5.25 / 6], [1.0 / 4, -1.0 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(lp.policy.grad, want)


def test_rloo_kl_sits_in_the_reward_and_beta_zero_is_plain_reinforce():
    lp = _rloo_lp()
    run("rloo", lp, 0.0).mean().backward()  # r~ = r: A = 1 - 4, 2 - 3.5, 6 - 1.5
    torch.testing.assert_close(lp.policy.grad[0], torch.tensor([3.0, 1.5, -4.5], dtype=torch.float64) / 6)


def test_rloo_clip_bounds_the_ratio():
    """A batch reused after a step: rho = exp(log pi - log pi_old) far from 1 is clipped where it would gain."""
    from paft.methods.losses import _clipped_surrogate

    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logratio = torch.log(torch.tensor([2.0, 0.5, 2.0, 0.5]))
    # -min(rho A, clip(rho) A): A>0 caps rho at 1.2; A<0 floors it at 0.8
    torch.testing.assert_close(_clipped_surrogate(logratio, adv, 0.2), torch.tensor([-1.2, -0.5, 2.0, 0.8]))


def test_rloo_ratio_is_against_the_sampling_policy_and_the_clip_engages():
    """A later step on a round's group: pi_old is the snapshot, not the current policy. One group, beta 0, rewards
    0 and 1: A = -1, +1; rho = pi / pi_old = 2 for both. A < 0: -min(-2, -1.2) = 2, unclipped, d/dlog pi = rho = 2;
    A > 0: -min(2, 1.2) = -1.2, clipped, no gradient. Group mean: loss 0.4, gradient (2, 0) / 2."""
    ln2 = math.log(2)
    policy = torch.tensor([[-2.0, -2.0]], dtype=torch.float64, requires_grad=True)
    lp = RankedLogps(policy=policy, scores=torch.tensor([[0.0, 1.0]], dtype=torch.float64),
                     mask=torch.ones(1, 2, dtype=torch.bool), ref=torch.tensor([[-3.0, -2.0]], dtype=torch.float64),
                     old=torch.tensor([[-2.0 - ln2, -2.0 - ln2]], dtype=torch.float64))
    loss = run("rloo", lp, 0.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.4], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(policy.grad, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    # the KL-shaped reward reads pi_old too: pi_old = (-2 - ln2, -2 - 2 ln2), rho = 2, 4; log pi_old - log pi_ref =
    # 1 - ln2, -2 ln2; beta 0.5: r~ = -0.5 + 0.5 ln2, 1 + ln2, A = -a, +a with a = 1.5 + 0.5 ln2 (the current
    # policy's log-ratios 1, 0 would give a = 1.5); loss (2a - 1.2a) / 2
    lp.old = torch.tensor([[-2.0 - ln2, -2.0 - 2 * ln2]], dtype=torch.float64)
    a = 1.5 + 0.5 * ln2
    torch.testing.assert_close(run("rloo", lp, 0.5).detach(), torch.tensor([0.4 * a], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ GRPO
# one group of 3 replies, rewards 0, 1, 2: mean 1, sample std 1, A = (-1, 0, 1) / (1 + 1e-4)
# reply lengths 1, 2, 2; per-token log pi and log pi_ref below; k3(d) = e^d - d - 1, d = log pi_ref - log pi


def _grpo_lp():
    pol = torch.tensor([[[-1.0, 0.0], [-2.0, -0.5], [-1.0, -1.0]]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[[-2.0, 0.0], [-2.0, -1.5], [-0.5, -1.0]]], dtype=torch.float64)
    tm = torch.tensor([[[True, False], [True, True], [True, True]]])
    sums = (pol * tm).sum(-1)
    return RankedLogps(policy=sums, scores=torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64),
                       mask=torch.ones(1, 3, dtype=torch.bool), ref=(ref * tm).sum(-1),
                       policy_tokens=pol, ref_tokens=ref, token_mask=tm)


def k3(d):
    return math.exp(d) - d - 1


def test_group_advantages_closed_form_and_ties():
    a = group_advantages(torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(a, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / torch.tensor([[1 + 1e-4], [1]]))


def test_grpo_closed_form_value_and_gradient():
    lp, beta = _grpo_lp(), 0.04
    loss = run("grpo", lp, beta)
    # surrogate value: the token mean of -A_i, averaged over the group, is -mean(A) = 0; the KL term remains
    kl = [k3(-1.0), (k3(0.0) + k3(-1.0)) / 2, (k3(0.5) + k3(0.0)) / 2]
    torch.testing.assert_close(loss.detach(), torch.tensor([beta * sum(kl) / 3], dtype=torch.float64))
    loss.sum().backward()
    a = [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)]
    d = lp.ref_tokens - lp.policy_tokens.detach()
    lengths = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)[None, :, None]
    # d/d log pi_t of (-A rho_t + beta k3): -A + beta (1 - e^d), over |o_i| tokens and G = 3 replies
    want = (-torch.tensor(a, dtype=torch.float64)[None, :, None] + beta * (1 - torch.exp(d))) / (3 * lengths)
    torch.testing.assert_close(lp.policy_tokens.grad, torch.where(lp.token_mask, want, torch.zeros_like(want)))


def test_grpo_needs_token_logps():
    lp = _rloo_lp()
    with pytest.raises(ValueError, match="per-token"):
        run("grpo", lp, 0.04)


# ------------------------------------------------------------------------------------------ TRL parity


class _Acc:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_trainer(cls, per_token_logps, **kw):
    """``cls._compute_loss`` runnable on given per-token log-probs: TRL's own loss code, the model stubbed."""
    t = object.__new__(cls)
    vars(t).update(accelerator=_Acc(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                   model=SimpleNamespace(training=True), aux_loss_enabled=False, current_gradient_accumulation_steps=1,
                   top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                   use_vllm=False, _entropy_bonus_enabled=False, epsilon_low=0.2, epsilon_high=0.2, **kw)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None)
    return t


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOTrainer, RLOOTrainer
        from trl.trainer.utils import nanstd
    return SimpleNamespace(GRPOTrainer=GRPOTrainer, RLOOTrainer=RLOOTrainer, nanstd=nanstd)


def _groups(b=3, k=4, t=6, seed=0):
    """b groups of k replies: random per-token log-probs, reference, lengths and rewards (float32, as TRL)."""
    g = torch.Generator().manual_seed(seed)
    pol = -torch.rand(b * k, t, generator=g) * 3
    ref = pol + torch.randn(b * k, t, generator=g) * 0.5
    lengths = torch.randint(1, t + 1, (b * k,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(b * k, generator=g)
    return pol, ref, mask, rewards


def _inputs(mask, **kw):
    n, t = mask.shape
    return dict(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1),
                completion_ids=torch.zeros(n, t, dtype=torch.long), completion_mask=mask, **kw)


def _ranked(pol, ref, mask, rewards, k):
    b = rewards.shape[0] // k
    tm = mask.bool()
    return RankedLogps(policy=(pol * mask).sum(-1).view(b, k), scores=rewards.view(b, k),
                       mask=torch.ones(b, k, dtype=torch.bool), ref=(ref * mask).sum(-1).view(b, k),
                       policy_tokens=pol.view(b, k, -1), ref_tokens=ref.view(b, k, -1), token_mask=tm.view(b, k, -1))


def _off_policy(pol, seed):
    """pi_old of a later step: the sampling policy, up to +-0.6 nats from the current one (rho in [0.55, 1.8],
    so the clip at 0.2 engages on many tokens)."""
    g = torch.Generator().manual_seed(seed)
    return pol + (torch.rand(pol.shape, generator=g) - 0.5) * 1.2


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.3])
def test_trl_grpo_loss_and_gradient(trl, beta, off_policy):
    k = 4
    pol, ref, mask, rewards = _groups(k=k)
    old = _off_policy(pol, 7) if off_policy else None
    # TRL's advantages (GRPOTrainer._generate_and_score_completions, scale_rewards="group")
    grouped = rewards.view(-1, k)
    mean = grouped.mean(dim=1).repeat_interleave(k)
    std = trl.nanstd(grouped, dim=1).repeat_interleave(k)
    adv = (rewards - mean) / (std + 1e-4)
    theirs_in = pol.clone().requires_grad_()
    t = _trl_trainer(trl.GRPOTrainer, theirs_in, beta=beta, loss_type="grpo",
                     args=SimpleNamespace(delta=None, use_bias_correction_kl=False))
    extra = {} if old is None else {"old_per_token_logps": old}
    want = t._compute_loss(None, _inputs(mask, advantages=adv, ref_per_token_logps=ref, num_items_in_batch=mask.sum(),
                                         **extra))
    want.backward()
    ours_in = pol.clone().requires_grad_()
    lp = _ranked(ours_in, ref, mask, rewards, k)
    if old is not None:
        lp.old_tokens = old.view(lp.policy_tokens.shape)
        rho = (pol - old).exp()[mask.bool()]
        assert ((rho < 0.8) | (rho > 1.2)).float().mean() > 0.3  # the clip is exercised
    got = run("grpo", lp, beta).mean()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_in.grad * mask, theirs_in.grad * mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.05, 0.5])
def test_trl_rloo_loss_and_gradient(trl, beta, off_policy):
    k = 4
    pol, ref, mask, rewards = _groups(k=k, seed=1)
    old = _off_policy(pol, 8) if off_policy else pol
    # TRL's reward shaping and advantages (RLOOTrainer._generate_and_score_completions, normalize_advantages=False):
    # the KL reads the sampling-time log-probs old_per_token_logps
    kl = ((old - ref) * mask).sum(-1)
    shaped = (rewards - beta * kl).view(-1, k)
    adv = (shaped - (shaped.sum(dim=1, keepdim=True) - shaped) / (k - 1)).view(-1)
    theirs_in = pol.clone().requires_grad_()
    t = _trl_trainer(trl.RLOOTrainer, theirs_in)
    want = t._compute_loss(None, _inputs(mask, advantages=adv, old_logps=(old * mask).sum(-1)))
    want.backward()
    ours_in = pol.clone().requires_grad_()
    lp = _ranked(ours_in, ref, mask, rewards, k)
    lp.old = (old * mask).sum(-1).view(lp.policy.shape)
    got = run("rloo", lp, beta).mean()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_in.grad * mask, theirs_in.grad * mask, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ data path


def test_token_matrix_pads_each_sequence_in_position_order():
    from paft.models.logps import sequence_sums, token_matrix

    logps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    seq = torch.tensor([0, 0, 2, 2, 2, 3])  # sequence 1 has no label token
    values, mask = token_matrix(logps, seq, 4)
    torch.testing.assert_close(values, torch.tensor([[1.0, 2, 0], [0, 0, 0], [3, 4, 5], [6, 0, 0]]))
    assert mask.tolist() == [[True, True, False], [False] * 3, [True] * 3, [True, False, False]]
    torch.testing.assert_close((values * mask).sum(1), sequence_sums(logps, seq, 4)[0])


def _group_batch(tok, packed=False):
    from paft.data.formats import RankedExample
    from paft.train.preference import DATA_KINDS

    kind = DATA_KINDS["groups"]
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(2)]
    examples = [kind.from_samples(p, [f"reply {j} " * (j + 1) for j in range(3)], [0.0, 1.0, 2.0 + i])
                for i, p in enumerate(prompts)]
    assert all(isinstance(e, RankedExample) for e in examples)
    assert kind.from_samples(prompts[0], ["only one"], [1.0]) is None  # no group of one
    data = SimpleNamespace(max_length=96, max_prompt_length=64)
    rows = [kind.encode(e, tok, data) for e in examples]
    return kind.collator(tok.pad_token_id, 512 if packed else None, 96)(rows)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
@pytest.mark.parametrize("packed", [False, True])
def test_token_level_group_objectives_read_per_token_policy_and_reference(lora_model, tiny_tok, packed, method):
    from paft.models.logps import sequence_logps
    from paft.train.preference import PreferenceObjective
    from paft.models.reference import ReferenceLogps

    model = lora_model
    plain = _group_batch(tiny_tok)
    batch = _group_batch(tiny_tok, packed) if packed else plain
    obj = PreferenceObjective(method, 0.04)
    if method == "ppo":
        from paft.train.preference import attach_value_head

        attach_value_head(model)
    obj.reference = ReferenceLogps(None)
    lp, _ = obj.kind.logps(obj, model, batch)
    assert lp.policy_tokens.shape[:2] == (2, 3) and lp.scores.tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]]
    with torch.no_grad():
        want = sequence_logps(model, plain["input_ids"], plain["attention_mask"], plain["labels"])[0].view(2, 3)
        with model.disable_adapter():
            want_ref = sequence_logps(model, plain["input_ids"], plain["attention_mask"], plain["labels"])[0].view(2, 3)
    tm = lp.token_mask
    torch.testing.assert_close((lp.policy_tokens * tm).sum(-1).detach(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close((lp.ref_tokens * tm).sum(-1), want_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp.ref, want_ref, atol=1e-4, rtol=0)
    assert (tm.sum(-1) == lp.tokens).all()
    loss, _ = obj(model, batch)
    loss.backward()  # the gradient reaches the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_reference_token_memo_stays_in_memory_and_snapshots(lora_model, tiny_tok, tmp_path):
    """Per-token reference entries (online sampled replies, which never recur) are memoised for the round only:
    never written to the cache file, which ``save`` rewrites whole."""
    from paft.models.reference import ReferenceLogps

    model = lora_model
    b = _group_batch(tiny_tok)
    path = tmp_path / "ref.json"
    a = ReferenceLogps(path)
    toks = a.tokens(model, b)
    assert a.misses == 6
    torch.testing.assert_close(a.tokens(model, b), toks)
    assert a.misses == 6 and a.hits == 6  # memoised
    torch.testing.assert_close(toks.sum(1), a(model, b), atol=1e-4, rtol=0)
    a.save()
    stored = json.loads(path.read_text())
    assert "token_logps" not in stored and len(stored["logps"]) == 6
    again = ReferenceLogps(path)
    torch.testing.assert_close(again.tokens(model, b), toks)
    assert again.misses == 6  # recomputed: not persisted
    again.forget_tokens()
    assert again.token_values == {}
    # a snapshot freezes the current policy's tokens too (online reference "previous")
    snap = ReferenceLogps(None)
    snap.snapshot(model, [b])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    frozen = snap.tokens(model, b)
    torch.testing.assert_close(frozen.sum(1), snap(model, b), atol=1e-4, rtol=0)
    assert not torch.allclose(frozen, toks, atol=1e-3)  # the policy's, not the adapter-disabled model's


def test_grpo_rounds_sample_k_replies_per_prompt_and_train_on_whole_groups(tmp_path):
    from paft.config import load_config
    from paft.pipeline import Run

    f = tmp_path / "my_scorer.py"
    f.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path / 'run'}", "preference.method=grpo", "preference.max_steps=2",
        "preference.online.samples_per_prompt=3", "preference.online.rounds=1", "preference.online.prompts_per_round=4",
        "preference.online.max_new_tokens=6", "preference.online.scorer.kind=function",
        f"preference.online.scorer.function={f}:score"])
    run = Run(cfg)
    run.prepare()
    s = run.train(["preference"])["preference"]
    assert s["data_kind"] == "groups" and s["schedule"] == "online" and s["steps"] == 2
    assert s["phases"][0]["groups"] == 4 and math.isfinite(s["train_loss"])
    path = run.branch_dir("preference") / "rounds" / "round-1" / "samples.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(recs) == 4 and all(len(x["replies"]) == 3 and x["used"] == [0, 1, 2] and "pair" not in x for x in recs)
    assert all(x["scores"] == [float(len(y)) for y in x["replies"]] for x in recs)


def test_group_size_below_two_is_a_config_error():
    from paft.config import load_config
    from paft.errors import ConfigError

    with pytest.raises(ConfigError, match="candidates"):
        load_config(preset="tiny", overrides=["preference.method=rloo", "preference.params.candidates=1"])


# ------------------------------------------------------------------------------------------ TDPO
# pair 0: h_w = +1, h_l = -1 (u = 2), D(y_w) = 0.5, D(y_l) = 1.5; pair 1: u = 0, D = 0 both (DPO at 0: log 2)


def _tdpo_lp():
    from paft.methods.losses import PairLogps

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(policy_chosen=t(-10.0, -5.0), policy_rejected=t(-12.0, -5.0), ref_chosen=t(-11.0, -5.0),
                     ref_rejected=t(-11.0, -5.0), seq_kl_chosen=t(0.5, 0.0).requires_grad_(),
                     seq_kl_rejected=t(1.5, 0.0).requires_grad_())


def lsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_tdpo_closed_forms(beta):
    lp = _tdpo_lp()
    tdpo2 = run("tdpo", lp, beta)  # u - alpha (D_l - D_w) = 2 - 0.5 * 1
    torch.testing.assert_close(tdpo2.detach(), torch.tensor([-lsig(1.5 * beta), math.log(2)], dtype=torch.float64))
    tdpo2.sum().backward()
    assert lp.seq_kl_chosen.grad is None  # TDPO2 stops the gradient through D(y_w)
    # d/dD_l of -log sigma(beta (u - alpha D_l ...)) = alpha beta sigma(-beta z)
    s = 1 / (1 + math.exp(1.5 * beta))
    torch.testing.assert_close(lp.seq_kl_rejected.grad, torch.tensor([0.5 * beta * s, 0.25 * beta], dtype=torch.float64))
    lp = _tdpo_lp()
    tdpo1 = run("tdpo", lp, beta, variant=1)  # u - (D_l - D_w) = 1
    torch.testing.assert_close(tdpo1.detach(), torch.tensor([-lsig(beta), math.log(2)], dtype=torch.float64))
    tdpo1.sum().backward()
    assert lp.seq_kl_chosen.grad[0] < 0 < lp.seq_kl_rejected.grad[0]
    with pytest.raises(ValueError, match="variant"):
        run("tdpo", lp, beta, variant=3)


def test_tdpo_objective_computes_the_sequential_kl_from_full_distributions(lora_model, tiny_tok):
    """D(y) against a plain full-logits computation, and the DPO sums against the sequence log-prob readers."""
    from paft.data.collate import PairCollator
    from paft.data.formats import PreferenceExample
    from paft.data.tokenize import encode_pair
    from paft.models.logps import sequence_logps
    from paft.train.preference import PreferenceObjective

    model = lora_model
    ex = [PreferenceExample(prompt=[{"role": "user", "content": f"q {i}"}], chosen="yes " * (i + 1),
                            rejected="no " * (3 - i)) for i in range(3)]
    b = PairCollator(tiny_tok.pad_token_id)([encode_pair(e, tiny_tok, 96, 64) for e in ex])
    obj = PreferenceObjective("tdpo", 0.1)
    lp, metrics = obj.kind.logps(obj, model, b)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    with torch.no_grad():
        pol = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        with model.disable_adapter():
            ref = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        want_kl = ((ref.exp() * (ref - pol)).sum(-1) * (labels[:, 1:] != -100)).sum(-1)
        want_pol = sequence_logps(model, ids, mask, labels)[0]
        with model.disable_adapter():
            want_ref = sequence_logps(model, ids, mask, labels)[0]
    got_kl = torch.cat([lp.seq_kl_chosen, lp.seq_kl_rejected]).detach()
    torch.testing.assert_close(got_kl, want_kl, atol=1e-5, rtol=1e-4)
    assert (got_kl > 0).all()  # the adapter moved the policy away from the reference
    torch.testing.assert_close(torch.cat([lp.policy_chosen, lp.policy_rejected]).detach(), want_pol, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([lp.ref_chosen, lp.ref_rejected]), want_ref, atol=1e-4, rtol=0)
    assert metrics["kl/chosen"] == pytest.approx(want_kl[:3].mean().item(), rel=1e-4)
    loss, _ = obj(model, b)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_tdpo_packed_batch_gives_the_padded_values(lora_model, tiny_tok):
    from paft.data.collate import PairCollator
    from paft.data.formats import PreferenceExample
    from paft.data.tokenize import encode_pair
    from paft.train.preference import PreferenceObjective

    model = lora_model
    rows = [encode_pair(PreferenceExample(prompt=[{"role": "user", "content": f"q {i}"}], chosen="yes " * (i + 1),
                                          rejected="no " * (3 - i)), tiny_tok, 96, 64) for i in range(3)]
    obj = PreferenceObjective("tdpo", 0.1)
    with torch.no_grad():
        padded, _ = obj.kind.logps(obj, model, PairCollator(tiny_tok.pad_token_id)(rows))
        packed, _ = obj.kind.logps(obj, model, PairCollator(tiny_tok.pad_token_id, 512)(rows))
    for f in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "seq_kl_chosen", "seq_kl_rejected"):
        torch.testing.assert_close(getattr(packed, f), getattr(padded, f), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ DRO
# rewards 1, 0, 2; h = log pi - log pi_ref = 0.5, -1, 0; tau = 0.5: r - tau h = 0.75, 0.5, 2; V = 3.25 / 3


def test_dro_closed_form_value_and_gradient():
    from paft.methods.losses import UnpairedLogps

    policy = torch.tensor([-4.5, -6.0, -3.0], dtype=torch.float64, requires_grad=True)
    lp = UnpairedLogps(policy=policy, labels=torch.tensor([True, False, True]),
                       ref=torch.tensor([-5.0, -5.0, -3.0], dtype=torch.float64),
                       rewards=torch.tensor([1.0, 0.0, 2.0]))
    res = [0.75, 0.5, 2.0]
    v = sum(res) / 3
    loss = run("dro", lp, 0.5)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.5 * (x - v) ** 2 for x in res], dtype=torch.float64))
    loss.sum().backward()  # V detached: d/dh of 1/2 (r - V - tau h)^2 = -tau (r - V - tau h)
    torch.testing.assert_close(policy.grad, torch.tensor([-0.5 * (x - v) for x in res], dtype=torch.float64))
    with pytest.raises(ValueError, match="reward"):
        run("dro", UnpairedLogps(policy=policy, labels=lp.labels, ref=lp.ref), 0.5)


def test_rewarded_rows_load_and_every_preference_format_converts(tmp_path):
    from paft.data.formats import BinaryExample, PreferenceExample, RankedExample, examples_for_method
    from paft.data.loading import load_examples

    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "a?", "completion": "yes", "reward": 0.7}\n'
                 '{"prompt": "b?", "completion": "no", "reward": -2}\n')
    rows = load_examples(str(f), "preference").examples
    assert [(e.completion, e.reward, e.label) for e in rows] == [("yes", 0.7, True), ("no", -2.0, False)]
    f.write_text('{"prompt": "a?", "completion": "yes", "reward": "high"}\n')
    with pytest.raises(Exception, match="reward"):
        load_examples(str(f), "preference")
    p = [{"role": "user", "content": "q"}]
    got = examples_for_method([PreferenceExample(p, "good", "bad")], "rewarded", method="dro", source="x")
    assert [(e.completion, e.reward) for e in got] == [("good", 1.0), ("bad", 0.0)]
    got = examples_for_method([RankedExample(p, ["a", "b", "c"], [3.0, 1.0, 2.0])], "rewarded", method="dro",
                              source="x")
    assert [(e.completion, e.reward) for e in got] == [("a", 3.0), ("b", 1.0), ("c", 2.0)]
    got = examples_for_method([BinaryExample(p, "a", False)], "rewarded", method="dro", source="x")
    assert got[0].reward == 0.0


def test_dro_trains_on_rewarded_rows_and_needs_two_rows_per_batch(tmp_path):
    from paft.config import load_config
    from paft.errors import ConfigError
    from paft.pipeline import Run

    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": "answer " * (i % 3 + 1),
                                     "reward": float(i % 3)}) + "\n" for i in range(24)))
    over = [f"run.output_dir={tmp_path / 'run'}", "preference.method=dro", "preference.max_steps=2",
            f"data.preference.path={f}"]
    run = Run(load_config(preset="tiny", overrides=over))
    run.prepare()
    s = run.train(["preference"])["preference"]
    assert s["data_kind"] == "rewarded" and s["steps"] == 2 and math.isfinite(s["train_loss"]) and s["train_loss"] > 0
    run = Run(load_config(preset="tiny", overrides=[*over, "preference.batch_size=1",
                                                     f"run.output_dir={tmp_path / 'run1'}"]))
    run.prepare()
    with pytest.raises(ConfigError, match="value estimate"):
        run.train(["preference"])


# ------------------------------------------------------------------------------------------ SPPO
# group of 3 rewards 0, 0, ln 3: sigma(ln 3) = 3/4; P(y_1 > pi) = (1/2 + 1/4)/2 = 3/8, P(y_2) = 3/8, P(y_3) = 3/4
# beta 0.5 (eta 2): targets (P - 1/2) * 2 = -1/4, -1/4, 1/2; h = log pi - log pi_ref = 0, -1, 1


def test_sppo_closed_form():
    from paft.methods.losses import win_probabilities

    ln3 = math.log(3)
    scores = torch.tensor([[0.0, 0.0, ln3], [1.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    win = win_probabilities(scores, mask)
    s14 = 1 / (1 + math.exp(4))
    torch.testing.assert_close(win, torch.tensor([[3 / 8, 3 / 8, 3 / 4], [s14, 1 - s14, 0.5]], dtype=torch.float64))
    policy = torch.tensor([[-2.0, -3.0, -1.0], [-1.0, -1.0, 50.0]], dtype=torch.float64, requires_grad=True)
    lp = RankedLogps(policy=policy, scores=scores, mask=mask,
                     ref=torch.tensor([[-2.0, -2.0, -2.0], [-1.0, -1.0, 0.0]], dtype=torch.float64))
    loss = run("sppo", lp, 0.5)
    g0 = ((0 + 0.25) ** 2 + (-1 + 0.25) ** 2 + (1 - 0.5) ** 2) / 3
    g1 = ((0 - (s14 - 0.5) * 2) ** 2 + (0 - (0.5 - s14) * 2) ** 2) / 2  # the padded entry is left out
    torch.testing.assert_close(loss.detach(), torch.tensor([g0, g1], dtype=torch.float64))
    loss.sum().backward()
    assert policy.grad[1, 2] == 0


def test_sppo_is_a_groups_row_with_the_previous_round_as_reference():
    from paft.methods.schedules import Group, Online

    assert LOSSES["sppo"].schedule == Online(selection=Group(), reference="previous")
    assert LOSSES["rloo"].schedule == LOSSES["grpo"].schedule == Online(selection=Group())
    assert Group().candidates is None  # online.samples_per_prompt
    assert [m for m, spec in LOSSES.items() if spec.ratio] == ["rloo", "grpo", "ppo"]
    assert LOSSES["grpo"].token_level and LOSSES["tdpo"].token_level and not LOSSES["rloo"].token_level


def test_sppo_two_rounds_snapshot_the_previous_model_as_reference(tmp_path):
    from paft.config import load_config
    from paft.pipeline import Run

    cfg = load_config(preset="tiny", overrides=[
        f"run.output_dir={tmp_path / 'run'}", "preference.method=sppo", "preference.max_steps=2",
        "preference.params.candidates=3", "preference.online.rounds=2", "preference.online.prompts_per_round=3",
        "preference.online.max_new_tokens=6", "preference.online.scorer.kind=function",
        "preference.online.scorer.function=paft.scoring:demo_reward"])
    run = Run(cfg)
    run.prepare()
    s = run.train(["preference"])["preference"]
    assert [p["reference"] for p in s["phases"]] == ["previous", "previous"]
    assert [p["groups"] for p in s["phases"]] == [3, 3] and s["steps"] == 2 and math.isfinite(s["train_loss"])


def test_paft_methods_json_lists_them_with_data_kind_and_schedule():
    from typer.testing import CliRunner

    from paft.cli import app

    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    want = {"rloo": ("groups", "online"), "grpo": ("groups", "online"), "sppo": ("groups", "online"),
            "tdpo": ("pairs", "offline"), "dro": ("rewarded", "offline")}
    assert {m: (rows[m]["data"], rows[m]["schedule"]) for m in want} == want
    assert rows["grpo"]["paper_beta"] == 0.04 and rows["rloo"]["defaults"] == {"epsilon": 0.2, "candidates": None}


# ------------------------------------------------------------------------------------------ PPO


def test_gae_closed_form():
    from paft.methods.losses import gae

    r = torch.tensor([[0.2, 1.0, 5.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.4, 7.0]], dtype=torch.float64)  # the third position is padding
    m = torch.tensor([[True, True, False]])
    # t=1: delta = 1 + 0.9 * 0 - 0.4 = 0.6 = A_1; t=0: delta = 0.2 + 0.9 * 0.4 - 0.5 = 0.06, A_0 = 0.06 + 0.45 * 0.6
    torch.testing.assert_close(gae(r, v, m, 0.9, 0.5), torch.tensor([[0.33, 0.6, 0.0]], dtype=torch.float64))
    # gamma = lam = 1: A_t = sum of rewards from t on minus V_t (Monte Carlo)
    torch.testing.assert_close(gae(r, v, m, 1.0, 1.0), torch.tensor([[0.7, 0.6, 0.0]], dtype=torch.float64))


def test_ppo_closed_form_value_and_gradients():
    """Two replies (2 and 1 tokens), scores 1 and -1, beta 0.1; see the comments for each step."""
    pol = torch.tensor([[[-1.0, -2.0], [-0.5, 0.0]]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[[-1.0, -1.0], [-1.0, 0.0]]], dtype=torch.float64)
    values = torch.tensor([[[0.5, 0.4], [0.2, 9.0]]], dtype=torch.float64, requires_grad=True)
    tm = torch.tensor([[[True, True], [True, False]]])
    lp = RankedLogps(policy=(pol * tm).sum(-1), scores=torch.tensor([[1.0, -1.0]], dtype=torch.float64),
                     mask=torch.ones(1, 2, dtype=torch.bool), ref=(ref * tm).sum(-1), policy_tokens=pol,
                     ref_tokens=ref, token_mask=tm, values=values)
    # rewards: reply 0: 0, -0.1 (-2 + 1) + 1 = 1.1; reply 1: -0.1 (-0.5 + 1) - 1 = -1.05
    # GAE (gamma 1, lam 0.95): reply 0: A_1 = 1.1 - 0.4 = 0.7, A_0 = 0.4 - 0.5 + 0.95 * 0.7 = 0.565; reply 1: -1.25
    adv = [0.565, 0.7, -1.25]
    returns = [0.565 + 0.5, 0.7 + 0.4, -1.25 + 0.2]
    mean = sum(adv) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in adv) / 2 + 1e-8)
    white = [(a - mean) / sd for a in adv]
    v = [0.5, 0.4, 0.2]
    loss = run("ppo", lp, 0.1)  # rho = 1: the surrogate's token mean is -mean(white) = 0; the value term remains
    want = 0.1 * 0.5 * sum((x - y) ** 2 for x, y in zip(v, returns)) / 3
    torch.testing.assert_close(loss.detach(), torch.tensor([want], dtype=torch.float64))
    loss.sum().backward()
    g = torch.zeros(1, 2, 2, dtype=torch.float64)
    g[0, 0, 0], g[0, 0, 1], g[0, 1, 0] = (-w / 3 for w in white)
    torch.testing.assert_close(pol.grad, g)
    gv = torch.zeros(1, 2, 2, dtype=torch.float64)
    gv[0, 0, 0], gv[0, 0, 1], gv[0, 1, 0] = (0.1 * (x - y) / 3 for x, y in zip(v, returns))
    torch.testing.assert_close(values.grad, gv)


def test_ppo_value_head_trains_with_the_adapter_and_stays_out_of_the_adapter_folder(lora_model, tiny_tok, tmp_path):
    from safetensors.torch import load_file

    from paft.train.preference import VALUE_HEAD, PreferenceObjective, attach_value_head

    model = lora_model
    attach_value_head(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(VALUE_HEAD in n for n in trainable) and any("lora" in n for n in trainable)  # the optimizer sees both
    obj = PreferenceObjective("ppo", 0.05)
    batch = _group_batch(tiny_tok)
    lp, _ = obj.kind.logps(obj, model, batch)
    assert lp.values.shape == lp.policy_tokens.shape and (lp.values == 0).all()  # zero-initialised critic
    loss, _ = obj(model, batch)
    loss.backward()
    head = getattr(model, VALUE_HEAD)
    assert head.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "adapter")
    assert not any(VALUE_HEAD in k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))


def test_ppo_with_full_fine_tuning_is_a_config_error():
    """The value head lives beside a LoRA adapter (a full model folder would save it among the weights); the
    config already refuses full fine-tuning for every online method."""
    from paft.config import load_config
    from paft.errors import ConfigError

    with pytest.raises(ConfigError, match="'ppo' is online: use adapter lora or qlora"):
        load_config(preset="tiny", overrides=["preference.method=ppo", "preference.adapter=full"])


# ------------------------------------------------------------------------------------------ review fixes


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_a_second_step_on_a_round_s_groups_is_off_policy(lora_model, tiny_tok, method):
    """An online round takes several optimiser steps on its groups: pi_old (and PPO's V_old) is the snapshot taken
    before the round trained, so after one step rho = pi / pi_old != 1 (before, pi_old was the current policy)."""
    from paft.train.preference import PreferenceObjective, attach_value_head
    from paft.models.reference import ReferenceLogps

    torch.manual_seed(0)
    model = lora_model
    if method == "ppo":
        attach_value_head(model)
    batch = _group_batch(tiny_tok)
    obj = PreferenceObjective(method, 0.0)
    obj.reference = ReferenceLogps(None)
    obj.start_round(model, [batch])
    first, _ = obj.kind.logps(obj, model, batch)
    tm = first.token_mask
    torch.testing.assert_close(first.old_tokens[tm], first.policy_tokens.detach()[tm], atol=1e-4, rtol=0)  # rho = 1
    if method == "ppo":
        torch.testing.assert_close(first.old_values, first.values.detach())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    loss, _ = obj(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    second, _ = obj.kind.logps(obj, model, batch)
    torch.testing.assert_close(second.old_tokens, first.old_tokens)  # pi_old stays the sampling policy
    logratio = (second.policy_tokens - second.old_tokens)[tm]
    assert logratio.abs().max() > 1e-3  # rho != 1
    if method == "ppo":
        assert not torch.allclose(second.values.detach()[tm], second.old_values[tm])  # V moved, V_old did not
    obj.end_round()  # the round is over: no pi_old, the reference's token memo dropped
    assert obj.old is None and obj.old_values is None and obj.reference.token_values == {}
    assert obj.kind.logps(obj, model, batch)[0].old_tokens is None


def test_grpo_after_a_step_clips_tokens_the_update_pushed_too_far(lora_model, tiny_tok):
    """The clip engages in GRPO's own loss: after a large step the surrogate's gradient at tokens whose rho left
    the clip range in the advantage's direction is zero (beta 0: the surrogate only)."""
    from paft.methods.losses import group_advantages
    from paft.train.preference import PreferenceObjective
    from paft.models.reference import ReferenceLogps

    model = lora_model
    batch = _group_batch(tiny_tok)
    obj = PreferenceObjective("grpo", 0.0)
    obj.reference = ReferenceLogps(None)
    obj.start_round(model, [batch])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    obj(model, batch)[0].backward()
    opt.step()
    opt.zero_grad()
    lp, _ = obj.kind.logps(obj, model, batch)
    lp.policy_tokens.retain_grad()
    get_loss("grpo").fn(lp, beta=0.0, epsilon=0.2).mean().backward()
    tm = lp.token_mask
    adv = group_advantages(lp.scores, lp.mask)[:, :, None].expand_as(tm)
    rho = (lp.policy_tokens - lp.old_tokens).exp().detach()
    binding = tm & (((adv > 0) & (rho > 1.2)) | ((adv < 0) & (rho < 0.8)))
    assert binding.any()
    assert (lp.policy_tokens.grad[binding] == 0).all()
    assert (lp.policy_tokens.grad[tm & ~binding & (adv != 0)] != 0).all()


def test_token_level_groups_run_the_reference_forward_once(lora_model, tiny_tok, monkeypatch):
    """GRPO/PPO read per-token reference log-probs; the per-reply sums come from them, not a second forward."""
    from paft.train.preference import PreferenceObjective
    from paft.models.reference import ReferenceLogps

    model = lora_model
    batch = _group_batch(tiny_tok)
    calls = []
    token_forward = ReferenceLogps._token_forward
    monkeypatch.setattr(ReferenceLogps, "_token_forward", lambda self, *a: calls.append(1) or token_forward(self, *a))

    def summed(self, *a):
        raise AssertionError("second reference forward")

    monkeypatch.setattr(ReferenceLogps, "_forward", summed)
    obj = PreferenceObjective("grpo", 0.04)
    obj.reference = ReferenceLogps(None, cache=False)
    lp, _ = obj.kind.logps(obj, model, batch)
    assert calls == [1]
    torch.testing.assert_close(lp.ref, (lp.ref_tokens * lp.token_mask).sum(-1))


def test_ppo_values_stay_float32_under_bf16_autocast(lora_model, tiny_tok):
    from paft.train.preference import PreferenceObjective, attach_value_head

    model = lora_model
    attach_value_head(model)
    with torch.no_grad():
        torch.nn.init.normal_(getattr(model, "paft_value_head").weight, std=0.1)
    obj = PreferenceObjective("ppo", 0.05)
    batch = _group_batch(tiny_tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = obj.kind.logps(obj, model, batch)
    assert lp.values.dtype == torch.float32


def test_reference_forward_is_the_frozen_copy_else_the_adapter_disabled_model(lora_model, tiny_tok):
    from paft.models.logps import batch_sequence_logps
    from paft.models.reference import reference_forward

    model = lora_model
    batch = _group_batch(tiny_tok)
    with reference_forward(model) as ref:
        assert ref is model and not torch.is_grad_enabled()
        disabled = batch_sequence_logps(ref, batch)[0]
    with torch.no_grad():
        enabled = batch_sequence_logps(model, batch)[0]
    assert not torch.allclose(disabled, enabled, atol=1e-4)  # the adapter was off inside, on again after
    frozen = object()
    with reference_forward(model, frozen) as ref:
        assert ref is frozen


def test_dro_batches_are_full_an_epoch_s_last_row_alone_is_dropped(tmp_path):
    """A DRO batch of one row has residual - V = 0 and trains nothing: 5 rows in batches of 2 give 2 batches per
    epoch, not 3; fewer rows than a batch is a one-line data error."""
    from paft.config import load_config
    from paft.errors import DataError
    from paft.pipeline import Run
    from paft.train.trainer import training_args

    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": "answer " * (i % 3 + 1),
                                     "reward": float(i % 3)}) + "\n" for i in range(5)))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "held out", "completion": "yes", "reward": 1.0}) + "\n")
    over = [f"run.output_dir={tmp_path / 'run'}", "preference.method=dro", "preference.max_steps=-1",
            "preference.epochs=2", "preference.batch_size=2", "preference.grad_accum=1", f"data.preference.path={f}",
            f"data.preference.eval_path={held}", "data.dev_size=0"]
    cfg = load_config(preset="tiny", overrides=over)
    args = training_args(cfg.preference, tmp_path / "ck", seed=0, device="cpu", bf16=False, n_examples=5,
                         drop_last=True)
    assert args.dataloader_drop_last and args.max_steps == 4
    assert training_args(cfg.preference, tmp_path / "ck", seed=0, device="cpu", bf16=False,
                         n_examples=5).max_steps == 6
    run = Run(cfg)
    run.prepare()
    s = run.train(["preference"])["preference"]
    assert s["examples"] == 5 and s["steps"] == 4
    f.write_text(json.dumps({"prompt": "q", "completion": "a", "reward": 1.0}) + "\n")
    cfg = load_config(preset="tiny", overrides=[*over, "preference.batch_size=4", f"run.output_dir={tmp_path / 'r2'}"])
    run = Run(cfg)
    with pytest.raises(DataError, match="at least preference.batch_size=4 rows"):
        run.prepare()
        run.train(["preference"])
