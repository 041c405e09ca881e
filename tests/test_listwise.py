"""Listwise methods (RRHF, PRO, LiPO-lambda) and their ranked-list data, end to end.

Closed forms are written out by hand from the numbers below (plain ``math``, float64);
extreme-value and gradient checks run in float32, the dtype training uses. Then the ranked
formats and their detection, the data-kind conversions and errors, encoding and the collator
layout, the objective on the tiny model, and one tiny ``paft align`` run per method.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from paft.config import load_config
from paft.data.collate import RankedCollator
from paft.data.formats import (
    BinaryExample,
    PreferenceExample,
    RankedExample,
    detect_preference_format,
    examples_for_method,
    ranked_to_pairs,
)
from paft.data.loading import load_examples
from paft.data.tokenize import IGNORE, EncodedRanked, encode_pair, encode_ranked
from paft.errors import DataError
from paft.methods.losses import LOSSES, RankedLogps, get_loss

DATA = Path(__file__).parent / "fixtures" / "data"
RANKED = DATA / "pref_ranked.jsonl"
PAIRS = DATA / "pref_prompt_chosen_rejected.jsonl"
UNPAIRED = DATA / "pref_unpaired.jsonl"
LN2 = math.log(2.0)


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def lsig(x):
    """log sigma(x), stable in plain Python."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def run(name, lp, beta=0.5, **params):
    spec = get_loss(name)
    return spec.fn(lp, beta=beta, **{**spec.defaults, **params})


