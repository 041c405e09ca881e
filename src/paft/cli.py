"""`paft` command line: one subcommand per pipeline step, all reading the same config.

Every flag maps to a config key: ``--out`` is ``run.output_dir``, ``--force`` is
``run.force``, and ``--set key=value`` (dotted, repeatable) reaches any key.
"""

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from paft.config import load_config, read_run_config
from paft.errors import PaftError
from paft.progress import ProgressUI, console, quiet_libraries

# the commands import the pipeline, sweep, merge, eval and report modules when they run: those load torch and
# transformers, which `paft --help` and a config error need not wait for

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="PAFT: parallel SFT + preference training, sparse deltas, merging; and the sequential baseline.")

ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML config (sections model, data, sft, preference, "
                                                         "merge, eval, run); default: the embedded default")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a config key: section.key=value")]
PresetOpt = Annotated[Optional[str], typer.Option(help="base preset under the config: default, tiny")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (run.output_dir)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="redo what a changed config affects; a changed training "
                                                        "config overwrites the run folder (run.force)")]


def _config(config, sets, preset, out, force):
    overrides = list(sets or [])
    if out is not None:
        overrides.append(f"run.output_dir={out}")
    if force:
        overrides.append("run.force=true")
    return load_config(config, overrides, preset)


def _run(config, sets, preset, out, force, *, prepare: bool = True, check_device: bool = True):
    """Build the Run for one step, with progress bars, its folder created or reopened. ``check_device``: False for
    the steps that load no model onto it (merge, sparsity, report), which then run on any machine."""
    quiet_libraries()
    from paft.pipeline import Run

    cfg = _config(config, sets, preset, out, force)
    run = Run(cfg, ProgressUI(enabled=True, log_every_s=cfg.run.log_every_s))
    if prepare:
        run.prepare(check_device=check_device)
    return run, run.ui


