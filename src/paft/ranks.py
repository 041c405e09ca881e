"""Where this process stands in a branch's process group (``accelerate launch``): the few collectives paft needs.

A branch of one process has no group: every helper degrades to the single-process answer, so the code that
calls them reads the same either way. Before the Trainer has started the group, the launcher's environment
(``WORLD_SIZE``, ``RANK``) answers.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _group() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if _group() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes a branch's outputs and reports its progress."""
    return rank() == 0


def barrier() -> None:
    if _group() and dist.get_world_size() > 1:
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` alone)."""
    if not _group() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(value: float) -> float:
    """``value`` summed over the ranks."""
    return float(sum(gather(value)))
