

def test_force_starts_a_run_with_a_damaged_config_over(tmp_path):
    run = _damaged_run(tmp_path, "- a\n")
    (run / "sft").mkdir()
    (run / "sft" / "log_history.json").write_text("[]")
    line = _error_line(runner.invoke(app, ["merge", *TINY, "--out", str(run), "--force"]))
    assert "train the sft branch before merging" in line  # got past the damaged config.yaml...
    assert not (run / "sft").exists()  # ...removing the outputs it could not vouch for
    from paft.config import read_run_config

    assert read_run_config(run)["model"]["name"] == "tiny"
