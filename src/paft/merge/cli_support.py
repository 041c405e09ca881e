"""The standalone mode of `paft merge` (cli.py only dispatches to it).

Dispatch: a positional YAML with a top-level ``merge_method`` is a mergekit
config; ``--base``/``--models`` flags mean flag mode; anything else is a paft
run config acting on a run folder, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from paft.errors import ConfigError
from paft.io import locked_output
from paft.merge.mergekit_config import GLOBAL_PARAMS, is_mergekit_yaml, load_mergekit_yaml, plan_from_flags
from paft.merge.standalone import run_merge
from paft.progress import console


def merge_mode(config: Path | None, base: Path | None, models: list[str] | None) -> str:
    """``mergekit``, ``flags`` or ``run``."""
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


def parse_floats(text: str | None, flag: str) -> list[float] | None:
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
    for key in out:
        if key not in GLOBAL_PARAMS:
            raise ConfigError(f"--param {key}: unknown; known: {', '.join(GLOBAL_PARAMS)}")
    return out


def standalone_merge(mode: str, config: Path | None, *, out: Path | None, force: bool, base: Path | None,
                     models: list[str] | None, method: str | None, density: str | None, weights: str | None,
                     dtype: str | None, tokenizer_source: str | None, seed: int | None, to_lora: int | None,
                     resize_vocab: bool, workers: int | None, params: list[str] | None,
                     allow_base_mismatch: bool = False) -> dict:
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
        plan.allow_base_mismatch = plan.allow_base_mismatch or allow_base_mismatch
    else:
        if base is None:
            raise ConfigError("--base: give the base model folder the models were fine-tuned from")
        plan = plan_from_flags(str(base), _split(models), method or "ties",
                               weights=parse_floats(weights, "--weights"), density=parse_floats(density, "--density"),
                               params=_params(params), dtype=dtype, tokenizer_source=tokenizer_source, seed=seed or 0,
                               resize_vocab=resize_vocab, allow_base_mismatch=allow_base_mismatch)
    # one paft process writes a folder at a time, as with `paft run` (RUN/.paft.lock)
    with locked_output(out), Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("to-lora" if to_lora else "merge", total=None)
        return run_merge(plan, out, force=force, to_lora=to_lora, workers=workers,
                         progress=lambda d, t: bar.update(task, completed=d, total=t))


def print_merge_summary(summary: dict) -> None:
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
