"""The run report: alignment-tax numbers, a self-contained report.html, `paft report RUN_DIR`, the screenshot
script, and the TensorBoard logging plumbing. The run folder is made by hand, as the pipeline writes it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from paft.cli import app
from paft.config import load_config
from paft.errors import ConfigError
from paft.io import write_json_atomic, write_text_atomic
from paft.report import Cell, Column, Table, table, to_html, to_markdown, write_report
from paft.report.html import page
from paft.report.metrics import alignment_tax, metric_info
from paft.report.model import Code, Figure, Section, Text
from paft.sparsity import delta_sparsity

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

EVALS = {  # eval.json models: the five models, the five standard metrics and newer flat keys
    "base": {"sft_exact_match": 0.0, "sft_nll": 2.25, "pref_accuracy": 0.5, "reward_margin": 0.0,
             "reward_accuracy": 0.0, "harness/paft_arith/acc": 0.10, "harness/paft_arith/acc_stderr": 0.03,
             "rm_reward": -1.5, "judge_win_rate": 0.20, "refusal_rate": 0.90, "my_custom_score": 3.0, "eval_s": 20.0},
    "sft": {"sft_exact_match": 0.5, "sft_nll": 0.25, "pref_accuracy": 0.375, "reward_margin": 0.05,
            "reward_accuracy": 0.5, "harness/paft_arith/acc": 0.55, "harness/paft_arith/acc_stderr": 0.05,
            "rm_reward": -0.5, "judge_win_rate": 0.40, "refusal_rate": 0.50, "my_custom_score": 3.5, "eval_s": 21.0},
    "preference": {"sft_exact_match": 0.0, "sft_nll": 2.5, "pref_accuracy": 1.0, "reward_margin": 8.0,
                   "reward_accuracy": 1.0, "harness/paft_arith/acc": 0.05, "harness/paft_arith/acc_stderr": 0.02,
                   "rm_reward": 1.25, "judge_win_rate": 0.70, "refusal_rate": 0.55, "my_custom_score": 2.0,
                   "eval_s": 20.5},
    "sequential": {"sft_exact_match": 0.375, "sft_nll": 0.3125, "pref_accuracy": 1.0, "reward_margin": 8.5,
                   "reward_accuracy": 1.0, "harness/paft_arith/acc": 0.40, "harness/paft_arith/acc_stderr": 0.05,
                   "rm_reward": 1.0, "judge_win_rate": 0.65, "refusal_rate": 0.60, "my_custom_score": None,
                   "eval_s": 19.0},
    "paft": {"sft_exact_match": 0.5625, "sft_nll": 0.28125, "pref_accuracy": 0.875, "reward_margin": 4.0,
             "reward_accuracy": 1.0, "harness/paft_arith/acc": 0.60, "harness/paft_arith/acc_stderr": 0.05,
             "rm_reward": 0.75, "judge_win_rate": 0.60, "refusal_rate": 0.52, "my_custom_score": 3.25, "eval_s": 19.5},
}


def _sft_log(steps):
    return [{"loss": 2.0 / s + 0.3, "nll": 2.0 / s + 0.2, "l1_delta": 100.0 * s, "grad_norm": 1.0,
             "learning_rate": 1e-4, "epoch": s / 10, "step": s} for s in steps] + \
        [{"train_runtime": 10.0, "train_loss": 0.7, "epoch": 1.0, "step": steps[-1]}]


def _pref_log(steps, scale=1.0):
    return [{"loss": 0.69 / s, "rewards/chosen": 0.1, "rewards/rejected": -0.1 * s, "rewards/margin": scale * s / 2,
             "rewards/accuracy": min(1.0, s / 8), "logps/chosen": -70.0, "logps/rejected": -60.0 - s,
             "epoch": s / 10, "step": s} for s in steps] + \
        [{"train_runtime": 10.0, "train_loss": 0.2, "epoch": 1.0, "step": steps[-1]}]


def _summary(name, kind, steps, examples):
    return {"branch": name, "kind": kind, "data_kind": "sft" if kind == "sft" else "pairs", "schedule": "offline",
            "steps": steps, "examples": examples, "dropped_no_reply_tokens": 0, "train_loss": 0.5, "wall_s": 12.3,
            "threads": 1, "device": "cpu", "bf16": False, "init_adapter": None}


def _sparsity(seed, *, old_format=False):
    """What Run.sparsity() saves per branch: paft.sparsity's statistics of (name, delta) pairs."""
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{m}.weight" for i in range(3)
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    deltas = [(n, torch.randn(16, 24, generator=g) * 10 ** torch.empty(16, 24).uniform_(-7, -2, generator=g))
              for n in names]
    out = delta_sparsity(deltas, {n: 0.02 for n in names}, (1e-6, 1e-5, 1e-4), (1e-3, 1e-2))
    if old_format:  # a sparsity.json saved before by_layer and histogram were recorded
        out = {k: out[k] for k in ("modules", "by_type", "overall")}
    return out


