import torch

from paft.data.collate import PairCollator, SFTCollator
from paft.data.formats import PreferenceExample, SFTExample
from paft.data.tokenize import IGNORE, encode_pair, encode_sft
from paft.models.logps import sequence_logps, token_logps

SYS = {"role": "system", "content": "You are a helpful assistant."}


def test_sft_labels_cover_assistant_turns_only(tiny_tok):
    ex = SFTExample(messages=[SYS, {"role": "user", "content": "What is 2 + 3?"},
                              {"role": "assistant", "content": "Answer: 5"},
                              {"role": "user", "content": "And 4 + 4?"},
                              {"role": "assistant", "content": "Answer: 8"}])
    enc = encode_sft(ex, tiny_tok, 512)
    trained = tiny_tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE])
    assert trained.count("Answer: 5<|im_end|>") == 1 and trained.count("Answer: 8<|im_end|>") == 1
    assert "2 + 3" not in trained and "helpful" not in trained
    assert tiny_tok.decode(enc.input_ids) == tiny_tok.apply_chat_template(ex.messages, tokenize=False)


def test_text_examples_train_on_every_token(tiny_tok):
    enc = encode_sft(SFTExample(text="plain text to learn"), tiny_tok, 512)
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tiny_tok.eos_token_id


def test_pair_split_and_truncation(tiny_tok):
    ex = PreferenceExample(prompt=[SYS, {"role": "user", "content": "How do I bake bread?"}],
                           chosen="Sure! Mix flour and water, then bake.", rejected="No.")
    enc = encode_pair(ex, tiny_tok, 512, 400)
    assert tiny_tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tiny_tok.decode(enc.chosen_ids) == "Sure! Mix flour and water, then bake.<|im_end|>\n"
    assert tiny_tok.decode(enc.rejected_ids) == "No.<|im_end|>\n"
    short = encode_pair(ex, tiny_tok, max_length=len(enc.prompt_ids) + 3, max_prompt_length=10)
    assert len(short.prompt_ids) == 10 and short.prompt_ids == enc.prompt_ids[-10:]
    assert len(short.chosen_ids) <= len(enc.prompt_ids) + 3 - 10


def _full_logits_reference(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (tgt != IGNORE)).sum(-1)


def test_completion_only_logps_equal_full_logits(tiny_model, tiny_tok):
    exs = [PreferenceExample(prompt=[{"role": "user", "content": f"question {i}"}], chosen="yes " * (i + 1),
                             rejected="no") for i in range(3)]
    batch = PairCollator(tiny_tok.pad_token_id)([encode_pair(e, tiny_tok, 128, 64) for e in exs])
    got, counts = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    want = _full_logits_reference(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == (batch["labels"][:, 1:] != IGNORE).sum(-1).float().tolist()


def test_token_logps_gradients_match_full_path(tiny_model, tiny_tok):
    ex = SFTExample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    b = SFTCollator(tiny_tok.pad_token_id)([encode_sft(ex, tiny_tok, 64)] * 2)
    lp, _ = token_logps(tiny_model, b["input_ids"], b["attention_mask"], b["labels"])
    lp.sum().backward()
    g1 = tiny_model.model.layers[0].mlp.up_proj.weight.grad.clone()
    tiny_model.zero_grad()
    _full_logits_reference(tiny_model, b["input_ids"], b["attention_mask"], b["labels"]).sum().backward()
    torch.testing.assert_close(g1, tiny_model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)
