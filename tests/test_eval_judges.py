"""Reply metrics: pairwise judge with position swap, refusal heuristic and judge, reward-model win rate."""

import json
from types import SimpleNamespace

import pytest
import torch

from paft.eval.judges import (harm_messages, harmlessness_metrics, load_harm_prompts, pairwise_judge,
                              pairwise_verdicts, refusal_judge, refusal_labels, rm_win_rate, win_rates)
from paft.models.generation import REFUSAL_PHRASES, is_refusal

PROMPTS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(4)]


class FakeJudge(torch.nn.Module):
    """A judge 'model' whose next-token logits come from a rule on the decoded prompt; it records the prompts."""

    def __init__(self, tok, rule):
        super().__init__()
        self.tok, self.rule, self.seen = tok, rule, []
        self.p = torch.nn.Parameter(torch.zeros(1))  # for the device lookup

    def forward(self, input_ids, attention_mask, use_cache=False):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for b in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[b][attention_mask[b].bool()])
            self.seen.append(text)
            for letter, value in self.rule(text).items():
                logits[b, :, self.tok.encode(letter, add_special_tokens=False)[0]] = value
        return SimpleNamespace(logits=logits)


def _reply(text: str, letter: str) -> str:
    return text.split(f"Reply {letter}:\n")[1].split("\n\n")[0]


def test_position_swap_shows_each_reply_in_both_places(tiny_tok):
    fake = FakeJudge(tiny_tok, lambda text: {"A": 1.0})
    judge = pairwise_judge(fake, tiny_tok)
    pairwise_verdicts(judge, PROMPTS[:1], ["model says hi"], ["reference says yo"])
    first, second = fake.seen
    assert _reply(first, "A") == "model says hi" and _reply(first, "B") == "reference says yo"
    assert _reply(second, "A") == "reference says yo" and _reply(second, "B") == "model says hi"
    assert "Question 0?" in first and first.rstrip().endswith("assistant")  # chat template, generation prompt


def test_a_judge_that_always_says_A_gives_only_ties(tiny_tok):
    # hand-made probabilities: p(A) = e^3 / (e^3 + e^0) in both orders, so each order favours whoever is A
    judge = pairwise_judge(FakeJudge(tiny_tok, lambda text: {"A": 3.0, "B": 0.0}), tiny_tok)
    verdicts = pairwise_verdicts(judge, PROMPTS, ["a", "b", "c", "d"], ["w", "x", "y", "z"])
    assert verdicts == [0, 0, 0, 0]
    rates = win_rates(verdicts)
    assert rates["judge_win_share"] == rates["judge_loss_share"] == 0 and rates["judge_win_rate"] == 0.5


def test_a_judge_that_reads_the_content_follows_the_better_reply_in_both_orders(tiny_tok):
    def rule(text):  # prefers the reply that says "good", wherever it stands
        return {"A": float("good" in _reply(text, "A")), "B": float("good" in _reply(text, "B"))}

    fake = FakeJudge(tiny_tok, rule)
    judge = pairwise_judge(fake, tiny_tok)
    model = ["good answer", "bad answer", "good", "meh"]
    ref = ["bad answer", "good answer", "good", "meh too"]
    assert pairwise_verdicts(judge, PROMPTS, model, ref) == [1, -1, 0, 0]  # identical: a tie, not judged
    assert len(fake.seen) == 2 * 3
    rates = win_rates([1, -1, 0, 0])
    assert rates == {"judge_win_rate": 0.5, "judge_win_share": 0.25, "judge_tie_share": 0.5, "judge_loss_share": 0.25}


def test_real_judge_is_antisymmetric_and_self_judging_ties(tiny_model, tiny_tok):
    judge = pairwise_judge(tiny_model, tiny_tok, batch_size=3)
    x = ["Sure, here is a plan.", "No.", "Answer: 12", "I can't help with that."]
    y = ["I can't help with that.", "Yes, gladly.", "Answer: 13", "Here you go."]
    xy, yx = pairwise_verdicts(judge, PROMPTS, x, y), pairwise_verdicts(judge, PROMPTS, y, x)
    assert xy == [-v for v in yx]  # the same two orders, roles swapped
    assert win_rates(xy)["judge_win_share"] == win_rates(yx)["judge_loss_share"]
    same = win_rates(pairwise_verdicts(judge, PROMPTS, x, list(x)))
    assert same["judge_win_share"] == same["judge_loss_share"] == 0 and same["judge_win_rate"] == 0.5
    logp = judge.letter_logprobs(PROMPTS[:2], [{"response_a": "a", "response_b": "b"}] * 2)
    assert logp.shape == (2, 2) and (logp < 0).all() and (logp.exp().sum(-1) <= 1).all()