def make_run(root: Path, *, old_sparsity: bool = False) -> Path:
    """A run folder holding the JSON the pipeline saves (no models, no checkpoints)."""
    cfg = load_config(preset="tiny", overrides=[f"run.output_dir={root}"])
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "config.yaml", cfg.to_yaml())
    write_json_atomic(root / "eval.json", {
        "models": EVALS, "reference": "base", "beta": 0.1, "n_sft_eval": 16, "n_pref_eval": 16,
        "samples": {m: [{"prompt": "What is 2 + 3?", "target": "Answer: 5", "reply": "Answer: 5" if m != "base"
                         else "To find <the> sum & more"}] for m in EVALS}})
    for name, kind, log in (("sft", "sft", _sft_log([1, 2, 4, 6, 8])),
                            ("preference", "preference", _pref_log([1, 2, 4, 6, 8])),
                            ("sequential", "preference", _pref_log([1, 2, 4, 6, 8], scale=1.2))):
        write_json_atomic(root / name / "train_summary.json", _summary(name, kind, 8, 64))
        write_json_atomic(root / name / "log_history.json", log)
    write_json_atomic(root / "sparsity.json", {"sft": _sparsity(0, old_format=old_sparsity),
                                               "preference": _sparsity(1, old_format=old_sparsity)})
    write_json_atomic(root / "timings.json", {"data": 0.1, "train:sft+preference+sequential": 27.0, "sparsity": 0.2,
                                              "merge": 0.3, "eval": 25.0})
    write_json_atomic(root / "provenance.json", {"versions": {"python": "3.11", "paft": "0.1.0"},
                                                 "seeds": {"run": 0}, "device": "cpu"})
    write_json_atomic(root / "data" / "summary.json", {"sft": {"path": "demo", "train": 64, "eval": 16},
                                                       "preference": {"path": "demo", "train": 64, "eval": 16}})
    write_json_atomic(root / "merged" / "paft_merge.json", {"method": "ties", "weights": [1.0, 1.0], "density": 0.5})
    return root


@pytest.fixture()
def run_dir(tmp_path):
    root = make_run(tmp_path / "run")
    write_report(root, load_config(root / "config.yaml"))
    return root


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------- the numbers

