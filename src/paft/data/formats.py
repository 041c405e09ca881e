"""Canonical training examples and the adapters that build them from dataset rows.

Every supported dataset layout becomes one of three shapes, so tokenisation and
training never see format differences: ``SFTExample`` (a chat conversation, or
raw text), ``PreferenceExample`` (a prompt conversation plus a chosen and a
rejected final assistant reply), ``BinaryExample`` (a prompt conversation, one
final assistant reply and a desirable/undesirable label: unpaired feedback, as KTO
and NPO use) and ``RankedExample`` (a prompt conversation and a list of scored
replies: listwise feedback, as RRHF, PRO and LiPO use). Adapters validate while they
convert and raise ``RowError`` naming the offending field; the loader adds the file and
row and turns it into a one-line ``DataError``.

A preference method declares the data kind it trains on (``LossSpec.data``):
``"pairs"`` (``PreferenceExample``), ``"binary"`` (``BinaryExample``, both labels),
``"negatives"`` (``BinaryExample`` with label False only) or ``"ranked"``
(``RankedExample``). ``examples_for_method`` converts what a file holds into that kind
(ranked -> pairs, best vs worst reply; pairs -> binary or negatives) or says, in one
line, why it cannot (unpaired rows for a pairwise method, pairs for a listwise one).
"""

from __future__ import annotations

import functools
import json
import math
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
    """A prompt conversation (ending with a user turn), one final assistant reply, and whether it is desirable;
    ``reward``: the reply's scalar reward where the data gives one (single-trajectory methods: DRO)."""

    prompt: list[Message]
    completion: str
    label: bool
    reward: float | None = None


@dataclass
class RankedExample:
    """A prompt conversation (ending with a user turn) and at least 2 final assistant replies with their scores.

    Higher score = better; ties are allowed. ``scores[i]`` belongs to ``responses[i]``.
    """

    prompt: list[Message]
    responses: list[str]
    scores: list[float]


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


def _user_first(messages: list[Message], field: str) -> list[Message]:
    """A chat opens with a user turn (after an optional system turn): chat templates render nothing to learn
    from before a first assistant turn, and many refuse a conversation that does not alternate from the user."""
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is not None and first["role"] != "user":
        raise RowError(field, f"starts with an {first['role']} turn; a conversation must open with a user turn "
                              "(after an optional system turn): drop the leading assistant turn, or put the "
                              "user's message before it")
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
    return _user_first(prompt, field)


# --- SFT adapters -----------------------------------------------------------


def sft_messages(row: Mapping[str, Any]) -> SFTExample:
    messages = _user_first(_parse_messages(_get(row, "messages"), "messages"), "messages")
    return SFTExample(messages=_require_assistant(messages, "messages"))


def sft_prompt_completion(row: Mapping[str, Any]) -> SFTExample:
    prompt = _user_first(_turns(_get(row, "prompt"), "prompt", "user"), "prompt")
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
    messages = _user_first(_parse_messages(_get(row, "conversations"), "conversations"), "conversations")
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