def test_refusal_phrases_on_fixed_strings():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m unable to assist with this request.")  # curly apostrophe
    assert is_refusal("As an AI, I   WILL NOT do that.")
    assert not is_refusal("Sure! Mash ripe bananas, mix in flour and bake.")
    assert not is_refusal("")
    assert all(p == p.lower() and "\u2019" not in p for p in REFUSAL_PHRASES)


def test_harmlessness_rates_with_the_heuristic_and_with_a_judge(tiny_tok):
    items = load_harm_prompts()
    assert sum(h.kind == "harmful" for h in items) == 24 and sum(h.kind == "benign" for h in items) == 12
    assert len({h.prompt for h in items}) == len(items)
    replies = ["I can't help with that." if h.kind == "harmful" and i % 2 == 0 else "Sure, here is how."
               for i, h in enumerate(items)]
    replies[-1] = "Sorry, I won't."  # one benign prompt refused
    labels = refusal_labels(replies, harm_messages(items, "You are a helpful assistant."), None)
    rates = harmlessness_metrics(items, labels, judged=False)
    assert rates == {"refusal_rate": 0.5, "over_refusal_rate": pytest.approx(1 / 12)}
    # a judge that answers C ("neither") for everything: no refusals, nothing unsafe
    judge = refusal_judge(FakeJudge(tiny_tok, lambda text: {"C": 2.0}), tiny_tok)
    labels = refusal_labels(replies, harm_messages(items, None), judge)
    assert set(labels) == {"neither"}
    assert harmlessness_metrics(items, labels, judged=True) == {"refusal_rate": 0.0, "over_refusal_rate": 0.0,
                                                                 "unsafe_rate": 0.0}
    judge = refusal_judge(FakeJudge(tiny_tok, lambda text: {"B": 1.0}), tiny_tok)  # "complies", always
    assert harmlessness_metrics(items, refusal_labels(replies, harm_messages(items, None), judge),
                                judged=True)["unsafe_rate"] == 1.0


def test_rm_win_rate_counts_ties_half():
    assert rm_win_rate([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]) == pytest.approx(0.5)
    assert rm_win_rate([], []) is None


def test_evaluate_models_adds_reward_judge_and_refusal_metrics(tiny_dir, tiny_tok, reward_dir, tmp_path):
    from paft.config import load_config
    from paft.data.demo import demo_splits
    from paft.eval.models import ModelSpec, evaluate_models
    from paft.scoring import RewardModelScorer

    cfg = load_config(preset="tiny", overrides=["eval.heldout=false", "eval.harness_tasks=[]", "eval.max_examples=4",
                                                f"eval.reward_model={reward_dir}", "eval.judge_model=tiny",
                                                "eval.reply_max_new_tokens=4", "eval.batch_size=64"])
    _, pref = demo_splits("preference", 4, 4, 0)
    specs = [ModelSpec("base", tiny_dir), ModelSpec("twin", tiny_dir)]  # the same model twice
    res = evaluate_models(specs, cfg, tiny_tok, [], pref, base_dir=tiny_dir)
    json.dumps(res)  # eval.json material
    base, twin = res["models"]["base"], res["models"]["twin"]
    for row in (base, twin):
        assert row["judge_win_rate"] == 0.5 and row["judge_win_share"] == row["judge_loss_share"]
        assert row["rm_win_rate"] == 0.5 and 0 <= row["refusal_rate"] <= 1 and 0 <= row["unsafe_rate"] <= 1
        assert "sft_exact_match" not in row
    assert base["rm_reward"] == pytest.approx(twin["rm_reward"])
    # rm_reward is the scorer's mean over the replies it saw (the samples keep them)
    replies = [s["reply"] for s in res["reply_samples"]["base"]["replies"]]
    scorer = RewardModelScorer(reward_dir, base_model_dir=tiny_dir)
    assert base["rm_reward"] == pytest.approx(sum(scorer([p.prompt for p in pref], replies)) / 4, abs=1e-5)
    assert res["replies"]["prompts"] == 4 and res["harmlessness"]["scorer"] == "judge tiny"


def test_unknown_judge_reference_is_one_line(tiny_dir, tiny_tok):
    from paft.config import load_config
    from paft.errors import ConfigError
    from paft.eval.models import ModelSpec, evaluate_models

    cfg = load_config(preset="tiny", overrides=["eval.judge_model=tiny", "eval.judge_reference=sft",
                                                "eval.harness_tasks=[]"])
    with pytest.raises(ConfigError, match="eval.judge_reference: 'sft' is not one of the evaluated models"):
        evaluate_models([ModelSpec("base", tiny_dir)], cfg, tiny_tok, [], [])
