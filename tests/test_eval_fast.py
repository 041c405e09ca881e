"""The fast evaluation path (``eval.fast``) gives the plain path's numbers: pair log-probs, NLL, greedy tokens,
accuracies; the reference cache serves the same values and misses on other data; standard errors equal their
closed forms; a run's report marks differences within them."""

from __future__ import annotations

import math

import pytest
import torch

from paft.config import load_config
from paft.data.demo import demo_splits
from paft.data.formats import PreferenceExample
from paft.data.tokenize import encode_pair, encode_sft
from paft.eval.metrics import (binomial_stderr, completion_nll, mean_stderr, packed_pair_logps, pair_logps,
                               ratio_stderr, sorted_nll)


def _multi_turn_pairs(n: int) -> list[PreferenceExample]:
    """Pairs with multi-turn prompts of unequal lengths (the demo's are one turn), so length sorting, packing
    and budgets over several forwards are exercised."""
    words = "the cat sat on a mat while seven birds sang about rain and old roads".split()
    out = []
    for i in range(n):
        turns = [{"role": "user" if t % 2 == 0 else "assistant",
                  "content": " ".join(words[(i + t + j) % len(words)] for j in range(3 + (i * 7 + t * 3) % 17))}
                 for t in range(1 + 2 * (i % 3))]
        out.append(PreferenceExample(prompt=turns, chosen=" ".join(words[: 2 + i % 9]),
                                     rejected=" ".join(reversed(words[: 4 + (i * 5) % 11]))))
    return out


@pytest.fixture(scope="module")
def heldout():
    _, sft = demo_splits("sft", 0, 10, 0)
    _, pref = demo_splits("preference", 0, 6, 0)
    return sft, pref + _multi_turn_pairs(10)


