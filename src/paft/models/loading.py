"""Turn ``model.name`` into a local folder, then load model and tokenizer from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from paft.errors import ModelError

ALIASES = ("smollm2-135m", "tiny")


def resolve_model_dir(name: str, revision: str | None = None, progress=None) -> Path:
    """Alias -> cached folder; local folder -> itself; hub id -> snapshot (only when online)."""
    from paft.models.smollm2 import cache_root, ensure_smollm2
    from paft.models.tiny import ensure_tiny

    if name == "smollm2-135m":
        return ensure_smollm2(progress)
    if name == "tiny":
        return ensure_tiny(cache_root())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
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

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelError(f"{model_dir}: tokenizer has no chat template; paft formats chat data with it")
    return tok


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load as a causal LM: {str(exc).splitlines()[0]}") from None
    return model.to(device)
