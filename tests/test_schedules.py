"""Reference log-prob cache, sDPO stages and online rounds (iterative DPO, RSO, self-rewarding)."""

import json
import random

import pytest
import torch

from paft.config import load_config
from paft.data.collate import PairCollator
from paft.data.formats import PreferenceExample, unique_prompts
from paft.data.tokenize import encode_pair
from paft.pipeline import Run
from paft.methods.schedules import best_worst, rejection_sample
from paft.train.phases import split_steps
from paft.models.reference import ReferenceLogps, reference_identity, row_key


def _pairs(n=4):
    return [PreferenceExample(prompt=[{"role": "user", "content": f"question number {i}"}],
                              chosen="yes " * (i + 1), rejected="no " * (4 - i)) for i in range(n)]


def _batch(tok, n=4):
    return PairCollator(tok.pad_token_id)([encode_pair(e, tok, 96, 64) for e in _pairs(n)])


def _disabled(model, b):
    from paft.models.logps import sequence_logps

    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])[0]


def test_reference_cache_matches_the_adapter_disabled_forward_and_memoises(lora_model, tiny_tok, monkeypatch):
    b = _batch(tiny_tok)
    want = _disabled(lora_model, b)
    ref = ReferenceLogps(None)
    got = ref(lora_model, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (ref.hits, ref.misses) == (0, 8)

    calls = []
    monkeypatch.setattr(ReferenceLogps, "_forward", lambda *a: calls.append(a) or torch.zeros(0))
    again = ref(lora_model, b)  # every row memoised: no forward
    assert calls == [] and torch.equal(again, got) and ref.hits == 8


def test_reference_cache_computes_only_missing_rows_and_keys_ignore_padding(lora_model, tiny_tok):
    full = _batch(tiny_tok, 4)
    ref = ReferenceLogps(None)
    first = _batch(tiny_tok, 2)  # rows of pairs 0 and 1, padded to their own (shorter) width
    ref(lora_model, first)
    got = ref(lora_model, full)
    assert ref.misses == 4 + 4 and ref.hits == 4  # the 4 rows seen before are found despite other padding
    torch.testing.assert_close(got, _disabled(lora_model, full), atol=1e-5, rtol=0)
    ids, mask, labels = full["input_ids"][0], full["attention_mask"][0], full["labels"][0]
    w = int(mask.sum())
    assert row_key(ids, mask, labels) == row_key(ids[:w], mask[:w], labels[:w])
    labels2 = labels.clone()
    labels2[labels2 != -100] = -100
    assert row_key(ids, mask, labels) != row_key(ids, mask, labels2)  # which tokens are scored is part of the key


def test_reference_cache_persists_and_merges_on_disk(lora_model, tiny_tok, tmp_path):
    b = _batch(tiny_tok)
    path = tmp_path / "ref.json"
    a = ReferenceLogps(path)
    want = a(lora_model, b)
    a.save()
    assert len(json.loads(path.read_text())["logps"]) == 8
    b2 = ReferenceLogps(path)  # a later run: everything from disk
    got = b2(lora_model, b)
    assert b2.misses == 0 and torch.allclose(got, want, atol=1e-7)
    path.write_text("not json")
    assert ReferenceLogps(path).values == {}  # a corrupt cache is recomputed, not an error
    off = ReferenceLogps(path, cache=False)
    torch.testing.assert_close(off(lora_model, b), want,
                               atol=1e-5, rtol=0)
    assert off.values == {}


def test_reference_identity_changes_with_merged_adapter_and_precision(tiny_dir, tmp_path):
    base = reference_identity(tiny_dir, dtype="float32", bf16=False, init_adapter=None)
    assert base == reference_identity(tiny_dir, dtype="float32", bf16=False, init_adapter=None)
    assert base != reference_identity(tiny_dir, dtype="float32", bf16=True, init_adapter=None)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    assert base != reference_identity(tiny_dir, dtype="float32", bf16=False, init_adapter=tmp_path)


def test_snapshot_freezes_the_current_policy(lora_model, tiny_tok):
    from paft.models.logps import sequence_logps

    b = _batch(tiny_tok)
    ref = ReferenceLogps(None)
    assert ref.snapshot(lora_model, [b]) == 8
    with torch.no_grad():
        policy = sequence_logps(lora_model, b["input_ids"], b["attention_mask"], b["labels"])[0]
        for n, p in lora_model.named_parameters():  # training moves on; the snapshot must not
            if "lora_B" in n:
                p.add_(0.1)
    got = ref(lora_model, b)
    torch.testing.assert_close(got, policy, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _disabled(lora_model, b), atol=1e-3)
    other = _batch(tiny_tok, 2)
    other["input_ids"] = other["input_ids"].flip(1)
    with pytest.raises(RuntimeError, match="missing from the stage snapshot"):
        ref(lora_model, other)
    ref.release_snapshot()
    torch.testing.assert_close(ref(lora_model, b),
                               _disabled(lora_model, b), atol=1e-5, rtol=0)


def test_split_steps():
    assert split_steps(8, 2) == [4, 4]
    assert split_steps(7, 3) == [3, 2, 2]
    assert split_steps(1, 3) == [1, 1, 1]  # every phase trains at least one step


def test_rejection_sampling_limits():
    scores = [0.1, 3.0, 1.0, 2.0, -1.0]
    rng = random.Random(0)
    # beta -> 0: exp((r - r_max)/beta) is 1 for the best remaining and ~0 otherwise: best-of-n order
    assert rejection_sample(scores, beta=1e-6, keep=3, rng=rng) == [1, 3, 2]
    # beta -> inf: every candidate accepted in the first sweep, in order
    assert rejection_sample(scores, beta=1e9, keep=5, rng=rng) == [0, 1, 2, 3, 4]
    # a candidate 1 nat below the best, tried first, is accepted with probability exp(-1/beta)
    hits = sum(0 in rejection_sample([0.0, 1.0], beta=1.0, keep=1, rng=random.Random(s)) for s in range(4000))
    assert abs(hits / 4000 - torch.exp(torch.tensor(-1.0)).item()) < 0.03
    a = rejection_sample(scores, beta=0.5, keep=2, rng=random.Random(7))
    assert a == rejection_sample(scores, beta=0.5, keep=2, rng=random.Random(7)) and len(a) == 2


def test_best_worst_and_unique_prompts():
    assert best_worst(["a", "b", "c"], [0.5, 2.0, -1.0]) == ("b", "c", 3.0)
    assert best_worst(["a", "b"], [1.0, 1.0]) is None  # ties give no preference
    ex = _pairs(3) + _pairs(2)
    assert unique_prompts(e.prompt for e in ex) == [e.prompt for e in _pairs(3)]


# ------------------------------------------------------------------------------------------ runs


def _align(tmp_path, *overrides):
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'run'}", *overrides])
    run = Run(cfg)
    run.prepare()
    return run, run.train(["preference"])["preference"]


