"""`paft run --seeds N`: the seed sweep, the per-model mean ± std, and the paired test of differences."""

import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from paft.cli import app
from paft.config import load_config
from paft.errors import PaftError
from paft.sweep.seeds import model_summary, paired_difference, seed_sweep


def test_paired_difference_equals_the_hand_computed_t_test():
    # d = [1, 1, 2]: mean 4/3, std sqrt(1/3), t = 4 with 2 dof; p = 2 (1 - F(4)), F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    d = paired_difference([1, 2, 3], [0, 1, 1])
    assert d["mean"] == pytest.approx(4 / 3) and d["std"] == pytest.approx(math.sqrt(1 / 3)) and d["n"] == 3
    assert d["p"] == pytest.approx(2 * (0.5 - 4 / (2 * math.sqrt(18))), rel=1e-9)  # 0.0572
    assert d["within_noise"]  # p >= 0.05
    assert not paired_difference([1, 2, 3, 4], [0, 1, 1, 2])["within_noise"]  # d = [1, 1, 2, 2]: p = 0.024
    same = paired_difference([0.5, 0.6], [0.5, 0.6])
    assert same["mean"] == 0 and same["p"] == 1.0 and same["within_noise"]
    assert not paired_difference([0.7, 0.8], [0.5, 0.6])["within_noise"]  # a constant gap of 0.2
    one = paired_difference([0.7], [0.5])
    assert one["p"] is None and one["within_noise"] and one["std"] is None


def test_model_summary_reads_model_columns_over_seeds():
    df = pd.DataFrame({"cell": ["a", "b", "c"], "run.seed": [0, 1, 2], "status": ["ok"] * 3,
                       "paft/pref_accuracy": [0.9, 0.8, 0.7], "sequential/pref_accuracy": [1.0, 1.0, 1.0],
                       "paft/sft_nll": [0.3, 0.3, 0.3], "sequential/sft_nll": [0.2, 0.21, 0.22],
                       "train/sft/steps": [40, 40, 40], "paft/eval_s": [1, 2, 3]})
    s = model_summary(df)
    assert s["seeds"] == [0, 1, 2] and s["metrics"] == ["sft_nll", "pref_accuracy"]
    assert set(s["models"]) == {"paft", "sequential"}  # train/ and sparsity/ columns are not models
    acc = s["models"]["paft"]["pref_accuracy"]
    assert acc["mean"] == pytest.approx(0.8) and acc["std"] == pytest.approx(0.1) and acc["n"] == 3
    assert acc["vs_reference"]["mean"] == pytest.approx(-0.2)
    assert "vs_reference" not in s["models"]["sequential"]["pref_accuracy"]
    assert model_summary(df.assign(**{"run.seed": [0, 0, 0]})) is None  # one seed: nothing to summarise


def test_seed_sweep_cells_and_refusals(tmp_path):
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'r'}", "run.seeds=3", "run.seed=5"])
    sweep = seed_sweep(cfg)
    assert [c.values["run.seed"] for c in sweep.cells] == [5, 6, 7] and sweep.columns == ["run.seed"]
    assert all(c.config["run"]["seeds"] == 1 for c in sweep.cells)  # a cell is one run, not another sweep
    assert all(c.config["sft"] == cfg.model_dump(mode="json")["sft"] for c in sweep.cells)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.yaml").write_text("run: {}\n")
    with pytest.raises(PaftError, match="holds a single run"):
        seed_sweep(load_config(preset="tiny", overrides=[f"run.output_dir={tmp_path / 'single'}", "run.seeds=2"]))
    res = CliRunner().invoke(app, ["run", "--preset", "tiny", "--seeds", "0", "--out", str(tmp_path / "z")])
    assert res.exit_code == 1 and "run.seeds" in res.output


@pytest.mark.slow
def test_paft_run_seeds_end_to_end(tmp_path):
    out = tmp_path / "seeds"
    res = CliRunner().invoke(app, ["run", "--preset", "tiny", "--seeds", "2", "--out", str(out),
                                   "--set", "eval.harness_tasks=[]", "--set", "eval.harmlessness=false"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["seeds"] == [0, 1] and {"paft", "sequential", "base"} <= set(summary["models"])
    assert summary["models"]["paft"]["pref_accuracy"]["n"] == 2
    assert any(m.startswith("expo_") for m in summary["models"])  # the candidates get mean ± std too
    assert len(list((out / "cells").glob("*/eval.json"))) == 2
    assert "mean ± std over 2 seeds" in (out / "report.md").read_text()


def _findings_table(pref_sparsity, nol1_sparsity, sft_sparsity, sft_nll, nol1_nll, tuned, seq):
    import pandas as pd

    rows = []
    for i in range(3):
        rows.append({"status": "ok", "run.seed": i,
                     "sparsity/preference/rel<=0.001": pref_sparsity[i], "sparsity/no_l1/rel<=0.001": nol1_sparsity[i],
                     "sparsity/sft/rel<=0.001": sft_sparsity[i],
                     "sft/sft_nll": sft_nll[i], "sft_no_l1/sft_nll": nol1_nll[i],
                     "sft/sft_exact_match": 0.5, "sft_no_l1/sft_exact_match": 0.5,
                     "paft_tuned/sft_nll": tuned[0][i], "paft_tuned/pref_accuracy": tuned[1][i],
                     "sequential/sft_nll": seq[0][i], "sequential/pref_accuracy": seq[1][i]})
    return pd.DataFrame(rows)


def test_findings_verdicts_follow_the_paired_differences():
    from paft.sweep.findings import findings

    # (a) DPO sparser (+0.1 each seed, with spread); (b) L1 sparser, NLL equal within noise; (c) tuned better on NLL
    df = _findings_table([0.5, 0.52, 0.49], [0.4, 0.41, 0.40], [0.7, 0.72, 0.69], [0.30, 0.31, 0.29],
                         [0.31, 0.29, 0.30], ([0.2, 0.21, 0.22], [0.9, 0.9, 0.9]), ([0.3, 0.3, 0.31], [1.0, 1.0, 1.0]))
    f = findings(df)
    assert f["a"]["verdict"] == "holds" and f["a"]["sparsity"]["mean"] == pytest.approx(0.1, abs=1e-9)
    assert f["b"]["verdict"] == "holds" and f["b"]["lost"] == []
    assert f["c"]["verdict"] == "holds" and f["c"]["seeds_dominated"] == 0 and f["c"]["better"] == ["sft_nll"]
    # the baseline better on both objectives in every seed: dominated, the finding does not hold
    df = _findings_table([0.3, 0.31, 0.29], [0.4, 0.41, 0.40], [0.4, 0.41, 0.40], [0.40, 0.41, 0.42],
                         [0.30, 0.30, 0.31], ([0.4, 0.41, 0.42], [0.8, 0.8, 0.81]), ([0.3, 0.3, 0.31], [1.0, 1.0, 1.0]))
    f = findings(df)
    assert f["a"]["verdict"] == "does not hold"
    assert f["b"]["verdict"] == "not shown"  # sparsity difference 0: within noise
    assert f["c"]["verdict"] == "does not hold" and f["c"]["seeds_dominated"] == 3
    # without the no_l1 candidate or a tune, the findings say what setting produces them
    f = findings(df.drop(columns=[c for c in df.columns if "no_l1" in c or "paft_tuned" in c]))
    assert f["a"]["verdict"] == "missing" and "no_l1" in f["a"]["why"]
    assert f["c"]["verdict"] == "missing" and "tune.trials" in f["c"]["why"]
