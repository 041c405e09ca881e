"""Multi-phase preference training (sDPO stages, online rounds) on one model and one adapter.

A phase trains the same LoRA adapter further on its own rows. Each finished phase
saves its adapter and a ``done.json`` under ``out_dir/<phase>/``, so a killed run
resumes at the first unfinished phase (and inside it from its last Trainer
checkpoint) with the adapter of the last finished one restored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from paft.errors import ConfigError
from paft.io import atomic_dir, write_json_atomic
from paft import ranks

# fit(rows, collator, ckpt_dir, max_steps) -> {"train_loss", "steps", "wall_s"}
Fit = Callable[[list, Any, Path, int], dict[str, Any]]


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` optimizer steps over ``parts`` phases, at least one each, earlier phases first."""
    base, extra = divmod(max(total, parts), parts)
    return [base + (i < extra) for i in range(parts)]


def save_phase(model, d: Path, info: dict[str, Any]) -> None:
    if ranks.is_main():  # a branch of several processes: rank 0 writes, the others wait for it
        with atomic_dir(d / "adapter", force=True) as tmp:
            model.save_pretrained(tmp)
        write_json_atomic(d / "done.json", info)
    ranks.barrier()


def resumed(model, d: Path, log: list) -> bool:
    """True, with the adapter weights it saved loaded into the live model and its info logged, when phase ``d``
    finished earlier."""
    done = d / "done.json"
    if not (done.is_file() and (d / "adapter").is_dir()):
        return False
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{d}/adapter does not match the model's adapter: {result.unexpected_keys[:3]}")
    log.append(json.loads(done.read_text()))
    return True


def steps_for(tcfg, rows_per_phase: float, phases: int) -> list[int]:
    """Per-phase steps: ``max_steps`` split over the phases, or ``epochs`` over each phase's rows."""
    if tcfg.max_steps > 0:
        return split_steps(tcfg.max_steps, phases)
    per = max(1, math.ceil(rows_per_phase / tcfg.batch_size * tcfg.epochs))  # batch_size: global
    return [per] * phases


def totals(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps of all phases and their step-weighted mean train loss (NaN when no phase trained)."""
    steps = sum(x["steps"] for x in log)
    loss = sum(x["train_loss"] * x["steps"] for x in log if x["steps"]) / steps if steps else float("nan")
    return {"steps": steps, "train_loss": loss}


def collate_all(collator, rows: list, batch_size: int):
    for i in range(0, len(rows), batch_size):
        yield collator(rows[i : i + batch_size])


def train_staged(*, model, rows: list, collator, objective, fit: Fit, tcfg, out_dir: Path, stages: int,
                 report: Callable[[dict[str, Any]], None], name: str) -> dict[str, Any]:
    """sDPO (Kim et al. 2024, arXiv 2403.19270): the pairs in ``stages`` consecutive chunks, in data order.

    Stage t trains with DPO whose reference is the model after stage t-1 (stage 1: the start
    model). The reference of a stage is frozen by ``ReferenceLogps.snapshot`` over that stage's
    rows before it trains: one no-grad forward per row, no second model in memory. Order the
    file easy-to-hard to get the paper's curriculum.
    """
    if stages < 1 or stages > len(rows):
        raise ConfigError(f"preference.params.stages must be between 1 and the number of pairs ({len(rows)}); "
                          f"got {stages}")
    bounds = [round(i * len(rows) / stages) for i in range(stages + 1)]
    steps = steps_for(tcfg, len(rows) / stages, stages)
    log = []
    for t in range(stages):
        d = out_dir / "stages" / f"stage-{t + 1}"
        if resumed(model, d, log):
            continue
        chunk = rows[bounds[t]:bounds[t + 1]]
        n_ref = objective.reference.snapshot(model, collate_all(collator, chunk, tcfg.batch_size))
        report({"branch": name, "note": f"stage {t + 1}/{stages}: {len(chunk)} pairs, reference = model after "
                                        f"stage {t}" if t else f"stage 1/{stages}: {len(chunk)} pairs"})
        res = fit(chunk, collator, d / "checkpoints", steps[t])
        objective.reference.release_snapshot()
        info = {"stage": t + 1, "pairs": len(chunk), "reference_rows": n_ref, **res}
        save_phase(model, d, info)
        log.append(info)
    return {"stages": log, **totals(log)}