def test_dpo_run_reuses_the_disk_cache(tmp_path, monkeypatch):
    # a cache folder of this test's own: other tests' runs on the same tiny data fill the shared one
    from paft.train import branch

    monkeypatch.setattr(branch, "reference_cache_path", lambda identity: tmp_path / "ref" / f"{identity}.json")
    _, first = _align(tmp_path / "a", "preference.max_steps=4")
    _, second = _align(tmp_path / "b", "preference.max_steps=4")
    assert first["reference_cache"]["computed"] > 0
    assert second["reference_cache"]["computed"] == 0 and second["reference_cache"]["hits"] == 32
    assert abs(first["train_loss"] - second["train_loss"]) < 1e-5
    _, off = _align(tmp_path / "c", "preference.max_steps=4", "preference.reference_cache=false")
    assert off["reference_cache"]["path"] is None and abs(off["train_loss"] - first["train_loss"]) < 1e-5


def test_sdpo_trains_in_stages_with_the_previous_stage_as_reference(tmp_path):
    from safetensors.torch import load_file

    run, s = _align(tmp_path, "preference.method=sdpo", "preference.max_steps=6", "preference.params.stages=3")
    assert s["schedule"] == "staged" and s["steps"] == 6
    assert [p["stage"] for p in s["phases"]] == [1, 2, 3] and sum(p["pairs"] for p in s["phases"]) == 64 - 8  # less the dev split
    stages = run.branch_dir("preference") / "stages"
    w = [load_file(str(stages / f"stage-{i}" / "adapter" / "adapter_model.safetensors")) for i in (1, 2, 3)]
    final = load_file(str(run.adapter("preference") / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], w[2][k]) for k in final)
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])
    # resume: drop stage 3's marker; the rerun restores stage 2's adapter and trains only stage 3
    (stages / "stage-3" / "done.json").unlink()
    (run.branch_dir("preference") / "train_summary.json").unlink()
    import shutil

    shutil.rmtree(stages / "stage-3" / "checkpoints")
    s2 = run.train(["preference"])["preference"]
    assert [p["stage"] for p in s2["phases"]] == [1, 2, 3] and s2["phases"][:2] == s["phases"][:2]
    again = load_file(str(run.adapter("preference") / "adapter_model.safetensors"))
    assert all(torch.allclose(again[k], final[k], atol=1e-6) for k in final)