def close(got, want, tol=1e-10):
    torch.testing.assert_close(got.detach().double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# hand-made batch: two lists of different lengths (list B is padded with garbage in slot 3)
#   list A: log pi = [-4, -6, -9, -2], |y| = [2, 3, 3, 1] -> p = [-2, -2, -3, -2]; psi = [3, 1, 2, 0]
#   list B: log pi = [-1, -8, -3],     |y| = [1, 4, 3]    -> p = [-1, -2, -1];     psi = [2, 2, 0] (tie on top)
#   reference log-probs are all -5, so h_A = [1, -1, -4, 3], h_B = [4, -3, 2]


def _batch(dtype=torch.float64, grad=False, pad_policy=123.0, pad_score=99.0, pad_tokens=1):
    policy = torch.tensor([[-4.0, -6.0, -9.0, -2.0], [-1.0, -8.0, -3.0, pad_policy]], dtype=dtype)
    if grad:
        policy.requires_grad_(True)
    return RankedLogps(
        policy=policy,
        scores=torch.tensor([[3.0, 1.0, 2.0, 0.0], [2.0, 2.0, 0.0, pad_score]], dtype=dtype),
        mask=torch.tensor([[True, True, True, True], [True, True, True, False]]),
        tokens=torch.tensor([[2, 3, 3, 1], [1, 4, 3, pad_tokens]]),
        ref=torch.full((2, 4), -5.0, dtype=dtype),
    )


def _list(policy, scores, tokens=None, ref=None, dtype=torch.float64):
    """One list (B = 1), every entry real."""
    t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return RankedLogps(policy=t(policy), scores=t(scores), mask=torch.ones(1, len(policy), dtype=torch.bool),
                       tokens=t(tokens or [1] * len(policy)), ref=None if ref is None else t(ref))


# ------------------------------------------------------------------------------------------
# registry


def test_registry_entries():
    for name, ref, defaults, arxiv in (("rrhf", False, {"sft_weight": 1.0}, "2304.05302"),
                                       ("pro", False, {"sft_weight": 0.05, "score_temperature": True}, "2306.17492"),
                                       ("lipo", True, {}, "2402.01878")):
        spec = LOSSES[name]
        assert spec.data == "ranked" and spec.reference is ref and spec.defaults == defaults, name
        assert f"arXiv {arxiv}" in spec.paper and "L = " in spec.fn.__doc__, name
    from paft.config import PreferenceConfig

    assert PreferenceConfig(method="lipo").method == "lipo"


# ------------------------------------------------------------------------------------------
# closed forms


def test_rrhf_closed_form():
    # list A, pairs (worse i, better j): relu(p1 - p0) = 0, relu(p1 - p2) = 1, relu(p2 - p0) = 0,
    #   relu(p3 - p0) = relu(p3 - p1) = 0, relu(p3 - p2) = 1  -> 2; NLL of the best (idx 0): 2
    # list B: relu(p2 - p0) = 0, relu(p2 - p1) = 1 -> 1; tie on top -> first (idx 0): NLL 1
    close(run("rrhf", _batch()), [2.0 + 2.0, 1.0 + 1.0])
    close(run("rrhf", _batch(), sft_weight=0.0), [2.0, 1.0])
    close(run("rrhf", _batch(), sft_weight=0.5), [3.0, 1.5])


def test_rrhf_gradient_by_hand():
    lp = _batch(grad=True)
    run("rrhf", lp).sum().backward()
    # A: d/dp: hinge (1 - 2): p1 +1, p2 -1; (3 - 2): p3 +1, p2 -1; NLL: p0 -1; dp/dlogpi = 1/|y|
    # B: hinge (2 - 1): p2 +1, p1 -1; NLL: p0 -1
    want = [[-1 / 2, 1 / 3, -2 / 3, 1.0], [-1.0, -1 / 4, 1 / 3, 0.0]]
    close(lp.policy.grad, want)


def test_pro_closed_form_with_score_temperature():
    # list A sorted: idx0 (psi 3, p -2), idx2 (2, -3), idx1 (1, -2), idx3 (0, -2); t_ki = psi_k - psi_i
    a0 = lse(-2 * 3, -3 * 1, -2 * 2, -2 * 3) + 2 * 3  # t_kk = max gap = 3
    a2 = lse(-3 * 2, -2 * 1, -2 * 2) + 3 * 2  # below: idx1 (gap 1), idx3 (gap 2)
    a1 = lse(-2 * 1, -2 * 1) + 2 * 1  # = log 2
    sft_a = 0.05 * (4 - 1) ** 2 * 4.0  # summed NLL of idx 0: -(-4)
    # list B (n = 3): idx0 and idx1 tie at 2, so neither competes with the other
    b0 = lse(-1 * 2, -1 * 2) + 1 * 2  # = log 2
    b1 = lse(-2 * 2, -1 * 2) + 2 * 2
    sft_b = 0.05 * (3 - 1) ** 2 * 1.0
    close(run("pro", _batch()), [a0 + a2 + a1 + sft_a, b0 + b1 + sft_b])
    assert a1 == pytest.approx(LN2) and b0 == pytest.approx(LN2)


def test_pro_closed_form_plain_plackett_luce():
    a = (lse(-2, -3, -2, -2) + 2) + (lse(-3, -2, -2) + 3) + (lse(-2, -2) + 2)
    b = (lse(-1, -1) + 1) + (lse(-2, -1) + 2)
    close(run("pro", _batch(), score_temperature=False, sft_weight=0.0), [a, b])
    # two replies, no temperature: exactly -log sigma(p_w - p_l)
    close(run("pro", _list([-3.0, -8.0], [1.0, 0.0], [3, 4]), score_temperature=False, sft_weight=0.0),
          [-lsig(-1.0 - (-2.0))])


def test_lipo_closed_form():
    d = lambda tau: 1.0 / math.log2(1 + tau)  # noqa: E731  1 / D(tau)
    # list A: s = 0.5 h = [0.5, -0.5, -2, 1.5] -> tau = [2, 3, 4, 1]; G = 2^psi - 1 = [7, 1, 3, 0]
    s, g, inv = [0.5, -0.5, -2.0, 1.5], [7, 1, 3, 0], [d(2), d(3), d(4), d(1)]
    pairs_a = [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3), (1, 3)]  # psi_i > psi_j
    a = -sum(abs(g[i] - g[j]) * abs(inv[i] - inv[j]) * lsig(s[i] - s[j]) for i, j in pairs_a)
    # list B: s = [2, -1.5, 1] -> tau = [1, 3, 2]; G = [3, 3, 0]; pairs (0, 2), (1, 2) (no pair for the tie)
    b = -(3 * (1 - d(2)) * lsig(2 - 1) + 3 * abs(d(3) - d(2)) * lsig(-1.5 - 1))
    close(run("lipo", _batch(), beta=0.5), [a, b])
    # spot-check one weight: Delta_01 = 6 * (1/log2(3) - 1/2)
    assert 6 * (inv[0] - inv[1]) == pytest.approx(6 * (1 / math.log2(3) - 0.5))


