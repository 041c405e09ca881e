"""Canonical training examples and the adapters that build them from dataset rows.

Every supported dataset layout becomes one of three shapes, so tokenisation and
training never see format differences: ``SFTExample`` (a chat conversation, or
raw text), ``PreferenceExample`` (a prompt conversation plus a chosen and a
rejected final assistant reply) and ``BinaryExample`` (a prompt conversation, one
final assistant reply and a desirable/undesirable label: unpaired feedback, as KTO
and NPO use). Adapters validate while they convert and raise ``RowError`` naming
the offending field; the loader adds the file and row and turns it into a one-line
``DataError``.

A preference method declares the data kind it trains on (``LossSpec.data``):
``"pairs"`` (``PreferenceExample``), ``"binary"`` (``BinaryExample``, both labels) or
``"negatives"`` (``BinaryExample`` with label False only). ``examples_for_method``
converts what a file holds into that kind (pairs -> binary or negatives) or says, in
one line, why it cannot (unpaired rows for a pairwise method).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from paft.errors import ConfigError, DataError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class SFTExample:
    """A chat conversation (loss on every assistant turn) or raw text (loss on all tokens); exactly one is set."""

    messages: list[Message] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("SFTExample needs exactly one of messages or text")


@dataclass
class PreferenceExample:
    """A prompt conversation (ending with a user turn) and the preferred / dispreferred final assistant reply."""

    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass
class BinaryExample:
    """A prompt conversation (ending with a user turn), one final assistant reply, and whether it is desirable."""

    prompt: list[Message]
    completion: str
    label: bool


class RowError(ValueError):
    """A row that cannot be converted; ``field`` is a column name or a path such as ``chosen[2].content``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Role spellings seen in the wild (OpenAI, ShareGPT, Vicuna, Gemini exports) -> canonical role.
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(row: Mapping[str, Any], column: str) -> Any:
    if column not in row:
        raise RowError(column, "missing column")
    return row[column]


def _require_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise RowError(field, "empty string")
    return value


def _optional_str(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(column, f"expected a string, got {_type_name(value)}")
    return value


def _parse_messages(value: Any, field: str) -> list[Message]:
    """Validate a message list and normalise it to ``{"role", "content"}`` dicts with canonical roles.

    Both ``role``/``content`` and ShareGPT's ``from``/``value`` keys are read, since
    datasets mix them freely. Empty system turns are dropped: exports often carry
    ``""`` as a placeholder system prompt, and it would only change the template.
    """
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise RowError(field, "empty list of messages")
    out: list[Message] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"expected a message object, got {_type_name(message)}")
        role_key = "role" if "role" in message or "from" not in message else "from"
        content_key = "content" if "content" in message or "value" not in message else "value"
        if role_key not in message:
            raise RowError(f"{where}.role", "missing key")
        if content_key not in message:
            raise RowError(f"{where}.content", "missing key")
        raw_role = message[role_key]
        role = _ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(f"{where}.{role_key}", f"unknown role {raw_role!r}; expected one of {', '.join(_ROLES)}")
        content = message[content_key]
        if not isinstance(content, str):
            raise RowError(f"{where}.{content_key}", f"expected a string, got {_type_name(content)}")
        if not content.strip():
            if role == "system":
                continue
            raise RowError(f"{where}.{content_key}", "empty string")
        if role == "system" and out:
            raise RowError(f"{where}.{role_key}", "a system turn is only allowed first")
        out.append({"role": role, "content": content})
    return out


