import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def paft_cache(tmp_path_factory):
    """Keep test models out of the user's cache; child processes inherit the variable."""
    root = tmp_path_factory.mktemp("paft-cache")
    old = os.environ.get("PAFT_CACHE")
    os.environ["PAFT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("PAFT_CACHE", None)
    else:
        os.environ["PAFT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(paft_cache):
    from paft.models import resolve_model_dir

    return resolve_model_dir("tiny")


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from paft.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture()
def tiny_model(tiny_dir):
    from paft.models import load_model

    return load_model(tiny_dir)


@pytest.fixture()
def lora_model(tiny_model):
    """The tiny model with a LoRA adapter (r=4) whose B is non-zero, so the policy and the adapter-disabled
    reference differ."""
    from paft.config import LoraConfig
    from paft.train.lora import attach_lora

    model = attach_lora(tiny_model, LoraConfig(r=4, alpha=8), 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, tiny_dir):
    """A `paft reward`-shaped folder written directly (random head, perturbed LoRA): no training needed."""
    from paft.config import LoraConfig
    from paft.io import write_json_atomic
    from paft.models import load_tokenizer
    from paft.models.reward import load_reward_base
    from paft.train.reward import attach_reward_lora

    out = tmp_path_factory.mktemp("rm") / "reward"
    tok = load_tokenizer(tiny_dir)
    torch.manual_seed(1)
    model = attach_reward_lora(load_reward_base(tiny_dir, pad_token_id=tok.pad_token_id), LoraConfig(r=4, alpha=8), 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    write_json_atomic(out / "train_summary.json", {"max_length": 96, "max_prompt_length": 64})
    return out
