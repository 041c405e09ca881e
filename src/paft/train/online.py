"""Online / iterative preference training: rounds of sample -> score -> pair -> train.

Each round draws ``online.prompts_per_round`` prompts, samples ``online.samples_per_prompt``
replies per prompt, scores them with the configured scorer (``paft.scoring``: a reward
model, an LLM judge, or a Python function), turns the scored replies into preference pairs
and trains the adapter on them with the method's pairwise loss. The three registered
methods differ in where samples come from, how pairs are chosen and who scores:

- ``iterative-dpo`` (Xiong et al. 2024, arXiv 2312.11456; Xu et al. 2023, arXiv 2312.16682):
  samples from the current policy; pair = best vs worst reply by score.
- ``rso`` (Liu et al. 2024, arXiv 2309.06657): samples from the *starting* (SFT) policy and
  keeps a subset by statistical rejection sampling towards pi_sft * exp(r / beta_rso); pairs
  are formed among the accepted replies (best vs worst), trained with the hinge loss by default.
- ``self-rewarding`` (Yuan et al. 2024, arXiv 2401.10020): the policy scores its own
  samples as an LLM judge; each round's reference is the previous round's model.

Everything a round produced (samples, scores, pairs, stats) is written under
``out_dir/rounds/round-N/`` so rounds can be inspected and a killed run resumes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable

import torch

from paft.io import write_text_atomic
from paft.train.phases import Fit, resumed, save_phase, steps_for, totals


@torch.no_grad()
def sample_replies(model, tok, prompts: list[list[dict]], *, k: int, max_new_tokens: int, temperature: float,
                   top_p: float, max_prompt_tokens: int, batch_size: int, seed: int,
                   use_adapter: bool = True) -> list[list[str]]:
    """``k`` sampled replies for each chat prompt (left-padded batched generation)."""
    from contextlib import nullcontext

    from paft.data.tokenize import prompt_text

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side, tok.padding_side = tok.padding_side, "left"
    out: list[list[str]] = []
    ctx = nullcontext() if use_adapter or not hasattr(model, "disable_adapter") else model.disable_adapter()
    try:
        with ctx:
            per = max(1, batch_size // k)
            for i in range(0, len(prompts), per):
                chunk = prompts[i : i + per]
                enc = tok([prompt_text(tok, p) for p in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False, truncation=True, max_length=max_prompt_tokens).to(device)
                torch.manual_seed(seed + i)
                gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                     num_return_sequences=k, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                out += [[t.strip() for t in texts[j * k:(j + 1) * k]] for j in range(len(chunk))]
    finally:
        tok.padding_side = side
        model.train(was_training)
    return out


def rejection_sample(scores: list[float], *, beta: float, keep: int, rng: random.Random) -> list[int]:
    """RSO's statistical rejection sampling (Liu et al. 2024, Algorithm 1).

    Candidates drawn from pi_sft are accepted towards pi_r(y|x) ∝ pi_sft(y|x) exp(r(y)/beta):
    repeatedly, each remaining candidate is accepted with probability exp((r - r_max) / beta),
    r_max the highest remaining score, until ``keep`` are accepted. Small beta approaches
    best-of-n; large beta approaches uniform sampling from pi_sft. Returns candidate indices.
    """
    remaining = list(range(len(scores)))
    accepted: list[int] = []
    while remaining and len(accepted) < keep:
        r_max = max(scores[i] for i in remaining)
        for i in list(remaining):
            if len(accepted) >= keep:
                break
            if rng.random() < math.exp((scores[i] - r_max) / beta):
                accepted.append(i)
                remaining.remove(i)
    return accepted


def best_worst(replies: list[str], scores: list[float]) -> tuple[str, str, float] | None:
    """(chosen, rejected, score gap) = highest vs lowest scored reply; None when all scores tie."""
    hi = max(range(len(scores)), key=lambda i: scores[i])
    lo = min(range(len(scores)), key=lambda i: scores[i])
    if scores[hi] <= scores[lo] or replies[hi] == replies[lo]:
        return None
    return replies[hi], replies[lo], scores[hi] - scores[lo]


def unique_prompts(examples: list) -> list[list[dict]]:
    """The distinct prompt conversations of any preference / prompt rows, in first-seen order."""
    seen, out = set(), []
    for e in examples:
        p = e.prompt
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def train_online(*, cfg, model, tok, objective, prompts: list[list[dict]], scorer: Callable, fit: Fit,
                 out_dir: Path, report: Callable[[dict[str, Any]], None], name: str,
                 collator=None) -> dict[str, Any]:
    """``collator``: the pair collator the rounds' pairs are batched with (default: padded)."""
    from paft.data.collate import PairCollator
    from paft.data.formats import PreferenceExample
    from paft.data.tokenize import encode_pair
    from paft.train.phases import collate_all

    p, o, d = cfg.preference, cfg.preference.online, cfg.data
    method = objective.spec.name
    params = objective.kwargs
    rounds = o.rounds
    steps = steps_for(p, o.prompts_per_round, rounds)  # a round has at most one pair per prompt
    reference = "previous" if method == "self-rewarding" else o.reference
    collator = collator or PairCollator(tok.pad_token_id)
    log: list[dict[str, Any]] = []
    for r in range(rounds):
        rd = out_dir / "rounds" / f"round-{r + 1}"
        if resumed(model, rd, log):
            continue
        rng = random.Random(f"{cfg.run.seed}-{method}-round-{r}")
        chosen_prompts = rng.sample(prompts, min(o.prompts_per_round, len(prompts)))
        n_samples = params.get("candidates", o.samples_per_prompt) if method == "rso" else o.samples_per_prompt
        report({"branch": name, "note": f"round {r + 1}/{rounds}: sampling {n_samples} replies for "
                                        f"{len(chosen_prompts)} prompts"})
        replies = sample_replies(model, tok, chosen_prompts, k=n_samples, max_new_tokens=o.max_new_tokens,
                                 temperature=o.temperature, top_p=o.top_p, max_prompt_tokens=d.max_prompt_length,
                                 batch_size=max(o.scorer.batch_size, n_samples), seed=cfg.run.seed + 1000 * r,
                                 use_adapter=method != "rso")
        flat_prompts = [pp for pp, rs in zip(chosen_prompts, replies) for _ in rs]
        flat_replies = [x for rs in replies for x in rs]
        flat_scores = list(scorer(flat_prompts, flat_replies))
        scores = [flat_scores[i * n_samples:(i + 1) * n_samples] for i in range(len(chosen_prompts))]
        pairs, records = [], []
        for pp, rs, sc in zip(chosen_prompts, replies, scores):
            idx = list(range(len(rs)))
            if method == "rso":
                idx = rejection_sample(sc, beta=params["rso_beta"], keep=params["keep"], rng=rng)
            pair = best_worst([rs[i] for i in idx], [sc[i] for i in idx]) if len(idx) >= 2 else None
            records.append({"prompt": pp, "replies": rs, "scores": sc, "used": idx,
                            "pair": None if pair is None else {"chosen": pair[0], "rejected": pair[1]}})
            if pair is not None:
                pairs.append(PreferenceExample(prompt=pp, chosen=pair[0], rejected=pair[1]))
        write_text_atomic(rd / "samples.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
        mean_score = sum(flat_scores) / len(flat_scores)
        info: dict[str, Any] = {"round": r + 1, "prompts": len(chosen_prompts), "samples": len(flat_replies),
                                "mean_sample_score": mean_score, "pairs": len(pairs), "reference": reference}
        if not pairs:
            report({"branch": name, "warning": f"round {r + 1}: every prompt's replies scored equally; no pairs, "
                                               "nothing to train on this round"})
            info.update(train_loss=float("nan"), steps=0, wall_s=0.0)
            save_phase(model, rd, info)
            log.append(info)
            continue
        rows = [encode_pair(e, tok, d.max_length, d.max_prompt_length) for e in pairs]
        if reference == "previous":
            objective.reference.snapshot(model, collate_all(collator, rows, p.batch_size))
        report({"branch": name, "note": f"round {r + 1}/{rounds}: mean sample score {mean_score:.3f}, "
                                        f"{len(pairs)} pairs"})
        res = fit(rows, collator, rd / "checkpoints", steps[r])
        if reference == "previous":
            objective.reference.release_snapshot()
        info.update(res)
        save_phase(model, rd, info)
        log.append(info)
    return {"rounds": log, **totals(log)}
