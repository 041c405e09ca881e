"""Branch adapters (LoRA, QLoRA, full fine-tuning) and the PAFT L1 penalty on the dense delta.

The penalty is lambda * sum_modules ||B A scale||_1, on the delta itself rather
than on the factors A and B: PAFT's claim is about the sparsity of the delta that
gets merged, and sparse factors do not make B A sparse (nor the reverse), so
penalising A and B would optimise a proxy. Forming B A costs 2*r*m*n flops per
module and step, a few percent of a training step at r=16.

Full fine-tuning has no factors: the delta is W - W_base, so the penalty needs the
starting weights, kept as a frozen copy of the model (``keep_frozen_copy``); the same
copy is the reference model of preference methods (there is no adapter to disable).
"""

from __future__ import annotations

import copy

import torch

from paft.config import LoraConfig, TrainConfig

_FROZEN = "paft_frozen_base"  # attribute holding the frozen copy, outside nn.Module's registry


def attach_adapter(model, tcfg: TrainConfig, seed: int):
    """Make ``model`` trainable as ``tcfg.adapter`` says: a LoRA adapter (``lora``; ``qlora`` on a model loaded
    in 4-bit, see ``paft.models.loading.load_model``), or every parameter (``full``)."""
    if tcfg.adapter == "full":
        return model.requires_grad_(True)
    if tcfg.adapter == "qlora":
        from peft import prepare_model_for_kbit_training

        # norms/embeddings to fp32 and frozen base, as QLoRA does; no gradient checkpointing: paft's
        # models are small and it costs a second forward (the Trainer's gradient_checkpointing can add it)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return attach_lora(model, tcfg.lora, seed)


def keep_frozen_copy(model):
    """Keep a frozen eval-mode copy of ``model``'s current weights on it (not as a submodule: the Trainer, the
    optimizer and ``save_pretrained`` never see it) and return the copy."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    model.__dict__[_FROZEN] = frozen
    return frozen


def frozen_copy(model):
    """(the model holding it, the copy ``keep_frozen_copy`` stored), looking through wrappers (DDP's
    ``module``); None without one."""
    while True:
        if _FROZEN in model.__dict__:
            return model, model.__dict__[_FROZEN]
        inner = model.__dict__.get("_modules", {}).get("module")
        if inner is None:
            return None
        model = inner


def attach_lora(model, cfg: LoraConfig, seed: int, *, task_type: str = "CAUSAL_LM",
                modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type=task_type, modules_to_save=modules_to_save,
                              bias="none")
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


def full_delta_l1(model, base) -> torch.Tensor:
    """sum over trainable floating parameters of ||W - W_base||_1 (differentiable), W_base from ``base``."""
    base_params = dict(base.named_parameters())
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point():
            total = total + (p.float() - base_params[name].float()).abs().sum()
    return total


def l1_delta_norm(model) -> torch.Tensor:
    """sum over LoRA layers of ||B A scale||_1, or of ||W - W_base||_1 under full fine-tuning (differentiable)."""
    held = frozen_copy(model)
    if held is not None:
        return full_delta_l1(*held)
    mods = lora_modules(model)
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    with torch.autocast(device.type, enabled=False):  # B A in fp32 under bf16 training: small deltas keep their sign
        for m in mods:
            total = total + lora_delta(m).abs().sum()
    return total
