"""The command line: errors are one line naming the problem, with exit code 1."""

import json
import re

from typer.testing import CliRunner

from paft.cli import app

runner = CliRunner()


def _err(result):
    return " ".join((result.output or "").split())


def test_bad_config_key_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preference:\n  bta: 0.1\n")
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "config key 'preference.bta': unknown key (did you mean 'beta'?)" in _err(result)
    assert "Traceback" not in result.output


def test_bad_row_names_file_row_and_field(tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}] * 3
    rows[1] = {"prompt": "hi", "chosen": 5, "rejected": "go away"}
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["align", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.preference.path={data}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    msg = _err(result)
    assert str(data) in msg and "row 1" in msg and "'chosen'" in msg and "Traceback" not in result.output


def test_unknown_model_gets_a_how_to_get_it_line(tmp_path):
    result = runner.invoke(app, ["sft", "--preset", "tiny", "--out", str(tmp_path / "r"),
                                 "--set", f"model.name={tmp_path}/missing-model"])
    assert result.exit_code == 1 and "model folder not found" in _err(result)


def test_config_command_prints_resolved_yaml():
    result = runner.invoke(app, ["config", "--preset", "tiny", "--set", "merge.method=dare_ties"])
    assert result.exit_code == 0 and "method: dare_ties" in result.output and "name: tiny" in result.output


def test_methods_json_lists_the_registry():
    from paft.methods.losses import LOSSES

    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} == set(LOSSES)
    dpo = next(r for r in rows if r["name"] == "dpo")
    assert dpo["data"] == "pairs" and dpo["reference"] is True and "2305.18290" in dpo["paper"]


def test_merge_params_reach_the_engine_and_bad_ones_are_one_line(tmp_path):
    base = ["--preset", "tiny", "--out", str(tmp_path / "run")]
    assert runner.invoke(app, ["sft", *base]).exit_code == 0
    assert runner.invoke(app, ["align", *base]).exit_code == 0
    adapter = tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors"
    trained = adapter.stat().st_mtime_ns
    # no merge exists yet: a changed merge section makes nothing stale, so no --force is needed
    first = runner.invoke(app, ["merge", *base, "--set", "merge.method=slerp", "--set", "merge.params={t: 0.5}"])
    assert first.exit_code == 0, first.output
    slerp = ["merge", *base, "--set", "merge.method=slerp", "--set", "merge.params={t: 0.3}"]
    refused = runner.invoke(app, slerp)  # now the merge exists: redoing it is asked for
    assert refused.exit_code == 1 and "--force to redo merged; trained branches are kept" in _err(refused)
    ok = runner.invoke(app, [*slerp, "--force"])
    assert ok.exit_code == 0, ok.output
    assert adapter.stat().st_mtime_ns == trained  # branches kept, only the merge redone
    summary = json.loads((tmp_path / "run" / "merged" / "paft_merge.json").read_text())
    assert summary["method"] == "slerp" and summary["params"] == {"t": 0.3}
    (tmp_path / "run" / "merged" / "paft_merge.json").unlink()
    bad = runner.invoke(app, ["merge", *base, "--force", "--set", "merge.method=breadcrumbs",
                              "--set", "merge.params={gamma: 2}"])
    assert bad.exit_code == 1 and "gamma" in _err(bad) and "Traceback" not in bad.output


def test_readme_lists_every_registered_method():
    from pathlib import Path

    from paft.merge.methods import MERGE_METHODS
    from paft.methods.losses import LOSSES

    docs = Path(__file__).parent.parent / "docs"  # the README links these method tables
    readme = (docs / "methods.md").read_text() + (docs / "merge.md").read_text()
    for name in [*LOSSES, *MERGE_METHODS]:
        assert f"| `{name}` |" in readme, name


def test_nan_loss_stops_the_branch_naming_the_step(tmp_path):
    """Issue 16 class 5: a diverging run (lr=1e30 passes validation) stops with one line, no adapter, exit 1."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["sft", "--preset", "tiny", "--out", str(out), "--set", "sft.learning_rate=1e30",
                                 "--set", "sft.max_steps=6"])
    assert result.exit_code == 1, result.output
    assert re.search(r"sft: loss is (nan|-?inf) at step \d+; training diverged", _err(result))
    assert "Traceback" not in result.output
    assert not (out / "sft" / "adapter").exists()


def test_force_on_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["sft", "--preset", "tiny", "--out", str(tmp_path / "d"), "--force"])
    assert result.exit_code == 1 and "not a paft run folder" in _err(result) and "Traceback" not in result.output
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
