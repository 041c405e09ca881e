"""Trained alignment-tax remedies (candidates.trained): config, the online merges against hand computations, the
joint loss against its two terms, and tiny runs of the branches."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from paft.config import load_config
from paft.errors import ConfigError


# --------------------------------------------------------------------------- config

def test_trained_names_default_empty_and_take_one_name():
    cfg = load_config(preset="tiny")
    assert cfg.candidates.trained.names == []
    one = load_config(preset="tiny", overrides=["candidates.trained.names=online_ties"])
    assert one.candidates.trained.names == ["online_ties"]


@pytest.mark.parametrize("override, match", [
    ("candidates.trained.names=[jont]", r"candidates\.trained\.names'.*unknown trained candidate 'jont' \(did you "
                                        r"mean 'joint'\?\); known: joint, online_dare, online_ties, no_l1"),
    ("candidates.trained.names=[joint, joint]", r"candidates\.trained\.names'.*joint is listed twice"),
    ("candidates.trained.online_density=0", r"candidates\.trained\.online_density"),
    ("candidates.trained.online_tau_weight=1", r"candidates\.trained\.online_tau_weight"),
    ("candidates.trained.joint_gamma=-1", r"candidates\.trained\.joint_gamma"),
    ("candidates.trained.gamma=1", r"candidates\.trained\.gamma'.*unknown key"),
])
def test_bad_trained_settings_fail_in_one_line_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(preset="tiny", overrides=[override])
    assert "\n" not in str(err.value)


def test_every_remedy_row_is_documented():
    from pathlib import Path

    from paft.methods.remedies import REMEDIES

    doc = (Path(__file__).parents[1] / "docs" / "trained-candidates.md").read_text()
    for r in REMEDIES.values():
        assert f"`{r.name}`" in doc and f"`{r.model}`" in doc


# --------------------------------------------------------------------------- online merges

def test_ondare_update_equals_the_hand_computation():
    from paft.train.online_merge import dare_update

    delta = torch.tensor([[0.2, -0.4, 0.1], [0.3, 0.0, -0.6]])
    tau = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 0.0]])
    keep, alpha = 0.5, 0.1
    got = dare_update(delta, tau, keep, alpha, torch.Generator().manual_seed(0))
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(0))  # the same draw: entry kept when u < p
    kept = (u < keep).tolist()
    assert any(map(any, kept)) and not all(map(all, kept))  # this seed keeps some entries and drops some
    for i in range(2):
        for j in range(3):
            d = delta[i, j].item() / keep if kept[i][j] else 0.0
            want = alpha * tau[i, j].item() + (1 - alpha) * d
            assert got[i, j].item() == pytest.approx(want, abs=1e-7)


def test_ondare_update_is_unbiased_over_masks():
    """E[m delta / p] = delta: the mean over many steps' masks approaches the undropped update."""
    from paft.train.online_merge import dare_update

    delta, tau = torch.tensor([0.5, -1.0, 2.0, 0.25]), torch.zeros(4)
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([dare_update(delta, tau, 0.3, 0.0, g) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, delta, atol=0.12, rtol=0.05)


def test_onties_update_equals_the_hand_computation():
    from paft.train.online_merge import ties_update, trim

    delta = torch.tensor([0.3, -0.2, 0.05, -0.4])
    tau = torch.tensor([1.0, 0.5, -0.2, 0.1])
    # trim(delta, 0.5) keeps the 2 largest magnitudes: [0.3, 0, 0, -0.4]; sign(tau + trimmed) = [+, +, -, -];
    # tau's agreeing entries [1.0, 0.5, -0.2, 0]; the step's [0.3, 0, 0, -0.4]
    torch.testing.assert_close(trim(delta, 0.5), torch.tensor([0.3, 0.0, 0.0, -0.4]))
    got = ties_update(delta, tau, 0.5, 0.1)
    want = torch.tensor([0.1 * 1.0 + 0.9 * 0.3, 0.1 * 0.5, 0.1 * -0.2, 0.9 * -0.4])
    torch.testing.assert_close(got, want)


def _step(cb, p: torch.nn.Parameter, update: torch.Tensor, step: int = 0):
    """One optimizer step as the Trainer runs it: pre-step callback, the optimizer's change, post-step callback."""
    state = SimpleNamespace(global_step=step)
    cb.on_pre_optimizer_step(None, state, None)
    with torch.no_grad():
        p.add_(update)
    cb.on_optimizer_step(None, state, None)


def test_online_ties_callback_merges_each_step_with_the_trimmed_sft_delta():
    from paft.train.online_merge import OnlineMerge

    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    tau = torch.tensor([1.0, 0.5, -0.2, 0.1])  # trimmed once at density 0.5: [1.0, 0.5, 0, 0]
    cb = OnlineMerge({"w": p}, {"w": tau}, "ties", density=0.5, alpha=0.1)
    _step(cb, p, torch.tensor([0.3, -0.2, 0.05, -0.4]))
    # step trimmed [0.3, 0, 0, -0.4]; signs of tau' + step [+, +, +, -]: tau' agrees at 0, 1; the step at 0, 3
    want = torch.tensor([1.0 + 0.1 * 1.0 + 0.9 * 0.3, 1.0 + 0.1 * 0.5, 1.0, 1.0 - 0.9 * 0.4])
    torch.testing.assert_close(p.detach(), want)


def test_online_dare_callback_seeds_each_step_and_keeps_the_optimizer_change():
    from paft.train.online_merge import OnlineMerge, dare_update

    start, update, tau = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.2, 0.4, -0.1]), torch.tensor([1.0, 1.0, 1.0])
    p = torch.nn.Parameter(start.clone())
    cb = OnlineMerge({"w": p}, {"w": tau}, "dare", density=0.5, alpha=0.2, seed=3)
    _step(cb, p, update, step=7)
    want = start + dare_update(update, tau, 0.5, 0.2, torch.Generator().manual_seed(3 * 1_000_003 + 7))
    torch.testing.assert_close(p.detach(), want)
    # keep rate 1, alpha 0: the optimizer's own step, unchanged
    q = torch.nn.Parameter(start.clone())
    _step(OnlineMerge({"w": q}, {"w": tau}, "dare", density=1.0, alpha=0.0), q, update)
    torch.testing.assert_close(q.detach(), start + update)