def test_sdpo_bad_stage_count_is_a_config_error(tmp_path):
    from paft.errors import ConfigError

    with pytest.raises(ConfigError, match="preference.params.stages"):
        _align(tmp_path, "preference.method=sdpo", "preference.params.stages=1000")


SCORER = '''
def score(prompts, responses):
    # prefers longer replies: a deterministic signal the tiny random model can follow
    return [float(len(r)) for r in responses]
'''


def _online(tmp_path, method, *extra):
    f = tmp_path / "my_scorer.py"
    f.write_text(SCORER)
    return _align(tmp_path, f"preference.method={method}", "preference.max_steps=4", "preference.online.rounds=2",
                  "preference.online.prompts_per_round=6", "preference.online.samples_per_prompt=3",
                  "preference.online.max_new_tokens=6", "preference.online.scorer.kind=function",
                  f"preference.online.scorer.function={f}:score", *extra)


def _round_records(run, r):
    path = run.branch_dir("preference") / "rounds" / f"round-{r}" / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_iterative_dpo_rounds_sample_score_pair_and_train(tmp_path):
    run, s = _online(tmp_path, "iterative-dpo")
    assert s["schedule"] == "online" and s["data_kind"] == "online" and s["steps"] == 4
    assert [p["round"] for p in s["phases"]] == [1, 2]
    for r in (1, 2):
        recs = _round_records(run, r)
        assert len(recs) == 6 and all(len(x["replies"]) == 3 for x in recs)
        for x in recs:
            assert x["scores"] == [float(len(y)) for y in x["replies"]]  # the configured function scored them
            if x["pair"]:
                assert len(x["pair"]["chosen"]) == max(len(y) for y in x["replies"])
                assert len(x["pair"]["rejected"]) == min(len(y) for y in x["replies"])
        info = s["phases"][r - 1]
        assert info["pairs"] == sum(x["pair"] is not None for x in recs) and info["reference"] == "initial"
        assert info["mean_sample_score"] == pytest.approx(sum(sum(x["scores"]) for x in recs) / 18)
    # round 2 samples from the policy after round 1: different replies from round 1's for the same seed stream
    assert _round_records(run, 1) != _round_records(run, 2)


def test_rso_samples_from_the_start_policy_and_keeps_accepted(tmp_path):
    run, s = _online(tmp_path, "rso", "preference.online.rounds=1", "preference.params.candidates=4",
                     "preference.params.keep=2")
    recs = _round_records(run, 1)
    assert all(len(x["replies"]) == 4 and len(x["used"]) == 2 for x in recs)
    for x in recs:
        if x["pair"]:
            used = [x["replies"][i] for i in x["used"]]
            assert {x["pair"]["chosen"], x["pair"]["rejected"]} <= set(used)


def test_self_rewarding_judges_with_the_policy_and_uses_the_previous_round_as_reference(tmp_path):
    run, s = _online(tmp_path, "self-rewarding")
    assert all(p["reference"] == "previous" for p in s["phases"])
    for x in _round_records(run, 1):
        assert all(1.0 <= v <= 5.0 for v in x["scores"])  # expected 1-5 rating of the policy as judge


def test_online_method_without_prompts_is_a_data_error(tmp_path):
    from paft.errors import DataError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        _online(tmp_path, "iterative-dpo", f"data.preference.path={empty}")


# ------------------------------------------------------------------------------------------ schedules as data


