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