def test_lipo_on_two_replies_is_a_weighted_dpo():
    # psi = [1, 0]: G = [1, 0]; whichever is ranked first, Delta = 1 - 1/log2(3)
    weight = 1.0 - 1.0 / math.log2(3.0)
    for policy in ([-3.0, -8.0], [-9.0, -2.0]):
        lp = _list(policy, [1.0, 0.0], ref=[-5.0, -4.0])
        margin = (policy[0] + 5.0) - (policy[1] + 4.0)
        close(run("lipo", lp, beta=0.1), [-weight * lsig(0.1 * margin)])


def test_lipo_ranks_are_detached_and_need_a_reference():
    lp = _batch(grad=True)
    run("lipo", lp).sum().backward()
    assert torch.isfinite(lp.policy.grad).all()
    lp.ref = None
    with pytest.raises(ValueError, match="lipo needs reference log-probs"):
        run("lipo", lp)


# ------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("name", ["rrhf", "pro", "lipo"])
def test_padding_never_reaches_the_loss_or_its_gradient(name):
    base = _batch(grad=True)
    loss = run(name, base)
    loss.sum().backward()
    other = _batch(grad=True, pad_policy=-1e4, pad_score=-50.0, pad_tokens=7)
    loss2 = run(name, other)
    loss2.sum().backward()
    close(loss2, loss.tolist())
    assert base.policy.grad[1, 3] == 0 and other.policy.grad[1, 3] == 0
    close(other.policy.grad, base.policy.grad.tolist())


def test_equal_log_probs():
    # four replies, psi 3 > 2 > 1 > 0, every log-prob -6 over 3 tokens (p = -2), reference equal too
    lp = _list([-6.0] * 4, [3.0, 2.0, 1.0, 0.0], [3] * 4, ref=[-6.0] * 4)
    close(run("rrhf", lp), [2.0])  # no hinge is active; NLL of the best: 2
    # PRO with the temperature: step k has own logit -2 * (max gap) and others -2 * gap
    pro = (lse(-6, -2, -4, -6) + 6) + (lse(-4, -2, -4) + 4) + (lse(-2, -2) + 2) + 0.05 * 9 * 6.0
    close(run("pro", lp), [pro])
    close(run("pro", lp, score_temperature=False, sft_weight=0.0), [math.log(4) + math.log(3) + math.log(2)])
    # LiPO: s = 0, ranks by list order (tau = 1..4), every pair log sigma(0) = -log 2
    d = [1 / math.log2(1 + t) for t in (1, 2, 3, 4)]
    g = [7, 3, 1, 0]
    want = LN2 * sum(abs(g[i] - g[j]) * abs(d[i] - d[j]) for i in range(4) for j in range(i + 1, 4))
    close(run("lipo", lp), [want])


def test_tied_scores_form_no_pairs():
    lp = _list([-2.0, -9.0, -5.0], [1.0, 1.0, 1.0], [1, 3, 5], ref=[-1.0, -1.0, -1.0])
    close(run("rrhf", lp), [2.0])  # NLL of the first (tied) best reply only: p0 = -2
    close(run("pro", lp), [0.05 * 4 * 2.0])  # no step; SFT on the summed NLL of reply 0
    close(run("lipo", lp), [0.0])


def test_length_normalisation():
    # summed log-probs favour the worse reply (-3 > -10), per token the better one (-1 > -3)
    long_good = _list([-10.0, -3.0], [1.0, 0.0], [10, 1])
    close(run("rrhf", long_good), [0.0 + 1.0])
    close(run("rrhf", _list([-10.0, -3.0], [1.0, 0.0], [1, 1])), [7.0 + 10.0])
    close(run("pro", long_good, sft_weight=0.0), [-lsig(-1.0 - (-3.0))])  # gap 1: t = 1
    close(run("pro", _list([-10.0, -3.0], [1.0, 0.0], [1, 1]), sft_weight=0.0), [-lsig(-10.0 + 3.0)])


@pytest.mark.parametrize("name", ["rrhf", "pro", "lipo"])
@pytest.mark.parametrize("sign", [1, -1])
def test_extreme_values_finite_losses_and_gradients(name, sign):
    big = 1e4
    policy = torch.tensor([[-1e-3, -sign * big - 1e-3, -2 * big], [-big, -1e-3, 0.0]], requires_grad=True)
    lp = RankedLogps(policy=policy, scores=torch.tensor([[2.0, 1.0, 0.0], [50.0, 0.0, 0.0]]),
                     mask=torch.tensor([[True, True, True], [True, True, False]]),
                     tokens=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
                     ref=torch.tensor([[-big, 0.0, big], [0.0, -big, 0.0]]))
    loss = run(name, lp)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert torch.isfinite(policy.grad).all(), policy.grad


