"""The Bradley-Terry reward model: loss vs closed form, last-token pooling, `paft reward` end to end."""

import importlib.util
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from paft.config import LoraConfig, load_config
from paft.data.collate import pad_sequences
from paft.errors import DataError
from paft.models.reward import last_token_index, load_reward_base, sequence_rewards
from paft.train.reward import (RewardObjective, RewardPairCollator, attach_reward_lora, bradley_terry_loss,
                               train_reward)


def _bt(rw: float, rl: float, margin: float = 0.0, center: float = 0.0) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-(rw - rl - margin)))) + center * (rw + rl) ** 2


def test_bradley_terry_loss_matches_closed_form():
    chosen = torch.tensor([1.5, -0.3, 0.0, 2.0, -1.0], dtype=torch.float64)
    rejected = torch.tensor([0.5, 0.7, 0.0, -2.0, -1.5], dtype=torch.float64)
    for margin, center in [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (1.0, 0.1)]:
        got = bradley_terry_loss(chosen, rejected, margin=margin, center=center)
        want = [_bt(w, l, margin, center) for w, l in zip(chosen.tolist(), rejected.tolist())]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # equal rewards: log 2; huge margins stay finite (softplus form)
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(2))
    big = bradley_terry_loss(torch.tensor([0.0, 1e4]), torch.tensor([1e4, 0.0]))
    assert big.tolist() == pytest.approx([1e4, 0.0])


def test_bradley_terry_gradient_is_sigmoid_of_minus_margin():
    rw, rl = torch.tensor([0.8], requires_grad=True), torch.tensor([-0.4], requires_grad=True)
    bradley_terry_loss(rw, rl).sum().backward()
    s = 1 / (1 + math.exp(1.2))  # d/dr_w -log sigma(d) = -sigma(-d)
    assert rw.grad.item() == pytest.approx(-s) and rl.grad.item() == pytest.approx(s)


@pytest.fixture(scope="module")
def reward_model(tiny_dir):
    from paft.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    model = attach_reward_lora(load_reward_base(tiny_dir, pad_token_id=tok.pad_token_id), LoraConfig(r=4, alpha=8), 0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), tok


def test_reward_is_read_at_last_real_token_for_either_padding_side(reward_model):
    model, tok = reward_model
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in
            ("How do I bake banana bread?", "Sure", "I can't help with that. Stealing a car is theft.")]
    assert len({len(s) for s in seqs}) == 3
    with torch.no_grad():
        single = torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                            for s in seqs])
        for side in ("right", "left"):
            b = pad_sequences(seqs, tok.pad_token_id, side)
            got = sequence_rewards(model, b["input_ids"], b["attention_mask"])
            torch.testing.assert_close(got, single, rtol=0, atol=1e-5)
            # the pad id itself plays no part: only the attention mask says which tokens are real
            other = b["input_ids"].masked_fill(b["attention_mask"] == 0, tok.eos_token_id)
            torch.testing.assert_close(sequence_rewards(model, other, b["attention_mask"]), single, rtol=0, atol=1e-5)
    assert last_token_index(pad_sequences(seqs, 0, "left")["attention_mask"]).tolist() == [len(seqs[2]) - 1] * 3
    assert single.std() > 0  # different texts, different rewards


def test_objective_is_bt_loss_of_the_pair_batch_rewards(reward_model):
    from paft.data.tokenize import EncodedPair

    model, tok = reward_model
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [EncodedPair(enc("How do I juggle?"), enc(" Start with one ball."), enc(" No.")),
            EncodedPair(enc("Hack an email"), enc(" Sorry, I can't help."), enc(" Sure! Here is how to do it."))]
    batch = RewardPairCollator(tok.pad_token_id)(rows)
    assert batch["input_ids"].shape[0] == 4
    obj = RewardObjective(margin=0.25, center=0.05)
    with torch.no_grad():
        loss, metrics = obj(model, batch)
        r = [sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
             for s in [rows[0].prompt_ids + rows[0].chosen_ids, rows[1].prompt_ids + rows[1].chosen_ids,
                       rows[0].prompt_ids + rows[0].rejected_ids, rows[1].prompt_ids + rows[1].rejected_ids]]
    want = (_bt(r[0], r[2], 0.25, 0.05) + _bt(r[1], r[3], 0.25, 0.05)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert metrics["rewards/margin"] == pytest.approx(((r[0] - r[2]) + (r[1] - r[3])) / 2, abs=1e-5)
    assert metrics["rewards/accuracy"] == ((r[0] > r[2]) + (r[1] > r[3])) / 2


def test_margin_weight_scales_each_pairs_score_gap(reward_model):
    from paft.train.reward import RewardRow

    model, tok = reward_model
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [RewardRow(enc("Q1"), enc(" good"), enc(" bad"), gap=2.0), RewardRow(enc("Q2"), enc(" yes"), enc(" no"))]
    batch = RewardPairCollator(tok.pad_token_id)(rows)
    assert batch["gap"].tolist() == [2.0, 1.0]
    with torch.no_grad():
        loss, _ = RewardObjective(margin=0.5)(model, batch)
        r = sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).tolist()
    assert loss.item() == pytest.approx((_bt(r[0], r[2], 1.0) + _bt(r[1], r[3], 0.5)) / 2, abs=1e-6)


