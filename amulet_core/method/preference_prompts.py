"""Preference prompt pairs from OpenAI-style chat messages.

Rule: the contrast context is the conversation as given; the pref context is the same
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

NEUTRAL_SYSTEM_PROMPT = "You are a helpful assistant."
"""Given to conversations without a system message when the model's template has no default of its own."""

TEMPLATE = "template"
"""Setting of the default system prompt: the model's chat template's own default (else the neutral one)."""
PAPER = "paper"
"""Setting of the default system prompt: the paper's system prompt."""
NONE = "none"
"""Setting of the default system prompt: an empty system message."""

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
    """The two conversations of one request: with the preference (pref) and without it (contrast)."""

    pref: list[Message]
    contrast: list[Message]
    system_prompt: str
    """The system message of the contrast conversation: the conversation's own, or the default given to it."""


def preference_message_pair(messages: Sequence[Message], preference: str, default_system_prompt: str = "") -> MessagePair:
    """Build the pref and contrast conversations, which differ by the preference sentence only."""
    built = preference_contexts(messages, [preference], default_system_prompt)
    return MessagePair(pref=built.prefs[0], contrast=built.contrast, system_prompt=built.system_prompt)


@dataclass(frozen=True)
class PreferenceContexts:
    """The contexts of one multi-preference request (``../design`` multi-context rule): K preference
    conversations, each the conversation with one preference sentence appended to its first system
    message, and the contrast conversation: as given, or carrying the negative sentence. With no
    preference sentence (classifier-free guidance) the one preference context is the conversation as given."""

    prefs: tuple[list[Message], ...]
    contrast: list[Message]
    system_prompt: str
    """The system message before any sentence: the conversation's own, or the default given to it."""
    sentences: tuple[str, ...]
    negative: str | None


def preference_contexts(
    messages: Sequence[Message],
    preferences: Sequence[str],
    default_system_prompt: str = "",
    negative: str | None = None,
) -> PreferenceContexts:
    """Build the K preference contexts and the contrast context; they differ by their sentences alone.

    Preset names expand as in :func:`preference_sentence`, for ``negative`` too. With one preference and
    no negative this is exactly :func:`preference_message_pair`."""
    conversation = [dict(m) for m in messages]
    system_index = next((i for i, m in enumerate(conversation) if m.get("role") == "system"), None)
    if system_index is None:
        conversation.insert(0, {"role": "system", "content": default_system_prompt})
        system_index = 0
    content = conversation[system_index].get("content") or ""
    if not isinstance(content, str):
        raise InvalidParameterError("messages", "The system message content must be a string.")

    def carrying(sentence: str) -> list[Message]:
        context = [dict(m) for m in conversation]
        context[system_index]["content"] = _append(content, sentence)
        return context

    sentences = tuple(preference_sentence(p) for p in preferences)
    negative_sentence = preference_sentence(negative) if negative is not None else None
    prefs = tuple(carrying(s) for s in sentences) if sentences else ([dict(m) for m in conversation],)
    contrast = carrying(negative_sentence) if negative_sentence is not None else conversation
    return PreferenceContexts(prefs, contrast, content, sentences, negative_sentence)


def resolve_default_system_prompt(setting: str, template_default: str | None) -> str:
    """The system message for conversations without one: ``template`` (the chat template's own default,
    else NEUTRAL_SYSTEM_PROMPT), ``paper`` (PAPER_SYSTEM_PROMPT), ``none`` (empty), or the text itself."""
    if setting == TEMPLATE:
        return template_default or NEUTRAL_SYSTEM_PROMPT
    if setting == PAPER:
        return PAPER_SYSTEM_PROMPT
    if setting == NONE:
        return ""
    return setting
