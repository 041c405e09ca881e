"""The run's data stage: each dataset of the config's ``data`` section loaded, validated and split into
training and held-out examples, written as canonical JSONL (``{kind}_train.jsonl``, ``{kind}_eval.jsonl``).

The pipeline writes them into the run folder; ``paft eval`` takes the held-out examples in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

from paft.data.demo import demo_splits
from paft.data.loading import hash_source, load_examples, split_examples
from paft.io import write_text_atomic

KINDS = ("sft", "preference")


def split_source(data, kind: str, *, seed: int, ranked: bool = False,
                 log: Callable[[str], None] = lambda msg: None) -> tuple[list, list, dict[str, Any]]:
    """(train, held-out, summary) of ``data.<kind>`` (``data``: the config's data section).

    ``ranked``: the preference method trains on ranked lists (the demo then gives graded reply lists
    for the same prompts).
    """
    src = getattr(data, kind)
    info: dict[str, Any] = {"path": src.path}
    if src.path == "demo":
        ranked = ranked and kind == "preference"
        train, held = demo_splits(kind, getattr(data.demo, f"{kind}_train"), getattr(data.demo, f"{kind}_eval"),
                                  data.demo.seed, ranked=ranked)
        info.update(format="demo_ranked" if ranked else "demo", sha256=f"demo:seed={data.demo.seed}", skipped=0)
        return train, held, info
    load = partial(load_examples, kind=kind, fmt=src.format, subset=src.subset, skip_invalid=data.skip_invalid,
                   beavertails_preference=src.beavertails_preference)
    res = load(src.path, split=src.split, max_rows=src.max_rows, local=src.local)
    info.update(format=res.fmt, sha256=hash_source(src.local or src.path), skipped=res.skipped,
                skipped_errors=res.errors)
    if res.skipped:
        log(f"[yellow]{src.path}: skipped {res.skipped} invalid rows (data.skip_invalid)")
    if src.eval_path:
        held_res = load(src.eval_path, split=src.eval_split or src.split)
        info.update(eval_sha256=hash_source(src.eval_path), eval_skipped=held_res.skipped)
        return res.examples, held_res.examples, info
    return (*split_examples(res.examples, src.eval_size, seed), info)


def prepare_data(data, out_dir: Path, *, seed: int, ranked: bool = False,
                 log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Split both datasets and write them under ``out_dir``; the summary of each (source, hashes, sizes)."""
    summary = {}
    for kind in KINDS:
        train, held, info = split_source(data, kind, seed=seed, ranked=ranked, log=log)
        write_examples(out_dir / f"{kind}_train.jsonl", train)
        write_examples(out_dir / f"{kind}_eval.jsonl", held)
        summary[kind] = {**info, "train": len(train), "eval": len(held)}
    return summary


def write_examples(path: Path, examples: list) -> None:
    """Examples as canonical JSONL (unset fields left out), which ``load_examples`` reads back the same."""
    lines = [json.dumps({k: v for k, v in asdict(e).items() if v is not None}, ensure_ascii=False) for e in examples]
    write_text_atomic(path, "\n".join(lines) + "\n")
