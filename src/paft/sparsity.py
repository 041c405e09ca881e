"""How sparse a weight delta is: per tensor, per module type and overall.

PAFT's claim is that an L1-sparsified SFT delta interferes less with the
preference delta when merged; these statistics measure that sparsity both in
absolute terms and relative to the scale (RMS) of the base weight it modifies.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from rich.table import Table

from paft.errors import ConfigError, PaftError
from paft.io import atomic_dir, check_output_dir, locked_output, write_json_atomic
from paft.merge.cli_support import parse_floats
from paft.merge.deltas import LoraDeltas, open_source, open_state
from paft.merge.engine import default_workers, ordered_map
from paft.merge.mergekit_config import layer_index
from paft.progress import console

ABSOLUTE = (1e-6, 1e-5, 1e-4)
RELATIVE = (1e-3, 1e-2)


def module_type(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj`` (the second-to-last component)."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def _tensor_stats(delta: torch.Tensor, rms: float | None, absolute: tuple[float, ...],
                  relative: tuple[float, ...]) -> dict:
    a = delta.detach().float().abs().flatten()
    n = a.numel()
    stats: dict = {"numel": n}
    for t in absolute:
        stats[f"abs<={t:g}"] = (a <= t).sum().item() / n
    if rms is not None:
        for r in relative:
            stats[f"rel<={r:g}"] = (a <= r * rms).sum().item() / n
    l1 = a.sum(dtype=torch.float64).item()
    stats.update(mean_abs=l1 / n, max_abs=a.max().item(), l1=l1)
    return stats


def _aggregate(rows: list[dict]) -> dict:
    """Combine per-tensor stats (all with the same keys): shares weighted by numel, max of maxima, sum of L1."""
    n = sum(r["numel"] for r in rows)
    out: dict = {"numel": n}
    for key in rows[0]:
        if key.startswith(("abs<=", "rel<=")):
            out[key] = sum(r[key] * r["numel"] for r in rows) / n
    l1 = sum(r["l1"] for r in rows)
    out.update(mean_abs=l1 / n, max_abs=max(r["max_abs"] for r in rows), l1=l1)
    return out


def delta_sparsity(deltas: Iterable[tuple[str, torch.Tensor]],
                   base_rms: Mapping[str, float] | Callable[[str], float] | None = None,
                   absolute: Iterable[float] = ABSOLUTE, relative: Iterable[float] = RELATIVE) -> dict:
    """Sparsity statistics of ``(name, delta)`` pairs, consumed one at a time.

    Per tensor: ``numel``; ``abs<=t``, the share of entries with ``|δ| <= t``;
    ``rel<=r``, the share with ``|δ| <= r * rms(W_base)`` (only with ``base_rms``);
    ``mean_abs``, ``max_abs`` and ``l1``. ``by_type``, ``overall`` and ``by_layer``
    aggregate these weighted by numel; ``histogram`` counts log10|δ| as in
    :func:`model_sparsity` (the run report plots it). Returns
    ``{"modules", "by_type", "overall", "by_layer", "histogram"}``.
    """
    absolute, relative = tuple(absolute), tuple(relative)

    def one(name: str, delta: torch.Tensor) -> tuple[str, dict, list[int], int] | None:
        if delta.numel() == 0:
            return None
        rms = None
        if base_rms is not None:
            try:
                rms = float(base_rms(name) if callable(base_rms) else base_rms[name])
            except KeyError:
                raise PaftError(f"no base RMS for {name}; cannot compute relative sparsity") from None
        return name, _tensor_stats(delta, rms, absolute, relative), *_histogram(delta)

    return _combine((one(name, delta) for name, delta in deltas), "no deltas to measure")


def _combine(per_tensor: Iterable[tuple[str, dict, list[int], int] | None], empty: str) -> dict:
    """Per-tensor ``(name, stats, histogram counts, zeros)`` (None: an empty tensor) -> ``modules``, their
    aggregates by module type, overall and by layer (``"other"`` last), and the summed ``histogram``."""
    modules: dict[str, dict] = {}
    hist, zeros = [0] * HIST_BINS, 0
    for res in per_tensor:
        if res is None:
            continue
        name, stats, counts, z = res
        modules[name] = stats
        hist, zeros = [a + b for a, b in zip(hist, counts)], zeros + z
    if not modules:
        raise PaftError(empty)
    groups: dict[str, list[dict]] = {}
    layers: dict[str, list[dict]] = {}
    for name, stats in modules.items():
        groups.setdefault(module_type(name), []).append(stats)
        i = layer_index(name)
        layers.setdefault("other" if i is None else str(i), []).append(stats)
    order = sorted((k for k in layers if k != "other"), key=int) + (["other"] if "other" in layers else [])
    lo, hi = HIST_RANGE
    return {"modules": modules,
            "by_type": {t: _aggregate(rows) for t, rows in sorted(groups.items())},
            "overall": _aggregate(list(modules.values())),
            "by_layer": {k: _aggregate(layers[k]) for k in order},
            "histogram": {"edges": [lo + i * (hi - lo) / HIST_BINS for i in range(HIST_BINS + 1)], "counts": hist,
                          "zeros": zeros}}


# --- standalone: `paft sparsity MODEL_OR_ADAPTER... --base BASE` ------------------------------------

HIST_RANGE = (-10.0, 1.0)  # log10 |delta|; smaller non-zero entries count in the first bin, larger in the last
HIST_BINS = 44


def _histogram(delta: torch.Tensor, bins: int = HIST_BINS, lo: float = HIST_RANGE[0],
               hi: float = HIST_RANGE[1]) -> tuple[list[int], int]:
    """Counts of log10|delta| over ``bins`` equal bins on [lo, hi] (clamped into the end bins), and the zeros."""
    a = delta.detach().float().abs().flatten()  # a new tensor: the in-place ops below leave delta alone
    zeros = int((a == 0).sum())
    width = (hi - lo) / bins
    # no masking of the zeros (a copy of the tensor, 4x slower): log10(0) = -inf lands in bin 0, taken out after
    idx = a.log10_().sub_(lo).div_(width).floor_().clamp_(0, bins - 1).long()
    counts = torch.bincount(idx, minlength=bins)
    counts[0] -= zeros
    return counts.tolist(), zeros


def model_sparsity(path: str | Path, base_dir: str | Path, absolute: Iterable[float] = ABSOLUTE,
                   relative: Iterable[float] = RELATIVE, workers: int | None = None) -> dict:
    """Sparsity of the delta of a LoRA adapter or a full checkpoint against ``base_dir``, streamed on a thread pool.

    Returns :func:`delta_sparsity`'s ``modules``/``by_type``/``overall`` plus
    ``by_layer`` (keys ``"0"``, ``"1"``, ... and ``"other"`` for tensors outside
    the layers), ``histogram`` (``edges`` of log10|δ|, ``counts`` per bin,
    ``zeros``) and ``kind`` (``lora`` or ``full``). Integer tensors are skipped.
    """
    path = Path(path)
    base = open_state(base_dir)
    src = open_source(path, base)
    is_lora = isinstance(src, LoraDeltas)
    names = [n for n in src.names() if base.dtype(n).is_floating_point] if not is_lora else src.names()
    absolute, relative = tuple(absolute), tuple(relative)

    def rms(name: str) -> float:
        return base.get(name).float().pow(2).mean().sqrt().item()

    def one(name: str) -> tuple[str, dict, list[int], int] | None:
        """Everything per tensor happens here, on the pool: delta, statistics, histogram."""
        delta = src.delta(name)
        if delta.numel() == 0:
            return None
        if not torch.isfinite(delta).all():
            raise PaftError(f"{path}: delta for {name} contains NaN or inf")
        return name, _tensor_stats(delta, rms(name), absolute, relative), *_histogram(delta)

    workers_ = default_workers() if workers is None else max(1, int(workers))
    per_tensor = ordered_map(one, names, workers_, cost=lambda n: math.prod(base.shape(n)))
    return {**_combine(per_tensor, f"{path}: no deltas to measure"), "kind": "lora" if is_lora else "full"}


def compare_sparsity(paths: list[str | Path], base_dir: str | Path, out_dir: str | Path | None = None, *,
                     absolute: Iterable[float] = ABSOLUTE, relative: Iterable[float] = RELATIVE,
                     workers: int | None = None, force: bool = False,
                     plot: Callable[[dict, Path], None] | None = None) -> dict:
    """:func:`model_sparsity` of several inputs against one base; with ``out_dir``, also
    ``sparsity.json`` and, given ``plot`` (the report layer's, passed down by the caller), ``sparsity.png``,
    written atomically.
    Inputs are keyed by folder name (made unique with a suffix)."""
    if out_dir is not None:
        check_output_dir(out_dir, force)  # before the measuring, not after
    results: dict[str, dict] = {}
    for p in paths:
        parts = Path(p).resolve().parts
        key, i = parts[-1], 2
        if key in results or key in ("adapter", "merged", "model"):  # generic names: add the parent folder
            key = "/".join(parts[-2:])
        while key in results:
            key, i = f"{'/'.join(parts[-2:])}-{i}", i + 1
        results[key] = {"path": str(p), **model_sparsity(p, base_dir, absolute, relative, workers)}
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_json_atomic(tmp / "sparsity.json", {"base": str(base_dir), "inputs": results})
            if plot is not None:
                plot(results, tmp / "sparsity.png")
    return results


def standalone_sparsity(inputs: list[Path], base: Path, out: Path | None, force: bool, absolute: str | None,
                        relative: str | None, workers: int | None,
                        plot: Callable[[dict, Path], None] | None = None) -> dict:
    if not inputs:
        raise ConfigError("give one or more model or adapter folders to measure against --base")
    abs_t = parse_floats(absolute, "--abs") or list(ABSOLUTE)
    rel_t = parse_floats(relative, "--rel") or list(RELATIVE)
    with locked_output(out) if out is not None else contextlib.nullcontext():  # one paft process per folder
        return compare_sparsity(inputs, base, out, absolute=abs_t, relative=rel_t, workers=workers, force=force,
                                plot=plot)


def print_sparsity_table(results: dict, out: Path | None) -> None:
    """Rows: overall, module types, layers; one column per input; each cell the shares at every threshold."""
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
