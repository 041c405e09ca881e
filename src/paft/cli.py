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

from paft.errors import PaftError
from paft.progress import ProgressUI, console, quiet_libraries

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
    from paft.config import load_config

    overrides = list(sets or [])
    if out is not None:
        overrides.append(f"run.output_dir={out}")
    if force:
        overrides.append("run.force=true")
    return load_config(config, overrides, preset)


def _run(config, sets, preset, out, force, *, prepare: bool = True):
    """Build the Run for one step, with progress bars, its folder created or reopened."""
    quiet_libraries()
    from paft.pipeline import Run

    run = Run(_config(config, sets, preset, out, force), ProgressUI(enabled=True))
    if prepare:
        run.prepare()
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
            force: ForceOpt = False):
    """The whole PAFT pipeline: branches in parallel, sequential baseline, sparsity, merge, eval, report."""
    start = time.perf_counter()
    run, ui = _run(config, set_, preset, out, force, prepare=False)  # all() prepares
    with ui:
        report = run.all()
    _print_summary(run)
    console.print(f"report: [bold]{report}[/]  ({time.perf_counter() - start:.0f} s)", highlight=False)


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


@app.command("sparsity")
@_guard
def sparsity_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
                 force: ForceOpt = False):
    """Share of near-zero entries of each trained branch's delta B·A·scale, into RUN/sparsity.json."""
    run, ui = _run(config, set_, preset, out, force)
    with ui:
        res = run.sparsity()
    for name, s in res.items():
        o = s["overall"]
        console.print(f"{name:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in o.items() if "<=" in k), highlight=False)


@app.command("merge")
@_guard
def merge_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
              force: ForceOpt = False):
    """Merge the SFT and preference deltas into the base (merge.method) as an HF folder RUN/merged."""
    run, ui = _run(config, set_, preset, out, force)
    with ui:
        summary = run.merge()
    console.print_json(json.dumps(summary))


@app.command("eval")
@_guard
def eval_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None,
             force: ForceOpt = False):
    """Evaluate every model the run folder has (base, sft, preference, sequential, paft) and write the report."""
    run, ui = _run(config, set_, preset, out, force)
    with ui:
        run.evaluate()
    run.report()
    _print_summary(run)


@app.command("report")
@_guard
def report_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None):
    """Re-render report.md / report.json / plots from a run folder's saved results."""
    run, _ = _run(config, set_, preset, out, False)
    console.print(f"report: {run.report()}", highlight=False)


@app.command("methods")
@_guard
def methods_cmd(as_json: Annotated[bool, typer.Option("--json", help="machine-readable list")] = False):
    """List the preference methods (preference.method): data kind, reference use, paper, defaults."""
    from paft.train.losses import LOSSES

    rows = [{"name": s.name, "data": s.data, "reference": s.reference, "paper": s.paper, "defaults": s.defaults,
             "paper_beta": s.paper_beta}
            for s in sorted(LOSSES.values(), key=lambda s: s.name)]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title="preference methods")
    for col in ("name", "data", "reference", "defaults", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["data"], "yes" if r["reference"] else "no",
                      ", ".join(f"{k}={v}" for k, v in r["defaults"].items()), r["paper"])
    console.print(table)


@app.command("config")
@_guard
def config_cmd(config: ConfigArg = None, set_: SetOpt = None, preset: PresetOpt = None, out: OutOpt = None):
    """Print the resolved config (preset <- file <- --set) as YAML."""
    sys.stdout.write(_config(config, set_, preset, out, False).to_yaml())


def _print_summary(run) -> None:
    from rich.table import Table

    from paft.report.render import LABELS, METRICS, MODELS, _fmt

    path = run.root / "eval.json"
    if not path.exists():
        return
    evals = json.loads(path.read_text())["models"]
    table = Table(title="held-out metrics")
    table.add_column("model")
    for _, header, up in METRICS:
        table.add_column(header + (" ↑" if up else " ↓"), justify="right")
    for m in MODELS:
        if m in evals:
            table.add_row(LABELS[m], *[_fmt(evals[m].get(k)) for k, _, _ in METRICS])
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