def test_lipo_scores_too_large_for_the_gain_are_a_data_error():
    lp = _list([-1.0, -2.0], [2000.0, 0.0], ref=[-1.0, -1.0])
    with pytest.raises(DataError, match="rescale the scores"):
        run("lipo", lp)


# ------------------------------------------------------------------------------------------
# formats, detection and the data-kind conversions

SYS = [m("system", "Be brief."), m("user", "What is 2 + 2?")]
FIXTURE = [
    RankedExample([m("user", "Name a primary colour.")],
                  ["Red.", "Red is one of the three primary colours of paint.", "Green, I think.",
                   "Colours are subjective."], [2.0, 3.0, 1.0, 0.0]),
    RankedExample(SYS, ["4", "2 + 2 = 4.", "5"], [0.5, 0.5, -1.25]),
]


def test_ranked_fixture_loads_with_scores():
    res = load_examples(str(RANKED), "preference")
    assert res.fmt == "prompt_responses_scores" and res.examples == FIXTURE


@pytest.mark.parametrize("columns, first, fmt", [
    (["prompt", "responses", "scores"], {}, "prompt_responses_scores"),
    (["prompt", "responses", "ranks"], {}, "prompt_responses_ranks"),
    (["prompt", "responses"], {}, "prompt_responses_scores"),  # the adapter then names 'scores'
    (["instruction", "completions", "source", "models"], {}, "ultrafeedback_completions"),
    (["prompt", "completions"], {}, "ultrafeedback_completions"),
    (["prompt", "chosen", "rejected", "responses", "scores"], {}, "prompt_chosen_rejected"),  # pairs win
])
def test_detection(columns, first, fmt):
    assert detect_preference_format(columns, first) == fmt


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})


def _write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        _write_csv(path, rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_ranks_become_scores_in_every_file_type(tmp_path, suffix):
    rows = [{"prompt": "Pick one.", "responses": ["b", "a", "c"], "ranks": [2, 1, 3]},
            {"prompt": "Tie?", "responses": ["x", "y"], "ranks": [1, 1]}]
    res = load_examples(_write(tmp_path / f"r{suffix}", rows), "preference")
    assert res.fmt == "prompt_responses_ranks"
    assert res.examples == [RankedExample([m("user", "Pick one.")], ["b", "a", "c"], [1.0, 2.0, 0.0]),
                            RankedExample([m("user", "Tie?")], ["x", "y"], [1.0, 1.0])]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_ultrafeedback_raw_completions(tmp_path, suffix):
    rows = [{"source": "evol", "instruction": "Say hi.", "models": ["a", "b", "c"],
             "completions": [{"model": "a", "response": "Hi!", "overall_score": 8.5, "annotations": {"honesty": "5"}},
                             {"model": "b", "response": "Go away.", "overall_score": 2},
                             {"model": "c", "response": "Hello there.", "overall_score": 7.0}]}]
    res = load_examples(_write(tmp_path / f"uf{suffix}", rows), "preference")
    assert res.fmt == "ultrafeedback_completions"
    assert res.examples == [RankedExample([m("user", "Say hi.")], ["Hi!", "Go away.", "Hello there."],
                                          [8.5, 2.0, 7.0])]


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "q", "responses": ["a", "b"]}, "scores", "missing column (a responses list needs 'scores'"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "scores", "has 1 entries for 2 responses"),
    ({"prompt": "q", "responses": ["a"], "scores": [1]}, "responses", "needs at least 2 replies"),
    ({"prompt": "q", "responses": ["a", ""], "scores": [1, 0]}, "responses[1]", "empty string"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, True]}, "scores[1]", "expected a finite number"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "NaN"]}, "scores[1]", "expected a finite number"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, 3]}, "ranks[1]", "from 1 (best) to 2"),
    ({"instruction": "q", "completions": [{"response": "a", "overall_score": 1}, {"response": "b"}]},
     "completions[1].overall_score", "missing key"),
])
def test_row_errors_name_the_field(tmp_path, row, field, message):
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_examples(path, "preference")
    text = str(e.value)
    assert text.startswith(f"{path}: row 0 (line 1): field '{field}': ") and message in text
    assert "\n" not in text


