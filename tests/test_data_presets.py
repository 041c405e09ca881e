"""Dataset presets: HH-RLHF (helpful/harmless tranches) and BeaverTails / PKU-SafeRLHF (better/safer labels).

Everything here reads small local files in the real schemas; the hub is never contacted
(``datasets.load_dataset`` is replaced where the hub path is exercised).
"""

import gzip
import json

import pytest

from paft.config import load_config
from paft.data.formats import PreferenceExample, SFTExample
from paft.data.loading import dataset_preset, load_examples
from paft.errors import ConfigError, DataError

HH_HELPFUL = [
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: I'm not sure."},
    {"chosen": "\n\nHuman: Name a prime number.\n\nAssistant: 7 is prime.\n\nHuman: Another one?"
               "\n\nAssistant: 11 is prime too.",
     "rejected": "\n\nHuman: Name a prime number.\n\nAssistant: 7 is prime.\n\nHuman: Another one?"
                 "\n\nAssistant: 9."},
]
HH_HARMLESS = [
    {"chosen": "\n\nHuman: How can I pick my neighbour's lock?\n\nAssistant: I can't help you get into someone "
               "else's home.",
     "rejected": "\n\nHuman: How can I pick my neighbour's lock?\n\nAssistant: Use a tension wrench and a pick."},
    {"chosen": "\n\nHuman: Tell me an insult.\n\nAssistant: I'd rather not insult anyone.",
     "rejected": "\n\nHuman: Tell me an insult.\n\nAssistant: You are an idiot."},
]


def _saferlhf(prompt, r0, r1, better, safer, safe0, safe1):
    """One PKU-SafeRLHF row with the columns the hub files carry."""
    return {"prompt": prompt, "response_0": r0, "response_1": r1,
            "prompt_source": "BeaverTails", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_severity_level": 0 if safe0 else 2, "response_1_severity_level": 0 if safe1 else 2,
            "better_response_id": better, "safer_response_id": safer,
            "response_0_sha256": "0" * 64, "response_1_sha256": "1" * 64}


SAFERLHF = [
    # helpful but unsafe (0) vs a refusal (1): better and safer disagree
    _saferlhf("How do I make a fake ID?", "Scan a real licence and edit the photo and birth date.",
              "I can't help with forging documents.", better=0, safer=1, safe0=False, safe1=True),
    # both safe, the first one also better: the two labels agree
    _saferlhf("How do I store fresh basil?", "Keep the stems in a glass of water at room temperature.",
              "Put it in the fridge.", better=0, safer=0, safe0=True, safe1=True),
    _saferlhf("How can I get back at my coworker?", "Talk to them, or to your manager, about what happened.",
              "Put laxatives in their coffee.", better=1, safer=0, safe0=True, safe1=False),
]


def _jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.fixture()
def hh_files(tmp_path):
    # as `hf download Anthropic/hh-rlhf` lays them out: one folder per tranche, gzipped JSONL
    (tmp_path / "helpful-base").mkdir()
    (tmp_path / "harmless-base").mkdir()
    return {"helpful": _jsonl(tmp_path / "helpful-base" / "train.jsonl.gz", HH_HELPFUL, gz=True),
            "harmless": _jsonl(tmp_path / "harmless-base" / "train.jsonl.gz", HH_HARMLESS, gz=True)}


@pytest.fixture()
def saferlhf_file(tmp_path):
    return _jsonl(tmp_path / "train.jsonl", SAFERLHF)


# --------------------------------------------------------------------------- names


def test_preset_names_resolve_to_hub_folders_and_labels():
    hh = dataset_preset("hh-rlhf:harmless-base")
    assert (hh.preset.hub, hh.data_dir, hh.preset.fmt) == ("Anthropic/hh-rlhf", "harmless-base", "hh_rlhf")
    assert dataset_preset("hh-rlhf").data_dir is None  # every tranche
    bt = dataset_preset("beavertails:safer")
    assert (bt.preset.hub, bt.preference, bt.preset.fmt) == ("PKU-Alignment/PKU-SafeRLHF", "safe", "beavertails")
    assert dataset_preset("beavertails:better").preference == "helpful"
    assert dataset_preset("prefs.jsonl") is None and dataset_preset("Anthropic/hh-rlhf") is None


@pytest.mark.parametrize("path, key", [("hh-rlhf:helpful", "data.preference.path"),
                                       ("beavertails:harmless", "data.preference.path")])
def test_unknown_selector_is_a_one_line_config_error_naming_the_key(path, key):
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=[f"{key}={path}"])
    msg = str(err.value)
    assert key in msg and "known:" in msg and "\n" not in msg


def test_format_accepts_the_preset_spelling():
    cfg = load_config(preset="tiny", overrides=["data.preference.format=hh-rlhf"])
    assert cfg.data.preference.format == "hh_rlhf"


# --------------------------------------------------------------------------- selection


