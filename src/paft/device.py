"""Where a run computes, and in which precision: the ground-layer helpers that models, train and eval share."""

from __future__ import annotations

from pathlib import Path


def resolve_device(setting: str) -> str:
    """``run.device``: ``auto`` is the GPU when there is one, else the CPU; anything else as given."""
    if setting == "auto":
        import torch  # lazy: a sweep cell sets its threads and CUDA_VISIBLE_DEVICES before torch loads

        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_bf16(setting, device: str) -> bool:
    """bf16 autocast where the hardware supports it (CPU: AVX512-BF16/AMX; CUDA: Ampere+)."""
    if setting is not True and setting is not False:
        if device.startswith("cuda"):
            import torch  # lazy: as in resolve_device

            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return cpu_has_bf16()
    return bool(setting)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU; without them torch emulates bf16 at a small fraction of fp32's speed."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