# --------------------------------------------------------------------------- joint loss

def test_joint_loss_is_the_preference_loss_plus_gamma_times_the_nll(lora_model, tiny_tok):
    from paft.data.demo import preference_examples, sft_examples
    from paft.data.tokenize import encode_pair, encode_sft
    from paft.train.joint import JointObjective, joint_collator, joint_rows
    from paft.train.preference import PreferenceObjective
    from paft.train.sft import SFTObjective

    pref = [encode_pair(e, tiny_tok, 96, 64) for e in preference_examples(3, 0)]
    sft = [encode_sft(e, tiny_tok, 96) for e in sft_examples(2, 0)]
    rows = joint_rows(pref, sft)
    assert [r[1] for r in rows] == [sft[0], sft[1], sft[0]]  # SFT rows cycled
    batch = joint_collator("pairs")(tiny_tok.pad_token_id, 512, 96)(rows)
    p_obj, s_obj, gamma = PreferenceObjective("dpo", 0.1), SFTObjective(0.0), 0.7
    joint, metrics = JointObjective(p_obj, s_obj, gamma)(lora_model, batch)
    pref_loss, _ = p_obj(lora_model, batch["pref"])
    nll, _ = s_obj(lora_model, batch["sft"])
    assert joint.item() == pytest.approx(pref_loss.item() + gamma * nll.item(), rel=1e-6)
    assert metrics["nll"] == pytest.approx(nll.item(), rel=1e-6) and "rewards/margin" in metrics
    # the closed form of each term: DPO -log sigmoid(beta (h_w - h_l)); NLL the mean completion-token NLL
    from paft.models.logps import batch_sequence_logps, batch_token_logps

    logps, _ = batch_sequence_logps(lora_model, batch["pref"])
    with lora_model.disable_adapter(), torch.no_grad():
        ref, _ = batch_sequence_logps(lora_model, batch["pref"])
    h = logps - ref
    dpo = -torch.nn.functional.logsigmoid(0.1 * (h[:3] - h[3:])).mean()
    tok_logps = batch_token_logps(lora_model, batch["sft"])[0]
    assert joint.item() == pytest.approx(dpo.item() - gamma * tok_logps.mean().item(), rel=1e-5)


def test_remedy_config_sets_l1_off_only_for_its_branch():
    from paft.methods.remedies import REMEDIES
    from paft.train.branch import remedy_config

    cfg = load_config(preset="tiny")
    assert cfg.sft.l1_lambda > 0
    assert remedy_config(cfg, REMEDIES["no_l1"]).sft.l1_lambda == 0
    assert remedy_config(cfg, REMEDIES["joint"]) is cfg and cfg.sft.l1_lambda > 0


# --------------------------------------------------------------------------- tiny runs

def _cfg(out, names, steps=8, **more):
    sets = [f"run.output_dir={out}", f"candidates.trained.names={json.dumps(names)}", "eval.harness_tasks=[]",
            "candidates.expo_alpha=[]", "candidates.average_alpha=[]", "candidates.average_blocks=[]",
            "candidates.merge_methods=[]", f"sft.max_steps={steps}", f"preference.max_steps={steps}",
            "run.report_to=[]", *(f"{k}={v}" for k, v in more.items())]
    return load_config(preset="tiny", overrides=sets)