def _guard(fn):
    """Run a command body: PaftError -> one red line, exit 1; Ctrl-C -> exit 130 with the resume hint."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PaftError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; run the same command again to resume from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper


@app.command("run")
@_guard
def run_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
            force: ForceOpt = False,
            seeds: Annotated[Optional[int], typer.Option(
                "--seeds", help="repeat the run under N training seeds; mean ± std per model (run.seeds)")] = None):
    """The whole PAFT pipeline: branches in parallel, sequential baseline, sparsity, merge, eval, candidates,
    report."""
    start = time.perf_counter()
    sets = [*(set_ or []), *([f"run.seeds={seeds}"] if seeds is not None else [])]
    run, ui = _run(config, sets, preset, out, force, prepare=False)  # all() prepares
    if run.cfg.run.seeds > 1:
        report = _run_seeds(run.cfg, ui)
        console.print(f"report: [bold]{report}[/], {report.with_suffix('.html')}  "
                      f"({time.perf_counter() - start:.0f} s)", highlight=False)
        return
    with ui:
        report = run.all()
    _print_summary(run)
    console.print(f"report: [bold]{report}[/], {report.with_suffix('.html')}  ({time.perf_counter() - start:.0f} s)",
                  highlight=False)


@app.command("sft")
@_guard
def sft_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
            force: ForceOpt = False):
    """Train only the SFT branch (LoRA + L1 on the delta) into RUN/sft/adapter."""
    _train_one_branch("sft", config, set_, preset, out, force)


@app.command("align")
@_guard
def align_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
              force: ForceOpt = False):
    """Train only the preference branch (preference.method) into RUN/preference/adapter."""
    _train_one_branch("preference", config, set_, preset, out, force)


def _train_one_branch(name, config, sets, preset, out, force):
    run, ui = _run(config, sets, preset, out, force)
    with ui:
        summary = run.train([name])
    console.print_json(json.dumps(summary[name]))


@app.command("reward")
@_guard
def reward_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
               force: ForceOpt = False):
    """Train a Bradley-Terry reward model (score head + LoRA, `reward` section) into RUN/reward/adapter."""
    run, ui = _run(config, set_, preset, out, force)
    with ui:
        summary = run.reward()
    console.print_json(json.dumps(summary))
    acc = summary.get("eval_accuracy")
    if acc is not None:
        console.print(f"held-out pairwise accuracy {acc:.3f} on {summary['eval_pairs']} pairs "
                      f"(mean margin {summary['eval_mean_margin']:.3f})", highlight=False)


@app.command("sparsity")
@_guard
def sparsity_cmd(
    inputs: Annotated[Optional[list[Path]], typer.Argument(
        help="a paft run config (YAML), or with --base: model / LoRA adapter folders to compare")] = None,
    set_: SetOpt = None, preset: PresetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder; with --base: folder for "
                                                                    "sparsity.json and sparsity.png")] = None,
    force: ForceOpt = False,
    base: Annotated[Optional[Path], typer.Option("--base", help="base model folder: measure the inputs' deltas "
                                                                "against it (standalone mode)")] = None,
    abs_: Annotated[Optional[str], typer.Option("--abs", help="absolute thresholds, comma-separated")] = None,
    rel: Annotated[Optional[str], typer.Option("--rel", help="thresholds relative to the base weight's RMS")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="tensors in parallel (default: cores, "
                                                                     "at most 4)")] = None):
    """Share of near-zero delta entries: of a run's branches (RUN/sparsity.json), or of any models vs --base."""
    if base is not None:
        from paft.report.sparsity_plot import plot_sparsity
        from paft.sparsity import print_sparsity_table, standalone_sparsity

        if set_ or preset:
            raise PaftError("--set/--preset apply to a paft run config, not to `paft sparsity ... --base`")
        results = standalone_sparsity(list(inputs or []), base, out, force, abs_, rel, workers, plot=plot_sparsity)
        print_sparsity_table(results, out)
        return
    inputs = list(inputs or [])
    if len(inputs) > 1 or (inputs and inputs[0].is_dir()):
        raise PaftError(f"{inputs[0]}: model/adapter folders need --base BASE (the model they were tuned from)")
    if abs_ is not None or rel is not None or workers is not None:
        raise PaftError("--abs/--rel/--workers apply with --base; a run uses its config's sparsity section")
    config = inputs[0] if inputs else None
    run, ui = _run(config, set_, preset, out, force, check_device=False)
    with ui:
        res = run.sparsity()
    for name, s in res.items():
        o = s["overall"]
        console.print(f"{name:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in o.items() if "<=" in k), highlight=False)


@app.command("merge")
@_guard
def merge_cmd(
    config: Annotated[Optional[Path], typer.Argument(
        help="a mergekit YAML (has merge_method) or a paft run config; default: the embedded run config")] = None,
    set_: SetOpt = None, preset: PresetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder; for a mergekit YAML or "
                                                                    "--base/--models: the output folder")] = None,
    force: ForceOpt = False,
    base: Annotated[Optional[Path], typer.Option("--base", help="base model folder (flag mode)")] = None,
    models: Annotated[Optional[list[str]], typer.Option(
        "--models", "-m", help="model or LoRA adapter folders (repeat or comma-separate; BASE+ADAPTER works)")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="merge method (flag mode; default ties)")] = None,
    density: Annotated[Optional[str], typer.Option("--density", help="one value or one per model")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="one value or one per model")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="output dtype: bfloat16, float16, float32")] = None,
    tokenizer_source: Annotated[Optional[str], typer.Option(
        "--tokenizer-source", help="base (default) or a model folder to copy the tokenizer from")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="seed of DARE/DELLA masks")] = None,
    to_lora: Annotated[Optional[int], typer.Option(
        "--to-lora", metavar="RANK", help="write the merged delta as a rank-RANK LoRA adapter (SVD)")] = None,
    resize_vocab: Annotated[bool, typer.Option(
        "--resize-vocab", help="merge models whose vocabulary size differs: keep the base's rows")] = False,
    allow_base_mismatch: Annotated[bool, typer.Option(
        "--allow-base-mismatch", help="merge a LoRA adapter whose adapter_config.json names another base "
                                      "(shapes must still fit)")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="threads merging in parallel (default: "
                                                                     "cores, at most 4)")] = None,
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", help="method parameter key=value: normalize, lambda, t, rescale, majority_sign")] = None):
    """Merge: a run's SFT and preference deltas (RUN/merged), or your own checkpoints from a mergekit YAML / flags."""
    from paft.merge.cli_support import merge_mode

    mode = merge_mode(config, base, models)
    if mode != "run":
        from paft.merge.cli_support import print_merge_summary, standalone_merge

        if set_ or preset:
            raise PaftError("--set/--preset apply to a paft run config, not to a mergekit YAML or --base/--models")
        summary = standalone_merge(mode, config, out=out, force=force, base=base, models=models, method=method,
                                   density=density, weights=weights, dtype=dtype, tokenizer_source=tokenizer_source,
                                   seed=seed, to_lora=to_lora, resize_vocab=resize_vocab, workers=workers,
                                   params=param, allow_base_mismatch=allow_base_mismatch)
        print_merge_summary(summary)
        return
    given = [f for f, v in (("--method", method), ("--density", density), ("--weights", weights),
                            ("--dtype", dtype), ("--tokenizer-source", tokenizer_source), ("--seed", seed),
                            ("--to-lora", to_lora), ("--resize-vocab", resize_vocab), ("--workers", workers),
                            ("--allow-base-mismatch", allow_base_mismatch),
                            ("--param", param)) if v]
    if given:
        raise PaftError(f"{given[0]}: only with a mergekit YAML or --base/--models; for a run use "
                        "--set merge.KEY=VALUE")
    run, ui = _run(config, set_, preset, out, force, check_device=False)  # a merge of a GPU run works on a CPU
    with ui:
        summary = run.merge()
    console.print_json(json.dumps(summary))


