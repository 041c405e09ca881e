"""Chat-template rendering and completion-only label masks.

Masks are found at the text level: each assistant turn's span is the difference
between the conversation rendered up to that turn and the same prefix rendered
with the generation prompt. The full text is tokenised once with offsets and a
token is trained on when it starts inside an assistant span (its content plus
the template's end-of-turn token, so the model learns to stop). This works for
any template whose renderings are prefixes of each other (ChatML, Llama, Mistral,
Gemma...); one that is not gets a clear error rather than a wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from paft.data.formats import BinaryExample, PreferenceExample, RankedExample, SFTExample
from paft.errors import DataError

IGNORE = -100


def _render(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokens_in_spans(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    flags = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    return ids, flags


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tok, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tok, messages[:i], add_generation_prompt=True)
        upto = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise DataError("the tokenizer's chat template does not render conversations as prefixes of each other; "
                            "completion-only masking needs that (use a ChatML/Llama-style template)")
        spans.append((len(prefix), len(upto)))
    return full, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_sft(example: SFTExample, tok, max_length: int) -> Encoded:
    """Token ids and labels (IGNORE outside assistant turns); right-truncated to max_length."""
    if example.text is not None:
        ids = tok(example.text, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        ids = ids[:max_length]
        return Encoded(ids, list(ids))
    text, spans = assistant_spans(tok, example.messages)
    ids, flags = _tokens_in_spans(tok, text, spans)
    ids, flags = ids[:max_length], flags[:max_length]
    return Encoded(ids, [t if f else IGNORE for t, f in zip(ids, flags)])


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _response_ids(tok, prompt_msgs, response: str, prompt_text: str) -> tuple[list[int], list[int]]:
    full = _render(tok, prompt_msgs + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise DataError("the tokenizer's chat template renders the prompt differently once a reply follows; "
                        "completion-only masking needs prefix-stable templates")
    ids, flags = _tokens_in_spans(tok, full, [(len(prompt_text), len(full))])
    cut = flags.index(True) if True in flags else len(ids)
    return ids[:cut], ids[cut:]


def _shared_prompt(tok, prompt_msgs, responses: list[str], max_length: int,
                   max_prompt_length: int) -> tuple[list[int], list[list[int]]]:
    """Prompt ids (left-truncated to max_prompt_length) and each response's ids (right-truncated to fit).

    Prompt tokens are shared by construction; the prompt is cut at the longest common token prefix
    of all renderings, guarding against tokenizers that merge across the prompt/reply boundary.
    """
    text = _render(tok, prompt_msgs, add_generation_prompt=True)
    split = [_response_ids(tok, prompt_msgs, r, text) for r in responses]
    heads = [p for p, _ in split]
    n = 0
    while n < min(len(h) for h in heads) and all(h[n] == heads[0][n] for h in heads):
        n += 1
    prompt = heads[0][:n][-max_prompt_length:]
    budget = max_length - len(prompt)
    return prompt, [(p[n:] + r)[:budget] for p, r in split]


def encode_pair(example: PreferenceExample, tok, max_length: int, max_prompt_length: int) -> EncodedPair:
    """Prompt ids (left-truncated to max_prompt_length) and both response ids (right-truncated to fit)."""
    prompt, (chosen, rejected) = _shared_prompt(tok, example.prompt, [example.chosen, example.rejected],
                                                max_length, max_prompt_length)
    return EncodedPair(prompt, chosen, rejected)


@dataclass
class EncodedRanked:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    scores: list[float]


def encode_ranked(example: RankedExample, tok, max_length: int, max_prompt_length: int) -> EncodedRanked:
    """Prompt ids (left-truncated to max_prompt_length) and every response's ids (right-truncated to fit
    max_length), split exactly as ``encode_pair`` splits a pair; the scores pass through."""
    prompt, responses = _shared_prompt(tok, example.prompt, list(example.responses), max_length, max_prompt_length)
    return EncodedRanked(prompt, responses, [float(x) for x in example.scores])


@dataclass
class EncodedCompletion:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    reward: float | None = None


def encode_completion(example: BinaryExample, tok, max_length: int, max_prompt_length: int) -> EncodedCompletion:
    """Prompt ids (left-truncated to max_prompt_length) and the reply ids (right-truncated to fit max_length).

    The same text-offset split as ``encode_pair``: the reply starts at the first token that begins
    inside the rendered reply (content plus the template's end-of-turn token).
    """
    text = _render(tok, example.prompt, add_generation_prompt=True)
    prompt, completion = _response_ids(tok, example.prompt, example.completion, text)
    prompt = prompt[-max_prompt_length:]
    return EncodedCompletion(prompt, completion[: max_length - len(prompt)], bool(example.label), example.reward)


def prompt_text(tok, messages: list[dict]) -> str:
    return _render(tok, messages, add_generation_prompt=True)