def pref_beavertails(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> PreferenceExample:
    if beavertails_preference not in _BEAVERTAILS_ID_COLUMN:
        raise ConfigError(f"beavertails_preference must be 'helpful' or 'safe', got {beavertails_preference!r}")
    id_column = _BEAVERTAILS_ID_COLUMN[beavertails_preference]
    prompt = _prompt(_get(row, "prompt"), "prompt")
    responses = [_require_str(_get(row, f"response_{i}"), f"response_{i}") for i in (0, 1)]
    best = _zero_one(_get(row, id_column), id_column, "0 or 1")
    return PreferenceExample(prompt=prompt, chosen=responses[best], rejected=responses[1 - best])


def pref_prompt_completion_label(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> BinaryExample:
    """Unpaired feedback (KTO style): ``prompt``, ``completion`` (a string or a message list ending with the
    assistant reply) and ``label`` (true = desirable, false = undesirable) and/or ``reward`` (a number: DRO's
    single-trajectory data; without ``label`` a reply is desirable when its reward is above 0)."""
    prompt = _prompt(_get(row, "prompt"), "prompt")
    completion = _final_reply(_get(row, "completion"), "completion", prompt)
    reward = None if row.get("reward") is None else _number(row["reward"], "reward")
    if reward is not None and row.get("label") is None:
        return BinaryExample(prompt=prompt, completion=completion, label=reward > 0, reward=reward)
    label = bool(_zero_one(_get(row, "label"), "label", "a boolean (true/false or 1/0)"))
    return BinaryExample(prompt=prompt, completion=completion, label=label, reward=reward)


# --- ranked (listwise) adapters ---------------------------------------------

_SCORES_OR_RANKS = "missing column (a responses list needs 'scores', higher = better, or 'ranks', 1 = best)"


def _number(value: Any, field: str) -> float:
    """A finite int/float (not a bool), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(field, f"expected a finite number, got {value!r}")
    return float(value)


def _responses(value: Any, field: str, prompt: list[Message]) -> list[str]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of replies, got {_type_name(value)}")
    if len(value) < 2:
        raise RowError(field, f"needs at least 2 replies to rank, got {len(value)}")
    return [_final_reply(v, f"{field}[{i}]", prompt) for i, v in enumerate(value)]


def _per_response(row: Mapping[str, Any], column: str, n: int) -> list[Any]:
    if column not in row:
        raise RowError(column, _SCORES_OR_RANKS)
    value = row[column]
    if not isinstance(value, list):
        raise RowError(column, f"expected a list with one entry per reply, got {_type_name(value)}")
    if len(value) != n:
        raise RowError(column, f"has {len(value)} entries for {n} responses")
    return value


def ranked_prompt_responses_scores(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> RankedExample:
    """Listwise feedback: ``prompt``, ``responses`` (strings or message lists ending with the reply) and
    ``scores`` (one number per reply, higher = better)."""
    prompt = _prompt(_get(row, "prompt"), "prompt")
    responses = _responses(_get(row, "responses"), "responses", prompt)
    scores = [_number(v, f"scores[{i}]") for i, v in enumerate(_per_response(row, "scores", len(responses)))]
    return RankedExample(prompt=prompt, responses=responses, scores=scores)


def ranked_prompt_responses_ranks(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> RankedExample:
    """Listwise feedback as ranks: ``ranks`` (1 = best, ties share a rank) become scores n - rank for n
    replies, so the best reply scores n - 1 and rank n scores 0."""
    prompt = _prompt(_get(row, "prompt"), "prompt")
    responses = _responses(_get(row, "responses"), "responses", prompt)
    n = len(responses)
    scores = []
    for i, v in enumerate(_per_response(row, "ranks", n)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 1 <= v <= n:
            raise RowError(f"ranks[{i}]", f"expected a whole number from 1 (best) to {n}, got {v!r}")
        scores.append(float(n - int(v)))
    return RankedExample(prompt=prompt, responses=responses, scores=scores)


def ranked_ultrafeedback(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> RankedExample:
    """Raw UltraFeedback: ``instruction`` (or ``prompt``) and ``completions``, a list of objects with
    ``response`` and ``overall_score`` (other keys, e.g. ``annotations`` or ``model``, are ignored)."""
    column = "instruction" if "instruction" in row else "prompt"
    prompt = _prompt(_get(row, column), column)
    completions = _get(row, "completions")
    if not isinstance(completions, list):
        raise RowError("completions", f"expected a list of objects, got {_type_name(completions)}")
    if len(completions) < 2:
        raise RowError("completions", f"needs at least 2 completions to rank, got {len(completions)}")
    responses, scores = [], []
    for i, c in enumerate(completions):
        where = f"completions[{i}]"
        if not isinstance(c, dict):
            raise RowError(where, f"expected an object, got {_type_name(c)}")
        for key in ("response", "overall_score"):
            if key not in c:
                raise RowError(f"{where}.{key}", "missing key")
        responses.append(_final_reply(c["response"], f"{where}.response", prompt))
        scores.append(_number(c["overall_score"], f"{where}.overall_score"))
    return RankedExample(prompt=prompt, responses=responses, scores=scores)


def _chosen_conversation(pref_adapter: Callable[..., PreferenceExample]) -> Callable[..., SFTExample]:
    """A pair format read as SFT data: the prompt and its chosen (better, or safer) reply (SFT on the
    preferred replies, as in arXiv 2406.04879)."""
    def adapter(row: Mapping[str, Any], *, beavertails_preference: str = "helpful") -> SFTExample:
        ex = pref_adapter(row, beavertails_preference=beavertails_preference)
        return SFTExample(messages=ex.prompt + [{"role": "assistant", "content": ex.chosen}])
    return adapter


SFT_FORMATS: dict[str, Callable[..., SFTExample]] = {
    "messages": sft_messages,
    "prompt_completion": sft_prompt_completion,
    "alpaca": sft_alpaca,
    "sharegpt": sft_sharegpt,
    "text": sft_text,
    "hh_rlhf": _chosen_conversation(pref_hh_rlhf),  # preference data read for SFT; never auto-detected as SFT
    "beavertails": _chosen_conversation(pref_beavertails),
}
_SFT_FROM_PAIRS = ("hh_rlhf", "beavertails")  # SFT formats that take beavertails_preference

PREFERENCE_FORMATS: dict[str, Callable[..., PreferenceExample | BinaryExample | RankedExample]] = {
    "prompt_chosen_rejected": pref_prompt_chosen_rejected,
    "implicit_prompt": pref_implicit_prompt,
    "hh_rlhf": pref_hh_rlhf,
    "beavertails": pref_beavertails,
    "prompt_completion_label": pref_prompt_completion_label,  # unpaired: BinaryExample
    "prompt_responses_scores": ranked_prompt_responses_scores,  # listwise: RankedExample
    "prompt_responses_ranks": ranked_prompt_responses_ranks,
    "ultrafeedback_completions": ranked_ultrafeedback,
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
    ("prompt_completion_label", ("prompt", "completion", "reward")),
    ("prompt_responses_scores", ("prompt", "responses", "scores")),
    ("prompt_responses_ranks", ("prompt", "responses", "ranks")),
    ("ultrafeedback_completions", ("instruction", "completions")),
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
    if {"prompt", "completion"} <= cols and cols & {"label", "reward"}:  # after the pair formats: pairs win
        return "prompt_completion_label"
    if {"prompt", "responses"} <= cols:  # without scores or ranks the adapter names the missing column
        return "prompt_responses_ranks" if "ranks" in cols and "scores" not in cols else "prompt_responses_scores"
    if "completions" in cols and cols & {"instruction", "prompt"}:
        return "ultrafeedback_completions"
    raise _no_match("preference", cols, _PREFERENCE_SIGNATURES)


def get_adapter(kind: str, fmt: str, beavertails_preference: str = "helpful") -> Callable[[Mapping[str, Any]], Any]:
    """The row converter for a format name, resolved once so a bad name fails before any data is read."""
    if kind not in ("sft", "preference"):
        raise ValueError(f"kind must be 'sft' or 'preference', got {kind!r}")
    table = SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS
    if fmt not in table:
        label = "SFT" if kind == "sft" else "preference"
        raise DataError(f"unknown {label} format {fmt!r}; known: auto, {', '.join(table)}")
    if kind == "sft" and fmt not in _SFT_FROM_PAIRS:
        return table[fmt]
    return functools.partial(table[fmt], beavertails_preference=beavertails_preference)


def to_sft_example(row: Mapping[str, Any], fmt: str) -> SFTExample:
    if fmt == "auto":
        fmt = detect_sft_format(row)
    return get_adapter("sft", fmt)(row)


def to_preference_example(
    row: Mapping[str, Any], fmt: str, beavertails_preference: str = "helpful"
) -> PreferenceExample | BinaryExample | RankedExample:
    if fmt == "auto":
        fmt = detect_preference_format(row, row)
    return get_adapter("preference", fmt, beavertails_preference)(row)


# --- data kinds of preference methods ---------------------------------------

DATA_KINDS = ("pairs", "binary", "negatives", "ranked", "online", "groups", "rewarded")
SAMPLED_KINDS = ("online", "groups")  # only the prompts are used: each round samples and scores its own replies

_NEEDS = {
    "pairs": "paired data (columns prompt/chosen/rejected, or hh_rlhf / beavertails / implicit-prompt forms)",
    "negatives": "undesirable completions (rows with label false in prompt/completion/label data, "
                 "or the rejected side of any pair format)",
    "ranked": "ranked lists (columns prompt, responses and scores or ranks; or UltraFeedback completions with "
              "overall_score)",
    "rewarded": "replies with a reward (columns prompt, completion, reward; or any pair, ranked or labelled rows)",
}
_HAS = {
    PreferenceExample: "pairs (prompt/chosen/rejected)",
    BinaryExample: "unpaired rows (prompt, completion, label)",
    RankedExample: "ranked lists (prompt, responses, scores)",
}


def unique_prompts(prompts: Iterable[list[Message]]) -> list[list[Message]]:
    """The distinct prompt conversations, in first-seen order."""
    seen, out = set(), []
    for p in prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def pairs_to_binary(pairs: Iterable[PreferenceExample]) -> list[BinaryExample]:
    """Each pair becomes two unpaired rows, in order: its chosen reply (label True), then its rejected one (False)."""
    out = []
    for p in pairs:
        out.append(BinaryExample(prompt=p.prompt, completion=p.chosen, label=True))
        out.append(BinaryExample(prompt=p.prompt, completion=p.rejected, label=False))
    return out


def ranked_to_pairs(examples: Iterable[RankedExample]) -> list[PreferenceExample]:
    """One pair per list: its top-scored reply (chosen) against its lowest-scored one (rejected).

    On a tie the first such reply in list order is taken; a list whose scores are all equal
    gives no pair.
    """
    out = []
    for e in examples:
        best = max(range(len(e.scores)), key=lambda i: (e.scores[i], -i))
        worst = min(range(len(e.scores)), key=lambda i: (e.scores[i], i))
        if e.scores[best] > e.scores[worst]:
            out.append(PreferenceExample(prompt=e.prompt, chosen=e.responses[best], rejected=e.responses[worst]))
    return out


def to_rewarded(examples: list) -> list[BinaryExample]:
    """Single trajectories (prompt, reply, reward) for DRO: rows with a ``reward`` keep it; every reply of a
    ranked list gets its score; a pair gives its chosen reply reward 1 and its rejected one 0, a labelled row
    1 (desirable) or 0."""
    out = []
    for e in examples:
        if isinstance(e, RankedExample):
            lo = min(e.scores)
            out += [BinaryExample(e.prompt, r, s > lo, float(s)) for r, s in zip(e.responses, e.scores)]
        elif isinstance(e, PreferenceExample):
            out += [BinaryExample(e.prompt, e.chosen, True, 1.0), BinaryExample(e.prompt, e.rejected, False, 0.0)]
        else:
            out.append(BinaryExample(e.prompt, e.completion, e.label, float(e.label) if e.reward is None else e.reward))
    return out


def examples_for_method(examples: list, data: str, *, method: str, source: str) -> list:
    """The examples of ``source`` in the data kind ``data`` that preference method ``method`` trains on.

    Ranked lists convert to ``pairs`` (best vs worst reply of each list; a list of equal scores
    gives none) and, through those pairs, to the unpaired kinds. Pairs convert to ``binary``
    (chosen -> desirable, rejected -> undesirable: how KTO is usually run on paired data) and to
    ``negatives`` (the rejected replies). Unpaired rows cannot become pairs, and neither pairs
    nor unpaired rows can become ranked lists: a one-line ``DataError`` naming the method and
    the columns it needs. ``online`` and ``groups`` take any rows (their prompts).
    """
    if data not in DATA_KINDS:
        raise ValueError(f"unknown data kind {data!r}; known: {', '.join(DATA_KINDS)}")
    if not examples:
        raise DataError(f"{source}: no preference rows")
    kinds = {type(e) for e in examples}
    if not kinds <= set(_HAS):
        names = ", ".join(sorted(k.__name__ for k in kinds - set(_HAS)))
        raise DataError(f"{source}: holds {names} rows, not preference data")
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes {' and '.join(sorted(_HAS[k] for k in kinds))}; use one format per file")
    (kind,) = kinds
    if data in SAMPLED_KINDS:  # each round samples and scores its own replies to the rows' prompts
        return list(examples)
    if data == "ranked":
        if kind is not RankedExample:
            raise DataError(f"preference.method {method!r} needs {_NEEDS['ranked']}; {source} has {_HAS[kind]}")
        return list(examples)
    if data == "rewarded":
        return to_rewarded(examples)
    if kind is RankedExample:
        examples, kind = ranked_to_pairs(examples), PreferenceExample
        if not examples:
            raise DataError(f"preference.method {method!r} needs {_NEEDS['pairs']}; every ranked list in {source} "
                            "has equal scores, so no best-vs-worst pair can be formed")
    paired = kind is PreferenceExample
    if data == "pairs":
        if not paired:
            raise DataError(f"preference.method {method!r} needs {_NEEDS['pairs']}; {source} has unpaired rows "
                            "(prompt, completion, label)")
        return list(examples)
    binary = pairs_to_binary(examples) if paired else list(examples)
    if data == "binary":
        return binary
    negatives = [e for e in binary if not e.label]
    if not negatives:
        raise DataError(f"preference.method {method!r} needs {_NEEDS['negatives']}; {source} has no row with "
                        "label false")
    return negatives
