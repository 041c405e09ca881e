"""One folder classifier (paft.models.folders) and one delta source per folder (paft.merge.deltas.open_source)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from paft.errors import ModelError, PaftError
from paft.merge.deltas import CheckpointDeltas, LoraDeltas, open_source, open_state
from paft.models.folders import adapter_base, adapter_config, classify, is_adapter, is_model


def _adapter(folder, task_type="CAUSAL_LM", base=None):
    folder.mkdir(parents=True)
    conf = {"peft_type": "LORA", "task_type": task_type, "r": 1, "lora_alpha": 1,
            "base_model_name_or_path": str(base) if base else "org/remote"}
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    a, b = torch.ones(1, 2), torch.full((2, 1), 0.5)
    save_file({"base_model.model.m.lora_A.weight": a, "base_model.model.m.lora_B.weight": b},
              folder / "adapter_model.safetensors")
    return folder


def _model(folder, w):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"m.weight": w}, folder / "model.safetensors")
    return folder


def test_classify_every_kind(tmp_path):
    base = _model(tmp_path / "base", torch.zeros(2, 2))
    lora = _adapter(tmp_path / "lora", base=base)
    reward = _adapter(tmp_path / "rm" / "adapter", "SEQ_CLS")
    branch = _adapter(tmp_path / "sft" / "adapter").parent
    full_branch = _model(tmp_path / "full" / "model", torch.ones(2, 2)).parent
    (tmp_path / "empty").mkdir()
    assert [classify(p) for p in (base, lora, reward, reward.parent, branch, full_branch, tmp_path / "empty")] == \
        ["model", "lora", "reward", "reward", "branch", "branch", None]
    assert is_adapter(lora) and not is_adapter(base) and is_model(base) and not is_model(lora)
    assert adapter_base(adapter_config(lora)) == base and adapter_base(adapter_config(branch / "adapter")) is None
    assert adapter_config(base) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    with pytest.raises(ModelError, match="invalid JSON"):
        classify(tmp_path / "broken")


def test_open_source_picks_the_delta_of_each_folder(tmp_path):
    base_dir = _model(tmp_path / "base", torch.zeros(2, 2))
    base = open_state(base_dir)
    lora = open_source(_adapter(tmp_path / "lora"), base)
    full = open_source(_model(tmp_path / "full", torch.ones(2, 2)), base)
    assert isinstance(lora, LoraDeltas) and isinstance(full, CheckpointDeltas)
    assert torch.equal(lora.delta("m.weight"), torch.full((2, 2), 0.5)) and torch.equal(full.delta("m.weight"), torch.ones(2, 2))
    with pytest.raises(PaftError, match="not a folder"):
        open_source(tmp_path / "missing", base)
