"""Read dataset rows from local files or the `datasets` hub and convert them to canonical examples.

Every problem surfaces as a one-line ``DataError`` that names the file and, for a
bad row, the 0-based row index (plus the line for JSONL) and the field, so a user
can fix the data without a traceback.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from paft.data.formats import RowError, detect_preference_format, detect_sft_format, get_adapter
from paft.errors import DataError
from paft.io import sha256_file

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz")
MAX_KEPT_ERRORS = 20
# the fix named by every bad-row error when rows are not skipped
SKIP_HINT = "fix the row, or skip invalid rows with data.skip_invalid: true (--set data.skip_invalid=true)"

# "name" or "owner/name": what a `datasets` hub id looks like, as opposed to a filesystem path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _not_utf8(path: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _read_jsonl(path: str, bad: list[str] | None = None) -> tuple[list[dict], list[int]]:
    """Rows and their 1-based line numbers; streamed, since JSONL files can be large (.jsonl.gz: HH-RLHF's files).

    ``bad``: where invalid lines go (one message each) instead of stopping the read (``data.skip_invalid``).
    """
    rows, lines = [], []
    opener = gzip.open if path.lower().endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    problem = None if isinstance(row, dict) else f"expected an object, got {type(row).__name__}"
                except json.JSONDecodeError as e:
                    problem = f"{e.msg} at column {e.colno}"
                if problem is not None:
                    message = f"{path}: line {n}: invalid JSON: {problem}"
                    if bad is None:
                        raise DataError(f"{message}; {SKIP_HINT}")
                    bad.append(message)
                    continue
                rows.append(row)
                lines.append(n)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # click turns a bare EOFError into "Aborted."
        raise DataError(f"{path}: truncated or corrupt gzip file after line {n} ({e}); download it again "
                        f"(gzip -t {path} checks a file)") from None
    return rows, lines


def _read_json(path: str) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: column lists have different lengths {sorted(lengths)}")
        columns = list(data)
        return [dict(zip(columns, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects or an object of equal-length column lists")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i} is not a JSON object (got {type(row).__name__})")
    return data


def _read_parquet(path: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read parquet: {e}") from None


def _csv_cell(value: str | None) -> Any:
    """Decode cells holding JSON lists/objects (how message lists survive CSV); other text stays as is."""
    if value is None or not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # text that merely starts with a bracket, e.g. "[Verse 1] ..."


def _read_csv(path: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    for row in reader:
        if None in row:
            raise DataError(f"{path}: line {reader.line_num}: more cells than header columns")
        rows.append({k: _csv_cell(v) for k, v in row.items()})
    return rows


def _read_hub(path: str, split: str, subset: str | None) -> list[dict]:
    try:
        import datasets

        return datasets.load_dataset(path, subset, split=split).to_list()
    except Exception as e:  # network, auth, missing dataset or split: all end the same way for the user
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"{path}: not a local file and could not be loaded with datasets ({type(e).__name__}: {reason}); "
            "download it when online or pass a local .jsonl/.json/.parquet/.csv"
        ) from None


def _read(path: str, split: str, subset: str | None,
          bad: list[str] | None = None) -> tuple[list[dict], list[int] | None]:
    """Rows plus, for JSONL, the 1-based line number of each row (None for other sources); ``bad``: see
    ``_read_jsonl``."""
    local = Path(path)
    if not local.exists():
        if not local.suffix and _HUB_NAME.fullmatch(path):
            return _read_hub(path, split, subset), None
        raise DataError(f"{path}: file not found")
    if local.is_dir():
        raise DataError(f"{path}: is a folder; pass a data file ({', '.join(SUPPORTED_SUFFIXES)})")
    suffix = ".jsonl.gz" if local.name.lower().endswith(".jsonl.gz") else local.suffix.lower()
    try:
        if suffix in (".jsonl", ".jsonl.gz"):
            return _read_jsonl(path, bad)
        if suffix == ".json":
            return _read_json(path), None
        if suffix == ".parquet":
            return _read_parquet(path), None
        if suffix == ".csv":
            return _read_csv(path), None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
                    f"expected {', '.join(SUPPORTED_SUFFIXES)}")


# --------------------------------------------------------------------------- dataset presets

@dataclass(frozen=True)
class DatasetPreset:
    """A named public dataset: where it lives on the hub, its format, and how a selector picks from it."""

    name: str
    hub: str
    fmt: str
    selectors: dict[str, dict[str, str]]  # selector -> {"data_dir": ...} and/or {"preference": ...}
    download: str  # how to fetch it for offline use ({sel}: the selector's data_dir)
    local_file: str  # which downloaded file to point data.*.local at


DATASET_PRESETS = {
    # Anthropic HH-RLHF: one folder per tranche on the hub, each with train/test .jsonl.gz
    "hh-rlhf": DatasetPreset(
        "hh-rlhf", "Anthropic/hh-rlhf", "hh_rlhf",
        {d: {"data_dir": d} for d in ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")},
        "hf download Anthropic/hh-rlhf --repo-type dataset --include '{sel}/*' --local-dir DIR",
        "DIR/{sel}/{split}.jsonl.gz"),
    # BeaverTails' preference data is PKU-SafeRLHF (prompt, response_0/1, better_/safer_response_id);
    # one pair of replies, two labels: `better` (helpfulness) and `safer` (harmlessness)
    "beavertails": DatasetPreset(
        "beavertails", "PKU-Alignment/PKU-SafeRLHF", "beavertails",
        {"better": {"preference": "helpful"}, "safer": {"preference": "safe"}},
        "hf download PKU-Alignment/PKU-SafeRLHF --repo-type dataset --local-dir DIR",
        "one of DIR/data/*/{split}.jsonl"),
}


@dataclass(frozen=True)
class ResolvedPreset:
    preset: DatasetPreset
    selector: str | None
    data_dir: str | None
    preference: str | None  # beavertails_preference implied by the selector


def dataset_preset(path: str) -> ResolvedPreset | None:
    """``hh-rlhf:helpful-base``, ``beavertails:safer``, or a bare preset name -> its preset; None for other paths.

    An unknown selector of a known preset is a one-line ``DataError``.
    """
    name, _, selector = path.partition(":")
    preset = DATASET_PRESETS.get(name.strip().lower())
    if preset is None or (not selector and Path(path).exists()):  # a local file that happens to share the name
        return None
    selector = selector.strip() or None
    if selector is not None and selector not in preset.selectors:
        raise DataError(f"{path}: unknown {preset.name} selector {selector!r}; known: "
                        f"{', '.join(f'{preset.name}:{k}' for k in preset.selectors)} (or {preset.name} for all)")
    chosen = preset.selectors.get(selector or "", {})
    return ResolvedPreset(preset, selector, chosen.get("data_dir"), chosen.get("preference"))


def _read_preset(rp: ResolvedPreset, path: str, kind: str, split: str, subset: str | None) -> list[dict]:
    """A preset's rows from the hub; offline, one line saying what to download and which key to point at it."""
    try:
        import datasets

        return datasets.load_dataset(rp.preset.hub, subset, data_dir=rp.data_dir, split=split).to_list()
    except Exception as e:  # network, auth, missing split: all end the same way for the user
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        sel = rp.data_dir or "*"
        where = f"{rp.preset.hub}" + (f" (data_dir {rp.data_dir})" if rp.data_dir else "")
        raise DataError(
            f"{path}: cannot load {where} split {split!r} from the hub ({type(e).__name__}: {reason}); "
            f"download it when online ({rp.preset.download.format(sel=sel)}) and set data.{kind}.local: "
            f"{rp.preset.local_file.format(sel=sel, split=split)}") from None


def read_rows(path: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Raw rows of a local .jsonl/.json/.parquet/.csv file, or of a `datasets` hub dataset split."""
    return _read(path, split, subset)[0]


@dataclass
class LoadResult:
    examples: list
    skipped: int
    source: str  # the path as given, or "name[subset]:split" for a hub dataset
    errors: list[str]  # messages of skipped rows, the first MAX_KEPT_ERRORS
    fmt: str  # the format used: the detected one when fmt was "auto"


def load_examples(
    path: str,
    kind: Literal["sft", "preference"],
    *,
    fmt: str = "auto",
    split: str = "train",
    subset: str | None = None,
    skip_invalid: bool = False,
    beavertails_preference: str = "helpful",
    max_rows: int | None = None,
    local: str | None = None,
) -> LoadResult:
    """Read ``path`` and convert every row; a bad row stops the load unless ``skip_invalid``.

    ``kind="preference"`` gives ``PreferenceExample`` rows for the pair formats and
    ``BinaryExample`` rows for unpaired data (format ``prompt_completion_label``); which one a
    preference method can train on is decided later (``formats.examples_for_method``).

    ``max_rows`` counts converted examples, and conversion stops once it is reached,
    so rows after that point are neither checked nor counted as skipped.

    ``path`` may name a dataset preset (``DATASET_PRESETS``: ``hh-rlhf:helpful-base``,
    ``beavertails:safer``, ...): its format and preference label are implied (the selector
    wins over ``beavertails_preference``), and its rows come from the hub, or from ``local``,
    a file in the same schema. For SFT a preset gives the chosen conversations.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    preset = dataset_preset(path)
    if preset is not None:
        fmt = preset.preset.fmt if fmt == "auto" else fmt
        beavertails_preference = preset.preference or beavertails_preference
    adapter = None if fmt == "auto" else get_adapter(kind, fmt, beavertails_preference)
    errors: list[str] = []  # invalid JSON lines, then invalid rows, when skipped
    bad = errors if skip_invalid else None
    if local is not None:
        local = str(Path(local).expanduser())
        rows, lines = _read(local, split, subset, bad)
        path = local  # errors name the file that holds the row
    elif preset is not None:
        rows, lines = _read_preset(preset, path, kind, split, subset), None
    else:
        rows, lines = _read(path, split, subset, bad)
    if not rows:
        raise DataError(f"{path}: no rows" + (f" ({len(errors)} invalid lines; first: {errors[0]})" if errors else ""))
    if adapter is None:
        try:
            fmt = detect_sft_format(rows[0]) if kind == "sft" else detect_preference_format(rows[0], rows[0])
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        adapter = get_adapter(kind, fmt, beavertails_preference)

    examples, skipped = [], len(errors)
    del errors[MAX_KEPT_ERRORS:]
    for i, row in enumerate(rows):
        if max_rows is not None and len(examples) >= max_rows:
            break
        try:
            examples.append(adapter(row))
        except RowError as e:
            where = f"row {i} (line {lines[i]})" if lines else f"row {i}"
            message = f"{path}: {where}: field {e.field!r}: {e.message}"
            if not skip_invalid:
                raise DataError(f"{message}; {SKIP_HINT}") from None
            skipped += 1
            if len(errors) < MAX_KEPT_ERRORS:
                errors.append(message)
    if not examples:
        raise DataError(f"{path}: none of the {skipped} rows is valid ({fmt} format); first error: {errors[0]}")

    source = path if Path(path).exists() else f"{path}{f'[{subset}]' if subset else ''}:{split}"
    return LoadResult(examples=examples, skipped=skipped, source=source, errors=errors, fmt=fmt)


def split_examples(examples: list, eval_size: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random ``eval_size`` share (at least one example on each side), keeping file order."""
    if len(examples) < 2:
        raise DataError(f"need at least 2 examples to split off an eval set, got {len(examples)}")
    if not 0 < eval_size < 1:
        raise ValueError(f"eval_size must be between 0 and 1, got {eval_size}")
    n_eval = min(max(round(len(examples) * eval_size), 1), len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    evaluation = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, evaluation


def hash_source(path: str) -> str | None:
    """sha256 of a local data file for provenance; None for hub datasets (their revision identifies them)."""
    local = Path(path).expanduser()  # data.*.local may start with ~, as load_examples reads it
    return sha256_file(local) if local.is_file() else None
