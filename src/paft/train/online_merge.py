"""Online merging optimizers (Lu et al. 2024, Online Merging Optimizers for Boosting Rewards and Mitigating Tax
in Alignment, arXiv 2405.17931): preference training from the SFT model whose every optimizer step is merged
with the SFT delta ``tau = theta_sft - theta_0``.

With ``delta_t`` the update the optimizer (the Trainer's AdamW, weight decay included) made at step t,
``alpha`` = ``candidates.trained.online_tau_weight`` and ``p`` = ``candidates.trained.online_density``:

- OnDARE: ``theta_t = theta_{t-1} + alpha tau + (1 - alpha) (m_t * delta_t) / p``, ``m_t ~ Bernoulli(p)`` drawn
  afresh each step (DARE on the update: kept entries rescaled by ``1/p``, so its expectation is ``delta_t``).
- OnTIES: ``theta_t = theta_{t-1} + alpha [tau']_s + (1 - alpha) [trim_p(delta_t)]_s``, where ``tau' =
  trim_p(tau)`` (trimmed once, at the start), ``trim_p`` keeps the ``ceil(p n)`` entries of largest magnitude,
  ``s = sign(tau' + trim_p(delta_t))`` is the elected sign (0 counts as +) and ``[x]_s`` keeps the entries of
  ``x`` whose sign is ``s`` (the disjoint merge: an entry where the step disagrees with the SFT direction keeps
  only the SFT term).

This follows the authors' ODAdamW / OTAdamW (github.com/QwenLM/online_merging_optimizers) applied to the update
of any optimizer, with two differences stated here: their OnDARE also drops entries of ``tau`` once at the
start (paft adds the whole SFT delta), and their optional L1 rescale of the kept update is not offered. The
authors' runs used ``p = 0.01`` and ``alpha = 1e-7`` at learning rate 1e-6 on full fine-tuning.

Parameters: with ``adapter: full`` they are the model's weights and ``theta_0`` the base, so ``tau = W_sft -
W_0``. With LoRA the branch continues training the SFT adapter itself (its A and B are the parameters), and the
base is the point ``(A, B) = (0, 0)`` (any ``B = 0`` gives the base model), so ``tau`` is the SFT adapter's own
A and B. The reference of the preference loss is the SFT model (a frozen merged copy), as in the sequential
baseline.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from paft.errors import ConfigError
from paft.models import load_model
from paft.models.folders import is_adapter


def dare_update(delta: torch.Tensor, tau: torch.Tensor, keep: float, alpha: float,
                generator: torch.Generator) -> torch.Tensor:
    """OnDARE: ``alpha tau + (1 - alpha) m * delta / keep``, ``m ~ Bernoulli(keep)`` from ``generator`` (CPU:
    ``torch.rand(delta.shape) < keep``, so a seed gives the same mask on every device)."""
    mask = (torch.rand(delta.shape, generator=generator) < keep).to(delta.device)
    return alpha * tau + (1 - alpha) * torch.where(mask, delta / keep, torch.zeros_like(delta))


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``ceil(density n)`` largest-magnitude entries set to 0 (TIES' trim)."""
    if density >= 1:
        return t
    k = max(1, math.ceil(density * t.numel()))
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[t.reshape(-1).abs().topk(k).indices] = True
    return torch.where(keep.reshape(t.shape), t, torch.zeros_like(t))


def ties_update(delta: torch.Tensor, tau_trimmed: torch.Tensor, density: float, alpha: float) -> torch.Tensor:
    """OnTIES: trim the step, elect the sign of ``tau' + trim(delta)``, keep the entries of each that agree with
    it and weight them ``alpha`` and ``1 - alpha``."""
    d = trim(delta, density)
    sign = torch.where(tau_trimmed + d >= 0, 1.0, -1.0).to(d.dtype)
    agree = lambda x: torch.where(torch.sign(x) == sign, x, torch.zeros_like(x))  # noqa: E731
    return alpha * agree(tau_trimmed) + (1 - alpha) * agree(d)


class OnlineMerge(TrainerCallback):
    """Replaces each optimizer step's update ``delta_t`` of the named parameters by its online merge with ``tau``.

    The parameters are copied just before ``optimizer.step()`` (``on_pre_optimizer_step``); after it, ``delta_t``
    is their change and the merged update is written back. Works with any optimizer the Trainer builds. The DARE
    mask of step t is seeded by ``(seed, t)``, so a resumed run draws the same masks.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], tau: dict[str, torch.Tensor], kind: str,
                 density: float, alpha: float, seed: int = 0):
        if kind not in ("dare", "ties"):
            raise ValueError(f"online merge {kind!r}: dare or ties")
        self.params, self.kind, self.density, self.alpha, self.seed = params, kind, density, alpha, seed
        # OnTIES trims the SFT delta once (its entries' signs then vote at every step)
        self.tau = {n: (trim(t, density) if kind == "ties" else t) for n, t in tau.items()}
        self._before: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._before = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kw):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + state.global_step)
        for n, p in self.params.items():
            before = self._before[n]
            delta = p.detach().float() - before.float()
            tau = self.tau[n].to(delta.device, delta.dtype)
            if self.kind == "dare":
                update = dare_update(delta, tau, self.density, self.alpha, g)
            else:
                update = ties_update(delta, tau, self.density, self.alpha)
            p.copy_((before.float() + update).to(p.dtype))
        self._before = {}


def online_start(adapter: str, model_dir: Path, init: Path, load_start: Callable[[], torch.nn.Module], *,
                 dtype: str, device: str, trust_remote_code: bool, seed_name: str):
    """(trainable model, frozen reference = the SFT model, tau by parameter name) of an online-merge branch.

    ``adapter`` is the branch's adapter kind; ``init`` the SFT branch's output; ``load_start()`` loads the SFT
    model (the base with the SFT adapter merged, or the SFT model folder) as the pipeline's sequential branch
    starts from it."""
    from peft import PeftModel

    if adapter == "qlora":
        raise ConfigError(f"candidates.trained.names: {seed_name} needs preference.adapter lora or full (the "
                          "4-bit base has no float weights for the per-step merge); got qlora")
    if adapter == "full":
        model = load_start().requires_grad_(True)
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        base = dict(load_model(model_dir, dtype, "cpu", trust_remote_code).named_parameters())
        tau = {n: (p.detach().float().cpu() - base[n].detach().float()) for n, p in model.named_parameters()}
        return model, frozen, tau
    if not is_adapter(init):
        raise ConfigError(f"candidates.trained.names: {seed_name} with preference.adapter lora continues the SFT "
                          f"adapter, but the SFT branch wrote a full model ({init}); set preference.adapter full")
    base = load_model(model_dir, dtype, device, trust_remote_code)
    model = PeftModel.from_pretrained(base, str(init), is_trainable=True)
    frozen = copy.deepcopy(model).merge_and_unload().eval().requires_grad_(False)
    # the base is (A, B) = (0, 0): tau is the SFT adapter's own parameters
    tau = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, frozen, tau


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