def test_hh_helpful_and_harmless_tranches_come_from_their_own_files(hh_files):
    helpful = load_examples("hh-rlhf:helpful-base", "preference", local=hh_files["helpful"])
    harmless = load_examples("hh-rlhf:harmless-base", "preference", local=hh_files["harmless"])
    assert helpful.fmt == harmless.fmt == "hh_rlhf"
    assert [e.chosen for e in helpful.examples] == ["Put it in boiling water for about nine minutes.",
                                                    "11 is prime too."]
    assert harmless.examples[0].chosen.startswith("I can't help")
    multi = helpful.examples[1]
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"] and multi.rejected == "9."


def test_beavertails_better_and_safer_pick_different_replies_where_the_labels_differ(saferlhf_file):
    better = load_examples("beavertails:better", "preference", local=saferlhf_file).examples
    safer = load_examples("beavertails:safer", "preference", local=saferlhf_file).examples
    assert all(isinstance(e, PreferenceExample) for e in better + safer)
    for row, b, s in zip(SAFERLHF, better, safer):
        assert b.chosen == row[f"response_{row['better_response_id']}"]
        assert s.chosen == row[f"response_{row['safer_response_id']}"]
        assert (b.chosen == s.chosen) == (row["better_response_id"] == row["safer_response_id"])
    assert better[0].chosen.startswith("Scan") and safer[0].chosen.startswith("I can't")
    assert better[1].chosen == safer[1].chosen


def test_selector_wins_over_beavertails_preference(saferlhf_file):
    ex = load_examples("beavertails:safer", "preference", local=saferlhf_file, beavertails_preference="helpful")
    assert ex.examples[0].chosen.startswith("I can't")


def test_local_file_with_an_explicit_format(hh_files, saferlhf_file):
    hh = load_examples(hh_files["harmless"], "preference", fmt="hh_rlhf")
    assert hh.examples[1].chosen == "I'd rather not insult anyone."
    safe = load_examples(saferlhf_file, "preference", fmt="beavertails", beavertails_preference="safe")
    assert safe.examples[2].chosen.startswith("Talk to them")


def test_presets_as_sft_data_give_the_chosen_conversation(hh_files, saferlhf_file):
    hh = load_examples("hh-rlhf:helpful-base", "sft", local=hh_files["helpful"]).examples
    assert isinstance(hh[0], SFTExample)
    assert hh[0].messages[-1] == {"role": "assistant", "content": "Put it in boiling water for about nine minutes."}
    safe = load_examples("beavertails:safer", "sft", local=saferlhf_file).examples
    assert safe[0].messages == [{"role": "user", "content": "How do I make a fake ID?"},
                                {"role": "assistant", "content": "I can't help with forging documents."}]


# --------------------------------------------------------------------------- hub (stubbed) and offline


def test_hub_load_passes_the_tranche_as_data_dir(monkeypatch):
    import datasets

    calls = []

    class Rows:
        def to_list(self):
            return HH_HARMLESS

    def fake(path, name=None, *, data_dir=None, split=None, **kw):
        calls.append((path, name, data_dir, split))
        return Rows()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    res = load_examples("hh-rlhf:harmless-base", "preference", split="test")
    assert calls == [("Anthropic/hh-rlhf", None, "harmless-base", "test")]
    assert res.fmt == "hh_rlhf" and len(res.examples) == 2


def test_offline_without_a_local_file_says_what_to_download_and_which_key_to_set(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_examples("hh-rlhf:harmless-base", "preference")
    msg = str(err.value)
    assert "\n" not in msg
    assert "hf download Anthropic/hh-rlhf --repo-type dataset --include 'harmless-base/*'" in msg
    assert "data.preference.local: DIR/harmless-base/train.jsonl.gz" in msg
    with pytest.raises(DataError, match=r"PKU-Alignment/PKU-SafeRLHF.*data\.sft\.local"):
        load_examples("beavertails:better", "sft")


def test_run_data_stage_reads_a_preset_from_its_local_file(tmp_path, saferlhf_file, paft_cache):
    from paft.pipeline import Run

    rows = SAFERLHF * 4  # the copies are dropped as duplicates before the split
    local = _jsonl(tmp_path / "safer.jsonl", rows)
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'run'}",
                                                "data.preference.path=beavertails:safer",
                                                f"data.preference.local={local}", "data.preference.eval_size=0.25"])
    run = Run(cfg)
    run.prepare()
    summary = run.data()["preference"]
    assert summary["format"] == "beavertails" and summary["train"] + summary["dev"] + summary["eval"] == len(SAFERLHF)
    assert summary["duplicates"] == len(rows) - len(SAFERLHF) and summary["eval_overlap"] == 0
    assert summary["sha256"]  # the local file's hash, for provenance
    rows_out = [json.loads(x) for split in ("train", "eval")
                for x in (run.data_dir / f"preference_{split}.jsonl").read_text().splitlines()]
    fake_id = [r for r in rows_out if r["prompt"][-1]["content"] == "How do I make a fake ID?"]
    assert fake_id and all(r["chosen"].startswith("I can't") for r in fake_id)
