"""`paft sweep`: grid expansion and cell keys, a resumable local sweep, failures, the CLI, and the Ray backend."""

import json
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from paft.cli import app
from paft.config import config_digest, load_config
from paft.errors import ConfigError
from paft.sweep import load_sweep, run_sweep
from paft.sweep.results import SweepResult, pick_metrics, results_table, write_results, write_sweep_report
from paft.sweep.spec import ExecutionSettings

# the cheapest real cell: the SFT branch of the tiny model for one step on a few rows
BASE = {"sft": {"max_steps": 1, "save_steps": 1, "logging_steps": 1, "batch_size": 2},
        "data": {"demo": {"sft_train": 8, "sft_eval": 4, "preference_train": 8, "preference_eval": 4}}}


def _write(path, doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _grid(tmp_path, **extra):
    return _write(tmp_path / "grid.yaml", {"preset": "tiny", "mode": "sft", "base": BASE,
                                           "axes": {"sft.lora.r": [2, 4], "run.seed": [0, 1]},
                                           "sweep": {"workers": 2}, **extra})


def test_grid_expands_to_the_product_with_stable_keys(tmp_path):
    path = _write(tmp_path / "s.yaml", {
        "preset": "tiny", "base": BASE,
        "axes": {"preference.method": ["dpo", "ipo", "simpo"], "sft.lora.r": [2, 4],
                 "data": [{"label": "demo", "value": {}},
                          {"label": "small", "value": {"demo": {"sft_train": 4}}}]}})
    sweep = load_sweep(path)
    assert len(sweep.cells) == 12 and sweep.columns == ["preference.method", "sft.lora.r", "data"]
    assert len({c.key for c in sweep.cells}) == 12
    first = sweep.cells[0]
    assert first.labels == {"preference.method": "dpo", "sft.lora.r": 2, "data": "demo"}
    small = next(c for c in sweep.cells if c.labels["data"] == "small")
    # a mapping value merges into its section: the other demo sizes keep the base's values
    assert small.config["data"]["demo"] == {**first.config["data"]["demo"], "sft_train": 4}
    # the key is the resolved config's hash: the same config from `paft config` gives the same key
    cfg = load_config(preset="tiny", overrides=[f"{k}={json.dumps(v)}" for k, v in
                                                {"sft.max_steps": 1, "sft.save_steps": 1, "sft.logging_steps": 1,
                                                 "sft.batch_size": 2, "data.demo.sft_train": 8, "data.demo.sft_eval": 4,
                                                 "data.demo.preference_train": 8, "data.demo.preference_eval": 4,
                                                 "sft.lora.r": 2, "preference.method": "dpo"}.items()])
    assert config_digest(cfg) == first.digest and first.key == first.digest[:12]
    assert load_sweep(path).cells[5].key == sweep.cells[5].key  # stable across loads
    # execution-only keys do not change it; anything else does
    assert config_digest(cfg.model_copy(update={"run": cfg.run.model_copy(
        update={"threads": 7, "output_dir": "elsewhere", "force": True})})) == first.digest
    assert config_digest(cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 1})})) != first.digest