def test_tax_table_equals_hand_computed_differences(run_dir):
    tax = json.loads((run_dir / "report.json").read_text())["alignment_tax"]
    keys = [m["key"] for m in tax["metrics"]]
    # every numeric metric, known ones first; timings and standard errors are not metrics
    assert keys[:5] == ["sft_exact_match", "sft_nll", "pref_accuracy", "reward_margin", "reward_accuracy"]
    assert set(keys) == {k for k in EVALS["base"] if k not in ("eval_s", "harness/paft_arith/acc_stderr")}
    for ref in ("sft", "preference"):
        others = [m for m in EVALS if m != ref]
        assert list(tax["deltas"][ref]) == others
        for m in others:
            for k in keys:
                a, b = EVALS[m][k], EVALS[ref][k]
                want = None if a is None or b is None else a - b
                assert tax["deltas"][ref][m][k] == pytest.approx(want), (ref, m, k)
    # hand-checked signs: the sequential baseline's tax on the SFT skill, the merge's on the preference
    assert tax["deltas"]["sft"]["sequential"]["sft_exact_match"] == pytest.approx(-0.125)
    assert tax["better"]["sft"]["sequential"]["sft_exact_match"] == -1
    assert tax["deltas"]["sft"]["sequential"]["sft_nll"] == pytest.approx(0.0625)
    assert tax["better"]["sft"]["sequential"]["sft_nll"] == -1  # NLL went up: worse
    assert tax["deltas"]["sft"]["paft"]["sft_nll"] == pytest.approx(0.03125)
    assert tax["deltas"]["preference"]["paft"]["pref_accuracy"] == pytest.approx(-0.125)
    assert tax["better"]["preference"]["paft"]["pref_accuracy"] == -1
    assert tax["better"]["preference"]["sequential"]["reward_margin"] == 1
    assert tax["better"]["sft"]["paft"]["refusal_rate"] == 1  # harmful prompts: refusing more is better (0.52 > 0.50)
    assert tax["deltas"]["sft"]["sequential"]["my_custom_score"] is None

    md = (run_dir / "report.md").read_text()
    assert "| sequential SFT->pref | -0.125 | +0.000 |" in md and "| PAFT merge | +0.062 | -0.125 |" in md
    assert "| SFT NLL ↓ | +2.000 | +2.250 | +0.062 | +0.031 | -0.250 | -2.250 | -2.188 | -2.219 |" in md


def test_html_delta_cells_carry_the_differences_and_their_colour(run_dir):
    html = (run_dir / "report.html").read_text()
    table = re.search(r'<table class="deltas">.*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    tax = alignment_tax(EVALS)
    cols = [(ref, m) for ref in ("sft", "preference") for m in EVALS if m != ref]
    for row, metric in zip(rows, tax["metrics"]):
        cells = re.findall(r'<td class="num ([a-z]+)[^"]*"(?: data-delta="([^"]+)")?[^>]*>([^<]*)</td>', row)
        assert len(cells) == len(cols)
        for (cls, value, text), (ref, m) in zip(cells, cols):
            a, b = EVALS[m][metric["key"]], EVALS[ref][metric["key"]]
            if a is None or b is None:
                assert value == "" and text == "–"
                continue
            assert float(value) == pytest.approx(a - b)
            want = {1: "good", -1: "bad", 0: "flat"}[tax["better"][ref][m][metric["key"]]]
            assert cls == want, (metric["key"], ref, m)
            noise = " ≈" if tax["within_noise"][ref][m][metric["key"]] else ""
            assert text.replace("−", "-") == f"{a - b:+.3f}{noise}" or "e" in text
    # the sequential model's SFT exact match fell: red; the merge's rose: green
    assert re.search(r'class="num bad tax"[^>]*title="sequential SFT-&gt;pref − SFT only, SFT exact match"', table)
    assert re.search(r'class="num good tax"[^>]*title="PAFT merge − SFT only, SFT exact match"', table)


def test_metric_labels_and_directions():
    assert metric_info("sft_nll").higher is False and metric_info("sft_nll").label == "SFT NLL"
    assert metric_info("judge_win_rate").higher is True and metric_info("rm_reward").label == "reward-model score"
    h = metric_info("harness/paft_arith/acc")
    assert h.label == "paft_arith: accuracy" and h.higher is True
    assert metric_info("harness/wikitext/word_perplexity").higher is False
    assert metric_info("harness/task/acc,none").higher is True
    odd = metric_info("my_custom_score")
    assert odd.label == "my_custom_score" and odd.higher is None
    assert metric_info("refusal_rate").higher is True  # paft's harmlessness set: harmful prompts only


# --------------------------------------------------------------------------- the page

def test_report_html_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "file:" not in html
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', html))
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) >= 3  # metric bars, training curves, sparsity
    from PIL import Image

    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        w, h = _png_size(data)
        assert w >= 600 and h >= 200
        Image.open(io.BytesIO(data)).verify()
    # the same figures as files for report.md
    for name in ("metrics.png", "training.png", "sparsity.png"):
        assert _png_size((run_dir / name).read_bytes())[0] >= 600
        assert f"]({name})" in (run_dir / "report.md").read_text()
    # text from the run is escaped, not markup
    assert "To find &lt;the&gt; sum &amp; more" in html and "<the>" not in html
    # every metric present, under its label; the stderr shown beside its value
    for label in ("paft_arith: accuracy", "reward-model score", "judge win rate", "refusal rate", "my_custom_score"):
        assert label in html
    assert "0.550 ± 0.050" in html
    assert "sft/tb" not in html  # no TensorBoard folders in this run: none named


