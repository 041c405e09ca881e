"""Turn ``model.name`` into a local folder, then load model and tokenizer from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from paft.device import resolve_bf16
from paft.errors import ConfigError, ModelError
from paft.io import cache_root
from paft.models.folders import check_weights, is_model
from paft.models.smollm2 import ensure_smollm2
from paft.models.tiny import ensure_tiny

ALIASES = ("smollm2-135m", "tiny")


def resolve_model_dir(name: str, revision: str | None = None, progress=None) -> Path:
    """Alias -> cached folder; local folder -> itself; hub id -> snapshot (only when online)."""
    if name == "smollm2-135m":
        return ensure_smollm2(progress)
    if name == "tiny":
        return ensure_tiny(cache_root())
    path = Path(name).expanduser()
    if path.exists():
        if not is_model(path):
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"{name}: model folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, gated...
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelError(
            f"model {name!r}: not a local folder, not an alias ({', '.join(ALIASES)}), and the hub is unreachable "
            f"({reason}); download it when online (huggingface-cli download {name}) and pass the folder") from None


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        # unparsable JSON (transformers re-raises a bad config.json as an OSError): the files are damaged
        raise ModelError(f"{model_dir}: cannot load its tokenizer ({str(exc).splitlines()[0]}); the folder's "
                         "config.json or tokenizer files are damaged: copy or download it again") from None
    except ValueError as exc:  # intact files this setup cannot load: say which, not "damaged"
        raise ModelError(f"{model_dir}: cannot load its tokenizer ({str(exc).splitlines()[0]})"
                         f"{_tokenizer_fix(str(exc))}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelError(f"{model_dir}: tokenizer has no chat template; paft formats chat data with it")
    return tok


def _tokenizer_fix(message: str) -> str:
    """The fix for a transformers ValueError on an intact tokenizer folder (its message spans lines)."""
    if "trust_remote_code" in message:
        return ("; the folder ships its own tokenizer code, which runs only with model.trust_remote_code: true "
                "(--set model.trust_remote_code=true): set it if you trust that code")
    if any(m in message for m in ("not currently imported", "does not exist", "was not found")):
        return "; this transformers does not know that tokenizer class: pip install -U transformers"
    return ""


def require_bitsandbytes(key: str) -> None:
    """One line telling how to install bitsandbytes, before any model is loaded."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key} 'qlora' needs bitsandbytes: pip install 'paft[qlora]' (or pip install bitsandbytes)")


def nf4_compute_dtype(device: str = "cpu"):
    """bf16 where the hardware has it; else fp16 on a GPU (pre-Ampere, as the QLoRA code does) and fp32 on a CPU:
    emulated bf16 matmuls made a QLoRA step about 10x slower than fp32 on a CPU without AVX512-BF16/AMX."""
    import torch

    if resolve_bf16("auto", device):
        return torch.bfloat16
    return torch.float16 if device.startswith("cuda") else torch.float32


def nf4_config(device: str = "cpu"):
    """QLoRA's quantisation (Dettmers et al. 2023): 4-bit NF4 weights, double quantisation, bf16 compute
    (see ``nf4_compute_dtype`` for hardware without bf16)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=nf4_compute_dtype(device))


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
               quantize_4bit: bool = False) -> Any:
    """The causal LM at ``model_dir`` on ``device``; ``quantize_4bit``: its linear layers in NF4 (QLoRA).

    The unquantised parts (embeddings, norms, head) stay in ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantize_4bit:
        require_bitsandbytes("adapter")
        # a quantised model cannot be moved with .to(); it is placed while loading
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        kwargs = {"quantization_config": nf4_config(device), "device_map": {"": str(dev)}}
    check_weights(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load as a causal LM: {str(exc).splitlines()[0]}") from None
    return model if quantize_4bit else model.to(device)
