"""Refactor a merged delta into a PEFT LoRA adapter by truncated SVD, with the error it costs.

For each merged 2-D tensor ``D = U S V^T`` (float32), rank ``r`` keeps
``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T`` with ``lora_alpha = r`` (scale 1),
so ``B A`` is the best rank-``r`` approximation (Eckart–Young) and the error is
exactly the tail energy: ``||D - B A||_F^2 = sum_{i > r} s_i^2``. Tensors with
fewer than ``r`` singular values keep all of them (``rank_pattern``), i.e. are
exact. Merged tensors that are not matrices (norms, biases) cannot be LoRA
factors: they are left out, and their energy is counted in the error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from paft.errors import PaftError
from paft.models.folders import ADAPTER_CONFIG, ADAPTER_WEIGHTS

_EMBED = re.compile(r"(embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$")
_PREFIX = "base_model.model."


def svd_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float, int]:
    """``(B, A, tail energy, total energy, rank used)`` for a 2-D ``delta``; ``B @ A`` approximates it."""
    d = delta.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(int(rank), s.numel())
    sq = s.double().pow(2)
    tail, total = float(sq[r:].sum()), float(sq.sum())
    root = s[:r].sqrt()
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous(), tail, total, r


def write_lora(job: Any, folder: Path, rank: int, base_dir: Path, *, workers: int,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the adapter of ``job``'s merged delta into ``folder``; returns the reconstruction report.

    ``relative_error`` is ``||D - B A||_F / ||D||_F`` over all merged tensors (the
    left-out non-matrix deltas count fully as error); ``per_tensor`` gives each one's.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PaftError(f"--to-lora: rank must be a positive integer, got {rank!r}")

    def factor(name: str) -> tuple[str, Any]:
        _, _, mixed = job.work(name, keep_delta=True)
        if mixed is None:
            return name, None
        if mixed.dim() != 2:
            return name, ("dropped", float(mixed.double().pow(2).sum()))
        b, a, tail, total, r = svd_factor(mixed, rank)
        return name, ("lora", b, a, tail, total, r)

    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, per_tensor, dropped = [], {}, {}, {}
    tail_sum = total_sum = 0.0
    n = len(job.names)
    for done, (name, res) in enumerate(job.run(factor, workers=workers), start=1):
        if progress is not None:
            progress(done, n)
        if res is None:
            continue
        if res[0] == "dropped":
            if res[1] > 0:
                dropped[name] = res[1]
                tail_sum += res[1]
                total_sum += res[1]
            continue
        _, b, a, tail, total, r = res
        tail_sum += tail
        total_sum += total
        if total == 0.0:
            continue
        module = name.removesuffix(".weight")
        per_tensor[name] = {"rank": r, "relative_error": math.sqrt(tail / total)}
        if _EMBED.search(name):  # PEFT Embedding LoRA: delta = (B A)^T with A (r, vocab), B (dim, r)
            tensors[f"{_PREFIX}{module}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{_PREFIX}{module}.lora_embedding_B"] = a.T.contiguous()
        else:
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = b
        targets.append(module)
        if r != rank:
            rank_pattern[re.escape(module)] = r
    if not tensors:
        raise PaftError("--to-lora: the merged delta has no non-zero matrix to factor")
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
              "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(targets), "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
              "init_lora_weights": True}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    report = {"rank": rank, "relative_error": math.sqrt(tail_sum / total_sum) if total_sum else 0.0,
              "tail_energy": tail_sum, "total_energy": total_sum, "modules": len(targets),
              "dropped_non_matrix": {k: v / total_sum for k, v in dropped.items()}, "per_tensor": per_tensor}
    (folder / "paft_lora.json").write_text(json.dumps(report, indent=2) + "\n")
    return {k: v for k, v in report.items() if k != "per_tensor"}
