"""A merge applied to a model in memory: candidates are scored without writing a model folder.

:class:`LiveMerge` holds the base model, loaded once. :meth:`LiveMerge.apply` runs a plan's
:class:`~paft.merge.engine.MergeJob` (the same per-tensor kernel as ``paft merge``, so the weights equal
the folder's) and copies each merged tensor into the model's parameters; a tensor the previous plan
changed and this one does not is restored from the base file. On the default model a plan costs about as
much as its merge kernels (no shard writes, no reload), so a search scores many candidates per minute.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.merge.deltas import StateDir
from paft.merge.engine import default_workers, ordered_map
from paft.merge.mergekit_config import MergePlan
from paft.merge.standalone import PreparedMerge


class LiveMerge:
    """``model`` (loaded from ``base_dir``) merged in place by one plan after another."""

    def __init__(self, model: torch.nn.Module, base_dir: str | Path):
        self.model, self.base_dir = model, Path(base_dir).resolve()
        self._params = model.state_dict(keep_vars=False)  # tensors that share storage with the parameters
        self._changed: set[str] = set()
        self._base: StateDir | None = None
        self.plan: MergePlan | None = None  # the plan the model holds now; None: the base

    def _target(self, name: str) -> torch.Tensor:
        try:
            return self._params[name]
        except KeyError:
            raise PaftError(f"{name}: in {self.base_dir} but not a parameter of the live model (a model loaded "
                            "from another folder?)") from None

    def apply(self, plan: MergePlan, workers: int | None = None) -> torch.nn.Module:
        """The model with ``plan``'s merged weights; the plan's base must be the folder the model came from."""
        prep = PreparedMerge(plan)
        if prep.base_dir.resolve() != self.base_dir:
            raise PaftError(f"{plan.source}: merges onto {prep.base_dir}, but the live model is {self.base_dir}")
        job = prep.job()
        self._base = prep.base
        names = job.merged_names
        self.reset(keep=set(names))
        workers = default_workers() if workers is None else max(1, int(workers))
        cost = (lambda n: math.prod(job.base.shape(n)))
        with torch.no_grad():
            for name, tensor, _ in ordered_map(job.work, names, workers, cost=cost):
                target = self._target(name)
                if target.shape != tensor.shape:
                    raise PaftError(f"{name}: merged shape {tuple(tensor.shape)}, live model has "
                                    f"{tuple(target.shape)}")
                target.copy_(tensor)
                self._changed.add(name)
        self.plan = plan
        return self.model

    def reset(self, keep: set[str] = frozenset()) -> torch.nn.Module:
        """Restore the base weights of every tensor a plan changed (except ``keep``, about to be overwritten)."""
        with torch.no_grad():
            for name in sorted(self._changed - keep):
                self._target(name).copy_(self._base.get(name))
                self._changed.discard(name)
        if not keep:
            self.plan = None
        return self.model
