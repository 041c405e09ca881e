"""LoRA adapters (PEFT) and the PAFT L1 penalty on the dense delta.

The penalty is lambda * sum_modules ||B A scale||_1, on the delta itself rather
than on the factors A and B: PAFT's claim is about the sparsity of the delta that
gets merged, and sparse factors do not make B A sparse (nor the reverse), so
penalising A and B would optimise a proxy. Forming B A costs 2*r*m*n flops per
module and step, a few percent of a training step at r=16.
"""

from __future__ import annotations

import torch

from paft.config import LoraConfig


def attach_lora(model, cfg: LoraConfig, seed: int):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, peft_cfg)


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def lora_delta(module, adapter: str = "default") -> torch.Tensor:
    """Dense delta B A scale of one LoRA layer, in the layout of its base weight."""
    a = module.lora_A[adapter].weight
    b = module.lora_B[adapter].weight
    delta = (b.float() @ a.float()) * module.scaling[adapter]
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


def l1_delta_norm(model) -> torch.Tensor:
    """sum over LoRA layers of ||B A scale||_1 (differentiable)."""
    mods = lora_modules(model)
    total = torch.zeros((), device=next(model.parameters()).device)
    for m in mods:
        total = total + lora_delta(m).abs().sum()
    return total
