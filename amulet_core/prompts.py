"""Preference prompt pairs from OpenAI-style chat messages.

Rule: the base context is the conversation as given; the pref context is the same
conversation with the preference sentence appended to the first system message after one
space. When the conversation has no system message, both contexts get one whose content is
``default_system_prompt`` (empty unless configured), so the two contexts still differ by the
preference text alone; with an empty default the pref system message is just the sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amulet_core.errors import InvalidParameterError

PRESETS: tuple[str, ...] = (
    "creative",
    "sycophantic",
    "verbose",
    "complex",
    "formal",
    "pleasant",
    "concise",
    "uplifting",
)
"""The 8 preferences of the paper's experiments."""

PAPER_SYSTEM_PROMPT = (
    "You are an AI designed to provide the most helpful, clear, and concise responses. Focus on giving "
    "actionable information, ensuring accuracy and detail without overwhelming the user. You should also be "
    "patient, polite, and calm. Avoid unnecessary complexity and always prioritize practical, user-friendly advice."
)

MAX_PREFERENCE_CHARS = 4000

Message = dict[str, Any]


def preference_sentence(preference: str) -> str:
    """A preset name becomes "Your answer should be <name> as much as possible."; other text is kept as is."""
    if not isinstance(preference, str):
        raise InvalidParameterError("preference", "'preference' text must be a string.")
    text = preference.strip()
    if not text:
        raise InvalidParameterError("preference", "'preference' must not be empty.")
    if len(text) > MAX_PREFERENCE_CHARS:
        raise InvalidParameterError("preference", f"'preference' is longer than {MAX_PREFERENCE_CHARS} characters.")
    if text.lower() in PRESETS:
        return f"Your answer should be {text.lower()} as much as possible."
    return text


def _append(content: str, sentence: str) -> str:
    return f"{content} {sentence}" if content else sentence


@dataclass(frozen=True)
class MessagePair:
    """The two conversations of one request: with the preference (pref) and without it (base)."""

    pref: list[Message]
    base: list[Message]


def preference_message_pair(messages: Sequence[Message], preference: str, default_system_prompt: str = "") -> MessagePair:
    """Build the pref and base conversations, which differ by the preference sentence only."""
    sentence = preference_sentence(preference)
    base = [dict(m) for m in messages]
    system_index = next((i for i, m in enumerate(base) if m.get("role") == "system"), None)
    if system_index is None:
        base.insert(0, {"role": "system", "content": default_system_prompt})
        system_index = 0
    content = base[system_index].get("content") or ""
    if not isinstance(content, str):
        raise InvalidParameterError("messages", "The system message content must be a string.")
    pref = [dict(m) for m in base]
    pref[system_index]["content"] = _append(content, sentence)
    return MessagePair(pref=pref, base=base)


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, generation prompt added."""
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may raise on roles or orders it does not support
        raise InvalidParameterError("messages", f"The model's chat template rejected the messages: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