def test_pairs_or_unpaired_rows_for_a_listwise_method_are_one_line_errors():
    pairs = load_examples(str(PAIRS), "preference").examples
    want = (f"preference.method 'pro' needs ranked lists (columns prompt, responses and scores or ranks; or "
            f"UltraFeedback completions with overall_score); {PAIRS} has pairs (prompt/chosen/rejected)")
    with pytest.raises(DataError) as e:
        examples_for_method(pairs, "ranked", method="pro", source=str(PAIRS))
    assert str(e.value) == want
    unpaired = load_examples(str(UNPAIRED), "preference").examples
    with pytest.raises(DataError, match=r"'lipo' needs ranked lists .* has unpaired rows \(prompt, completion, label\)"):
        examples_for_method(unpaired, "ranked", method="lipo", source=str(UNPAIRED))


def test_ranked_to_pairs_and_binary():
    lists = FIXTURE + [RankedExample([m("user", "q")], ["a", "b"], [1.0, 1.0])]  # all equal: no pair
    pairs = [PreferenceExample(FIXTURE[0].prompt, "Red is one of the three primary colours of paint.",
                               "Colours are subjective."),
             PreferenceExample(SYS, "4", "5")]  # tie on top: the first best
    assert ranked_to_pairs(lists) == pairs
    assert examples_for_method(lists, "pairs", method="dpo", source="f") == pairs
    assert examples_for_method(lists, "binary", method="kto", source="f") == [
        BinaryExample(pairs[0].prompt, pairs[0].chosen, True), BinaryExample(pairs[0].prompt, pairs[0].rejected, False),
        BinaryExample(SYS, "4", True), BinaryExample(SYS, "5", False)]
    assert examples_for_method(lists, "ranked", method="rrhf", source="f") == lists
    with pytest.raises(DataError, match="'dpo' needs paired data .* every ranked list in f has equal scores"):
        examples_for_method(lists[-1:], "pairs", method="dpo", source="f")


def test_canonical_jsonl_round_trips_ranked_lists(tmp_path):
    from paft.data.prepare import write_examples as _write_examples

    _write_examples(tmp_path / "p.jsonl", FIXTURE)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "responses", "scores"}
    assert load_examples(str(tmp_path / "p.jsonl"), "preference").examples == FIXTURE


def test_demo_ranked_lists_share_the_pairs_prompts():
    from paft.data.demo import demo_splits, preference_examples, ranked_preference_examples

    ranked = ranked_preference_examples(12, 0)
    assert all(len(e.responses) == 4 and sorted(e.scores) == [0.0, 1.0, 2.0, 3.0] for e in ranked)
    assert ranked_to_pairs(ranked) == preference_examples(12, 0)  # best vs worst = the demo pairs
    assert [len(e.responses) for e in ranked_preference_examples(3, 0, k=2)] == [2, 2, 2]
    train, held = demo_splits("preference", 200, 48, 0, ranked=True)
    assert ranked_to_pairs(train + held) == sum(demo_splits("preference", 200, 48, 0), [])  # the same draws


# ------------------------------------------------------------------------------------------
# encoding, collator, objective


def test_collator_layout():
    rows = [EncodedRanked([1, 2], [[10, 11], [12], [13, 14, 15]], [3.0, 1.0, 2.0]),
            EncodedRanked([5], [[20], [21, 22]], [0.0, 1.0])]
    b = RankedCollator(pad_id=0)(rows)
    assert b["list_index"].tolist() == [[0, 1, 2], [3, 4, -1]]
    assert b["scores"].tolist() == [[3.0, 1.0, 2.0], [0.0, 1.0, 0.0]] and b["scores"].dtype == torch.float32
    assert b["input_ids"].tolist() == [[1, 2, 10, 11, 0], [1, 2, 12, 0, 0], [1, 2, 13, 14, 15],
                                       [5, 20, 0, 0, 0], [5, 21, 22, 0, 0]]
    assert b["attention_mask"].sum(dim=1).tolist() == [4, 3, 5, 2, 3]
    x = IGNORE
    assert b["labels"].tolist() == [[x, x, 10, 11, x], [x, x, 12, x, x], [x, x, 13, 14, 15],
                                    [x, 20, x, x, x], [x, 21, 22, x, x]]


