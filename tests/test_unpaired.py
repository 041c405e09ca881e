"""Methods whose data is not pairs: KTO (binary feedback) and NPO (undesirable completions only).

Format adapter and detection, pair -> unpaired conversion, the wrong-data-kind error, encoding
and the KTO KL batch, the losses (closed forms, extremes, parity with TRL 1.16's KTOTrainer),
the objective on the tiny model, evaluation on unpaired held-out data, and one tiny KTO run.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from paft.config import load_config
from paft.data.collate import BinaryCollator
from paft.data.formats import (
    BinaryExample,
    PreferenceExample,
    RowError,
    detect_preference_format,
    examples_for_method,
    pairs_to_binary,
    to_preference_example,
)
from paft.data.loading import load_examples
from paft.data.tokenize import IGNORE, EncodedCompletion, encode_completion, encode_pair
from paft.errors import ConfigError, DataError
from paft.methods.losses import LOSSES, UnpairedLogps, get_loss

DATA = Path(__file__).parent / "fixtures" / "data"
UNPAIRED = DATA / "pref_unpaired.jsonl"


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def lsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(lsig(x))


def run(name, lp, beta, **params):
    spec = get_loss(name)
    return spec.fn(lp, beta=beta, **{**spec.defaults, **params})


def close(got, want, tol=1e-10):
    torch.testing.assert_close(got.detach().double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# format adapter, detection, conversion


def test_unpaired_fixture_loads_as_binary_examples():
    res = load_examples(str(UNPAIRED), "preference")
    assert res.fmt == "prompt_completion_label" and res.skipped == 0 and len(res.examples) == 4
    q = [m("user", "What is the capital of Australia?")]
    assert res.examples[:2] == [BinaryExample(q, "The capital of Australia is Canberra.", True),
                                BinaryExample(q, "Sydney.", False)]
    # message lists: the completion may repeat the prompt (system turn included) or hold the reply only
    lock = res.examples[2]
    assert lock.prompt[0] == m("system", "You are a careful assistant.") and lock.prompt[-1]["role"] == "user"
    assert lock.completion.startswith("I can't help") and lock.label is True  # label 1
    assert res.examples[3] == BinaryExample([m("user", "Summarise the water cycle in one sentence.")], "Rain.",
                                            False)  # label "False"


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False), (1.0, True),
                                             ("true", True), (" FALSE ", False), ("1", True), ("0", False)])
def test_label_spellings(value, expected):
    ex = to_preference_example({"prompt": "Q?", "completion": "A.", "label": value}, "prompt_completion_label")
    assert ex == BinaryExample([m("user", "Q?")], "A.", expected)


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "Q?", "completion": "A.", "label": "yes"}, "label",
     "expected a boolean (true/false or 1/0), got 'yes'"),
    ({"prompt": "Q?", "completion": "A.", "label": 2}, "label", "got 2"),
    ({"prompt": "Q?", "completion": "A.", "label": None}, "label", "got None"),
    ({"prompt": "Q?", "completion": "A.", "label": 0.5}, "label", "got 0.5"),
    ({"prompt": "Q?", "completion": "A."}, "label", "missing column"),
    ({"prompt": "Q?", "completion": 3, "label": True}, "completion", "expected a string or a list of messages"),
    ({"prompt": "Q?", "completion": [m("user", "Q?")], "label": True}, "completion",
     "last message must be the assistant reply"),
    ({"prompt": [m("assistant", "hi")], "completion": "A.", "label": True}, "prompt", "must end with a user turn"),
])
def test_unpaired_row_errors_name_the_field(row, field, message):
    with pytest.raises(RowError) as err:
        to_preference_example(row, "prompt_completion_label")
    assert err.value.field == field and message in err.value.message


def test_bad_label_in_a_file_is_a_one_line_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "Q?", "completion": "A.", "label": True}, {"prompt": "Q?", "completion": "B.", "label": "maybe"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'label': expected a boolean"):
        load_examples(str(path), "preference")


def test_detection_of_unpaired_data_keeps_pair_formats():
    row = {"prompt": "Q", "completion": "A", "label": True}
    assert detect_preference_format(row, row) == "prompt_completion_label"
    both = {**row, "chosen": "a", "rejected": "b"}  # pair columns win when both layouts are present
    assert detect_preference_format(both, both) == "prompt_chosen_rejected"
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    assert detect_preference_format(hh, hh) == "hh_rlhf"
    with pytest.raises(DataError, match=r"prompt_completion_label \(prompt, completion, label\)"):
        detect_preference_format(["prompt", "completion"], {})


def test_pairs_to_binary_and_negatives():
    q1, q2 = [m("user", "one")], [m("user", "two")]
    pairs = [PreferenceExample(q1, "good 1", "bad 1"), PreferenceExample(q2, "good 2", "bad 2")]
    binary = pairs_to_binary(pairs)
    assert binary == [BinaryExample(q1, "good 1", True), BinaryExample(q1, "bad 1", False),
                      BinaryExample(q2, "good 2", True), BinaryExample(q2, "bad 2", False)]
    assert examples_for_method(pairs, "binary", method="kto", source="x") == binary
    assert examples_for_method(pairs, "negatives", method="npo", source="x") == [binary[1], binary[3]]
    assert examples_for_method(pairs, "pairs", method="dpo", source="x") == pairs
    unpaired = load_examples(str(UNPAIRED), "preference").examples
    assert examples_for_method(unpaired, "binary", method="kto", source="x") == unpaired
    assert [e.completion for e in examples_for_method(unpaired, "negatives", method="npo", source="x")] == [
        "Sydney.", "Rain."]


def test_wrong_data_kind_names_method_and_columns():
    unpaired = load_examples(str(UNPAIRED), "preference").examples
    with pytest.raises(DataError) as err:
        examples_for_method(unpaired, "pairs", method="dpo", source="data/preference_train.jsonl")
    msg = str(err.value)
    assert msg == ("preference.method 'dpo' needs paired data (columns prompt/chosen/rejected, or hh_rlhf / "
                   "beavertails / implicit-prompt forms); data/preference_train.jsonl has unpaired rows "
                   "(prompt, completion, label)")
    only_good = [e for e in unpaired if e.label]
    with pytest.raises(DataError, match=r"preference.method 'npo' needs undesirable completions.*x has no row with "
                                        r"label false"):
        examples_for_method(only_good, "negatives", method="npo", source="x")


def test_train_branch_refuses_unpaired_data_for_a_pairwise_method(tmp_path, paft_cache):
    from paft.train.branch import preference_examples, train_branch

    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}/run", "preference.method=ipo"])
    # checked before any model is loaded: the model folder does not even exist
    with pytest.raises(DataError, match=r"preference.method 'ipo' needs paired data \(columns prompt/chosen/rejected"
                                        r".*pref_unpaired.jsonl has unpaired rows \(prompt, completion, label\)"):
        train_branch("preference", cfg, tmp_path / "no-such-model", UNPAIRED, tmp_path / "pref")
    assert not (tmp_path / "pref").exists()
    kto1 = load_config(preset="tiny", overrides=["preference.method=kto", "preference.batch_size=1"])
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        preference_examples(kto1, UNPAIRED)


def test_canonical_jsonl_round_trips_unpaired_rows(tmp_path):
    from paft.data.prepare import write_examples as _write_examples
    from paft.pipeline import Run

    unpaired = load_examples(str(UNPAIRED), "preference").examples
    _write_examples(tmp_path / "p.jsonl", unpaired)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "completion", "label"} and rows[1]["label"] is False
    assert load_examples(str(tmp_path / "p.jsonl"), "preference").examples == unpaired
    # the pipeline's data stage: unpaired input -> canonical train/eval files that load back the same
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path}/run", f"data.preference.path={UNPAIRED}",
                                                "data.preference.eval_size=0.25", "data.dev_size=0"])
    run = Run(cfg)
    run.prepare()
    summary = run.data()
    assert summary["preference"]["format"] == "prompt_completion_label"
    assert summary["preference"]["train"] == 3 and summary["preference"]["eval"] == 1
    back = (load_examples(str(run.data_dir / "preference_train.jsonl"), "preference").examples
            + run.eval_examples("preference"))
    assert sorted(back, key=repr) == sorted(unpaired, key=repr)
    # the run's default method is DPO: the train stage stops before any branch (SFT included) starts
    with pytest.raises(DataError, match=r"preference.method 'dpo' needs paired data.*pref_unpaired.jsonl has "
                                        r"unpaired rows"):  # the user's file, not the run's copy
        run.train(["sft", "preference"])
    assert not (run.root / "sft").exists()


# ------------------------------------------------------------------------------------------
# encoding and the KL batch


def test_encode_completion_matches_encode_pair(tiny_tok):
    pair = PreferenceExample([m("system", "Be brief."), m("user", "Name a colour.")], "Blue.", "I like turtles a lot.")
    ep = encode_pair(pair, tiny_tok, 128, 64)
    good, bad = (encode_completion(e, tiny_tok, 128, 64) for e in pairs_to_binary([pair]))
    assert good.prompt_ids == bad.prompt_ids == ep.prompt_ids
    assert good.completion_ids == ep.chosen_ids and bad.completion_ids == ep.rejected_ids
    assert good.label is True and bad.label is False
    assert tiny_tok.decode(good.completion_ids).startswith("Blue.")
    # prompt left-truncated, completion right-truncated to the remaining budget
    short = encode_completion(pairs_to_binary([pair])[1], tiny_tok, 8, 5)
    assert short.prompt_ids == ep.prompt_ids[-5:] and short.completion_ids == ep.rejected_ids[:3]


def test_binary_collator_builds_mismatched_kl_rows():
    rows = [EncodedCompletion([1, 2], [10, 11], True), EncodedCompletion([3], [20], False),
            EncodedCompletion([4, 5, 6], [30, 31, 32], True)]
    b = BinaryCollator(pad_id=0)(rows)
    assert b["desirable"].tolist() == [True, False, True]
    want = [[1, 2, 10, 11], [3, 20], [4, 5, 6, 30, 31, 32],  # matched: prompt_i + completion_i
            [3, 10, 11], [4, 5, 6, 20], [1, 2, 30, 31, 32]]  # KL: prompt_{(i+1) mod 3} + completion_i
    want_labels = [[IGNORE, IGNORE, 10, 11], [IGNORE, 20], [IGNORE] * 3 + [30, 31, 32],
                   [IGNORE, 10, 11], [IGNORE] * 3 + [20], [IGNORE, IGNORE, 30, 31, 32]]
    assert b["input_ids"].shape == (6, 6)
    for i, (ids, labels) in enumerate(zip(want, want_labels)):
        n = len(ids)
        assert b["input_ids"][i, :n].tolist() == ids and b["attention_mask"][i].tolist() == [1] * n + [0] * (6 - n)
        assert b["labels"][i].tolist() == labels + [IGNORE] * (6 - n)
    # the prompt of every KL row differs from its completion's own prompt
    for i in range(3):
        assert b["input_ids"][3 + i, 0] != b["input_ids"][i, 0]
    # without the KL rows (NPO): the B matched rows only; max_length cuts KL completions that would not fit
    assert BinaryCollator(pad_id=0, kl=False)(rows)["input_ids"].shape == (3, 6)
    capped = BinaryCollator(pad_id=0, max_length=5)(rows)
    assert capped["attention_mask"][4].sum().item() == 4  # [4, 5, 6] + [20]: fits
    assert capped["input_ids"][5, :5].tolist() == [1, 2, 30, 31, 32] and capped["input_ids"].shape[1] == 6
    capped = BinaryCollator(pad_id=0, max_length=4)(rows)
    assert capped["input_ids"][5, :4].tolist() == [1, 2, 30, 31] and capped["attention_mask"][5].sum().item() == 4


# ------------------------------------------------------------------------------------------
# losses

# policy, ref, label; h = policy - ref = 1, 0, -1, 0.5
ROWS = [(-10.0, -11.0, True), (-5.0, -5.0, False), (-3.0, -2.0, True), (-8.0, -8.5, False)]
# mismatched rows: policy_kl - ref_kl = 0.5, 0.2, 0.1, 0.2 -> mean 0.25 = z0
KL = [(-12.0, -12.5), (-7.0, -7.2), (-4.0, -4.1), (-9.0, -9.2)]


def _ulp(rows=ROWS, kl=KL, dtype=torch.float64, grad=False):
    policy = torch.tensor([r[0] for r in rows], dtype=dtype, requires_grad=grad)
    ref = torch.tensor([r[1] for r in rows], dtype=dtype)
    labels = torch.tensor([r[2] for r in rows])
    pk = rk = None
    if kl is not None:
        pk = torch.tensor([k[0] for k in kl], dtype=dtype, requires_grad=grad)
        rk = torch.tensor([k[1] for k in kl], dtype=dtype)
    return UnpairedLogps(policy=policy, labels=labels, ref=ref, policy_kl=pk, ref_kl=rk)


def test_registry_entries():
    kto, npo = LOSSES["kto"], LOSSES["npo"]
    assert kto.data == "binary" and kto.reference and kto.defaults == {"desirable_weight": 1.0,
                                                                       "undesirable_weight": 1.0}
    assert npo.data == "negatives" and npo.reference and npo.defaults == {}
    assert "2402.01306" in kto.paper and "2404.05868" in npo.paper
    assert kto.paper_beta == npo.paper_beta == 0.1
    assert "z0" in kto.fn.__doc__ and "softplus" in npo.fn.__doc__
    assert {s.data for s in LOSSES.values()} == {"pairs", "binary", "negatives", "ranked", "online", "groups", "rewarded"}


def test_kto_closed_form():
    beta, z0 = 0.5, 0.25
    h = [1.0, 0.0, -1.0, 0.5]
    want = [1 - sig(beta * (h[0] - z0)), 1 - sig(beta * (z0 - h[1])), 1 - sig(beta * (h[2] - z0)),
            1 - sig(beta * (z0 - h[3]))]
    close(run("kto", _ulp(), beta), want)
    assert run("kto", _ulp(), beta)[0].item() == pytest.approx(1 - 1 / (1 + math.exp(-0.375)))  # 0.407333
    # weights scale each class
    close(run("kto", _ulp(), beta, desirable_weight=2.0, undesirable_weight=0.5),
          [2 * want[0], 0.5 * want[1], 2 * want[2], 0.5 * want[3]])
    # z0 is clamped at 0: a negative KL estimate counts as 0
    neg_kl = [(a, b + 1.0) for a, b in KL]  # diffs -0.5, -0.8, -0.9, -0.8
    close(run("kto", _ulp(kl=neg_kl), beta), [1 - sig(beta * x) for x in (1.0, 0.0, -1.0, -0.5)])
    with pytest.raises(ValueError, match="KL rows"):
        run("kto", _ulp(kl=None), beta)


def test_kto_gradient_skips_the_kl_estimate():
    lp = _ulp(grad=True)
    beta, z0 = 0.5, 0.25
    run("kto", lp, beta).sum().backward()
    assert lp.policy_kl.grad is None  # z0 detached
    # desirable: d/dh (1 - sigma(beta (h - z0))) = -beta s (1 - s) with s = sigma(beta (h - z0));
    # undesirable: +beta s (1 - s) with s = sigma(beta (z0 - h))
    want = []
    for (p, r, lab) in ROWS:
        s = sig(beta * ((p - r) - z0)) if lab else sig(beta * (z0 - (p - r)))
        want.append((-1 if lab else 1) * beta * s * (1 - s))
    close(lp.policy.grad, want)


def test_npo_closed_form_and_gradient():
    beta = 0.5
    rows = [(-10.0, -11.0, False), (-5.0, -5.0, False), (-3.0, -1.0, False)]  # h = 1, 0, -2
    lp = _ulp(rows, kl=None, grad=True)
    loss = run("npo", lp, beta)
    close(loss, [4 * math.log1p(math.exp(0.5)), 4 * math.log(2), 4 * math.log1p(math.exp(-1.0))])
    assert loss[1].item() == pytest.approx(2.7725887, abs=1e-7)  # (2/beta) log 2
    loss.sum().backward()
    close(lp.policy.grad, [2 * sig(beta * h) for h in (1.0, 0.0, -2.0)])  # dL/dh = 2 sigma(beta h)
    # small beta: NPO -> gradient ascent up to a constant, L - 2 log2 / beta -> h
    small = run("npo", _ulp(rows, kl=None), 1e-4) - 2 * math.log(2) / 1e-4
    close(small, [1.0, 0.0, -2.0], tol=1e-3)
    with pytest.raises(ValueError, match="undesirable completions only"):
        run("npo", _ulp(ROWS, kl=None), beta)


@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_values_are_finite(sign):
    big = 1e4
    for name, lab, kl in (("kto", [True, False], [(sign * big, 0.0), (0.0, 0.0)]), ("npo", [False, False], None)):
        rows = [(sign * big, 0.0, lab[0]), (-sign * big, 0.0, lab[1])]
        lp = _ulp(rows, kl=kl, dtype=torch.float32, grad=True)
        loss = run(name, lp, 0.5)
        assert torch.isfinite(loss).all(), (name, loss)
        loss.sum().backward()
        assert torch.isfinite(lp.policy.grad).all(), name
    lp = _ulp([(big, 0.0, False), (-big, 0.0, False)], kl=None, dtype=torch.float32)
    v = run("npo", lp, 0.5)
    assert v[0].item() == pytest.approx(2 * big, rel=1e-6) and v[1].item() == pytest.approx(0.0, abs=1e-6)
    lp = _ulp([(big, 0.0, True), (-big, 0.0, False), (-big, 0.0, True), (big, 0.0, False)], kl=[(0.0, 0.0)] * 4,
              dtype=torch.float32)
    assert run("kto", lp, 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------
# parity with TRL 1.16's KTOTrainer._compute_loss (TRL's own code on the same log-probs)


class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


class _SeqLogpModel(torch.nn.Module):
    """Stands in for the policy: per-token log-probs whose row sums are fixed numbers.

    The main batch is all 1s and the KL batch all 2s, so the stub knows which sums to return.
    """

    def __init__(self, main, kl):
        super().__init__()
        self.main, self.kl = main, kl

    def forward(self, input_ids, labels=None, **kwargs):
        sums = self.kl if int(input_ids[0, 0]) == 2 else self.main
        b, t = input_ids.shape
        per_token = torch.zeros(b, t - 1)
        per_token[:, 0] = sums  # TRL sums over the positions; where the sum sits does not matter
        z = torch.zeros(b, t - 1)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, aux_loss=None)


def _trl_kto(rows, kl, beta, desirable_weight=1.0, undesirable_weight=1.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import KTOTrainer
    b, t = len(rows), 4
    model = _SeqLogpModel(torch.tensor([r[0] for r in rows]), torch.tensor([k[0] for k in kl]))
    trainer = object.__new__(KTOTrainer)
    vars(trainer).update(model=model, accelerator=_Accel(), aux_loss_enabled=False, precompute_ref_logps=True,
                         calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight,
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                         _tp_size=1)
    ones, cmask = torch.ones(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)
    cmask[:, 1:] = 1
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": cmask,
              "KL_input_ids": 2 * ones, "KL_attention_mask": ones, "KL_completion_mask": cmask,
              "label": torch.tensor([r[2] for r in rows]), "ref_logps": torch.tensor([r[1] for r in rows]),
              "ref_KL_logps": torch.tensor([k[1] for k in kl])}
    return trainer._compute_loss(model, inputs, False), trainer._metrics["train"]


TRL_ROWS = ROWS + [(-20.5, -22.0, True), (-7.75, -6.0, False), (-31.25, -27.0, False)]
TRL_KL = KL + [(-15.0, -14.0), (-6.5, -7.0), (-30.0, -28.5)]  # mean diff < 0: z0 clamps to 0
TRL_KL_POS = KL + [(-15.0, -16.0), (-6.5, -7.0), (-30.0, -30.5)]
TRL_KL_BIG = KL + [(-1.0, -9.0), (-2.0, -1.0), (-5.0, -15.5)]  # z0 larger than most h


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("kl", [TRL_KL, TRL_KL_POS, TRL_KL_BIG], ids=["z0-clamped", "z0-positive", "z0-large"])
def test_kto_matches_trl(beta, kl):
    pytest.importorskip("trl")
    for weights in ((1.0, 1.0), (1.0, 1.33), (0.75, 1.0)):
        want, metrics = _trl_kto(TRL_ROWS, kl, beta, *weights)
        lp = _ulp(TRL_ROWS, kl, dtype=torch.float32)
        got = run("kto", lp, beta, desirable_weight=weights[0], undesirable_weight=weights[1])
        torch.testing.assert_close(got.mean(), want, rtol=1e-5, atol=1e-5)
        z0 = (lp.policy_kl - lp.ref_kl).mean().clamp(min=0).item()
        assert metrics["kl"][-1] == pytest.approx(z0, abs=1e-6)
    for row, k in zip(TRL_ROWS, kl):  # one row per batch: per example, not only the mean
        want, _ = _trl_kto([row], [k], beta)
        torch.testing.assert_close(run("kto", _ulp([row], [k], dtype=torch.float32), beta).mean(), want,
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# the objective on the tiny model


def _lora_model(tiny_model):
    from paft.config import LoraConfig
    from paft.train.lora import attach_lora

    model = attach_lora(tiny_model, LoraConfig(r=4, alpha=8), 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make policy == reference; move it so h != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _binary_batch(tok, kl):
    exs = [BinaryExample([m("user", f"question {i}")], ("yes " if i % 2 else "no ") * (i + 1), bool(i % 2))
           for i in range(4)]
    if not kl:
        exs = [BinaryExample(e.prompt, e.completion, False) for e in exs]
    rows = [encode_completion(e, tok, 128, 64) for e in exs]
    return BinaryCollator(tok.pad_token_id, kl=kl, max_length=128)(rows), rows


@pytest.mark.parametrize("name", ["kto", "npo"])
def test_objective_matches_the_loss_on_the_tiny_model(name, tiny_model, tiny_tok):
    from paft.models.logps import sequence_logps
    from paft.train.preference import PreferenceObjective

    model = _lora_model(tiny_model)
    kl = LOSSES[name].data == "binary"
    batch, rows = _binary_batch(tiny_tok, kl)
    obj = PreferenceObjective(name, 0.5)
    loss, metrics = obj(model, batch)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)

    # the same loss from log-probs computed row by row (no padding), matched and mismatched by hand
    def one(prompt, completion, adapter):
        ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[IGNORE] * len(prompt) + completion])
        with torch.no_grad():
            if adapter:
                return sequence_logps(model, ids, torch.ones_like(ids), labels)[0]
            with model.disable_adapter():
                return sequence_logps(model, ids, torch.ones_like(ids), labels)[0]

    b = len(rows)
    lp = UnpairedLogps(policy=torch.cat([one(r.prompt_ids, r.completion_ids, True) for r in rows]),
                       labels=torch.tensor([r.label for r in rows]),
                       ref=torch.cat([one(r.prompt_ids, r.completion_ids, False) for r in rows]))
    if kl:
        mis = [(rows[(i + 1) % b].prompt_ids, r.completion_ids) for i, r in enumerate(rows)]
        lp.policy_kl = torch.cat([one(p, c, True) for p, c in mis])
        lp.ref_kl = torch.cat([one(p, c, False) for p, c in mis])
    want = run(name, lp, 0.5).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lp.policy, lp.ref)  # the reference really is the adapter-free model
    if kl:
        assert {"rewards/desirable", "rewards/undesirable", "rewards/margin", "kl",
                "logps/desirable", "logps/undesirable"} <= set(metrics)
        assert metrics["kl"] == pytest.approx(max(0.0, (lp.policy_kl - lp.ref_kl).mean().item()), abs=1e-4)
    else:
        assert "rewards/undesirable" in metrics and "rewards/desirable" not in metrics and "kl" not in metrics
        h = (lp.policy - lp.ref).mean().item()
        assert metrics["rewards/undesirable"] == pytest.approx(0.5 * h, abs=1e-4)


# ------------------------------------------------------------------------------------------
# evaluation and the pipeline


def test_evaluation_on_unpaired_held_out_data_reports_none(tiny_dir, tiny_tok):
    from paft.data.formats import SFTExample
    from paft.eval.models import ModelSpec, evaluate_models
    from paft.report.markdown import to_markdown
    from paft.report.render import build_report

    cfg = load_config(preset="tiny")
    sft = [SFTExample(messages=[m("user", "hi"), m("assistant", "hello")])]
    unpaired = load_examples(str(UNPAIRED), "preference").examples
    res = evaluate_models([ModelSpec("base", tiny_dir)], cfg, tiny_tok, sft, unpaired)
    base = res["models"]["base"]
    assert base["pref_accuracy"] is None and base["reward_margin"] is None and base["reward_accuracy"] is None
    assert base["sft_nll"] > 0 and "unpaired" in res["pref_metrics"]
    # the report renders None metrics (and the alignment-tax table) without failing
    evals = {k: dict(base) for k in ("base", "sft", "preference", "paft")}
    rep = {"config": cfg.model_dump(mode="json"), "eval": {**res, "models": evals}, "sparsity": {}, "training": {},
           "timings_s": None, "versions": {}}
    text = to_markdown(build_report(rep))
    assert "Preference metrics not computed: held-out preference data is unpaired" in text
    assert "| PAFT merge | +0.000 | – |" in text


def test_tiny_run_with_kto(tmp_path, paft_cache):
    from paft.pipeline import Run

    out = tmp_path / "kto"
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={out}", "preference.method=kto",
                                                "run.parallel=false"])
    Run(cfg).all()  # in-process branches: about 15 s on 2 idle cores
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["models"]) == {"base", "sft", "preference", "sequential", "paft"}
    assert "pref_metrics" not in ev and ev["n_pref_eval"] == cfg.data.demo.preference_eval
    for metrics in ev["models"].values():
        assert 0 <= metrics["pref_accuracy"] <= 1
    for branch in ("preference", "sequential"):
        summary = json.loads((out / branch / "train_summary.json").read_text())
        assert summary["data_kind"] == "binary" and summary["steps"] == cfg.preference.max_steps
        # every training pair (the demo's, less the dev split) became two rows
        assert summary["examples"] == 2 * (cfg.data.demo.preference_train - cfg.data.dev_size)
        logged = json.loads((out / branch / "log_history.json").read_text())
        assert any("kl" in h and "rewards/desirable" in h for h in logged)