def test_packed_pair_logps_equal_the_padded_rows(tiny_model, tiny_tok, heldout):
    _, pairs = heldout
    plain = pair_logps(tiny_model, tiny_tok, pairs, max_length=96, max_prompt_length=64, batch_size=4)
    rows = [encode_pair(e, tiny_tok, 96, 64) for e in pairs]
    longest = max(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    # one forward in one row; one forward in rows of up to 2 pairs; one per pair, the longest alone over its budget
    for budget, pack_length in ((4096, None), (4096, longest + 40), (longest - 1, None)):
        packed = packed_pair_logps(tiny_model, rows, pad_id=tiny_tok.pad_token_id, token_budget=budget,
                                   pack_length=pack_length)
        assert packed.shape == plain.shape == (len(pairs), 2)
        assert torch.allclose(packed, plain, atol=1e-4, rtol=0), (packed - plain).abs().max()
    assert ((packed[:, 0] > packed[:, 1]) == (plain[:, 0] > plain[:, 1])).all()


def test_sorted_nll_equals_the_padded_rows(tiny_model, tiny_tok, heldout):
    sft, _ = heldout
    plain = completion_nll(tiny_model, tiny_tok, sft, max_length=96, batch_size=3)
    rows = [encode_sft(e, tiny_tok, 96) for e in sft]
    assert plain.mean == pytest.approx((plain.totals.sum() / plain.counts.sum()).item(), rel=1e-6)
    for budget in (4096, 150):  # one forward; several, by length
        fast = sorted_nll(tiny_model, rows, pad_id=tiny_tok.pad_token_id, token_budget=budget)
        assert fast.mean == pytest.approx(plain.mean, abs=1e-5)
        assert torch.allclose(fast.totals.float(), plain.totals.float(), atol=1e-3)
        assert torch.equal(fast.counts.float(), plain.counts.float())


def test_token_budget_batches():
    from paft.data.collate import packed_batches, padded_batches

    lengths = [5, 30, 12, 7, 12, 40]
    assert padded_batches(lengths, 60) == [[5], [1, 2], [4, 3, 0]]  # rows x longest <= 60, longest first
    assert padded_batches(lengths, 60, extra=10) == [[5], [1], [2, 4], [3, 0]]
    assert packed_batches(lengths, 45) == [[5], [1, 2], [4, 3, 0]]  # tokens in all <= 45
    assert packed_batches([50, 3], 45) == [[0], [1]]  # over the budget: alone


def test_cached_greedy_decoding_picks_generate_s_tokens(tiny_model, tiny_tok):
    """Weights scaled up so the random model's argmax moves from token to token; ``eos`` set to a token the
    model produces, so rows end at different steps and leave the batch (and its KV cache) early."""
    from paft.models.generation import _greedy

    torch.manual_seed(0)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    tiny_model.generation_config.eos_token_id = None  # the reference runs all 10 steps; eos is applied below
    prompts = [[int(t) for t in torch.randint(3, 400, (n,))] for n in (5, 17, 9, 30, 12, 3, 22)]
    reference = []
    for ids in prompts:  # one prompt at a time: no padding in the reference
        out = tiny_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
        reference.append(out[0, len(ids):].tolist())
    assert len({tuple(r) for r in reference}) > 3  # the replies differ
    eos = max({t for r in reference for t in r[1:6]}, key=lambda t: sum(t in r[:9] for r in reference))
    want = [r[: r.index(eos) + 1] if eos in r else r for r in reference]
    assert len({len(w) for w in want}) > 1  # some rows end early
    for budget in (10_000, 60):  # one batch; several, sorted by length
        got = _greedy(tiny_model, prompts, max_new_tokens=10, token_budget=budget, eos=eos, pad=0)
        assert got == want


def _greedy_targets(tiny_model, tiny_tok, n_hits: int, n_rows: int = 12):
    """Demo SFT rows on a tiny model with scaled-up weights (its argmax moves from token to token): ``n_hits`` rows'
    targets replaced by the model's own greedy replies (hits: replies that decode to whole characters, as a
    trained model's do; a random model's byte tokens re-tokenize differently), the rest left (misses)."""
    from paft.data.formats import SFTExample
    from paft.models.generation import generate_replies

    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    _, sft = demo_splits("sft", 0, 64, 0)
    replies = generate_replies(tiny_model, tiny_tok, [e.messages[:-1] for e in sft], max_new_tokens=6, batch_size=4,
                               max_prompt_tokens=128, token_budget=4096)
    clean = [i for i, r in enumerate(replies) if r and "\ufffd" not in r][:n_hits]
    assert len(clean) == n_hits
    misses = [i for i in range(len(sft)) if i not in clean][: n_rows - n_hits]
    # a two-turn chat answered by the model's own reply (a hit after an earlier assistant turn's labels), and a
    # plain-text row first (exact match skips it: the rows and their argmax stay aligned with the examples)
    firsts = [sft[clean[0]].messages[:-1] + [{"role": "assistant", "content": replies[clean[0]]},
                                             {"role": "user", "content": e.messages[-2]["content"]}]
              for e in sft]
    seconds = generate_replies(tiny_model, tiny_tok, firsts, max_new_tokens=6, batch_size=4, max_prompt_tokens=128,
                               token_budget=4096)
    two = next(f + [{"role": "assistant", "content": r}] for f, r in zip(firsts, seconds) if r and "\ufffd" not in r)
    return ([SFTExample(text="a plain text row, scored by the NLL only")]
            + [SFTExample(messages=sft[i].messages[:-1] + [{"role": "assistant", "content": replies[i]}])
               for i in clean]
            + [SFTExample(messages=two)] + [sft[i] for i in misses])


def test_exact_match_read_off_the_nll_forward_equals_generating_every_row(tiny_model, tiny_tok, monkeypatch):
    """The teacher-forced verdicts (``exact_match(teacher=...)``) equal greedy generation's on rows that hit and
    rows that miss, and generate only the rows they leave open plus the report's samples."""
    import paft.eval.metrics as metrics
    from paft.eval.metrics import MISS, exact_match, teacher_forced_replies

    n_hits = 6
    sft = _greedy_targets(tiny_model, tiny_tok, n_hits)
    rows = [encode_sft(e, tiny_tok, 160) for e in sft]
    nll = sorted_nll(tiny_model, rows, pad_id=tiny_tok.pad_token_id, token_budget=150, argmax=True)
    plain = sorted_nll(tiny_model, rows, pad_id=tiny_tok.pad_token_id, token_budget=150)
    assert nll.mean == plain.mean and [len(a) for a in nll.argmax] == [int(c) for c in plain.counts]
    gen = dict(max_new_tokens=6, batch_size=4, max_prompt_tokens=128, token_budget=4096)
    want, want_samples = exact_match(tiny_model, tiny_tok, sft, **gen)
    rows_all, argmax_all, text_row = rows, nll.argmax, sft[0]
    sft, rows, nll_argmax = sft[1:], rows[1:], nll.argmax[1:]  # teacher_forced_replies takes chats only
    known = teacher_forced_replies(tiny_tok, sft, rows, nll_argmax, max_new_tokens=6, max_prompt_tokens=128)
    targets = [e.messages[-1]["content"].strip() for e in sft]
    two_turns = sum(m["role"] == "assistant" for m in sft[n_hits].messages) == 2
    # the two-turn chat is a hit of generation's; the teacher finds it or leaves it open (a reply that began with a
    # space re-tokenizes differently once stripped), never a miss
    assert two_turns and want_samples[n_hits]["reply"] == targets[n_hits] and known[n_hits] in (targets[n_hits], None)
    for k, s in zip(known, want_samples):  # every decided verdict is generation's
        if isinstance(k, str):
            assert k == s["reply"]
        elif k is MISS:
            assert s["reply"] != s["target"]
    decided_hits = sum(isinstance(k, str) and k == t for k, t in zip(known, targets))
    assert decided_hits >= 5 and sum(k is MISS for k in known) >= 4  # most rows need no generation
    generated = []
    real = metrics.generate_replies
    monkeypatch.setattr(metrics, "generate_replies", lambda m, t, prompts, **kw: generated.append(len(prompts))
                        or real(m, t, prompts, **kw))
    monkeypatch.setattr(metrics, "SAMPLES", 2)
    got, samples = exact_match(tiny_model, tiny_tok, [text_row, *sft], **gen, teacher=(rows_all, argmax_all))
    assert got == want == pytest.approx(sum(s["reply"] == s["target"] for s in want_samples) / len(sft))
    assert 0 < want < 1
    assert samples == want_samples[:2]
    assert generated == [sum(k is None for k in known[2:]) + 2]


def test_teacher_forced_verdicts_on_hand_made_argmax(tiny_tok):
    """Each case of ``teacher_forced_replies`` on a row whose argmax is written by hand."""
    from paft.data.formats import SFTExample
    from paft.eval.metrics import MISS, teacher_forced_replies

    target = "seven birds sang"
    chat = SFTExample(messages=[{"role": "user", "content": "who sang?"}, {"role": "assistant", "content": target}])
    row = encode_sft(chat, tiny_tok, 96)
    ref = [t for t in row.labels if t != -100]
    eos = tiny_tok.eos_token_id
    assert eos in ref
    content = ref[: ref.index(eos)]
    other = next(t for t in range(50, 5000)  # a token whose text cannot begin the target
                 if tiny_tok.decode([t]).strip() and not target.startswith(tiny_tok.decode([t]).lstrip()))
    # a token other than the reference's whose text begins the target: the reply could still decode to it
    texts = {t: tiny_tok.decode([t]) for t in range(3, len(tiny_tok))}
    begins = next(content[:j] + [t] for j in range(len(content)) for t, x in texts.items()
                  if t != content[j] and x and target[len(tiny_tok.decode(content[:j])):].startswith(x))
    space = tiny_tok(" ", add_special_tokens=False)["input_ids"]

    def verdict(picks, max_new=8, max_prompt=64):
        picks = picks + [other] * (len(ref) - len(picks))
        return teacher_forced_replies(tiny_tok, [chat], [row], [picks], max_new_tokens=max_new,
                                      max_prompt_tokens=max_prompt)[0]

    assert verdict(ref, max_new=len(content) + 1) == target  # follows the reference to its end: a hit
    assert verdict(content[:1] + [eos]) == tiny_tok.decode(content[:1]).strip()  # ends early: that reply
    assert verdict(content, max_new=2) == tiny_tok.decode(content[:2]).strip()  # cut at max_new_tokens
    assert verdict([other]) is MISS  # leaves the reference with text that cannot begin it
    assert verdict(begins) is None  # leaves it with a token whose text begins the rest: generate
    assert len(space) == 1 and space[0] != eos
    assert verdict(content + space, max_new=len(content) + 2) is None  # the target, then whitespace: could match
    assert verdict(ref, max_prompt=3) is None  # the generation prompt is cut: not the encoded row's prompt


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir):
    """A LoRA adapter on the tiny model with non-zero B: a second model to evaluate."""
    from paft.config import LoraConfig
    from paft.models import load_model
    from paft.train.lora import attach_lora

    model = attach_lora(load_model(tiny_dir), LoraConfig(r=4, alpha=8), 0)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("adapter") / "sft"
    model.save_pretrained(out)
    return out