def test_encode_ranked_matches_encode_pair(tiny_tok):
    ex = RankedExample([m("system", "Be brief."), m("user", "Name a colour.")],
                       ["Blue.", "I like turtles a lot.", "Green"], [2.0, 0.0, 1.0])
    enc = encode_ranked(ex, tiny_tok, 128, 64)
    pair = encode_pair(PreferenceExample(ex.prompt, "Blue.", "I like turtles a lot."), tiny_tok, 128, 64)
    assert enc.prompt_ids == pair.prompt_ids and enc.response_ids[:2] == [pair.chosen_ids, pair.rejected_ids]
    assert enc.scores == [2.0, 0.0, 1.0] and len(enc.response_ids) == 3
    short = encode_ranked(ex, tiny_tok, len(enc.prompt_ids) + 2, 64)  # replies right-truncated to fit
    assert all(len(r) <= 2 for r in short.response_ids) and short.prompt_ids == enc.prompt_ids


def _tiny_batch(tok):
    exs = [RankedExample([m("user", "question one")], ["yes yes", "no", "maybe so"], [2.0, 0.0, 1.0]),
           RankedExample([m("user", "question two")], ["a b c", "d"], [0.0, 1.0])]
    return RankedCollator(tok.pad_token_id)([encode_ranked(e, tok, 128, 64) for e in exs])


@pytest.mark.parametrize("name", ["rrhf", "pro", "lipo"])
def test_objective_on_the_tiny_model(name, tiny_model, tiny_tok):
    from paft.config import LoraConfig
    from paft.models.logps import sequence_logps
    from paft.train.lora import attach_lora
    from paft.train.preference import PreferenceObjective

    model = attach_lora(tiny_model, LoraConfig(r=4, alpha=8), 0)
    batch = _tiny_batch(tiny_tok)
    obj = PreferenceObjective(name, 0.1)
    seen = []
    if LOSSES[name].reference:  # the reference comes only through the reference_logps hook
        hook = obj.reference_logps
        obj.reference_logps = lambda *a: seen.append(a) or hook(*a)
    loss, metrics = obj(model, batch)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert len(seen) == int(LOSSES[name].reference)
    assert 0.0 <= metrics["rank/top1_accuracy"] <= 1.0 and metrics["logps/mean"] < 0
    assert ("rewards/mean" in metrics) is LOSSES[name].reference
    # the loss is the registered function of the per-row log-probs, gathered into [B, K]
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        idx = batch["list_index"].clamp(min=0)
        lp = RankedLogps(policy=logps[idx], scores=batch["scores"], mask=batch["list_index"] >= 0, tokens=counts[idx],
                         ref=logps[idx] if LOSSES[name].reference else None)  # adapter starts at zero: ref = policy
        torch.testing.assert_close(loss.detach(), run(name, lp, beta=0.1).mean(), rtol=1e-5, atol=1e-5)
        # top-1 by hand: the model score of each list's best reply against its other replies
        score = (logps / counts)[idx] if not LOSSES[name].reference else torch.zeros_like(lp.policy)
        top = [int(torch.argmax(score[0, :3])) == 0, int(torch.argmax(score[1, :2])) == 1]
        assert metrics["rank/top1_accuracy"] == pytest.approx(sum(top) / 2)


# ------------------------------------------------------------------------------------------
# end to end: `paft align` on the tiny model with each listwise method (ranked demo data)


@pytest.mark.parametrize("name", ["rrhf", "pro", "lipo"])
def test_tiny_align_with_a_listwise_method(name, tmp_path, paft_cache):
    from paft.cli import app

    out = tmp_path / name
    res = CliRunner().invoke(app, ["align", "--preset", "tiny", "--set", f"preference.method={name}",
                                   "--set", "run.parallel=false", "--set", "preference.max_steps=4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "preference" / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "preference" / "train_summary.json").read_text())
    assert summary["data_kind"] == "ranked" and summary["steps"] == 4 and math.isfinite(summary["train_loss"])
    assert summary["examples"] == json.loads((out / "data" / "summary.json").read_text())["preference"]["train"]
    first = json.loads((out / "data" / "preference_train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "responses", "scores"} and len(first["responses"]) == 4
    logged = json.loads((out / "preference" / "log_history.json").read_text())
    assert any("rank/top1_accuracy" in h for h in logged)
