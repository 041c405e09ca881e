"""Format adapters and file loading: every fixture converts to the exact canonical examples."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from paft.data.formats import (
    PreferenceExample,
    RowError,
    SFTExample,
    detect_preference_format,
    detect_sft_format,
    to_preference_example,
    to_sft_example,
)
from paft.data.loading import hash_source, load_examples, read_rows, split_examples
from paft.errors import DataError

DATA = Path(__file__).parent / "fixtures" / "data"


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def load(name: str, kind: str, **kw):
    return load_examples(str(DATA / name), kind, **kw)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- every fixture, auto-detected, to exact canonical examples -----------------


@pytest.mark.parametrize("name, kind, fmt", [
    ("sft_messages.jsonl", "sft", "messages"),
    ("sft_prompt_completion.jsonl", "sft", "prompt_completion"),
    ("sft_alpaca.json", "sft", "alpaca"),
    ("sft_sharegpt.jsonl", "sft", "sharegpt"),
    ("sft_text.csv", "sft", "text"),
    ("pref_prompt_chosen_rejected.jsonl", "preference", "prompt_chosen_rejected"),
    ("pref_ultrafeedback.parquet", "preference", "prompt_chosen_rejected"),
    ("pref_implicit.jsonl", "preference", "implicit_prompt"),
    ("pref_hh_rlhf.jsonl", "preference", "hh_rlhf"),
    ("pref_beavertails.csv", "preference", "beavertails"),
])
def test_fixture_auto_detects_its_format(name, kind, fmt):
    result = load(name, kind)
    assert result.fmt == fmt
    assert result.skipped == 0 and result.errors == []
    assert result.source == str(DATA / name)
    assert len(result.examples) == 3


def test_sft_messages_normalises_roles():
    ex = load("sft_messages.jsonl", "sft").examples
    assert ex[0] == SFTExample(messages=[
        m("system", "You are a concise assistant."),
        m("user", "What is the capital of Australia?"),
        m("assistant", "The capital of Australia is Canberra."),
    ])
    assert [t["role"] for t in ex[1].messages] == ["user", "assistant", "user", "assistant"]
    assert ex[2].messages == [m("user", "Give me a synonym for 'happy'."), m("assistant", "Joyful.")]


def test_sft_prompt_completion_strings_and_lists():
    ex = load("sft_prompt_completion.jsonl", "sft").examples
    assert ex[0].messages == [m("user", "Translate to French: Good morning, how are you?"),
                              m("assistant", "Bonjour, comment allez-vous ?")]
    assert [t["role"] for t in ex[1].messages] == ["system", "user", "assistant"]
    assert ex[1].messages[2]["content"].startswith("Use slicing: `my_list[::-1]`")
    assert ex[2].messages == [m("user", "Name a prime number greater than 10."),
                              m("assistant", "11 is a prime number greater than 10.")]


def test_sft_alpaca_joins_input_and_keeps_system():
    ex = load("sft_alpaca.json", "sft").examples
    assert ex[0].messages[0] == m("user", "Give three tips for staying healthy.")  # empty input: not appended
    assert ex[1].messages == [
        m("user", "Summarize the following sentence in five words or fewer.\n\n"
                  "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."),
        m("assistant", "Fox leaps over lazy dog."),
    ]
    assert ex[2].messages == [
        m("system", "You are a sentiment classifier. Answer with one word."),
        m("user", "Classify the sentiment of this product review.\n\nThe battery died after two days."),
        m("assistant", "Negative"),
    ]


def test_sft_sharegpt_reads_from_value():
    ex = load("sft_sharegpt.jsonl", "sft").examples
    assert [t["role"] for t in ex[0].messages] == ["system", "user", "assistant"]
    assert ex[0].messages[1]["content"] == "What should I pack for a weekend in Edinburgh in March?"
    assert ex[1].messages[3] == m("assistant", "Snow hushes the street\nbreath hangs white above the gate\n"
                                               "the world holds its breath")
    assert ex[2].messages == [m("user", "Is 91 a prime number?"), m("assistant", "No. 91 = 7 x 13, so it is not prime.")]


def test_sft_text_csv_keeps_multiline_and_bracketed_text():
    ex = load("sft_text.csv", "sft").examples
    assert all(e.messages is None for e in ex)
    assert ex[1].text == "Dear team,\nThe quarterly report is attached. Revenue grew 4%, costs fell 2%.\nBest, Ana"
    # starts with "[" but is not JSON: stays text
    assert ex[2].text == "[Chapter 1] It was a bright cold day in April, and the clocks were striking thirteen."


def test_pref_prompt_chosen_rejected_strings():
    ex = load("pref_prompt_chosen_rejected.jsonl", "preference").examples
    assert ex[0] == PreferenceExample(
        prompt=[m("user", "What is the boiling point of water at sea level?")],
        chosen="Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
        rejected="Water boils at 90 degrees Celsius.",
    )
    assert ex[2].rejected == "Run `rm -rf / --no-preserve-root` as root."


def test_pref_ultrafeedback_message_lists():
    ex = load("pref_ultrafeedback.parquet", "preference").examples
    assert ex[0].prompt == [m("user", "Explain in one sentence why the sky is blue.")]
    assert ex[0].chosen.startswith("Air molecules scatter short blue wavelengths")
    assert ex[0].rejected == "Because it reflects the ocean."
    assert ex[1].chosen == "def square(x):\n    return x * x"
    assert ex[1].rejected == "def square(x):\n    return x ** x"
    # reply-only lists
    assert ex[2] == PreferenceExample([m("user", "Give me a synonym for 'fast'.")], "Quick.", "Slow.")


def test_pref_implicit_prompt_lists_and_strings():
    ex = load("pref_implicit.jsonl", "preference").examples
    assert ex[0] == PreferenceExample(
        prompt=[m("user", "Recommend a book for someone who liked The Martian.")],
        chosen="Try Project Hail Mary by Andy Weir: same author, same problem-solving humour.",
        rejected="Read a book.",
    )
    assert [t["role"] for t in ex[1].prompt] == ["system", "user", "assistant", "user"]
    assert ex[1].prompt[-1] == m("user", "And how do I peel it easily?")
    assert ex[1].rejected == "Just use your fingers."
    # the common prefix ends inside "four"/"five": the split backs off to the word boundary
    assert ex[2] == PreferenceExample(
        prompt=[m("user", "Question: What is 2 + 2?\nAnswer: The answer is")],
        chosen="four.",
        rejected="five.",
    )


def test_pref_hh_rlhf_reconstructs_multi_turn_prompt():
    ex = load("pref_hh_rlhf.jsonl", "preference").examples
    assert ex[0] == PreferenceExample(
        prompt=[
            m("user", "What are some good houseplants for a dark apartment?"),
            m("assistant", "Snake plants, ZZ plants and pothos all tolerate low light well."),
            m("user", "Which one needs the least water?"),
        ],
        chosen="The ZZ plant. It stores water in its rhizomes, so watering every two to three weeks is usually enough.",
        rejected="Cacti need the least water, so get a cactus.",
    )
    assert ex[1].prompt == [m("user", "How do I get my neighbor's wifi password?")]
    assert [t["role"] for t in ex[2].prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert ex[2].prompt[-1]["content"] == "How hot should the water be for green tea?"
    assert ex[2].rejected == "Boiling hot, like any tea."


def test_beavertails_helpful_vs_safe():
    helpful = load("pref_beavertails.csv", "preference").examples
    safe = load("pref_beavertails.csv", "preference", beavertails_preference="safe").examples
    # row 0 and 2: better == safer, same pair
    assert helpful[0] == safe[0] and helpful[2] == safe[2]
    assert helpful[0].chosen.startswith("Document your contributions")
    assert helpful[2].chosen.startswith("Take their keys")
    # row 1: better_response_id=1, safer_response_id=0
    assert helpful[1].prompt == [m("user", "Which household chemicals should never be mixed?")]
    assert helpful[1].chosen.startswith("Never mix bleach")
    assert helpful[1].rejected.startswith("I'd rather not talk about chemicals")
    assert (safe[1].chosen, safe[1].rejected) == (helpful[1].rejected, helpful[1].chosen)


@pytest.mark.parametrize("value, expected", [(0, "A"), (1, "B"), (True, "B"), (False, "A"), ("1", "B"), (" 0 ", "A"),
                                             (1.0, "B")])
def test_beavertails_id_types(value, expected):
    row = {"prompt": "Q?", "response_0": "A", "response_1": "B", "better_response_id": value, "safer_response_id": 0}
    assert to_preference_example(row, "beavertails").chosen == expected


# --- errors ---------------------------------------------------------------------


def test_bad_row_names_file_row_line_and_field():
    with pytest.raises(DataError) as err:
        load("pref_bad_row.jsonl", "preference")
    msg = str(err.value)
    assert "pref_bad_row.jsonl" in msg and "row 2" in msg and "'chosen'" in msg
    assert "row 2 (line 3): field 'chosen': expected a string or a list of messages, got int" in msg
    assert msg.endswith("fix the row, or skip invalid rows with data.skip_invalid: true (--set data.skip_invalid=true)")
    assert "\n" not in msg


def test_skip_invalid_skips_exactly_the_bad_row():
    result = load("pref_bad_row.jsonl", "preference", skip_invalid=True)
    assert result.skipped == 1
    assert [e.prompt[0]["content"] for e in result.examples] == [
        "What is the largest planet in the solar system?",
        "Translate 'thank you' into Spanish.",
        "What gas do plants absorb from the air?",
    ]
    assert len(result.errors) == 1 and "row 2 (line 3)" in result.errors[0]


def test_max_rows_counts_valid_examples():
    result = load("pref_bad_row.jsonl", "preference", skip_invalid=True, max_rows=2)
    assert len(result.examples) == 2 and result.skipped == 0


def test_invalid_json_line_names_line_number(tmp_path):
    good = json.dumps({"text": "fine"})
    path = write(tmp_path, "broken.jsonl", f"{good}\n\n{{\"text\": \"unterminated\n{good}\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3: invalid JSON"):
        read_rows(path)
    path = write(tmp_path, "array.jsonl", f"{good}\n[1, 2]\n")
    with pytest.raises(DataError, match=r"line 2: invalid JSON: expected an object, got list"):
        read_rows(path)


def test_blank_lines_shift_line_not_row(tmp_path):
    rows = [json.dumps({"text": "ok"}), "", json.dumps({"text": ""})]
    path = write(tmp_path, "gap.jsonl", "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"row 1 \(line 3\): field 'text': empty string"):
        load_examples(path, "sft")


def test_unknown_format_name_lists_known():
    with pytest.raises(DataError, match=r"unknown SFT format 'chatml'; known: auto, messages, prompt_completion"):
        load("sft_messages.jsonl", "sft", fmt="chatml")
    with pytest.raises(DataError, match=r"unknown preference format 'dpo'.*hh_rlhf, beavertails"):
        to_preference_example({}, "dpo")


def test_missing_column_names_the_column():
    with pytest.raises(DataError, match=r"row 0 \(line 1\): field 'instruction': missing column"):
        load("sft_messages.jsonl", "sft", fmt="alpaca")


def test_every_row_invalid_is_an_error():
    with pytest.raises(DataError, match=r"none of the 3 rows is valid \(alpaca format\); first error: .*row 0"):
        load("sft_messages.jsonl", "sft", fmt="alpaca", skip_invalid=True)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_examples(write(tmp_path, "empty.jsonl", "\n\n"), "sft")


def test_undetectable_columns_list_columns_and_formats(tmp_path):
    path = write(tmp_path, "odd.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path, "sft")
    msg = str(err.value)
    assert "odd.jsonl" in msg and "['answer', 'question']" in msg and "alpaca (instruction, output)" in msg
    with pytest.raises(DataError, match=r"cannot detect the preference format.*prompt_chosen_rejected"):
        detect_preference_format(["prompt", "response"], {})


@pytest.mark.parametrize("row, field, message", [
    ({"messages": [m("user", "hi"), {"role": "narrator", "content": "x"}]}, "messages[1].role", "unknown role 'narrator'"),
    ({"messages": [m("user", "hi")]}, "messages", "no assistant turn"),
    ({"messages": [m("user", "hi"), m("assistant", "  ")]}, "messages[1].content", "empty string"),
    ({"messages": [m("user", "hi"), {"role": "assistant", "content": None}]}, "messages[1].content", "got null"),
    ({"messages": [m("user", "hi"), m("assistant", "yo"), m("system", "late")]}, "messages[2].role",
     "only allowed first"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "conversations[1].content", "missing key"),
    ({"prompt": "hi", "completion": 3}, "completion", "expected a string or a list of messages, got int"),
    ({"instruction": "Do it", "input": 7, "output": "done"}, "input", "expected a string, got int"),
    ({"text": ""}, "text", "empty string"),
])
def test_sft_row_errors_name_the_field(row, field, message):
    with pytest.raises(RowError) as err:
        to_sft_example(row, "auto")
    assert err.value.field == field and message in err.value.message


def test_empty_system_turn_is_dropped():
    ex = to_sft_example({"messages": [m("system", ""), m("user", "hi"), m("assistant", "hello")]}, "messages")
    assert ex.messages == [m("user", "hi"), m("assistant", "hello")]


HH_A = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: "


@pytest.mark.parametrize("fmt, row, field, message", [
    ("prompt_chosen_rejected", {"prompt": "Q?", "chosen": 5, "rejected": "no"}, "chosen",
     "expected a string or a list of messages, got int"),
    ("prompt_chosen_rejected", {"prompt": "Q?", "chosen": "yes"}, "rejected", "missing column"),
    ("prompt_chosen_rejected", {"prompt": "Q?", "chosen": [m("user", "Other?"), m("assistant", "yes")],
                                "rejected": "no"}, "chosen", "do not match 'prompt'"),
    ("prompt_chosen_rejected", {"prompt": "Q?", "chosen": "yes", "rejected": [m("user", "Q?")]}, "rejected",
     "last message must be the assistant reply"),
    ("prompt_chosen_rejected", {"prompt": [m("user", "Q?"), m("assistant", "A")], "chosen": "y", "rejected": "n"},
     "prompt", "must end with a user turn"),
    ("implicit_prompt", {"chosen": "Paris is lovely.", "rejected": "London is lovely."}, "rejected", "no shared prompt"),
    ("implicit_prompt", {"chosen": "Q: hi A:", "rejected": "Q: hi A: hello"}, "chosen", "empty response"),
    ("implicit_prompt", {"chosen": [m("user", "Q"), m("assistant", "A")], "rejected": "Q A"}, "rejected", "same type"),
    ("implicit_prompt", {"chosen": [m("user", "Q"), m("assistant", "A")], "rejected": [m("user", "Q"), m("assistant", "A")]},
     "rejected", "same reply"),
    ("hh_rlhf", {"chosen": HH_A + "Why did the chicken cross the road?",
                 "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."},
     "rejected", "chosen/rejected do not share the same conversation before the last reply"),
    ("hh_rlhf", {"chosen": "\n\nHuman: Tell me a joke.", "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No."},
     "chosen", "no final 'Assistant:' reply"),
    ("hh_rlhf", {"chosen": HH_A, "rejected": HH_A + "No."}, "chosen", "turn 4 (Assistant) is empty"),
    ("beavertails", {"prompt": "Q?", "response_0": "a", "response_1": "b", "better_response_id": "2"},
     "better_response_id", "expected 0 or 1, got '2'"),
])
def test_preference_row_errors_name_the_field(fmt, row, field, message):
    with pytest.raises(RowError) as err:
        to_preference_example(row, fmt)
    assert err.value.field == field and message in err.value.message


def test_hh_rlhf_tolerates_surrounding_whitespace():
    row = {"chosen": "  Human: Tell me a joke.  \n\nAssistant:  Knock knock.\n",
           "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No.\n\n"}
    assert to_preference_example(row, "hh_rlhf") == PreferenceExample([m("user", "Tell me a joke.")], "Knock knock.", "No.")


def test_detection():
    assert detect_sft_format(["id", "conversations"]) == "sharegpt"
    assert detect_sft_format(["instruction", "input", "output"]) == "alpaca"
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    assert detect_preference_format(hh, hh) == "hh_rlhf"
    assert detect_preference_format(["chosen", "rejected"], {"chosen": "a b", "rejected": "a c"}) == "implicit_prompt"


# --- files and sources ------------------------------------------------------------


def test_csv_json_cells_are_decoded(tmp_path):
    chosen = json.dumps([m("user", "Capital of France?"), m("assistant", "Paris.")])
    rejected = json.dumps([m("user", "Capital of France?"), m("assistant", "Lyon.")])
    csv_text = 'prompt,chosen,rejected\n"Capital of France?","{}","{}"\n'.format(
        chosen.replace('"', '""'), rejected.replace('"', '""'))
    path = write(tmp_path, "uf.csv", csv_text)
    assert read_rows(path)[0]["chosen"][1] == m("assistant", "Paris.")
    assert load_examples(path, "preference").examples == [
        PreferenceExample([m("user", "Capital of France?")], "Paris.", "Lyon.")]


def test_json_column_dict(tmp_path):
    path = write(tmp_path, "cols.json", json.dumps({"text": ["a", "b"], "id": [1, 2]}))
    assert read_rows(path) == [{"text": "a", "id": 1}, {"text": "b", "id": 2}]


def test_local_path_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; expected \.jsonl, \.json, \.parquet, \.csv"):
        read_rows(write(tmp_path, "notes.txt", "hello"))


def test_hub_name_offline_gives_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError) as err:
        read_rows("Anthropic/hh-rlhf")
    msg = str(err.value)
    assert msg.startswith("Anthropic/hh-rlhf: not a local file and could not be loaded with datasets (ConnectionError: ")
    assert msg.endswith("download it when online or pass a local .jsonl/.json/.parquet/.csv") and "\n" not in msg


def test_hub_name_loads_through_datasets(monkeypatch):
    calls = []

    class FakeDataset:
        def to_list(self):
            return [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}]

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = load_examples("owner/prefs", "preference", subset="en", split="test")
    assert calls == [("owner/prefs", "en", "test")]
    assert result.source == "owner/prefs[en]:test" and result.fmt == "prompt_chosen_rejected"
    assert hash_source("owner/prefs") is None


def test_hash_source_local():
    digest = hash_source(str(DATA / "sft_messages.jsonl"))
    assert digest is not None and len(digest) == 64


def test_split_examples_is_deterministic_and_non_empty():
    items = list(range(20))
    train, held = split_examples(items, 0.25, seed=3)
    assert (train, held) == split_examples(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # file order kept on both sides
    assert split_examples(items, 0.25, seed=4)[1] != held
    assert [len(s) for s in split_examples(["a", "b"], 0.01, seed=0)] == [1, 1]
    assert [len(s) for s in split_examples(["a", "b"], 0.99, seed=0)] == [1, 1]
    with pytest.raises(DataError, match="at least 2 examples"):
        split_examples(["only"], 0.5, seed=0)