def test_a_joint_branch_trains_in_a_tiny_run(tmp_path):
    from paft.pipeline import Run
    from paft.train.branch import branch_done

    run = Run(_cfg(tmp_path / "run", ["joint"], steps=2, **{"run.sequential_baseline": "false"}))
    assert run.branches["joint"] == ("preference", None)
    run.prepare()
    summary = run.train(["joint"])["joint"]
    assert branch_done(tmp_path / "run" / "joint") and summary["remedy"] == "joint" and summary["steps"] == 2
    logged = json.loads((tmp_path / "run" / "joint" / "log_history.json").read_text())
    first = next(e for e in logged if "loss" in e)
    # both terms logged, and the loss is their sum (gamma = 1)
    assert first["loss"] == pytest.approx(first["pref_loss"] + first["nll"], rel=1e-3)
    assert not (tmp_path / "run" / "sft").exists()  # only the named branch trained


def test_online_branch_with_a_full_sft_branch_and_lora_preference_fails_in_one_line(tmp_path):
    from paft.train.online_merge import online_start

    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match="continues the SFT adapter.*set preference.adapter full"):
        online_start("lora", tmp_path, tmp_path / "model", lambda: None, dtype="float32", device="cpu",
                     trust_remote_code=False, seed_name="online_dare")
    with pytest.raises(ConfigError, match="online_ties needs preference.adapter lora or full"):
        online_start("qlora", tmp_path, tmp_path / "adapter", lambda: None, dtype="float32", device="cpu",
                     trust_remote_code=False, seed_name="online_ties")


@pytest.mark.slow
def test_tiny_run_trains_every_remedy_scores_it_and_resumes(tmp_path):
    from safetensors.torch import load_file

    from paft.pipeline import Run

    out = tmp_path / "run"
    names = ["joint", "online_dare", "online_ties", "no_l1"]
    cfg = _cfg(out, names, steps=4)
    Run(cfg).all()
    cand = json.loads((out / "candidates.json").read_text())
    rows = {r["name"]: r for r in cand["models"]}
    for model, family, branches in [("joint", "joint", ["joint"]),
                                    ("online_dare", "online_dare", ["sft", "online_dare"]),
                                    ("online_ties", "online_ties", ["sft", "online_ties"]),
                                    ("paft_no_l1", "no_l1", ["no_l1", "preference"])]:
        r = rows[model]
        assert r["family"] == family and r["cost"]["branches"] == branches
        assert all(math.isfinite(r["metrics"][k]) for k in ("sft_nll", "pref_accuracy", "reward_margin"))
        summaries = [json.loads((out / b / "train_summary.json").read_text()) for b in branches]
        assert r["cost"]["train_steps"] == sum(s["steps"] for s in summaries) == 4 * len(branches)
        assert r["cost"]["train_s"] == pytest.approx(sum(s["wall_s"] for s in summaries), abs=0.02)
    # no_l1 trains without the L1 term, the SFT branch with it
    logged = lambda b: json.loads((out / b / "log_history.json").read_text())  # noqa: E731
    assert any("l1_delta" in e for e in logged("sft")) and not any("l1_delta" in e for e in logged("no_l1"))
    # the online branches continue the SFT adapter (same keys), and trained it further
    sft = load_file(str(out / "sft" / "adapter" / "adapter_model.safetensors"))
    for b in ("online_dare", "online_ties"):
        online = load_file(str(out / b / "adapter" / "adapter_model.safetensors"))
        assert online.keys() == sft.keys() and any(not torch.equal(online[k], sft[k]) for k in sft)
    report = (out / "report.md").read_text()
    assert "paft_no_l1" in report and "online_ties" in report
    # resume: a second run trains nothing and keeps every branch's outputs
    stamps = {b: (out / b / "train_summary.json").stat().st_mtime_ns for b in names}
    Run(cfg).all()
    assert {b: (out / b / "train_summary.json").stat().st_mtime_ns for b in names} == stamps


def test_online_start_full_takes_tau_as_the_sft_weights_minus_the_base(tiny_dir):
    from paft.models import load_model
    from paft.train.online_merge import online_start

    def sft_model():  # a stand-in SFT model: the base with one weight moved
        m = load_model(tiny_dir)
        with torch.no_grad():
            next(m.parameters()).add_(0.25)
        return m

    model, frozen, tau = online_start("full", tiny_dir, tiny_dir, sft_model, dtype="float32", device="cpu",
                                      trust_remote_code=False, seed_name="online_dare")
    first = next(iter(tau))
    torch.testing.assert_close(tau[first], torch.full_like(tau[first], 0.25))
    assert all(not torch.any(t) for n, t in tau.items() if n != first)
    assert all(p.requires_grad for p in model.parameters()) and not any(p.requires_grad for p in frozen.parameters())