def test_old_sparsity_json_still_renders(tmp_path):
    root = make_run(tmp_path / "old", old_sparsity=True)
    write_report(root, load_config(root / "config.yaml"))
    assert _png_size((root / "sparsity.png").read_bytes())[0] >= 600
    assert "predates the histogram" in (root / "report.html").read_text()


def test_training_curves_follow_a_staged_branch_across_its_fits():
    from paft.report.plots import _series

    hist = [{"loss": 1.0, "step": 1}, {"loss": 0.8, "step": 4}, {"train_loss": 0.9, "step": 4},
            {"loss": 0.7, "step": 1}, {"loss": 0.5, "step": 4}]
    assert _series(hist, "loss") == ([1, 4, 5, 8], [1.0, 0.8, 0.7, 0.5])


# --------------------------------------------------------------------------- the report model

def test_one_table_model_two_serializers():
    t = Table([Column("name"), Column(Cell("Δ", swatch="paft"), num=True, cls="tax")],
              [["a|b", Cell("-0.125", tone="bad", title="x <y>", delta=-0.125, note="± 0.010")], ["`c`", 2]])
    assert to_markdown(t) == "| name | Δ |\n|---|---:|\n| a\\|b | -0.125 |\n| `c` | 2 |"
    html = to_html(t)
    assert '<td class="num bad tax" data-delta="-0.125" title="x &lt;y&gt;">−0.125 ± 0.010</td>' in html
    assert '<td class="text"><code>c</code></td>' in html and '<td class="text">a|b</td>' in html
    assert '<th class="num tax"><span class="sw" style="background:#55a868"></span>Δ</th>' in html
    # the plain form the sweep report uses: numbers from num_from on, any iterable of rows
    plain = table(["stage", "seconds"], {"data": 0.1, "eval": 25}.items())
    assert to_markdown(plain) == "| stage | seconds |\n|---|---:|\n| data | 0.1 |\n| eval | 25 |"
    assert to_markdown(table(["a", "b"], [[1, 2]], num_from=2)).splitlines()[1] == "|---|---|"


def test_sections_nest_and_blocks_keep_to_their_format():
    rep = Section("R", [Text("intro `x`"), Text("md only", only="md"), Section("A", [
        Text("html only", only="html"), Section("B", [Figure("f.png", "f", "cap")], id="b", nav="Bee"),
        Code("cfg", "a: <1>")], id="a", nav="A")])
    assert to_markdown(rep) == "# R\n\nintro `x`\n\nmd only\n\n## A\n\n### B\n\n![f](f.png)"
    html = page(rep, "sub", {"f.png": b"\x89PNG"})
    assert "md only" not in html and "html only" in html and "<p>intro <code>x</code></p>" in html
    assert '<section id="a"><h2>A</h2>' in html and '<h3 id="b">B</h3>' in html
    assert '<nav><a href="#a">A</a><a href="#b">Bee</a></nav>' in html
    assert "<pre>a: &lt;1&gt;</pre>" in html and "<figcaption>cap</figcaption>" in html
    assert "data:image/png;base64,iVBORw==" in html
    assert to_html(Figure("missing.png", "m")) == ""  # a figure without data is left out of the page


