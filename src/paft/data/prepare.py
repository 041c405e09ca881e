"""The run's data stage: each dataset of the config's ``data`` section loaded, validated and split into
training and held-out examples, written as canonical JSONL (``{kind}_train.jsonl``, ``{kind}_eval.jsonl``), and a
dev split carved from the training rows (``{kind}_dev.jsonl``, ``data.dev_size`` rows) that merge tuning scores
on: no dev prompt occurs in the held-out rows or in the rows left for training, so choosing a merge on the dev
split never looks at the test split.

Degenerate data is reported, not trained on silently: preference pairs whose chosen and rejected replies
are the same carry no preference signal (DPO's loss is ln 2 whatever the weights) and are dropped (all of
them: a one-line error); exact duplicate rows are dropped before the held-out split is carved, so no
held-out row also occurs in train; a separate held-out file's rows that also occur in train are counted.

The pipeline writes them into the run folder; ``paft eval`` takes the held-out examples in memory.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

from paft.data.demo import demo_splits
from paft.data.formats import PreferenceExample, RankedExample, SFTExample
from paft.data.loading import hash_source, load_examples, split_examples
from paft.errors import DataError
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
        # the demo is reported as drawn, not deduplicated, so the README's default-run figures stay reproducible
        keys = [_key(e) for e in train]
        info.update(equal_pairs=sum(map(_no_signal, train)), duplicates=len(keys) - len(set(keys)),
                    eval_overlap=_overlap(train, held))
        return train, held, info
    load = partial(load_examples, kind=kind, fmt=src.format, subset=src.subset, skip_invalid=data.skip_invalid,
                   beavertails_preference=src.beavertails_preference)
    res = load(src.path, split=src.split, max_rows=src.max_rows, local=src.local)
    info.update(format=res.fmt, sha256=hash_source(src.local or src.path), skipped=res.skipped,
                skipped_errors=res.errors)
    if res.skipped:
        log(f"[yellow]{src.path}: skipped {res.skipped} invalid rows (data.skip_invalid)")
    examples, info["equal_pairs"] = _drop_equal_pairs(res.examples, src.path, log)
    examples, info["duplicates"] = _drop_duplicates(examples, src.path, log)
    if src.eval_path:
        held_res = load(src.eval_path, split=src.eval_split or src.split)
        held, eval_equal = _drop_equal_pairs(held_res.examples, src.eval_path, log)
        overlap = _overlap(examples, held)
        if overlap:
            log(f"[yellow]{src.eval_path}: {overlap} of its {len(held)} held-out rows also occur in {src.path}; "
                "held-out metrics on them measure memorisation")
        info.update(eval_sha256=hash_source(src.eval_path), eval_skipped=held_res.skipped,
                    eval_equal_pairs=eval_equal, eval_overlap=overlap)
        return examples, held, info
    _check_size(examples, src.path, kind, res.skipped)
    train, held = split_examples(examples, src.eval_size, seed)
    info["eval_overlap"] = _overlap(train, held)  # 0: the rows were deduplicated before the split
    return train, held, info


def _key(example) -> str:
    """An example's identity: every field (system and prompt turns, replies, labels or scores)."""
    return json.dumps(asdict(example), sort_keys=True, ensure_ascii=False)


def _no_signal(example) -> bool:
    """A pair (or ranked list) whose replies are all the same text: no reply is preferred to another."""
    if isinstance(example, PreferenceExample):
        return example.chosen == example.rejected
    if isinstance(example, RankedExample):
        return len(set(example.responses)) == 1
    return False


def _drop_equal_pairs(examples: list, path: str, log: Callable[[str], None]) -> tuple[list, int]:
    """``examples`` without the replies-all-equal pairs, and their count; all of them equal is a ``DataError``
    (an empty list is not: emptiness is ``load_examples``' and ``_check_size``'s to report)."""
    kept = [e for e in examples if not _no_signal(e)]
    dropped = len(examples) - len(kept)
    if dropped and not kept:
        raise DataError(f"{path}: all {dropped} preference pairs have chosen == rejected, so the preference loss has "
                        "no signal (DPO's is ln 2 at every step); check which columns hold the chosen and rejected "
                        "replies (data.preference.format)")
    if dropped:
        log(f"[yellow]{path}: dropped {dropped} of {len(examples)} preference pairs with chosen == rejected "
            "(no preference signal)")
    return kept, dropped


