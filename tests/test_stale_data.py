"""A data file edited after the data stage (issue 16, class 5): a rerun into the run folder stops with one line
naming the file and both hashes, instead of reusing the data prepared from the old file; --force redoes it."""

import json

import pytest
from typer.testing import CliRunner

from paft.cli import app
from paft.config import load_config
from paft.errors import DataError
from paft.io import sha256_file
from paft.pipeline import Run

runner = CliRunner()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_rows(n, tag="a"):
    return [{"prompt": f"what is {i}?", "completion": f"{tag}{i}"} for i in range(n)]


def test_edited_data_file_stops_the_rerun_and_force_redoes_it(tmp_path, paft_cache):
    data = _write(tmp_path / "sft.jsonl", _sft_rows(12))
    out = tmp_path / "run"
    args = ["sft", "--preset", "tiny", "--out", str(out), "--set", "run.report_to=[]", "--set", "sft.max_steps=2",
            "--set", "sft.save_steps=2", "--set", f"data.sft.path={data}"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    old = sha256_file(data)
    assert json.loads((out / "data" / "summary.json").read_text())["sft"]["sha256"] == old

    _write(data, _sft_rows(12, tag="b"))  # same path, new content: the config is unchanged
    new = sha256_file(data)
    again = runner.invoke(app, args)
    text = " ".join(again.output.split())
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert len([ln for ln in again.output.splitlines() if ln.strip()]) == 1, again.output
    assert str(data) in text and old[:12] in text and new[:12] in text and "--force" in text
    assert "a0" in (out / "data" / "sft_train.jsonl").read_text() + (out / "data" / "sft_eval.jsonl").read_text()

    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "data" / "summary.json").read_text())["sft"]["sha256"] == new
    prepared = (out / "data" / "sft_train.jsonl").read_text() + (out / "data" / "sft_eval.jsonl").read_text()
    assert "b0" in prepared and "a0" not in prepared
    assert data.exists()  # --force keeps the input file


def test_edited_eval_file_is_caught_and_an_unchanged_one_reused(tmp_path):
    train = _write(tmp_path / "sft.jsonl", _sft_rows(6))
    held = _write(tmp_path / "held.jsonl", _sft_rows(3, tag="h"))
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'run'}", f"data.sft.path={train}",
                                                f"data.sft.eval_path={held}"])
    run = Run(cfg)
    run.prepare()
    first = run.data()
    assert Run(cfg).data() == first  # unchanged files: the prepared data is reused
    _write(held, _sft_rows(4, tag="h"))
    with pytest.raises(DataError, match=r"held\.jsonl: changed since the data stage"):
        Run(cfg).data()
    held.unlink()  # a file that is gone (a moved data folder) is not compared
    assert Run(cfg).data() == first