def test_ranked_lists_give_every_pair_with_different_scores(tmp_path):
    from paft.train.reward import reward_pairs

    path = tmp_path / "ranked.jsonl"
    rows = [{"prompt": "Name a colour.", "responses": ["Red.", "Blue.", "Green.", "Teal."], "scores": [3, 1, 2, 2]},
            {"prompt": "Say hi.", "responses": ["Hi.", "Hello."], "scores": [1, 1]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = {(e.chosen, e.rejected, gap) for e, gap in reward_pairs(path)}
    assert got == {("Red.", "Blue.", 2.0), ("Red.", "Green.", 1.0), ("Red.", "Teal.", 1.0),
                   ("Green.", "Blue.", 1.0), ("Teal.", "Blue.", 1.0)}
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"ranked\.jsonl: every ranked list has equal scores"):
        reward_pairs(path)


def test_unpaired_data_is_a_one_line_data_error(tmp_path, tiny_dir):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": True}) + "\n")
    cfg = load_config(preset="tiny")
    with pytest.raises(DataError, match=r"kto\.jsonl: paft reward trains on pairs .*unpaired rows") as exc:
        train_reward(cfg, tiny_dir, path, tmp_path / "out")
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- `paft reward` end to end

STEPS = 6


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, paft_cache):
    from paft.cli import app

    out = tmp_path_factory.mktemp("runs") / "reward"
    args = ["reward", "--preset", "tiny", "--out", str(out), "--set", f"reward.max_steps={STEPS}",
            "--set", "reward.batch_size=4", "--set", "reward.save_steps=3", "--set", "reward.learning_rate=1e-3",
            "--set", "reward.lora.r=4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out, args, res


def test_paft_reward_writes_summary_eval_and_adapter(reward_run):
    out, _, res = reward_run
    summary = json.loads((out / "reward" / "train_summary.json").read_text())
    ev = json.loads((out / "reward" / "reward_eval.json").read_text())
    assert summary["steps"] == STEPS and summary["examples"] == 64 - 8 and summary["kind"] == "reward"
    assert math.isfinite(summary["train_loss"]) and summary["wall_s"] > 0
    assert ev["pairs"] == summary["eval_pairs"] == 16
    assert 0 <= ev["accuracy"] <= 1 and ev["accuracy"] == summary["eval_accuracy"]
    assert ev["mean_margin"] == pytest.approx(ev["mean_chosen"] - ev["mean_rejected"], abs=1e-5)
    assert "held-out pairwise accuracy" in res.output
    conf = json.loads((out / "reward" / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and "score" in conf["modules_to_save"] and conf["r"] == 4
    assert (out / "reward" / "checkpoints").is_dir() and json.loads((out / "timings.json").read_text())["reward"] > 0
    if importlib.util.find_spec("tensorboard"):  # the tiny preset logs to TensorBoard: the branches' harness routes it
        assert any((out / "reward" / "tb").glob("events.out.tfevents.*"))


def test_adapter_loads_back_with_peft_and_scores_like_the_eval(reward_run, tiny_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from paft.data.loading import load_examples
    from paft.models import load_tokenizer
    from paft.scoring import RewardModelScorer
    from paft.train.reward import encode_pairs, pair_metrics, pair_rewards

    out, _, _ = reward_run
    adapter = out / "reward" / "adapter"
    tok = load_tokenizer(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    saved = load_file(adapter / "adapter_model.safetensors")["base_model.model.score.weight"]
    torch.testing.assert_close(model.base_model.model.score.modules_to_save["default"].weight, saved)

    pairs = load_examples(str(out / "data" / "preference_eval.jsonl"), "preference").examples
    chosen, rejected = pair_rewards(model, encode_pairs(pairs, tok, 96, 64), tok.pad_token_id)
    ev = json.loads((out / "reward" / "reward_eval.json").read_text())
    m = pair_metrics(chosen, rejected)
    assert m["accuracy"] == ev["accuracy"] and m["mean_margin"] == pytest.approx(ev["mean_margin"], abs=1e-5)

    # transformers' own pooling (last non-pad token) agrees on right-padded rows of this tokenizer
    b = pad_sequences([tok(t, add_special_tokens=False)["input_ids"] for t in ("one two three", "four")],
                      tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits.squeeze(-1),
                                   sequence_rewards(model, b["input_ids"], b["attention_mask"]), rtol=0, atol=1e-5)

    # the scorer on the run folder gives the same rewards as the eval
    scorer = RewardModelScorer(out / "reward", base_model_dir=tiny_dir, batch_size=5)
    prompts = [p.prompt for p in pairs]
    got_c = scorer(prompts, [p.chosen for p in pairs])
    got_r = scorer(prompts, [p.rejected for p in pairs])
    torch.testing.assert_close(torch.tensor(got_c), chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got_r), rejected, rtol=0, atol=1e-5)


def test_paft_reward_again_reuses_the_trained_model(reward_run):
    from paft.cli import app

    out, args, _ = reward_run
    weights = out / "reward" / "adapter" / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert weights.stat().st_mtime_ns == before


def test_paft_reward_on_unpaired_data_fails_with_one_line(tmp_path, paft_cache):
    from paft.cli import app

    data = tmp_path / "kto.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}?", "completion": "A.", "label": i % 2 == 0})
                              for i in range(12)) + "\n")
    res = CliRunner().invoke(app, ["reward", "--preset", "tiny", "--out", str(tmp_path / "run"),
                                   "--set", f"data.preference.path={data}"])
    assert res.exit_code == 1
    assert "paft reward trains on pairs" in res.output and "Traceback" not in res.output
