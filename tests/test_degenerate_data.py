"""Degenerate data in the data stage (issue 16, class 5): pairs with chosen == rejected, duplicate rows,
held-out rows that also occur in train. Hand-made files, counts checked against what was written."""

import json

import pytest

from paft.config import DataConfig, load_config
from paft.data.loading import load_examples
from paft.data.prepare import prepare_data
from paft.errors import DataError
from paft.report.markdown import to_markdown
from paft.report.render import build_report


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pair(i, rejected=None):
    return {"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": rejected or f"bad answer {i}"}


def _sft(i):
    return {"prompt": f"q{i}", "completion": f"a{i}"}


def _data(tmp_path, pairs, sft=None, **pref):
    sft_path = _write(tmp_path / "sft.jsonl", sft or [_sft(i) for i in range(10)])
    return DataConfig(sft={"path": sft_path}, preference={"path": _write(tmp_path / "pref.jsonl", pairs), **pref})


def _read(tmp_path, name, kind):
    return load_examples(str(tmp_path / "out" / name), kind).examples


def _keys(examples):
    return [json.dumps(e.__dict__, sort_keys=True) for e in examples]


def test_equal_pairs_dropped_counted_and_warned(tmp_path):
    # 10 pairs, 3 of them with chosen == rejected (rows 2, 5, 8)
    pairs = [_pair(i, rejected=f"good answer {i}" if i in (2, 5, 8) else None) for i in range(10)]
    logs = []
    summary = prepare_data(_data(tmp_path, pairs), tmp_path / "out", seed=0, log=logs.append)
    p = summary["preference"]
    assert p["equal_pairs"] == 3 and p["duplicates"] == 0 and p["eval_overlap"] == 0
    assert p["train"] + p["dev"] + p["eval"] == 7  # the dev split (data.dev_size) comes from the training rows
    kept = [e for split in ("train", "dev", "eval") if (tmp_path / "out" / f"preference_{split}.jsonl").stat().st_size > 1
            for e in _read(tmp_path, f"preference_{split}.jsonl", "preference")]
    assert sorted(e.prompt[-1]["content"] for e in kept) == [f"question {i}" for i in (0, 1, 3, 4, 6, 7, 9)]
    assert any("dropped 3 of 10 preference pairs with chosen == rejected" in m and "pref.jsonl" in m for m in logs)


def test_all_pairs_equal_stops_with_one_line(tmp_path):
    pairs = [_pair(i, rejected=f"good answer {i}") for i in range(6)]
    with pytest.raises(DataError) as e:
        prepare_data(_data(tmp_path, pairs), tmp_path / "out", seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "pref.jsonl" in msg and "all 6 preference pairs have chosen == rejected" in msg
    assert "ln 2" in msg and "data.preference.format" in msg


def test_duplicates_dropped_before_the_split_so_no_held_out_row_is_in_train(tmp_path):
    # 8 distinct rows; row 0 four times, row 1 three times: 5 duplicates among 13
    sft = [_sft(i) for i in range(8)] + [_sft(0)] * 3 + [_sft(1)] * 2
    summary = prepare_data(_data(tmp_path, [_pair(i) for i in range(10)], sft=sft), tmp_path / "out", seed=3)
    s = summary["sft"]
    assert s["duplicates"] == 5 and s["train"] + s["dev"] + s["eval"] == 8 and s["eval_overlap"] == 0
    train, held = (_keys(_read(tmp_path, f"sft_{x}.jsonl", "sft")) for x in ("train", "eval"))
    assert len(set(train)) == len(train) and not set(train) & set(held)
    assert len(set(train) | set(held)) == 8 - s["dev"]


def test_separate_eval_file_overlap_reported_and_warned(tmp_path):
    eval_rows = [_pair(1), _pair(2), _pair(100), _pair(101), _pair(102, rejected="good answer 102")]
    eval_path = _write(tmp_path / "held.jsonl", eval_rows)
    logs = []
    pairs = [_pair(i) for i in range(10)] + [_pair(3)]
    summary = prepare_data(_data(tmp_path, pairs, eval_path=eval_path), tmp_path / "out", seed=0, log=logs.append)
    p = summary["preference"]
    assert (p["train"] + p["dev"], p["eval"], p["duplicates"], p["eval_equal_pairs"], p["eval_overlap"]) == (10, 4, 1, 1, 2)
    assert any("held.jsonl: 2 of its 4 held-out rows also occur in" in m for m in logs)
    md = to_markdown(build_report({"config": load_config(preset="tiny").model_dump(mode="json"), "data": summary}))
    row = next(line for line in md.splitlines() if line.startswith("| preference "))
    assert [c.strip() for c in row.strip("|").split("|")][-3:] == ["0 + 1 held-out", "1", "2"]


def test_report_shows_the_data_checks(tmp_path):
    sft = [_sft(i) for i in range(8)] + [_sft(0)] * 2
    pairs = [_pair(i, rejected=f"good answer {i}" if i < 2 else None) for i in range(10)]
    data = prepare_data(_data(tmp_path, pairs, sft=sft), tmp_path / "out", seed=0)
    cfg = load_config(preset="tiny").model_dump(mode="json")
    md = to_markdown(build_report({"config": cfg, "data": data}))
    assert "## Data" in md and "pairs chosen = rejected, dropped" in md and "held-out rows also in train" in md
    row = {kind: next(line for line in md.splitlines() if line.startswith(f"| {kind} ")) for kind in data}
    cells = {kind: [c.strip() for c in line.strip("|").split("|")] for kind, line in row.items()}
    assert cells["sft"][-3:] == ["0", "2", "0"] and cells["preference"][-3:] == ["2", "0", "0"]


def test_demo_counts_reported_as_drawn(tmp_path):
    cfg = load_config(preset="tiny")
    summary = prepare_data(cfg.data, tmp_path, seed=cfg.run.seed)
    for kind, s in summary.items():
        train = load_examples(str(tmp_path / f"{kind}_train.jsonl"), kind).examples
        held = load_examples(str(tmp_path / f"{kind}_eval.jsonl"), kind).examples
        assert s["duplicates"] == len(train) - len(set(_keys(train)))
        assert s["eval_overlap"] == sum(k in set(_keys(train)) for k in _keys(held))
        assert s["equal_pairs"] == 0