def _cfg():
    cfg = load_config(preset="tiny", overrides=["eval.harness_tasks=[]", "eval.harmlessness=false",
                                                "eval.max_new_tokens=6", "eval.batch_size=4",
                                                "data.max_length=96", "data.max_prompt_length=64"])
    return cfg


@pytest.fixture(scope="module")
def both_paths(tiny_dir, tiny_tok, heldout, adapter_dir):
    from paft.eval.models import ModelSpec, evaluate_models

    sft, pairs = heldout
    specs = [ModelSpec("base", tiny_dir), ModelSpec("sft", tiny_dir, adapter_dir)]
    return {fast: evaluate_models(specs, _cfg(), tiny_tok, sft, pairs, fast=fast) for fast in (False, True)}


def test_fast_evaluation_gives_the_plain_numbers(both_paths):
    plain, fast = both_paths[False], both_paths[True]
    assert plain["samples"] == fast["samples"]  # the same greedy replies
    for name in ("base", "sft"):
        a, b = plain["models"][name], fast["models"][name]
        assert set(a) == set(b)
        for key in ("sft_exact_match", "pref_accuracy", "reward_accuracy", "sft_exact_match_stderr",
                    "pref_accuracy_stderr", "reward_accuracy_stderr"):
            assert a[key] == b[key], (name, key)
        for key in ("sft_nll", "reward_margin", "sft_nll_stderr", "reward_margin_stderr"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (name, key)
    assert fast["models"]["base"]["reward_margin"] == 0.0  # the reference against itself, exactly
    assert plain["models"]["sft"]["reward_margin"] != 0.0


def test_standard_errors_equal_their_closed_forms(tiny_dir, tiny_tok, heldout, adapter_dir, both_paths):
    from paft.models import load_model

    sft, pairs = heldout
    row, n = both_paths[True]["models"]["sft"], len(pairs)
    assert row["pref_accuracy_stderr"] == pytest.approx(math.sqrt(row["pref_accuracy"] * (1 - row["pref_accuracy"])
                                                                  / n))
    assert row["sft_exact_match_stderr"] == pytest.approx(
        math.sqrt(row["sft_exact_match"] * (1 - row["sft_exact_match"]) / len(sft)))
    # the margin's: std / sqrt(n) of beta * (h(y_w) - h(y_l)) per pair, from the two models' log-probs
    from peft import PeftModel

    lp = {}
    for name, model in (("base", load_model(tiny_dir)),
                        ("sft", PeftModel.from_pretrained(load_model(tiny_dir), str(adapter_dir)).merge_and_unload())):
        lp[name] = pair_logps(model.eval(), tiny_tok, pairs, max_length=96, max_prompt_length=64, batch_size=4)
    margin = 0.1 * ((lp["sft"][:, 0] - lp["base"][:, 0]) - (lp["sft"][:, 1] - lp["base"][:, 1]))
    assert row["reward_margin"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert row["reward_margin_stderr"] == pytest.approx(margin.std().item() / math.sqrt(n), rel=1e-4)
    assert row["sft_nll_stderr"] > 0


def test_stderr_helpers_closed_forms():
    assert binomial_stderr(0.25, 16) == pytest.approx(math.sqrt(0.25 * 0.75 / 16))
    assert binomial_stderr(None, 4) is None and binomial_stderr(0.5, 0) is None
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    assert mean_stderr(x) == pytest.approx(math.sqrt(((x - 3.5) ** 2).sum().item() / 3) / 2)
    assert mean_stderr(torch.tensor([1.0])) is None
    # equal row lengths: the ratio's standard error is the row means' std / sqrt(n)
    totals, counts = torch.tensor([2.0, 6.0, 3.0, 5.0]), torch.full((4,), 2.0)
    assert ratio_stderr(totals, counts) == pytest.approx(mean_stderr(totals / counts))
    # unequal: the delta method, by hand: m = 16/10, residuals x - m n
    totals, counts = torch.tensor([2.0, 6.0, 3.0, 5.0]), torch.tensor([1.0, 4.0, 2.0, 3.0])
    resid = [2 - 1.6, 6 - 6.4, 3 - 3.2, 5 - 4.8]
    assert ratio_stderr(totals, counts) == pytest.approx(math.sqrt(sum(r * r for r in resid) / 12) / 2.5)


def test_reference_cache_serves_the_same_numbers_and_misses_on_new_data(tiny_dir, tiny_tok, heldout, paft_cache,
                                                                          monkeypatch):
    from paft.eval.models import ModelSpec, eval_reference_identity, evaluate_models
    from paft.models.reference import ReferenceLogps, reference_cache_path

    sft, pairs = heldout
    cfg, specs = _cfg(), [ModelSpec("base", tiny_dir)]
    path = reference_cache_path(eval_reference_identity(specs[0], cfg, "cpu"))
    path.unlink(missing_ok=True)
    first = evaluate_models(specs, cfg, tiny_tok, sft[:2], pairs)
    assert path.is_file()
    calls = []
    forward = ReferenceLogps._forward
    monkeypatch.setattr(ReferenceLogps, "_forward", lambda self, m, b: calls.append(b) or forward(self, m, b))
    again = evaluate_models(specs, cfg, tiny_tok, sft[:2], pairs)
    assert calls == [] and again["models"] == {k: {**v, "eval_s": again["models"][k]["eval_s"]}
                                               for k, v in first["models"].items()}
    changed = [PreferenceExample(pairs[0].prompt, pairs[0].chosen + " indeed", pairs[0].rejected), *pairs[1:]]
    evaluate_models(specs, cfg, tiny_tok, sft[:2], changed)
    assert len(calls) >= 1  # the changed pair's batch ran the reference again
    # another max_length is other tokens, so other keys: nothing stale is read
    short = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": 40, "max_prompt_length": 24})})
    n = len(calls)
    evaluate_models(specs, short, tiny_tok, sft[:2], pairs)
    assert len(calls) > n


def test_report_marks_differences_within_noise(both_paths):
    """A tiny run's differences are mostly within 1.96 standard errors on 16 pairs: the alignment-tax table marks
    them (≈) and does not call them better or worse."""
    from paft.report.metrics import NOISE_Z, alignment_tax

    rows = both_paths[True]["models"]
    evals = {"sft": rows["sft"], "preference": rows["base"]}
    tax = alignment_tax(evals)
    marked = 0
    for key in ("sft_exact_match", "sft_nll", "pref_accuracy", "reward_margin", "reward_accuracy"):
        a, b = rows["sft"], rows["base"]
        quiet = abs(a[key] - b[key]) < NOISE_Z * math.hypot(a[f"{key}_stderr"], b[f"{key}_stderr"])
        assert tax["within_noise"]["preference"]["sft"][key] == quiet, key
        if quiet:
            marked += 1
            assert tax["better"]["preference"]["sft"][key] == 0
    assert marked >= 1


def test_a_run_report_shows_the_within_noise_marks(both_paths, tmp_path):
    """eval.json rows as the fast path writes them, through the report: report.json's alignment tax and
    report.md's table mark the differences within noise."""
    import json

    from paft.io import write_json_atomic
    from paft.report import write_report
    from test_report import make_run  # the saved-JSON run folder of the report tests

    rows = both_paths[True]["models"]
    root = make_run(tmp_path / "run")
    models = {"base": rows["base"], "sft": rows["sft"], "preference": rows["base"], "sequential": rows["sft"],
              "paft": rows["sft"]}
    data = json.loads((root / "eval.json").read_text())
    write_json_atomic(root / "eval.json", {**data, "models": models})
    write_report(root, load_config(root / "config.yaml"))
    tax = json.loads((root / "report.json").read_text())["alignment_tax"]
    assert tax["within_noise"]["preference"]["paft"]["pref_accuracy"] == (
        abs(rows["sft"]["pref_accuracy"] - rows["base"]["pref_accuracy"])
        < 1.96 * math.hypot(rows["sft"]["pref_accuracy_stderr"], rows["base"]["pref_accuracy_stderr"]))
    assert any(v for m in tax["within_noise"]["preference"].values() for v in m.values())
    assert " ≈" in (root / "report.md").read_text()


@pytest.mark.parametrize("fast", [False, True])
def test_a_reference_that_is_not_scored_still_sets_the_implicit_rewards(tiny_dir, tiny_tok, heldout, adapter_dir,
                                                                        both_paths, fast):
    """Candidates and tune already hold the base's metrics (eval.json): it gives only its pair log-probs."""
    from paft.eval.models import ModelSpec, evaluate_models

    sft, pairs = heldout
    specs = [ModelSpec("base", tiny_dir), ModelSpec("sft", tiny_dir, adapter_dir)]
    res = evaluate_models(specs, _cfg(), tiny_tok, sft, pairs, fast=fast, score_reference=False)
    assert list(res["models"]) == ["sft"]
    want = both_paths[fast]["models"]["sft"]
    for k in ("sft_nll", "pref_accuracy", "reward_margin", "reward_accuracy"):
        assert res["models"]["sft"][k] == pytest.approx(want[k], abs=1e-6), k
