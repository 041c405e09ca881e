"""How sparse a weight delta is: per tensor, per module type and overall.

PAFT's claim is that an L1-sparsified SFT delta interferes less with the
preference delta when merged; these statistics measure that sparsity both in
absolute terms and relative to the scale (RMS) of the base weight it modifies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from paft.errors import PaftError
from paft.merge.deltas import LoraDeltas, open_state

ABSOLUTE = (1e-6, 1e-5, 1e-4)
RELATIVE = (1e-3, 1e-2)


def _abs_key(t: float) -> str:
    return f"abs<={t:g}"


def _rel_key(r: float) -> str:
    return f"rel<={r:g}"


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
        stats[_abs_key(t)] = (a <= t).sum().item() / n
    if rms is not None:
        for r in relative:
            stats[_rel_key(r)] = (a <= r * rms).sum().item() / n
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
    ``mean_abs``, ``max_abs`` and ``l1``. ``by_type`` and ``overall`` aggregate
    these weighted by numel. Returns ``{"modules", "by_type", "overall"}``.
    """
    absolute, relative = tuple(absolute), tuple(relative)
    modules: dict[str, dict] = {}
    for name, delta in deltas:
        if delta.numel() == 0:
            continue
        rms = None
        if base_rms is not None:
            try:
                rms = float(base_rms(name) if callable(base_rms) else base_rms[name])
            except KeyError:
                raise PaftError(f"no base RMS for {name}; cannot compute relative sparsity") from None
        modules[name] = _tensor_stats(delta, rms, absolute, relative)
    if not modules:
        raise PaftError("no deltas to measure")
    groups: dict[str, list[dict]] = {}
    for name, stats in modules.items():
        groups.setdefault(module_type(name), []).append(stats)
    return {"modules": modules,
            "by_type": {t: _aggregate(rows) for t, rows in sorted(groups.items())},
            "overall": _aggregate(list(modules.values()))}


def adapter_sparsity(adapter_dir: str | Path, base_dir: str | Path, absolute: Iterable[float] = ABSOLUTE,
                     relative: Iterable[float] = RELATIVE) -> dict:
    """:func:`delta_sparsity` of a LoRA adapter's dense deltas, relative to the base weights' RMS."""
    base = open_state(base_dir)

    def rms(name: str) -> float:
        if name not in base:
            raise KeyError(name)
        return base.get(name).float().pow(2).mean().sqrt().item()

    return delta_sparsity(LoraDeltas(adapter_dir, base), rms, absolute, relative)
