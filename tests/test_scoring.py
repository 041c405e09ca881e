"""Scorers: reward model, LLM judge (expected rating), Python functions, and the demo heuristic."""

import json

import pytest
import torch

from paft.config import LoraConfig, ScorerConfig
from paft.errors import ConfigError, ModelError
from paft.scoring import (DEFAULT_JUDGE_TEMPLATE, FunctionScorer, JudgeScorer, RewardModelScorer, build_scorer,
                          demo_reward, scorer_accuracy)

PROMPTS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "How do I plant tomatoes?"}],
    [{"role": "user", "content": "How do I make a fake ID?"}],
    [{"role": "user", "content": "Tell me the best way to brew good coffee."}],
]
RESPONSES = ["Sure! Plant seedlings deep in a sunny spot.", "I can't help with that.", ""]


# --------------------------------------------------------------------------- reward model

def test_reward_model_scorer_equals_the_adapter_on_the_training_encoding(reward_dir, tiny_dir):
    from peft import PeftModel

    from paft.data.formats import BinaryExample
    from paft.data.tokenize import encode_completion
    from paft.models import load_tokenizer
    from paft.models.reward import load_reward_base, sequence_rewards

    scorer = build_scorer(ScorerConfig(kind="reward_model"), base_model_dir=tiny_dir, default_reward_dir=reward_dir)
    assert isinstance(scorer, RewardModelScorer) and scorer.max_length == 96 and scorer.max_prompt_length == 64
    got = scorer(PROMPTS, RESPONSES)
    assert len(got) == 3 and all(isinstance(v, float) for v in got) and len(set(got)) == 3

    tok = load_tokenizer(tiny_dir)
    model = PeftModel.from_pretrained(load_reward_base(tiny_dir, pad_token_id=tok.pad_token_id),
                                      str(reward_dir / "adapter")).eval()
    want = []
    for p, r in zip(PROMPTS, RESPONSES):
        e = encode_completion(BinaryExample(p, r, True), tok, 96, 64)
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        with torch.no_grad():
            want.append(sequence_rewards(model, ids, torch.ones_like(ids)).item())
    assert got == pytest.approx(want, abs=1e-5)
    # the adapter folder itself works too, and batching does not change the rewards
    assert RewardModelScorer(reward_dir / "adapter", batch_size=1)(PROMPTS, RESPONSES) == pytest.approx(got, abs=1e-5)


