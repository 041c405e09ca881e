"""lm-evaluation-harness in process: paft's own task against a hand computation, task names, offline data."""

import json

import pytest
import torch
from typer.testing import CliRunner

from paft.errors import ConfigError, DataError
from paft.eval.harness import LEADERBOARD_V1, PAFT_TASKS_DIR, HarnessSuite, _manager_for, parse_tasks


def _arith_rows():
    rows = [json.loads(x) for x in (PAFT_TASKS_DIR / "paft_arith.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "test"]


@torch.no_grad()
def _continuation_logprobs(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """Sum of log p(continuation tokens | context) per pair: the whole string encoded, split after the
    context's own tokens; one right-padded batch (padding after a row cannot change its causal logits)."""
    seqs = [(tok.encode(c + x), len(tok.encode(c))) for c, x in pairs]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in seqs])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs])
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    return [sum(logp[b, i - 1, row[i]].item() for i in range(n_ctx, len(row))) for b, (row, n_ctx) in enumerate(seqs)]


def test_paft_arith_accuracy_equals_the_hand_computed_loglikelihood_choice(tiny_model, tiny_tok):
    suite = HarnessSuite.build(["paft_arith"], batch_size=8)
    flat, details = suite.run(tiny_model, tiny_tok)
    rows = _arith_rows()
    assert len(rows) == 40 and details["n_samples"]["paft_arith"]["effective"] == 40
    assert details["n_shot"]["paft_arith"] == 0
    lls_all = _continuation_logprobs(tiny_model, tiny_tok, [(f"{r['question']}\nAnswer:", " " + c)
                                                           for r in rows for c in r["choices"]])
    hits = hits_norm = 0
    for k, r in enumerate(rows):
        lls = lls_all[4 * k: 4 * k + 4]
        hits += max(range(4), key=lambda i: lls[i]) == r["gold"]
        # acc_norm divides by the choice's length in characters (without the delimiter), as lm-eval does
        hits_norm += max(range(4), key=lambda i: lls[i] / len(r["choices"][i])) == r["gold"]
    acc = flat["harness/paft_arith/acc"]
    assert 0 <= acc <= 1
    assert acc == pytest.approx(hits / 40, abs=1e-9)
    assert flat["harness/paft_arith/acc_norm"] == pytest.approx(hits_norm / 40, abs=1e-9)
    assert flat["harness/paft_arith/acc_stderr"] > 0


def test_shots_and_limit_reach_lm_eval(tiny_model, tiny_tok):
    suite = HarnessSuite.build(["paft_arith:2"], limit=5)
    assert suite.shots() == {"paft_arith": 2}
    _, details = suite.run(tiny_model, tiny_tok)
    assert details["n_shot"]["paft_arith"] == 2 and details["n_samples"]["paft_arith"]["effective"] == 5


def test_leaderboard_names_get_their_standard_shots():
    reqs = {r.name: r.shots for r in parse_tasks(["leaderboard-v1"])}
    assert reqs == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0, "winogrande": 5,
                    "gsm8k": 5} == LEADERBOARD_V1
    assert [(r.name, r.shots) for r in parse_tasks(["arc_challenge", "paft_arith"])] == \
        [("arc_challenge", 25), ("paft_arith", None)]
    assert parse_tasks(["arc_challenge:0"])[0].shots == 0
    assert len(parse_tasks(["leaderboard-v1", "gsm8k:5"])) == 6  # the same request twice is one
    with pytest.raises(ConfigError, match="asked for twice"):
        parse_tasks(["leaderboard-v1", "gsm8k:8"])
    with pytest.raises(ConfigError, match="fixed shots"):
        parse_tasks(["leaderboard-v1:3"])
    tm, is_paft = _manager_for("arc_challenge")  # lm-eval's own ARC config, indexed from its folder only
    assert not is_paft and "arc_challenge" in tm.all_tasks


def test_a_cached_leaderboard_task_runs_with_its_standard_shots(monkeypatch, tiny_model, tiny_tok):
    """lm-eval's own arc_challenge config on a stand-in for a cached ai2_arc (datasets.load_dataset faked)."""
    import datasets

    def fake_load_dataset(path, name=None, **kwargs):
        assert (path, name) == ("allenai/ai2_arc", "ARC-Challenge")
        assert datasets.config.HF_HUB_OFFLINE  # read from the cache first, with the hub off

        def rows(n):
            return datasets.Dataset.from_list([
                {"id": str(i), "question": f"Which is {i} plus one?", "answerKey": "B",
                 "choices": {"text": [str(i), str(i + 1), str(i + 2)], "label": ["A", "B", "C"]}} for i in range(n)])
        return datasets.DatasetDict({"train": rows(30), "validation": rows(5), "test": rows(6)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    suite = HarnessSuite.build(["arc_challenge"], limit=2)
    assert suite.shots() == {"arc_challenge": 25}
    flat, details = suite.run(tiny_model, tiny_tok)
    assert details["n_shot"]["arc_challenge"] == 25 and details["n_samples"]["arc_challenge"]["effective"] == 2
    assert 0 <= flat["harness/arc_challenge/acc_norm"] <= 1


def test_uncached_leaderboard_task_is_one_line_naming_it(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network in tests
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(DataError) as e:
        HarnessSuite.build(["arc_challenge"])
    msg = str(e.value)
    assert "\n" not in msg and "'arc_challenge'" in msg and "allenai/ai2_arc" in msg
    assert "HF_DATASETS_CACHE" in msg and "network" in msg
    assert datasets.config.HF_HUB_OFFLINE == before  # the offline switch is put back


def test_unknown_task_lists_close_matches():
    with pytest.raises(ConfigError) as e:
        HarnessSuite.build(["arc_chalenge"])
    assert "unknown lm-eval task 'arc_chalenge'" in str(e.value) and "arc_challenge" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean paft_arith"):
        HarnessSuite.build(["paft_arth"])


def test_paft_eval_on_a_model_folder_with_tasks(tmp_path, tiny_dir):
    from paft.cli import app

    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--preset", "tiny", "--tasks", "paft_arith",
                                      "--limit", "4", "--set", "eval.heldout=false", "--set",
                                      "eval.harmlessness=false", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ev = json.loads((out / "eval.json").read_text())
    row = ev["models"][tiny_dir.name]
    assert 0 <= row["harness/paft_arith/acc"] <= 1 and ev["harness"]["tasks"] == {"paft_arith": 0}
    assert "sft_exact_match" not in row
    bad = CliRunner().invoke(app, ["eval", str(tiny_dir), "--preset", "tiny", "--tasks", "nope_task",
                                   "--out", str(tmp_path / "ev2")])
    assert bad.exit_code == 1 and "unknown lm-eval task 'nope_task'" in bad.output and "Traceback" not in bad.output
