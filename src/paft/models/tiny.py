"""A tiny random-initialised llama and a tokenizer built locally: for tests and smoke runs.

The tokenizer is a byte-level BPE trained on a fixed corpus at build time, with a
ChatML template (the same as SmolLM2's), so every code path that applies chat
templates and masks prompts is exercised without any download.
"""

from __future__ import annotations

from pathlib import Path

from paft.data.demo import corpus_sample
from paft.io import atomic_dir

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    words = ("the a of to and in is you that it for on with as are this be at or have from by not but what all "
             "can your how do help sure sorry answer question please here steps first then").split()
    return corpus_sample() + [" ".join(words)] * 4


def build_tiny(out: Path, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 512) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def ensure_tiny(root: Path) -> Path:
    """The cached tiny model, keyed by its build inputs so a changed corpus never reuses a stale one."""
    import hashlib

    key = hashlib.sha256(("\n".join(_corpus()) + CHAT_TEMPLATE).encode()).hexdigest()[:10]
    out = root / "models" / f"tiny-llama-{key}"
    if (out / "model.safetensors").is_file():
        return out
    return build_tiny(out)
