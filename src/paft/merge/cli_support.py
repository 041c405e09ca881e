"""The standalone modes of `paft merge` and `paft sparsity` (cli.py only dispatches to these).

Dispatch: a positional YAML with a top-level ``merge_method`` is a mergekit
config; ``--base``/``--models`` flags mean flag mode; anything else is a paft
run config acting on a run folder, as before. ``paft sparsity`` with ``--base``
measures the positional model/adapter folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from paft.errors import ConfigError

#: flags that only make sense for a standalone merge
STANDALONE_FLAGS = ("--base", "--models", "--method", "--density", "--weights", "--dtype", "--tokenizer-source",
                    "--seed", "--to-lora", "--resize-vocab", "--workers", "--param")


def merge_mode(config: Path | None, base: Path | None, models: list[str] | None) -> str:
    """``mergekit``, ``flags`` or ``run``."""
    from paft.merge.mergekit_config import is_mergekit_yaml

    if config is not None and is_mergekit_yaml(config):
        if base is not None or models:
            raise ConfigError(f"{config}: a mergekit config names its models; drop --base/--models "
                              "(or drop the config and use the flags alone)")
        return "mergekit"
    if base is not None or models:
        if config is not None:
            raise ConfigError(f"{config}: not a mergekit config (no top-level merge_method); with --base/--models "
                              "give no config file")
        return "flags"
    return "run"


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in _split([text])]
    except ValueError:
        raise ConfigError(f"{flag}: expected numbers separated by commas, got {text!r}") from None


def _params(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param: expected key=value (e.g. normalize=false, lambda=0.9), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    from paft.merge.mergekit_config import GLOBAL_PARAMS

    for key in out:
        if key not in GLOBAL_PARAMS:
            raise ConfigError(f"--param {key}: unknown; known: {', '.join(GLOBAL_PARAMS)}")
    return out


def standalone_merge(mode: str, config: Path | None, *, out: Path | None, force: bool, base: Path | None,
                     models: list[str] | None, method: str | None, density: str | None, weights: str | None,
                     dtype: str | None, tokenizer_source: str | None, seed: int | None, to_lora: int | None,
                     resize_vocab: bool, workers: int | None, params: list[str] | None) -> dict:
    from paft.merge.mergekit_config import load_mergekit_yaml
    from paft.merge.mergekit_config import plan_from_flags
    from paft.merge.standalone import run_merge
    from paft.progress import console

    if out is None:
        raise ConfigError("--out: give the output folder of the merged model")
    if mode == "mergekit":
        for flag, value in (("--method", method), ("--density", density), ("--weights", weights),
                            ("--param", params)):
            if value:
                raise ConfigError(f"{flag}: set it in {config} (a mergekit config is the whole recipe)")
        plan = load_mergekit_yaml(config)
        if dtype is not None:
            plan.out_dtype = dtype
        if tokenizer_source is not None:
            plan.tokenizer_source = tokenizer_source
        if seed is not None:
            plan.seed = seed
        plan.resize_vocab = plan.resize_vocab or resize_vocab
    else:
        if base is None:
            raise ConfigError("--base: give the base model folder the models were fine-tuned from")
        plan = plan_from_flags(str(base), _split(models), method or "ties", weights=_floats(weights, "--weights"),
                               density=_floats(density, "--density"), params=_params(params), dtype=dtype,
                               tokenizer_source=tokenizer_source, seed=seed or 0, resize_vocab=resize_vocab)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("to-lora" if to_lora else "merge", total=None)
        summary = run_merge(plan, out, force=force, to_lora=to_lora, workers=workers,
                            progress=lambda d, t: bar.update(task, completed=d, total=t))
    return summary


def print_merge_summary(summary: dict) -> None:
    from paft.progress import console

    lines = [f"merged {summary['tensors_merged']}/{summary['tensors_total']} tensors of "
             f"{len(summary['models'])} input(s) with {summary['method']} in {summary['seconds']:.1f} s "
             f"({summary['workers']} workers) -> {summary['out_dir']}"]
    if "to_lora" in summary:
        r = summary["to_lora"]
        lines.append(f"LoRA rank {r['rank']} on {r['modules']} modules: relative reconstruction error "
                     f"{r['relative_error']:.4g} (||D - BA||_F / ||D||_F; per tensor in paft_lora.json)")
        if r["dropped_non_matrix"]:
            lines.append(f"left out (not matrices): {', '.join(r['dropped_non_matrix'])}")
    for line in lines:
        console.print(line, highlight=False)


def standalone_sparsity(inputs: list[Path], base: Path, out: Path | None, force: bool, absolute: str | None,
                        relative: str | None, workers: int | None) -> dict:
    from paft.sparsity import ABSOLUTE, RELATIVE, compare_sparsity

    if not inputs:
        raise ConfigError("give one or more model or adapter folders to measure against --base")
    abs_t = _floats(absolute, "--abs") or list(ABSOLUTE)
    rel_t = _floats(relative, "--rel") or list(RELATIVE)
    return compare_sparsity(inputs, base, out, absolute=abs_t, relative=rel_t, workers=workers, force=force)


def print_sparsity_table(results: dict, out: Path | None) -> None:
    """Rows: overall, module types, layers; one column per input; each cell the shares at every threshold."""
    from rich.table import Table

    from paft.progress import console

    first = next(iter(results.values()))
    keys = [k for k in first["overall"] if "<=" in k]
    table = Table(title=f"share of delta entries with |δ| at or under: {' / '.join(keys)}")
    table.add_column("group")
    for name, res in results.items():
        table.add_column(f"{name} ({res['kind']})", justify="right")
    rows = [("overall", lambda r: r["overall"])]
    types = sorted({t for r in results.values() for t in r["by_type"]})
    rows += [(t, lambda r, t=t: r["by_type"].get(t)) for t in types]
    layers = list(dict.fromkeys(k for r in results.values() for k in r["by_layer"]))
    rows += [(f"layer {k}" if k != "other" else "outside layers", lambda r, k=k: r["by_layer"].get(k))
             for k in layers]
    for label, get in rows:
        cells = []
        for res in results.values():
            s = get(res)
            cells.append("-" if s is None else " / ".join(f"{s[k]:.3f}" for k in keys))
        table.add_row(label, *cells)
    console.print(table)
    if out is not None:
        console.print(f"wrote {out / 'sparsity.json'} and {out / 'sparsity.png'}", highlight=False)