def test_markdown_and_html_show_the_same_sections(run_dir):
    md, html = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    heads = re.findall(r"^#{2,3} (.+)$", md, re.M)
    assert heads[:3] == ["Held-out metrics (16 SFT rows, 16 preference pairs)", "Alignment tax",
                         "Differences from the single-objective models"]
    assert heads == [unescape(t) for _, t in re.findall(r'<h([23])(?: id="[^"]*")?>([^<]*)</h\1>', html)]
    # the headline: a table in Markdown, a card per two-objective model in HTML, the same numbers
    assert "| model | Δ SFT exact match vs SFT only | Δ preference accuracy vs preference only |" in md
    assert html.count('<div class="card">') == 2 and '<span class="v bad">−0.125</span>' in html


# --------------------------------------------------------------------------- the command

def test_paft_report_run_dir_rerenders_from_saved_json(tmp_path):
    root = make_run(tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.move(root, moved)  # config.yaml still names the old folder: RUN_DIR wins
    result = runner.invoke(app, ["report", str(moved)])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "report.json", "metrics.png", "training.png", "sparsity.png"):
        assert (moved / name).is_file(), name
    assert not root.exists()
    assert json.loads((moved / "report.json").read_text())["run_dir"] == str(moved)
    assert "report.html" in result.output

    bad = runner.invoke(app, ["report", str(moved), "--set", "merge.method=ties"])
    assert bad.exit_code == 1 and "RUN_DIR's own config.yaml" in " ".join(bad.output.split())
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = runner.invoke(app, ["report", str(empty)])
    assert bad.exit_code == 1 and "no config.yaml" in bad.output


def test_paft_report_config_and_out_form_still_works(tmp_path):
    root = make_run(tmp_path / "run")
    result = runner.invoke(app, ["report", "--preset", "tiny", "--out", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "report.html").is_file() and "Alignment tax" in (root / "report.md").read_text()


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium on PATH")
def test_screenshot_script(run_dir, tmp_path):
    out = tmp_path / "shot.png"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(run_dir), "--out",
                          str(out), "--height", "1600"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert _png_size(out.read_bytes()) == (1280, 1600)


# --------------------------------------------------------------------------- training logs (run.report_to)

def test_report_to_config():
    assert load_config(preset="tiny").run.report_to == ["tensorboard"]
    assert load_config(preset="tiny", overrides=["run.report_to=none"]).run.report_to == []
    assert load_config(preset="tiny", overrides=["run.report_to=wandb"]).run.report_to == ["wandb"]
    assert load_config(preset="tiny", overrides=["run.report_to=[]"]).run.report_to == []
    with pytest.raises(ConfigError, match="run.report_to"):
        load_config(preset="tiny", overrides=["run.report_to=tensorbored"])


def test_missing_logger_is_one_config_error(monkeypatch):
    import importlib.util

    from paft.train import trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="'wandb'.*pip install wandb"):
        trainer.check_report_to(["wandb"])
    trainer.check_report_to([])


def test_tensorboard_logs_in_the_branch_folder_and_survive_a_resume(tmp_path, tiny_model):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from paft.config import TrainConfig
    from paft.train.trainer import PaftTrainer, last_checkpoint, route_tensorboard, training_args

    def objective(model, batch):
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss, {"nll": out.loss.item()}

    rows = [{"input_ids": torch.tensor([1, 5 + i, 7, 9, 11])} for i in range(8)]
    branch = tmp_path / "sft"

    def fit(steps):
        cfg = TrainConfig(max_steps=steps, batch_size=2, logging_steps=1, save_steps=2, learning_rate=1e-3)
        args = training_args(cfg, branch / "checkpoints", seed=0, device="cpu", bf16=False, n_examples=len(rows),
                             report_to=["tensorboard"], run_name="run/sft")
        tr = PaftTrainer(model=tiny_model, args=args, train_dataset=rows, objective=objective,
                         data_collator=lambda b: {"input_ids": torch.stack([r["input_ids"] for r in b])})
        route_tensorboard(tr, branch / "tb")
        tr.train(resume_from_checkpoint=last_checkpoint(branch / "checkpoints"))

    fit(2)
    shutil.copytree(branch / "checkpoints", tmp_path / "kept")
    fit(3)  # step 3 is logged, then the run is "killed" before its next checkpoint ...
    shutil.rmtree(branch / "checkpoints")
    shutil.copytree(tmp_path / "kept", branch / "checkpoints")
    fit(4)  # ... and resumed from step 2 to the end
    assert not (branch / "checkpoints" / "runs").exists()  # not the Trainer's default folder
    assert len(list((branch / "tb").glob("events.out.tfevents.*"))) == 3
    ea = EventAccumulator(str(branch / "tb"))  # honours the purge the resumed writer recorded
    ea.Reload()
    assert {"train/loss", "train/nll"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("train/nll")] == [1, 2, 3, 4]


