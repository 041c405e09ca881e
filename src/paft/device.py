"""Where a run computes, and in which precision: the ground-layer helpers that models, train and eval share."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from paft.errors import ConfigError


def resolve_device(setting: str) -> str:
    """``run.device``: ``auto`` is the GPU when there is one, else the CPU; anything else as given, once this
    machine is seen to have it (checked here, not in the config: a sweep cell picks its GPUs before torch loads)."""
    if setting == "cpu":
        return setting
    import torch  # lazy: a sweep cell sets its threads and CUDA_VISIBLE_DEVICES before torch loads

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        index = int(setting.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device {setting!r}: no CUDA device is available here (torch.cuda.is_available() "
                              "is False); set run.device: auto or cpu (--set run.device=auto)")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"run.device {setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0; set run.device: auto, cuda or cuda:N below that")
    elif setting == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("run.device 'mps': no Apple GPU is available here; set run.device: auto or cpu")
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


def autocast(device: str, bf16: bool):
    """The bf16 autocast a branch's training step computes in (accelerate's, under the Trainer), for the work
    done outside the Trainer on the same model (reference snapshots), so both see the same numbers."""
    import torch  # lazy: this module is imported by the CLI before torch is needed

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for the block, restored after (None: unchanged)."""
    if n is None:
        yield
        return
    import torch  # lazy: as in resolve_device

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