def _check_size(examples: list, path: str, kind: str, skipped: int) -> None:
    """At least two examples, so one can be held out; else one line naming the file (``split_examples`` cannot)."""
    if len(examples) < 2:
        why = f" ({skipped} invalid rows skipped)" if skipped else ""
        raise DataError(f"{path}: only {len(examples)} usable example after dropping "
                        f"invalid, duplicate and no-signal rows{why}; at least 2 are needed to hold one out for "
                        f"evaluation: add rows, or give the held-out rows in their own file (data.{kind}.eval_path)")


def _drop_duplicates(examples: list, path: str, log: Callable[[str], None]) -> tuple[list, int]:
    """``examples`` with each exact duplicate row dropped (the first kept, file order), and their count."""
    seen: set[str] = set()
    kept = [e for e in examples if not ((k := _key(e)) in seen or seen.add(k))]
    dropped = len(examples) - len(kept)
    if dropped:
        log(f"[yellow]{path}: dropped {dropped} exact duplicate rows of {len(examples)}")
    return kept, dropped


def _overlap(train: list, held: list) -> int:
    """How many held-out rows also occur, exactly, in train."""
    keys = {_key(e) for e in train}
    return sum(_key(e) in keys for e in held)


def prompt_key(example) -> str:
    """The prompt of an example as text to compare: its turns before the reply, system turns left out (two rows
    asking the same thing under another system prompt still share their prompt)."""
    turns = example.messages[:-1] if isinstance(example, SFTExample) else example.prompt
    return json.dumps([t for t in turns or [] if t.get("role") != "system"], sort_keys=True, ensure_ascii=False)


def carve_dev(train: list, held: list, size: int, seed: int) -> tuple[list, list]:
    """(train, dev): about ``size`` rows moved from ``train`` into a dev split, whole prompt groups at a time.

    A prompt that also occurs in ``held`` never goes to dev, and every row of a dev prompt leaves ``train``, so the
    dev split shares no prompt with either. Groups are drawn in a seeded order; one that would overshoot ``size``
    is passed over for a smaller one. At most half the training rows go to dev."""
    if size <= 0 or not train:
        return train, []
    banned = {prompt_key(e) for e in held}
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(train):
        groups.setdefault(prompt_key(e), []).append(i)
    order = [k for k in groups if k not in banned]
    random.Random(seed).shuffle(order)
    cap = min(size, len(train) // 2)
    chosen: set[int] = set()
    for key in order:
        if len(chosen) + len(groups[key]) <= cap:
            chosen.update(groups[key])
        if len(chosen) == cap:
            break
    return [e for i, e in enumerate(train) if i not in chosen], [e for i, e in enumerate(train) if i in chosen]


def prepare_data(data, out_dir: Path, *, seed: int, ranked: bool = False,
                 log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Split both datasets and write them under ``out_dir``; the summary of each (source, hashes, sizes)."""
    summary = {}
    for kind in KINDS:
        train, held, info = split_source(data, kind, seed=seed, ranked=ranked, log=log)
        train, dev = carve_dev(train, held, data.dev_size, seed)
        if data.dev_size and len(dev) < data.dev_size:
            log(f"[yellow]data.dev_size: {len(dev)} {kind} dev rows, not {data.dev_size} (at most half the training "
                "rows, whole prompt groups, none with a held-out prompt)")
        write_examples(out_dir / f"{kind}_train.jsonl", train)
        write_examples(out_dir / f"{kind}_eval.jsonl", held)
        write_examples(out_dir / f"{kind}_dev.jsonl", dev)
        summary[kind] = {**info, "train": len(train), "eval": len(held), "dev": len(dev)}
    return summary


def check_sources_unchanged(data, summary: dict[str, Any], where: Path) -> None:
    """A one-line ``DataError`` when a data file changed since ``summary`` (its data stage) recorded its sha256.

    The prepared JSONL under ``where`` would otherwise be reused silently; a file that is gone now (a moved
    folder, another working directory) or a hub dataset (no hash) is not compared.
    """
    for kind in KINDS:
        src, info = getattr(data, kind), summary.get(kind) or {}
        for file, key in ((src.local or src.path, "sha256"), (src.eval_path, "eval_sha256")):
            recorded = info.get(key)
            if not file or not recorded or recorded.startswith("demo:"):
                continue
            now = hash_source(file)
            if now is not None and now != recorded:
                raise DataError(f"{file}: changed since the data stage of {where} (sha256 {recorded[:12]} recorded, "
                                f"{now[:12]} now); pass --force to redo the run from the data stage, or restore "
                                "the file")


def write_examples(path: Path, examples: list) -> None:
    """Examples as canonical JSONL (unset fields left out), which ``load_examples`` reads back the same."""
    lines = [json.dumps({k: v for k, v in asdict(e).items() if v is not None}, ensure_ascii=False) for e in examples]
    write_text_atomic(path, "\n".join(lines) + "\n")