def test_differences_within_noise_are_marked_and_not_judged():
    from paft.report.metrics import alignment_tax, within_noise

    # 1.96 * sqrt(0.03^2 + 0.04^2) = 0.098: a 0.05 gap is noise, a 0.15 gap is not
    assert within_noise(0.05, 0.03, 0.04) and not within_noise(0.15, 0.03, 0.04)
    assert not within_noise(0.05, None, 0.04)  # no standard error: nothing is called noise
    evals = {"sft": {"pref_accuracy": 0.50, "pref_accuracy_stderr": 0.03, "sft_nll": 0.2},
             "preference": {"pref_accuracy": 0.95, "pref_accuracy_stderr": 0.04, "sft_nll": 2.0},
             "paft": {"pref_accuracy": 0.90, "pref_accuracy_stderr": 0.04, "sft_nll": 0.3}}
    tax = alignment_tax(evals)
    assert tax["within_noise"]["preference"]["paft"]["pref_accuracy"]
    assert tax["better"]["preference"]["paft"]["pref_accuracy"] == 0  # -0.05 within noise: not "worse"
    assert not tax["within_noise"]["sft"]["paft"]["pref_accuracy"]
    assert tax["better"]["sft"]["paft"]["pref_accuracy"] == 1
    assert tax["better"]["sft"]["paft"]["sft_nll"] == -1  # no stderr saved: judged as before


def test_candidates_section_lists_every_row_with_its_cost(tmp_path):
    keys = ["sft_nll", "pref_accuracy"]

    def row(name, family, nll, acc, steps, train_s, extra_s):
        return {"name": name, "family": family, "setting": None, "what": f"{family} equation",
                "metrics": {"sft_nll": nll, "pref_accuracy": acc},
                "cost": {"branches": [], "train_steps": steps, "train_s": train_s, "extra_s": extra_s}}

    cand = {"metrics": keys, "reference": "base", "beta": 0.1, "n_sft_eval": 8, "n_pref_eval": 6, "note": "held-out only",
            "models": [row("sft", "main", 0.5, 0.4, 10, 12.0, 0.0), row("paft", "main", 0.6, 0.9, 20, 25.0, 1.5),
                       row("paft_della", "paft", 0.45, 0.8, 20, 25.0, 3.25)],
            "skipped": {"expo": "needs the sequential branch, not trained"}}
    write_json_atomic(tmp_path / "candidates.json", cand)
    md = write_report(tmp_path, load_config(preset="tiny")).read_text()
    assert "## Candidates" in md and "6 preference pairs" in md
    assert "| paft_della | paft | 0.450 | 0.800 | 20 | 25.0 | 3.2 |" in md  # 3.25 s to one decimal
    assert "| PAFT merge | main | 0.600 | 0.900 | 20 | 25.0 | 1.5 |" in md
    assert "Skipped `expo`: needs the sequential branch, not trained." in md and "`paft`: paft equation" in md
    html = (tmp_path / "report.html").read_text()
    assert re.search(r'class="num best"[^>]*>0\.450<', html) and re.search(r'class="num best"[^>]*>0\.900<', html)
    assert json.loads((tmp_path / "report.json").read_text())["candidates"] == cand
