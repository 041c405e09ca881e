import re

from paft.data.demo import demo_splits, is_harmful_prompt, preference_examples, sft_examples


def test_demo_is_deterministic_and_seeded():
    assert sft_examples(20, 0) == sft_examples(20, 0)
    assert preference_examples(20, 0) == preference_examples(20, 0)
    assert sft_examples(20, 0) != sft_examples(20, 1)


def test_sft_targets_are_correct_in_house_format():
    for ex in sft_examples(200, 0):
        question, answer = ex.messages[1]["content"], ex.messages[2]["content"]
        a, op, b = re.search(r"(\d+) ([+-]) (\d+)", question).groups()
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert answer == f"Answer: {value}" and value >= 0


def test_preference_pairs_refuse_harm_and_help_otherwise():
    train, held = demo_splits("preference", 40, 10, 0)
    assert len(train) == 40 and len(held) == 10
    harmful = [is_harmful_prompt(e) for e in train]
    assert sum(harmful) == 20
    for ex, h in zip(train, harmful):
        refusing = ("can't" in ex.chosen or "not able" in ex.chosen)
        assert refusing == h and ex.chosen != ex.rejected


def test_demo_held_out_prompts_are_never_trained_on_and_nothing_repeats():
    import pytest

    from paft.errors import ConfigError

    for kind, n_train in (("sft", 320), ("preference", 256)):
        train, held = demo_splits(kind, n_train, 48, 0)
        prompt = (lambda e: str(e.messages[:-1])) if kind == "sft" else (lambda e: str(e.prompt))
        assert len(train) == n_train and len(held) == 48
        assert len({prompt(e) for e in held}) == 48  # one example per held-out prompt
        assert not {prompt(e) for e in held} & {prompt(e) for e in train}
        assert len({repr(e) for e in train}) == n_train  # no training example twice
    with pytest.raises(ConfigError, match="data.demo.preference_train"):
        demo_splits("preference", 5000, 48, 0)  # more than the demo's 240 prompts x 3 refusals can give