def test_bad_sweep_files_fail_in_one_line_naming_the_key(tmp_path):
    runner = CliRunner()
    cases = [({"preset": "tiny", "axes": {"sft.lora.rr": [2, 4]}}, "'sft.lora.rr': unknown config key (did you mean 'sft.lora.r'?)"),
             ({"preset": "tiny", "axes": {"sft.lora.r": [4, 0]}}, "cell 2 (sft.lora.r=0): config key 'sft.lora.r'"),
             ({"preset": "tiny", "axes": {"run.seed.x": [1]}}, "'run.seed' is a value, not a section"),
             ({"preset": "tiny", "axis": {"sft.lora.r": [4]}}, "sweep key 'axis': unknown key (did you mean 'axes'?)"),
             ({"preset": "tiny"}, "give either `axes`"),
             ({"preset": "tiny", "base": {"sft": {"lr": 1}}, "axes": {"sft.lora.r": [4]}}, "base: config key 'sft.lr'")]
    for i, (doc, want) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.yaml", doc)
        with pytest.raises(ConfigError) as err:
            load_sweep(path)
        assert want in str(err.value) and "\n" not in str(err.value), str(err.value)
    res = runner.invoke(app, ["sweep", str(tmp_path / "bad0.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "sft.lora.rr" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing ran, nothing was written


def test_report_plots_numeric_axes_with_seed_error_bars_and_heatmaps(tmp_path):
    path = _write(tmp_path / "s.yaml", {"preset": "tiny", "axes": {
        "preference.method": ["dpo", "ipo"], "data": [{"label": "a", "value": {}},
                                                      {"label": "b", "value": {"demo": {"sft_train": 4}}}],
        "sft.lora.r": [2, 8], "run.seed": [0, 1]}})
    sweep = load_sweep(path)
    records = [{"key": c.key, "status": "ok", "wall_s": 1.0, "error": None,
                "metrics": {"paft/pref_accuracy": 0.5 + 0.01 * i, "sft/sft_nll": 1.0, "base/sft_nll": 2.0}}
               for i, c in enumerate(sweep.cells)]
    records[-1] = {"key": sweep.cells[-1].key, "status": "failed", "wall_s": None, "error": "boom", "metrics": {}}
    res = SweepResult(tmp_path, sweep, records, table=results_table(sweep, records))
    res.metrics = pick_metrics(res.table, None, "s.yaml")
    assert res.metrics == ["paft/pref_accuracy", "sft/sft_nll"]
    with pytest.raises(ConfigError, match="did you mean 'paft/pref_accuracy'"):
        pick_metrics(res.table, ["paft/pref_acuracy"], "s.yaml")
    write_results(tmp_path, res.table)
    write_sweep_report(tmp_path, res, ExecutionSettings())
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert plots == ["paft-pref_accuracy__preference.method_x_data.png", "paft-pref_accuracy__vs__sft.lora.r.png",
                     "sft-sft_nll__preference.method_x_data.png", "sft-sft_nll__vs__sft.lora.r.png"]
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "| dpo | a | 2 | 2 | 0.505 ± 0.007 | 1.000 ± 0.000 |" in md  # seeds 0 and 1 of the first combination
    assert "boom" in md and page.count("data:image/png;base64,") == 4
    assert pd.read_parquet(tmp_path / "results.parquet")["status"].tolist().count("failed") == 1


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, paft_cache):
    tmp = tmp_path_factory.mktemp("sweep")
    path, out = _grid(tmp), tmp / "out"
    return path, out, run_sweep(path, out)


def test_local_sweep_writes_one_row_per_cell(grid_sweep):
    _, out, res = grid_sweep
    assert len(res.ran) == 4 and not res.skipped and not res.failed
    for name in ("results.csv", "results.parquet", "report.md", "report.html"):
        assert (out / name).is_file(), name
    csv, pq = pd.read_csv(out / "results.csv"), pd.read_parquet(out / "results.parquet")
    assert len(csv) == len(pq) == 4 and set(csv["status"]) == {"ok"}
    assert sorted(zip(pq["sft.lora.r"], pq["run.seed"])) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert (pq["train/sft/steps"] == 1).all() and pq["train/sft/final_loss"].notna().all()
    for key in pq["cell"]:
        cell = json.loads((out / "cells" / key / "cell.json").read_text())
        assert cell["status"] == "ok" and cell["wall_s"] > 0 and (out / "cells" / key / "config.yaml").is_file()
        assert (out / "cells" / key / "sft" / "adapter" / "adapter_config.json").is_file()
        # the pool split the cores between the two workers
        assert yaml.safe_load((out / "cells" / key / "config.yaml").read_text())["run"]["threads"] >= 1
    text = (out / "report.md").read_text()
    assert "Mean ± std over seeds" in text and "vs__sft.lora.r.png" in text
    assert any((out / "plots").glob("*vs__sft.lora.r.png"))


def test_second_call_skips_every_finished_cell(grid_sweep):
    path, out, _ = grid_sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}
    start = time.perf_counter()
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - start < 60  # nothing reran (the line below); a guard against a hang
    assert "0 ran, 4 skipped" in res.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")} == stamps


def test_a_failing_cell_is_recorded_and_retried_without_stopping_others(grid_sweep, tmp_path):
    _, out, _ = grid_sweep
    path = _write(tmp_path / "cells.yaml", {
        "preset": "tiny", "mode": "sft", "base": BASE, "sweep": {"workers": 2},
        "cells": [{"sft.lora.r": 2, "run.seed": 0},  # finished in the grid sweep: skipped
                  {"sft.lora.r": 8},
                  {"data.sft.path": str(tmp_path / "missing.jsonl")}]})
    res = run_sweep(path, out)
    assert len(res.skipped) == 1 and len(res.ran) == 2
    assert list(res.table["status"]) == ["ok", "ok", "failed"]
    assert list(res.table["data.sft.path"]) == ["demo", "demo", str(tmp_path / "missing.jsonl")]
    bad = res.failed[0]
    assert "missing.jsonl" in bad["error"] and "\n" not in bad["error"]
    cell_dir = out / "cells" / bad["key"]
    assert json.loads((cell_dir / "cell.json").read_text())["status"] == "failed"
    assert "Traceback" in (cell_dir / "error.txt").read_text()
    assert list(pd.read_csv(out / "results.csv")["status"]) == ["ok", "ok", "failed"]
    again = run_sweep(path, out)  # the failed cell is tried again, the others are not
    assert again.ran == [bad["key"]] and len(again.skipped) == 2


def test_ray_backend_runs_cells_as_tasks(tmp_path, paft_cache):
    ray = pytest.importorskip("ray")
    path = _write(tmp_path / "ray.yaml", {"preset": "tiny", "mode": "sft", "base": BASE,
                                          "axes": {"sft.lora.r": [2, 8]},
                                          "sweep": {"backend": "ray", "num_cpus": 1}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_sweep(path, tmp_path / "out")
    finally:
        ray.shutdown()
    assert list(res.table["status"]) == ["ok", "ok"], res.table["error"].tolist()
    for key in res.table["cell"]:
        cell = json.loads((tmp_path / "out" / "cells" / key / "cell.json").read_text())
        assert cell["threads"] == 1 and cell["metrics"]["train/sft/steps"] == 1


def test_example_sweeps_validate():
    from pathlib import Path

    root = Path(__file__).parent.parent / "examples"
    sweeps = {p.name: load_sweep(p) for p in sorted(root.glob("sweep-*.yaml"))}
    assert len(sweeps["sweep-tiny.yaml"].cells) >= 4 and len(sweeps["sweep-tradeoffs.yaml"].cells) == 16
    trade = sweeps["sweep-tradeoffs.yaml"]
    assert {c.config["preference"]["method"] for c in trade.cells} == {"dpo", "simpo"}
    assert {c.config["data"]["demo"]["sft_train"] for c in trade.cells} == {512, 128}
