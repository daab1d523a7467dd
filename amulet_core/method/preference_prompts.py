"""Preference prompt pairs from OpenAI-style chat messages.

Rule: the contrast context is the conversation as given; the pref context is the same
conversation with the preference sentence appended to the first system message after one space
(:attr:`Placement.SYSTEM`, the paper's) or to the last user message after a blank line
(:attr:`Placement.END`, so that the contexts share every token before it). When the conversation
has no system message, both contexts get one whose content is ``default_system_prompt`` (empty
unless configured), so the two contexts still differ by the preference text alone.

A chat template without a system role (Gemma 2, Mistral v0.1/v0.2) is given the same conversations: the
renderer (:class:`~amulet_core.model.chat_template.ChatTokenizer`) folds the system text into the first
user turn, as Gemma 3's template does itself, so the ``system`` placement's sentence lands at the end of
that text, and the ``end`` placement's after the last user message as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from amulet_core.errors import InvalidParameterError
from amulet_core.method.settings import Method

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


def _append_paragraph(content: str, sentence: str) -> str:
    return f"{content}\n\n{sentence}" if content else sentence


class Placement(StrEnum):
    """Where a preference sentence (or a negative one) goes in its context."""

    SYSTEM = "system"
    """Appended to the first system message (the paper's placement). The contexts differ from there on, so
    each holds and prefills its own copy of the rest of the conversation."""
    END = "end"
    """Appended to the last user message: the contexts agree on every token before it and share its KV."""


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
    """The contexts of one multi-preference request: K preference conversations, each the conversation with
    one preference sentence appended where the placement says, and the contrast conversation: as given, or
    carrying the negative sentence. With no preference sentence (classifier-free guidance) the one
    preference context is the conversation as given."""

    prefs: tuple[list[Message], ...]
    contrast: list[Message]
    system_prompt: str
    """The system message before any sentence: the conversation's own, or the default given to it."""
    sentences: tuple[str, ...]
    negative: str | None

    def decoded_by(self, method: Method) -> list[list[Message]]:
        """The conversations a request of ``method`` decodes, in the engine's order: the K preference contexts
        then the contrast one (la, amulet), the preference contexts (pref), the contrast one alone (base)."""
        if method is Method.BASE:
            return [self.contrast]
        if method is Method.PREF:
            return list(self.prefs)
        return [*self.prefs, self.contrast]


def preference_contexts(
    messages: Sequence[Message],
    preferences: Sequence[str],
    default_system_prompt: str = "",
    negative: str | None = None,
    placement: Placement | str = Placement.SYSTEM,
) -> PreferenceContexts:
    """Build the K preference contexts and the contrast context; they differ by their sentences alone.

    ``placement`` says where a sentence goes (:class:`Placement`): appended to the first system message
    after one space, or to the last user message after a blank line. A conversation without a system
    message gets one whose content is ``default_system_prompt`` in every context, whatever the placement.
    Preset names expand as in :func:`preference_sentence`, for ``negative`` too. With one preference, no
    negative and the system placement this is exactly :func:`preference_message_pair`. Raises
    InvalidParameterError naming ``preference.placement`` for the end placement without a user message."""
    placement = Placement(placement)
    conversation = [dict(m) for m in messages]
    system_index = next((i for i, m in enumerate(conversation) if m.get("role") == "system"), None)
    if system_index is None:
        conversation.insert(0, {"role": "system", "content": default_system_prompt})
        system_index = 0
    content = conversation[system_index].get("content") or ""
    if not isinstance(content, str):
        raise InvalidParameterError("messages", "The system message content must be a string.")
    target, join = system_index, _append
    if placement is Placement.END:
        users = [i for i, m in enumerate(conversation) if m.get("role") == "user"]
        if not users:
            raise InvalidParameterError(
                "preference.placement", "The 'end' placement appends the preference to the last user message, and there is none."
            )
        target, join = users[-1], _append_paragraph
    target_content = conversation[target].get("content") or ""
    if not isinstance(target_content, str):
        raise InvalidParameterError("messages", "The message content must be a string.")

    def carrying(sentence: str) -> list[Message]:
        context = [dict(m) for m in conversation]
        context[target]["content"] = join(target_content, sentence)
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
