"""Reward-model inference: load a ``paft reward`` output and read the scalar reward of sequences.

A reward model is the base as ``AutoModelForSequenceClassification`` (one label, a linear ``score`` head)
with a LoRA adapter (``paft.train.reward`` trains it). The reward of a row is the head's output at its
last real token, taken from the attention mask, not from the pad token id (transformers' own pooling looks
for the last token that is not ``pad_token_id``, which is wrong when the pad token also occurs in the
text, as with SmolLM2 where pad == eos == ``<|im_end|>``); position ids follow the mask, so a row's
reward does not depend on its padding side or width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from paft.errors import ModelError
from paft.models.folders import adapter_base, adapter_config, check_weights, classify, is_adapter
from paft.models.loading import load_tokenizer


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token ([B] long), for left- or right-padded rows."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row ([B] float32): the score head at the row's last real token.

    ``model`` is an ``AutoModelForSequenceClassification`` (num_labels=1), plain or PEFT-wrapped.
    Position ids are ``cumsum(mask) - 1``, so left padding shifts nothing.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = getattr(inner, "score", None)
    if backbone is None or head is None:
        raise ModelError(f"{type(inner).__name__}: paft reward models need a sequence-classification model with a "
                         "`score` head on a decoder body (Llama, Mistral, Qwen, Gemma, SmolLM, ...)")
    mask = attention_mask.long()
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    last = last_token_index(mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(pooled).squeeze(-1).float()


def load_reward_base(model_dir: Path | str, *, pad_token_id: int, dtype: str = "float32", device: str = "cpu",
                     trust_remote_code: bool = False):
    """The base as ``AutoModelForSequenceClassification`` with one label and ``pad_token_id`` set.

    The ``score`` head is not in a causal LM checkpoint, so it starts from the model's own init
    (seed it with ``torch.manual_seed`` first for a reproducible head).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{model_dir}: cannot load as a sequence-classification model: {msg}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id
    return model.to(device)


def load_reward_model(path: str | Path, *, base_model_dir: str | Path | None = None, device: str = "cpu",
                      dtype: str = "float32", trust_remote_code: bool = False):
    """(model in eval mode, tokenizer, adapter folder, base folder, training summary) of a ``paft reward`` output.

    ``path``: the output folder (holding ``adapter/``) or the adapter folder itself. The base is the
    adapter's ``base_model_name_or_path`` when that folder exists, else ``base_model_dir``.
    """
    from peft import PeftModel  # lazy: peft's import is slow

    root = Path(path)
    adapter = root / "adapter" if is_adapter(root / "adapter") else root
    conf = adapter_config(adapter)
    if conf is None:
        raise ModelError(f"{root}: not a `paft reward` output (no adapter/adapter_config.json); "
                         "train one with `paft reward`")
    if classify(adapter) != "reward":
        raise ModelError(f"{adapter}: a {conf.get('task_type')} adapter, not a reward model (SEQ_CLS, "
                         "as `paft reward` writes)")
    base = adapter_base(conf) or (Path(base_model_dir) if base_model_dir is not None else None)
    if base is None:
        raise ModelError(f"{adapter}: its base model {conf.get('base_model_name_or_path')!r} is not a local "
                         "folder; pass the base folder")
    summary_file = (root if adapter != root else root.parent) / "train_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    tok = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base, trust_remote_code)
    model = load_reward_base(base, pad_token_id=tok.pad_token_id, dtype=dtype, device=device,
                             trust_remote_code=trust_remote_code)
    check_weights(adapter)
    return PeftModel.from_pretrained(model, str(adapter)).eval(), tok, adapter, base, summary