@app.command("eval")
@_guard
def eval_cmd(
    inputs: Annotated[Optional[list[Path]], typer.Argument(
        help="a paft run config (YAML; default: the embedded one), or model / LoRA adapter folders to evaluate "
             "on their own")] = None,
    set_: SetOpt = None, preset: PresetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="run folder (run.output_dir); for model folders: where eval.json goes (runs/eval)")] = None,
    force: ForceOpt = False,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help="lm-eval tasks, comma-separated (eval.harness_tasks): NAME or NAME:SHOTS, paft_arith, "
                        "leaderboard-v1")] = None,
    limit: Annotated[Optional[float], typer.Option(
        "--limit", help="rows per harness task, or a share below 1 (eval.harness_limit)")] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="base model of LoRA adapter folders, evaluated too as 'base' (model.name)")] = None):
    """Evaluate a run's models (base, sft, preference, sequential, paft) and its training-free candidates
    (candidates section), and write the report; or model folders."""
    overrides = list(set_ or [])
    if tasks is not None:
        overrides.append(f"eval.harness_tasks={tasks}")
    if limit is not None:
        overrides.append(f"eval.harness_limit={limit}")
    inputs = list(inputs or [])
    if len(inputs) > 1 or (inputs and (inputs[0].is_dir() or
                                       (not inputs[0].exists() and inputs[0].suffix not in (".yaml", ".yml")))):
        _eval_folders(inputs, overrides, preset, out, force, base)
        return
    if base is not None:
        raise PaftError("--base: only with model folders (paft eval MODEL... --base BASE); a run's base is "
                        "model.name")
    run, ui = _run(inputs[0] if inputs else None, overrides, preset, out, force)
    with ui:
        run.evaluate()
        run.candidates()
    run.report()
    _print_summary(run)


def _eval_folders(inputs, overrides, preset, out, force, base) -> None:
    """`paft eval MODEL...`: model / adapter folders (paft.eval.standalone), eval.json in run.output_dir."""
    quiet_libraries()
    from paft.eval.standalone import DEFAULT_OUT, evaluate_folders, print_table

    if base is not None:
        overrides.append(f"model.name={base}")
    if out is None and not any(o.split("=", 1)[0].strip() == "run.output_dir" for o in overrides):
        out = DEFAULT_OUT  # never the default run's folder
    cfg = _config(None, overrides, preset, out, force)

    def progress(name, i, n):
        console.print(f"evaluating {name} ({i + 1}/{n})", highlight=False)

    path, res = evaluate_folders(inputs, cfg, base=base, force=cfg.run.force, progress=progress)
    print_table(res, console)
    console.print(f"eval: [bold]{path}[/]", highlight=False)


