"""Online / iterative preference training: rounds of sample -> score -> pair or group -> train.

Each round draws ``online.prompts_per_round`` prompts, samples ``online.samples_per_prompt``
replies per prompt, scores them with the configured scorer (``paft.scoring``: a reward
model, an LLM judge, or a Python function), turns the scored replies into one example per prompt
in the method's data kind (``DataKind.from_samples``: a best-vs-worst pair for ``online``, all
replies with their rewards for ``groups``: RLOO, GRPO, PPO, SPPO) and trains the adapter on them with
the method's loss. Where samples come from, which replies are kept, the reference and the scorer are the
method's schedule
(``paft.methods.schedules.Online``): iterative DPO samples from the current policy and pairs best
vs worst; RSO samples from the start policy and pairs among the replies rejection sampling
accepts; self-rewarding judges its own samples with the previous round's model as reference. Before a
round trains, ratio methods (RLOO, GRPO, PPO) snapshot the sampling policy as pi_old
(``PreferenceObjective.start_round``): the round's steps reuse its groups, so later steps are off-policy.

Everything a round produced (samples, scores, pairs, stats) is written under
``out_dir/rounds/round-N/`` so rounds can be inspected and a killed run resumes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from paft.io import write_text_atomic
from paft.models.generation import generate_replies
from paft.train.phases import Fit, collate_all, resumed, save_phase, steps_for, totals
from paft.train.preference import DATA_KINDS


def train_online(*, cfg, model, tok, objective, prompts: list[list[dict]], scorer: Callable, fit: Fit,
                 out_dir: Path, report: Callable[[dict[str, Any]], None], name: str,
                 collator=None) -> dict[str, Any]:
    """``collator``: the collator the rounds' examples are batched with (default: the data kind's, padded)."""
    p, o, d = cfg.preference, cfg.preference.online, cfg.data
    method, schedule = objective.spec.name, objective.schedule
    rounds = o.rounds
    steps = steps_for(p, o.prompts_per_round, rounds)  # a round has at most one example (pair or group) per prompt
    reference = schedule.reference or o.reference
    kind = DATA_KINDS[objective.spec.data]
    collator = collator or kind.collator(tok.pad_token_id, None, d.max_length)
    n_samples = schedule.candidates or o.samples_per_prompt
    if n_samples != o.samples_per_prompt:  # the method's own params.candidates: say so, not silently
        report({"branch": name, "note": f"{method} samples preference.params.candidates={n_samples} replies per "
                                        f"prompt; preference.online.samples_per_prompt={o.samples_per_prompt} "
                                        "is not used"})
    log: list[dict[str, Any]] = []
    for r in range(rounds):
        rd = out_dir / "rounds" / f"round-{r + 1}"
        if resumed(model, rd, log):
            continue
        rng = random.Random(f"{cfg.run.seed}-{method}-round-{r}")
        chosen_prompts = rng.sample(prompts, min(o.prompts_per_round, len(prompts)))
        report({"branch": name, "note": f"round {r + 1}/{rounds}: sampling {n_samples} replies for "
                                        f"{len(chosen_prompts)} prompts"})
        flat_replies = generate_replies(
            model, tok, chosen_prompts, k=n_samples, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
            top_p=o.top_p, max_prompt_tokens=d.max_prompt_length, batch_size=max(o.scorer.batch_size, n_samples),
            seed=cfg.run.seed + 1000 * r, use_adapter=schedule.sample_from == "policy")
        flat_scores = list(scorer([pp for pp in chosen_prompts for _ in range(n_samples)], flat_replies))
        replies, scores = ([xs[i * n_samples:(i + 1) * n_samples] for i in range(len(chosen_prompts))]
                           for xs in (flat_replies, flat_scores))
        examples, records = [], []
        for pp, rs, sc in zip(chosen_prompts, replies, scores):
            idx = schedule.selection.select(sc, rng)
            ex = kind.from_samples(pp, [rs[i] for i in idx], [sc[i] for i in idx])
            records.append({"prompt": pp, "replies": rs, "scores": sc, "used": idx, **kind.record(ex)})
            if ex is not None:
                examples.append(ex)
        write_text_atomic(rd / "samples.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
        mean_score = sum(flat_scores) / len(flat_scores)
        info: dict[str, Any] = {"round": r + 1, "prompts": len(chosen_prompts), "samples": len(flat_replies),
                                "mean_sample_score": mean_score, kind.unit: len(examples), "reference": reference}
        if not examples:
            report({"branch": name, "warning": f"round {r + 1}: no {kind.unit} ({kind.unit_needs}); nothing to "
                                               "train on this round"})
            info.update(train_loss=float("nan"), steps=0, wall_s=0.0)
            save_phase(model, rd, info)
            log.append(info)
            continue
        rows = [kind.encode(e, tok, d) for e in examples]
        batches = list(collate_all(collator, rows, p.batch_size))
        if reference == "previous":
            objective.reference.snapshot(model, batches)
        # the sampling policy pi_old of ratio methods, frozen before the round's steps reuse its groups
        objective.start_round(model, batches)
        report({"branch": name, "note": f"round {r + 1}/{rounds}: mean sample score {mean_score:.3f}, "
                                        f"{len(examples)} {kind.unit}"})
        res = fit(rows, collator, rd / "checkpoints", steps[r])
        if reference == "previous":
            objective.reference.release_snapshot()
        objective.end_round()
        info.update(res)
        save_phase(model, rd, info)
        log.append(info)
    return {"rounds": log, **totals(log)}