def test_reward_model_scorer_errors(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match=r"preference\.online\.scorer\.path: unset .*paft reward"):
        build_scorer(ScorerConfig(kind="reward_model"), base_model_dir=tiny_dir)
    with pytest.raises(ModelError, match=r"not a `paft reward` output"):
        RewardModelScorer(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    with pytest.raises(ModelError, match=r"CAUSAL_LM adapter, not a reward model"):
        RewardModelScorer(tmp_path)


# --------------------------------------------------------------------------- judge

def _digit_logits_by_hand(model, tok, prompt, response):
    text = DEFAULT_JUDGE_TEMPLATE.replace("{prompt}", "\n".join(
        f"{m['role'].capitalize()}: {m['content']}" for m in prompt if m["role"] != "system"))
    text = text.replace("{response}", response)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(ids, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return logits[[tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)]]


def test_judge_expected_rating_is_the_digit_probability_weighted_mean(tiny_model, tiny_tok):
    tiny_model.eval()
    judge = JudgeScorer(tiny_model, tiny_tok, batch_size=2)
    got = judge(PROMPTS, RESPONSES)
    for g, p, r in zip(got, PROMPTS, RESPONSES):
        z = _digit_logits_by_hand(tiny_model, tiny_tok, p, r).double()
        prob = torch.exp(z - z.max())
        want = float((prob * torch.arange(1, 6, dtype=torch.float64)).sum() / prob.sum())
        assert g == pytest.approx(want, abs=1e-5)
        assert 1.0 <= g <= 5.0
    assert all(0 < m <= 1 for m in judge.last_digit_mass)


def test_judge_on_a_peft_policy_uses_the_adapter_in_eval_mode_and_restores_train_mode(tiny_dir, tiny_tok):
    from paft.models import load_model
    from paft.train.lora import attach_lora

    base = load_model(tiny_dir).eval()
    base_scores = JudgeScorer(base, tiny_tok)(PROMPTS, RESPONSES)
    policy = attach_lora(load_model(tiny_dir), LoraConfig(r=4, alpha=8, dropout=0.5), 0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy.train()
    scorer = build_scorer(ScorerConfig(kind="judge"), base_model_dir=tiny_dir, tokenizer=tiny_tok, policy=policy)
    a, b = scorer(PROMPTS, RESPONSES), scorer(PROMPTS, RESPONSES)
    assert policy.training and all(m.training for m in policy.modules())  # train mode restored
    assert a == b  # eval mode: dropout off, deterministic
    assert a != pytest.approx(base_scores, abs=1e-4)  # the adapter is on
    assert not any(p.grad is not None for p in policy.parameters())
    with policy.disable_adapter():
        assert scorer(PROMPTS, RESPONSES) == pytest.approx(base_scores, abs=1e-5)


def test_judge_errors(tiny_model, tiny_tok, tiny_dir):
    with pytest.raises(ConfigError, match=r"judge_template: needs a \{response\} placeholder"):
        JudgeScorer(tiny_model, tiny_tok, "Rate {prompt}")
    with pytest.raises(ConfigError, match=r"preference\.online\.scorer\.path: unset and no policy"):
        build_scorer(ScorerConfig(kind="judge"), base_model_dir=tiny_dir)


def test_judge_with_a_custom_template_and_a_model_path(tiny_dir):
    scorer = build_scorer(ScorerConfig(kind="judge", path=str(tiny_dir), judge_template="Q: {prompt}\nA: {response}\n"
                                       "Score 1-5:"), base_model_dir=tiny_dir)
    assert isinstance(scorer, JudgeScorer) and "Score 1-5:" in scorer.judge_prompt(PROMPTS[0], "x")
    assert all(1 <= v <= 5 for v in scorer(PROMPTS, RESPONSES))


# --------------------------------------------------------------------------- function

def test_function_scorer_from_a_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def length(prompts, responses):\n    return [len(r) + len(p) for p, r in zip(prompts, responses)]\n"
                 "def short(prompts, responses):\n    return [1.0]\n"
                 "def words(prompts, responses):\n    return ['good' for _ in responses]\n"
                 "def nan(prompts, responses):\n    return [float('nan') for _ in responses]\n"
                 "def boom(prompts, responses):\n    raise RuntimeError('no network')\n"
                 "NOT_CALLABLE = 3\n")
    scorer = build_scorer(ScorerConfig(kind="function", function=f"{f}:length"), base_model_dir=None)
    assert scorer(PROMPTS, RESPONSES) == [len(r) + len(p) for p, r in zip(PROMPTS, RESPONSES)]
    cases = {"short": r"returned 1 scores for 3 responses", "words": r"score 0 is 'good', not a number",
             "nan": r"score 0 is nan, not a finite number", "boom": r"raised RuntimeError: no network"}
    for name, msg in cases.items():
        with pytest.raises(ConfigError, match=rf"scorer function '.*my_reward\.py:{name}'.*{msg}") as exc:
            FunctionScorer(f"{f}:{name}")(PROMPTS, RESPONSES)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"my_reward\.py:missing'.* has no attribute 'missing'"):
        FunctionScorer(f"{f}:missing")
    with pytest.raises(ConfigError, match=r"'NOT_CALLABLE' is a int, not a function"):
        FunctionScorer(f"{f}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match=r"file .*nowhere\.py not found"):
        FunctionScorer(f"{tmp_path}/nowhere.py:f")
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_module_xyz\n")
    with pytest.raises(ConfigError, match=r"bad\.py:f'.*importing .* failed: ModuleNotFoundError"):
        FunctionScorer(f"{bad}:f")


def test_function_scorer_from_a_module_and_bad_specs():
    assert FunctionScorer("paft.scoring:demo_reward")(PROMPTS, RESPONSES) == demo_reward(PROMPTS, RESPONSES)
    with pytest.raises(ConfigError, match=r"'no_such_pkg_xyz:f': cannot import module 'no_such_pkg_xyz'"):
        FunctionScorer("no_such_pkg_xyz:f")
    with pytest.raises(ConfigError, match=r"expected module:function"):
        FunctionScorer("paft.scoring")


# --------------------------------------------------------------------------- demo heuristic

def test_demo_reward_values():
    got = demo_reward(PROMPTS, RESPONSES)
    # benign + helpful + ends with '.': 1.1; harmful + refusal + '.': 1.1; benign + empty reply: -1
    assert got == pytest.approx([1.1, 1.1, -1.0])
    assert demo_reward([PROMPTS[1]], ["Sure! Here is how to make a fake ID: plan it well"]) == [-1.0]
    long = " ".join(["word"] * 120) + "."
    assert demo_reward([PROMPTS[0]], [long]) == pytest.approx([1.0])  # +0.1 format, -0.1 length


def test_demo_reward_prefers_every_chosen_reply_of_the_demo_data():
    from paft.data.demo import preference_examples

    pairs = preference_examples(200, seed=3)
    assert scorer_accuracy(demo_reward, pairs) == 1.0