@app.command("tune")
@_guard
def tune_cmd(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a finished run folder")],
             trials: Annotated[Optional[int], typer.Option("--trials", help="candidates to score (tune.trials); "
                                                                            "more than before extends the study")] = None,
             set_: SetOpt = None,
             force: Annotated[bool, typer.Option("--force", help="redo the tune from scratch (RUN/tune only; a "
                                                                 "changed tune section needs it)")] = False):
    """Tune the merge on the run's dev split (Optuna, multi-objective), write the picked model to RUN/tune/model and
    its held-out metrics to RUN/tune/eval.json, and re-render the report (docs/tune.md)."""
    quiet_libraries()
    from paft.config import parse_override, set_dotted, validate_config
    from paft.pipeline import Run

    if not (run_dir / "config.yaml").is_file():
        raise PaftError(f"{run_dir}: not a paft run folder (no config.yaml); `paft run` makes one")
    data = read_run_config(run_dir)  # without run.force: the recorded run is tuned, never wiped
    overrides = [*(set_ or []), *([f"tune.trials={trials}"] if trials is not None else []),
                 f"run.output_dir={run_dir}"]  # the folder may have moved since the run
    for item in overrides:
        set_dotted(data, *parse_override(item))
    cfg = validate_config(data, f"{run_dir / 'config.yaml'} with --set/--trials")
    if cfg.tune.trials <= 0:
        raise PaftError(f"tune.trials: {run_dir} records 0 trials; pass --trials N")
    run = Run(cfg, ProgressUI(enabled=True, log_every_s=cfg.run.log_every_s))
    run.prepare(redo=("tune",) if force else ())
    with run.ui:
        res = run.tune()
    md = run.report()
    pick = res["pick"]
    console.print(f"picked trial {pick['trial']} of {pick['trials']} by {pick['rule']}: "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pick["params"].items()),
                  highlight=False, soft_wrap=True)
    if pick.get("note"):
        console.print(f"[yellow]{pick['note']}", highlight=False)
    test = res["models"]["paft_tuned"]
    console.print("held-out (test): " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()
                                                   if isinstance(v, float) and k != "eval_s"), highlight=False)
    console.print(f"model: [bold]{run.tune_dir / 'model'}[/]; trials: {run.tune_dir / 'trials.json'}; report: {md}",
                  highlight=False, soft_wrap=True)


@app.command("report")
@_guard
def report_cmd(target: Annotated[Optional[Path], typer.Argument(
                   metavar="[RUN_DIR|CONFIG]", help="a run folder (its config.yaml is used), or a YAML config "
                                                    "whose run.output_dir / --out names the folder")] = None,
               set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None):
    """Re-render report.md, report.html, report.json and the plots from a run folder's saved JSON (no model needed)."""
    if target is not None and target.is_dir():
        from paft.report import write_report

        if set_ or preset or out is not None:
            raise PaftError("--set/--preset/--out apply with a config file; a RUN_DIR's own config.yaml is used")
        if not (target / "config.yaml").is_file():
            raise PaftError(f"{target}: not a paft run folder (no config.yaml)")
        read_run_config(target)  # a damaged config.yaml: one line with the fix
        # the folder may have moved since the run: it is the output folder, whatever config.yaml says
        cfg = load_config(target / "config.yaml", [f"run.output_dir={target}"])
        md = write_report(target, cfg)
    else:
        run, _ = _run(target, set_, preset, out, False, check_device=False)  # a report loads no model
        md = run.report()
    console.print(f"report: {md}  ({md.with_suffix('.html')})", highlight=False, soft_wrap=True)


@app.command("methods")
@_guard
def methods_cmd(as_json: Annotated[bool, typer.Option("--json", help="machine-readable list")] = False):
    """List the preference methods (preference.method): data kind, reference use, paper, defaults."""
    from paft.methods.losses import LOSSES

    rows = [{"name": s.name, "data": s.data, "reference": s.reference, "paper": s.paper, "defaults": s.params,
             "paper_beta": s.paper_beta, "schedule": s.schedule.kind}
            for s in sorted(LOSSES.values(), key=lambda s: s.name)]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="preference methods")
    for col in ("name", "data", "schedule", "reference", "defaults", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["data"], r["schedule"], "yes" if r["reference"] else "no",
                      ", ".join(f"{k}={v}" for k, v in r["defaults"].items()), r["paper"])
    console.print(table)


@app.command("config")
@_guard
def config_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None):
    """Print the resolved config (preset <- file <- --set) as YAML."""
    sys.stdout.write(_config(config, set_, preset, out, False).to_yaml())