def test_schedules_are_rows_of_the_loss_registry():
    from paft.methods.losses import LOSSES
    from paft.methods.schedules import BestWorst, Online, RejectionSampling, Staged

    assert LOSSES["sdpo"].schedule == Staged(stages=2) and LOSSES["sdpo"].fn is LOSSES["dpo"].fn
    assert LOSSES["iterative-dpo"].schedule == Online()  # current policy, best vs worst, configured ref and scorer
    assert LOSSES["rso"].schedule == Online(sample_from="start", selection=RejectionSampling(0.5, 8, 4))
    assert LOSSES["self-rewarding"].schedule == Online(reference="previous", scorer="self_judge")
    assert isinstance(Online().selection, BestWorst)
    assert {s.schedule.kind for s in LOSSES.values()} == {"offline", "staged", "online"}
    # what `paft methods` shows as defaults: the loss's and the schedule's parameters
    assert LOSSES["rso"].params == {"loss": "hinge", "rso_beta": 0.5, "candidates": 8, "keep": 4}
    assert LOSSES["sdpo"].params == {"stages": 2} and LOSSES["dpo"].params == {}


def test_configure_splits_params_between_the_loss_and_the_schedule():
    from paft.methods.losses import LOSSES
    from paft.methods.schedules import ScheduleParamError

    kwargs, schedule = LOSSES["rso"].configure({"keep": 2, "loss": "sigmoid"})
    assert kwargs == {"loss": "sigmoid"} and schedule.selection.keep == 2 and schedule.candidates == 8
    kwargs, schedule = LOSSES["sdpo"].configure({"stages": 3})
    assert kwargs == {} and schedule.stages == 3
    kwargs, schedule = LOSSES["cdpo"].configure({"eps": 0.2})
    assert kwargs == {"eps": 0.2} and schedule.kind == "offline"
    assert LOSSES["iterative-dpo"].configure({})[1].candidates is None  # online.samples_per_prompt decides
    with pytest.raises(ScheduleParamError, match="keep <= candidates"):
        LOSSES["rso"].configure({"keep": 9})


def test_bad_schedule_params_fail_when_the_config_loads():
    from paft.errors import ConfigError

    with pytest.raises(ConfigError, match="rso_beta > 0"):
        load_config(preset="tiny", overrides=["preference.method=rso", "preference.params.rso_beta=0"])


def test_scorer_kind_reads_the_schedule_not_the_method_name():
    from paft.methods.losses import LOSSES

    assert LOSSES["dpo"].schedule.scorer_kind("reward_model") is None
    assert LOSSES["iterative-dpo"].schedule.scorer_kind("reward_model") == "reward_model"
    assert LOSSES["self-rewarding"].schedule.scorer_kind("reward_model") == "self_judge"
    cfg = load_config(preset="tiny", overrides=["preference.method=rso"])
    assert Run(cfg).needs_reward_model()
    assert not Run(load_config(preset="tiny", overrides=["preference.method=self-rewarding"])).needs_reward_model()


def test_a_new_online_method_is_one_registry_row(tmp_path, monkeypatch):
    """Best-of-n from the start model with the policy as judge: no training code names it."""
    from paft.methods import losses
    from paft.methods.schedules import Online

    monkeypatch.setitem(losses.LOSSES, "start-self-judge", losses.LossSpec(
        "start-self-judge", losses.pair_loss, "online", True, "test row", {"loss": "sigmoid"},
        schedule=Online(sample_from="start", scorer="self_judge")))
    run, s = _online(tmp_path, "start-self-judge", "preference.online.rounds=1")
    assert s["schedule"] == "online" and s["steps"] == 4 and not run.needs_reward_model()
    assert all(1.0 <= v <= 5.0 for x in _round_records(run, 1) for v in x["scores"])  # the policy judged


def test_generation_is_greedy_or_seeded_k_per_prompt(tiny_model, tiny_tok):
    from paft.models.generation import generate_replies

    prompts = [e.prompt for e in _pairs(3)]
    side = tiny_tok.padding_side
    kw = dict(max_new_tokens=4, batch_size=4, max_prompt_tokens=64)
    greedy = generate_replies(tiny_model, tiny_tok, prompts, **kw)
    assert len(greedy) == 3 and greedy == generate_replies(tiny_model, tiny_tok, prompts, **{**kw, "batch_size": 1})
    sampled = generate_replies(tiny_model, tiny_tok, prompts, k=2, temperature=1.0, seed=5, **kw)
    assert len(sampled) == 6 and sampled == generate_replies(tiny_model, tiny_tok, prompts, k=2, temperature=1.0,
                                                             seed=5, **kw)
    assert tiny_tok.padding_side == side and not tiny_model.training  # both restored after generation
