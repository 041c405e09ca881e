"""What kind of folder is this: the one place that reads the marker files of model, adapter and paft folders.

- ``lora``: a PEFT adapter folder (``adapter_config.json``), a causal-LM LoRA;
- ``reward``: a ``paft reward`` output (a ``SEQ_CLS`` adapter, or a folder whose ``adapter/`` is one);
- ``model``: a full Hugging Face checkpoint (``config.json``);
- ``branch``: a paft branch folder (``adapter/`` or ``model/`` inside);
- ``None``: none of these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from paft.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def is_model(folder: str | Path) -> bool:
    return (Path(folder) / MODEL_CONFIG).is_file()


def adapter_config(folder: str | Path) -> dict | None:
    """The parsed ``adapter_config.json`` of an adapter folder; None when ``folder`` is not one."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc})") from None


def adapter_base(conf: dict) -> Path | None:
    """The base an adapter config names (``base_model_name_or_path``), when that is a local model folder."""
    named = conf.get("base_model_name_or_path")
    return Path(named) if named and is_model(named) else None


def open_safetensors(path: str | Path):
    """``safe_open`` on one safetensors file (its header only); a truncated or corrupt file is one line naming it.

    safetensors checks that the header's offsets cover the file exactly, so a file cut short anywhere fails here.
    """
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # safetensors may report an unreadable file as a missing one ("No such file or directory"): ask the OS
        if isinstance(exc, PermissionError) or (os.path.exists(path) and not os.access(path, os.R_OK)):
            raise ModelError(f"{path}: not readable (permission denied); fix its permissions (chmod a+r) or copy "
                             "the folder somewhere you can read it") from None
        raise ModelError(f"{path}: not a readable safetensors file ({reason}); it is truncated or corrupt: "
                         "copy or download it again") from None


def check_weights(folder: str | Path) -> None:
    """Every safetensors file of ``folder`` opens (headers only): before transformers or PEFT load it."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        open_safetensors(f)


def classify(folder: str | Path) -> str | None:
    """``lora``, ``reward``, ``model``, ``branch`` or None (see the module docstring)."""
    folder = Path(folder)
    conf = adapter_config(folder)
    if conf is not None:
        return "reward" if conf.get("task_type") == "SEQ_CLS" else "lora"
    if is_model(folder):
        return "model"
    inner = classify(folder / "adapter") if (folder / "adapter").is_dir() else None
    if inner == "reward":
        return "reward"
    if inner == "lora" or ((folder / "model").is_dir() and is_model(folder / "model")):
        return "branch"
    return None