def _turns(value: Any, field: str, role: str) -> list[Message]:
    """A string becomes one ``role`` turn; a list is read as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": _require_str(value, field)}]
    if isinstance(value, list):
        return _parse_messages(value, field)
    raise RowError(field, f"expected a string or a list of messages, got {_type_name(value)}")


def _require_assistant(messages: list[Message], field: str) -> list[Message]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "no assistant turn to train on")
    return messages


def _same_turns(a: list[Message], b: list[Message]) -> bool:
    """Equal roles and contents, ignoring surrounding whitespace (exports often differ only in that)."""
    return len(a) == len(b) and all(
        x["role"] == y["role"] and x["content"].strip() == y["content"].strip() for x, y in zip(a, b)
    )


def _check_prompt(prompt: list[Message], field: str) -> list[Message]:
    if not prompt:
        raise RowError(field, "no prompt turns before the reply")
    if prompt[-1]["role"] != "user":
        raise RowError(field, f"the prompt must end with a user turn, got a {prompt[-1]['role']} turn")
    return prompt


# --- SFT adapters -----------------------------------------------------------


def sft_messages(row: Mapping[str, Any]) -> SFTExample:
    messages = _parse_messages(_get(row, "messages"), "messages")
    return SFTExample(messages=_require_assistant(messages, "messages"))


def sft_prompt_completion(row: Mapping[str, Any]) -> SFTExample:
    prompt = _turns(_get(row, "prompt"), "prompt", "user")
    completion = _require_assistant(_turns(_get(row, "completion"), "completion", "assistant"), "completion")
    return SFTExample(messages=prompt + completion)


def sft_alpaca(row: Mapping[str, Any]) -> SFTExample:
    instruction = _require_str(_get(row, "instruction"), "instruction")
    extra_input = _optional_str(row, "input")
    output = _require_str(_get(row, "output"), "output")
    system = _optional_str(row, "system")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return SFTExample(messages=messages)


def sft_sharegpt(row: Mapping[str, Any]) -> SFTExample:
    messages = _parse_messages(_get(row, "conversations"), "conversations")
    return SFTExample(messages=_require_assistant(messages, "conversations"))


def sft_text(row: Mapping[str, Any]) -> SFTExample:
    return SFTExample(text=_require_str(_get(row, "text"), "text"))


# --- preference adapters ----------------------------------------------------


def _prompt(value: Any, field: str) -> list[Message]:
    return _check_prompt(_turns(value, field, "user"), field)


def _final_reply(value: Any, field: str, prompt: list[Message]) -> str:
    """The reply text of a string, or of the last assistant message of a list that may repeat the prompt."""
    if isinstance(value, str):
        return _require_str(value, field)
    if not isinstance(value, list):
        raise RowError(field, f"expected a string or a list of messages, got {_type_name(value)}")
    messages = _parse_messages(value, field)
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(field, "the last message must be the assistant reply")
    if len(messages) > 1 and not _same_turns(messages[:-1], prompt):
        raise RowError(field, "the turns before the last reply do not match 'prompt'")
    return messages[-1]["content"]


def pref_prompt_chosen_rejected(
    row: Mapping[str, Any], *, beavertails_preference: str = "helpful"
) -> PreferenceExample:
    prompt = _prompt(_get(row, "prompt"), "prompt")
    chosen = _final_reply(_get(row, "chosen"), "chosen", prompt)
    rejected = _final_reply(_get(row, "rejected"), "rejected", prompt)
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected)


def _at_word_boundary(text: str, i: int) -> bool:
    return i == len(text) or text[i].isspace() or text[i - 1].isspace()


def _split_strings(chosen: str, rejected: str) -> PreferenceExample:
    """Split two full texts at their longest common prefix, backed off so no word is cut in two."""
    cut = len(os.path.commonprefix([chosen, rejected]))
    while cut > 0 and not (_at_word_boundary(chosen, cut) and _at_word_boundary(rejected, cut)):
        cut -= 1
    prompt = chosen[:cut].strip()
    if not prompt:
        raise RowError("rejected", "no shared prompt with 'chosen' (they differ from the first word)")
    replies = {"chosen": chosen[cut:].strip(), "rejected": rejected[cut:].strip()}
    for field, reply in replies.items():
        if not reply:
            raise RowError(field, "empty response after the shared prompt")
    return PreferenceExample(prompt=[{"role": "user", "content": prompt}], **replies)


def _split_conversations(chosen: list[Message], rejected: list[Message]) -> PreferenceExample:
    """The common leading messages are the prompt; each side must then end with exactly one assistant reply."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and _same_turns([chosen[shared]], [rejected[shared]]):
        shared += 1
    if shared == 0:
        raise RowError("rejected", "no shared prompt with 'chosen' (the first messages differ)")
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        rest = conversation[shared:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise RowError(field, f"expected one assistant reply after the shared prompt, got {len(rest)} messages")
    prompt = _check_prompt(chosen[:shared], "chosen")
    if _same_turns(chosen[shared:], rejected[shared:]):
        raise RowError("rejected", "same reply as 'chosen'")
    return PreferenceExample(prompt=prompt, chosen=chosen[-1]["content"], rejected=rejected[-1]["content"])


def pref_implicit_prompt(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> PreferenceExample:
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise RowError(field, f"expected a string or a list of messages, got {_type_name(value)}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_strings(_require_str(chosen, "chosen"), _require_str(rejected, "rejected"))
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _split_conversations(_parse_messages(chosen, "chosen"), _parse_messages(rejected, "rejected"))
    raise RowError("rejected", "must have the same type as 'chosen' (both strings or both message lists)")


_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(value: Any, field: str) -> list[Message]:
    """Parse an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into turns ending with the reply."""
    parts = _HH_SPEAKER.split("\n\n" + _require_str(value, field).strip())
    if parts[0].strip():
        raise RowError(field, "does not start with a 'Human:' or 'Assistant:' turn")
    turns = []
    for n, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
        if not content.strip():
            raise RowError(field, f"turn {n} ({speaker}) is empty")
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if turns[-1]["role"] != "assistant":
        raise RowError(field, "no final 'Assistant:' reply")
    return turns


def pref_hh_rlhf(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> PreferenceExample:
    chosen = _hh_turns(_get(row, "chosen"), "chosen")
    rejected = _hh_turns(_get(row, "rejected"), "rejected")
    if not _same_turns(chosen[:-1], rejected[:-1]):
        raise RowError("rejected", "chosen/rejected do not share the same conversation before the last reply")
    prompt = _check_prompt(chosen[:-1], "chosen")
    return PreferenceExample(prompt=prompt, chosen=chosen[-1]["content"], rejected=rejected[-1]["content"])


# bool and float keys hash like the ints, so True/1.0 also resolve to 1.
_ZERO_ONE = {0: 0, 1: 1, "0": 0, "1": 1, "false": 0, "true": 1}
_BEAVERTAILS_ID_COLUMN = {"helpful": "better_response_id", "safe": "safer_response_id"}


def _zero_one(value: Any, field: str, expected: str) -> int:
    """0 or 1 from a bool, 0/1 (int, float or string) or "true"/"false"; RowError otherwise."""
    key = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(key, (str, int, float)) or key not in _ZERO_ONE:
        raise RowError(field, f"expected {expected}, got {value!r}")
    return _ZERO_ONE[key]


def _response_id(value: Any, field: str) -> int:
    return _zero_one(value, field, "0 or 1")


def pref_beavertails(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> PreferenceExample:
    if beavertails_preference not in _BEAVERTAILS_ID_COLUMN:
        raise ConfigError(f"beavertails_preference must be 'helpful' or 'safe', got {beavertails_preference!r}")
    id_column = _BEAVERTAILS_ID_COLUMN[beavertails_preference]
    prompt = _prompt(_get(row, "prompt"), "prompt")
    responses = [_require_str(_get(row, f"response_{i}"), f"response_{i}") for i in (0, 1)]
    best = _response_id(_get(row, id_column), id_column)
    return PreferenceExample(prompt=prompt, chosen=responses[best], rejected=responses[1 - best])


def _label(value: Any, field: str) -> bool:
    return bool(_zero_one(value, field, "a boolean (true/false or 1/0)"))


def pref_prompt_completion_label(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> BinaryExample:
    """Unpaired feedback (KTO style): ``prompt``, ``completion`` (a string or a message list ending with the
    assistant reply) and ``label`` (true = desirable, false = undesirable)."""
    prompt = _prompt(_get(row, "prompt"), "prompt")
    completion = _final_reply(_get(row, "completion"), "completion", prompt)
    return BinaryExample(prompt=prompt, completion=completion, label=_label(_get(row, "label"), "label"))


SFT_FORMATS: dict[str, Callable[[Mapping[str, Any]], SFTExample]] = {
    "messages": sft_messages,
    "prompt_completion": sft_prompt_completion,
    "alpaca": sft_alpaca,
    "sharegpt": sft_sharegpt,
    "text": sft_text,
}

PREFERENCE_FORMATS: dict[str, Callable[..., PreferenceExample | BinaryExample]] = {
    "prompt_chosen_rejected": pref_prompt_chosen_rejected,
    "implicit_prompt": pref_implicit_prompt,
    "hh_rlhf": pref_hh_rlhf,
    "beavertails": pref_beavertails,
    "prompt_completion_label": pref_prompt_completion_label,  # unpaired: BinaryExample
}

# Detection order matters: the first format whose columns are all present wins.
_SFT_SIGNATURES = [
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt_completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
]
_PREFERENCE_SIGNATURES = [
    ("beavertails", ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id")),
    ("prompt_chosen_rejected", ("prompt", "chosen", "rejected")),
    ("hh_rlhf", ("chosen", "rejected")),
    ("implicit_prompt", ("chosen", "rejected")),
    ("prompt_completion_label", ("prompt", "completion", "label")),
]


def _no_match(kind: str, columns: set[str], signatures: list[tuple[str, tuple[str, ...]]]) -> DataError:
    expected = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in signatures)
    return DataError(f"cannot detect the {kind} format from columns {sorted(columns)}; expected one of: {expected}")


def detect_sft_format(columns: Iterable[str]) -> str:
    cols = set(columns)
    for name, required in _SFT_SIGNATURES:
        if cols.issuperset(required):
            return name
    raise _no_match("SFT", cols, _SFT_SIGNATURES)


def _looks_like_hh(value: Any) -> bool:
    return isinstance(value, str) and "\n\nAssistant:" in value and (
        "\n\nHuman:" in value or value.lstrip().startswith("Human:"))


def detect_preference_format(columns: Iterable[str], first_row: Mapping[str, Any]) -> str:
    """Pick the adapter from the columns; chosen/rejected-only data is HH-RLHF if the first row reads like it."""
    cols = set(columns)
    if {"response_0", "response_1"} <= cols:
        return "beavertails"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= cols:
        hh = _looks_like_hh(first_row.get("chosen")) and _looks_like_hh(first_row.get("rejected"))
        return "hh_rlhf" if hh else "implicit_prompt"
    if {"prompt", "completion", "label"} <= cols:  # after the pair formats: pairs win when both are present
        return "prompt_completion_label"
    raise _no_match("preference", cols, _PREFERENCE_SIGNATURES)


def get_adapter(kind: str, fmt: str, beavertails_preference: str = "helpful") -> Callable[[Mapping[str, Any]], Any]:
    """The row converter for a format name, resolved once so a bad name fails before any data is read."""
    if kind not in ("sft", "preference"):
        raise ValueError(f"kind must be 'sft' or 'preference', got {kind!r}")
    table = SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS
    if fmt not in table:
        label = "SFT" if kind == "sft" else "preference"
        raise DataError(f"unknown {label} format {fmt!r}; known: auto, {', '.join(table)}")
    if kind == "sft":
        return table[fmt]
    return functools.partial(table[fmt], beavertails_preference=beavertails_preference)


def to_sft_example(row: Mapping[str, Any], fmt: str) -> SFTExample:
    if fmt == "auto":
        fmt = detect_sft_format(row)
    return get_adapter("sft", fmt)(row)


def to_preference_example(
    row: Mapping[str, Any], fmt: str, beavertails_preference: str = "helpful"
) -> PreferenceExample | BinaryExample:
    if fmt == "auto":
        fmt = detect_preference_format(row, row)
    return get_adapter("preference", fmt, beavertails_preference)(row)


# --- data kinds of preference methods ---------------------------------------

DATA_KINDS = ("pairs", "binary", "negatives")

_NEEDS = {
    "pairs": "paired data (columns prompt/chosen/rejected, or hh_rlhf / beavertails / implicit-prompt forms)",
    "negatives": "undesirable completions (rows with label false in prompt/completion/label data, "
                 "or the rejected side of any pair format)",
}


def pairs_to_binary(pairs: Iterable[PreferenceExample]) -> list[BinaryExample]:
    """Each pair becomes two unpaired rows, in order: its chosen reply (label True), then its rejected one (False)."""
    out = []
    for p in pairs:
        out.append(BinaryExample(prompt=p.prompt, completion=p.chosen, label=True))
        out.append(BinaryExample(prompt=p.prompt, completion=p.rejected, label=False))
    return out


def binary_to_negatives(examples: Iterable[BinaryExample]) -> list[BinaryExample]:
    """The undesirable rows (label False) only."""
    return [e for e in examples if not e.label]


def examples_for_method(examples: list, data: str, *, method: str, source: str) -> list:
    """The examples of ``source`` in the data kind ``data`` that preference method ``method`` trains on.

    Pairs convert to ``binary`` (chosen -> desirable, rejected -> undesirable: how KTO is usually
    run on paired data) and to ``negatives`` (the rejected replies); unpaired rows cannot become
    pairs, which is a one-line ``DataError`` naming the method and the columns it needs.
    """
    if data not in DATA_KINDS:
        raise ValueError(f"unknown data kind {data!r}; known: {', '.join(DATA_KINDS)}")
    if not examples:
        raise DataError(f"{source}: no preference rows")
    kinds = {type(e) for e in examples}
    if not kinds <= {PreferenceExample, BinaryExample}:
        names = ", ".join(sorted(k.__name__ for k in kinds - {PreferenceExample, BinaryExample}))
        raise DataError(f"{source}: holds {names} rows, not preference data")
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes paired and unpaired preference rows; use one format per file")
    paired = kinds == {PreferenceExample}
    if data == "pairs":
        if not paired:
            raise DataError(f"preference.method {method!r} needs {_NEEDS['pairs']}; {source} has unpaired rows "
                            "(prompt, completion, label)")
        return list(examples)
    binary = pairs_to_binary(examples) if paired else list(examples)
    if data == "binary":
        return binary
    negatives = binary_to_negatives(binary)
    if not negatives:
        raise DataError(f"preference.method {method!r} needs {_NEEDS['negatives']}; {source} has no row with "
                        "label false")
    return negatives