@app.command("sweep")
@_guard
def sweep_cmd(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML: base config + axes (a grid) or cells (a list)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="sweep folder (default sweeps/NAME)")] = None,
    set_: SetOpt = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="local or ray (sweep.backend)")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="local cells at once (sweep.workers)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells and their keys; run nothing")] = False):
    """Run a grid of paft runs (resumable: finished cells are skipped); results.csv/parquet and report.md."""
    quiet_libraries()
    from paft.sweep import load_sweep, run_sweep
    from paft.sweep.results import fmt

    s = load_sweep(sweep_file, set_)  # every cell's config is validated before the progress display starts
    if dry_run:
        table = Table(title=f"{len(s.cells)} cells")
        for col in ("cell", *s.columns):
            table.add_column(col)
        for c in s.cells:
            table.add_row(c.key, *[str(c.labels[k]) for k in s.columns])
        console.print(table)
        return
    ui = ProgressUI(enabled=True)
    with ui:
        res = run_sweep(s, out, backend=backend, workers=workers, ui=ui)
    df = res.table
    table = Table(title=f"sweep results ({len(res.ran)} ran, {len(res.skipped)} skipped)")
    axes = res.sweep.columns
    # the last part of a dotted key is header enough when it is unique (narrow terminals)
    short = {a: a.rsplit(".", 1)[-1] if [x.rsplit(".", 1)[-1] for x in axes].count(a.rsplit(".", 1)[-1]) == 1
             else a for a in axes}
    table.add_column("cell", no_wrap=True)
    for a in axes:
        table.add_column(short[a], overflow="fold")
    table.add_column("status")
    table.add_column("wall s", justify="right")
    for m in res.metrics:
        table.add_column(m, justify="right", overflow="fold")
    for _, row in df.iterrows():
        status = row["status"] if row["status"] == "ok" else f"[red]{row['status']}"
        wall = "–" if row["wall_s"] != row["wall_s"] else f"{row['wall_s']:.0f}"
        table.add_row(row["cell"], *[fmt(row[a]) for a in axes], status, wall, *[fmt(row[m]) for m in res.metrics])
    console.print(table)
    console.print(f"results: {res.out / 'results.csv'} (.parquet); report: {res.report} (.html)", highlight=False,
                  soft_wrap=True)
    if res.failed:
        first = res.failed[0]
        raise PaftError(f"{len(res.failed)} of {len(df)} cells failed (first: {first['key']}: {first['error']}); "
                        f"run the same command again to retry them")


def _run_seeds(cfg, ui) -> Path:
    """`paft run --seeds N`: the run as a sweep over run.seed; prints each model's mean ± std."""
    from paft.sweep import run_sweep
    from paft.sweep.seeds import model_summary, seed_sweep

    with ui:
        res = run_sweep(seed_sweep(cfg), cfg.run.output_dir, ui=ui)
    summary = model_summary(res.table)
    if summary:
        from paft.report.metrics import metric_info
        from paft.report.style import LABELS

        table = Table(title=f"held-out metrics, mean ± std over {len(summary['seeds'])} seeds")
        table.add_column("model")
        for m in summary["metrics"]:
            table.add_column(metric_info(m).label, justify="right")
        for model, row in summary["models"].items():
            table.add_row(LABELS.get(model, model), *[
                f"{row[m]['mean']:.3f} ± {row[m]['std'] or 0:.3f}" if row.get(m, {}).get("mean") is not None
                else "–" for m in summary["metrics"]])
        console.print(table)
    if res.failed:
        first = res.failed[0]
        raise PaftError(f"{len(res.failed)} of {len(res.records)} seeds failed (first: {first['key']}: "
                        f"{first['error']}); run the same command again to retry them")
    return res.report


def _print_summary(run) -> None:
    from paft.report.render import METRICS
    from paft.report.style import LABELS, MODELS, fmt

    path = run.root / "eval.json"
    if not path.exists():
        return
    evals = json.loads(path.read_text())["models"]
    table = Table(title="held-out metrics")
    table.add_column("model")
    # the fixed columns, then harness accuracies and the harmlessness rates when the run has them
    extra = sorted({k for v in evals.values() for k in v if k.startswith("harness/") and k.endswith("/acc")})
    extra += [k for k in ("refusal_rate", "over_refusal_rate") if any(k in v for v in evals.values())]
    columns = [(k, h, up) for k, h, up in METRICS] + [
        (k, k.split("/")[1] if k.startswith("harness/") else k.replace("_rate", "").replace("_", "-"),
         k != "over_refusal_rate") for k in extra]
    for _, header, up in columns:
        table.add_column(header + (" ↑" if up else " ↓"), justify="right")
    for m in MODELS:
        if m in evals:
            table.add_row(LABELS[m], *[fmt(evals[m].get(k)) for k, _, _ in columns])
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
