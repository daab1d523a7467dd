"""vLLM's ``/tokenize`` and ``/detokenize``: body -> intent -> text -> token ids (or ids -> text).

A chat conversation is rendered as a chat request renders it without a preference (a preference adds a
sentence to the system message).
"""

from __future__ import annotations

from dataclasses import dataclass

from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import Message
from amulet_core.model.chat_template import ChatRenderer, ChatTemplateOptions
from server.protocol_messages import template_messages
from server.protocol_tokenize import DetokenizeRequest, TokenizeRequest
from server.requests.admission import Admission
from server.requests.fields import template_options


@dataclass(frozen=True)
class TokenizeIntent:
    """A raw prompt (``messages`` None) or a conversation and how to render it."""

    prompt: str
    messages: tuple[Message, ...] | None
    options: ChatTemplateOptions
    add_special_tokens: bool
    return_token_strs: bool


def admit_tokenize(body: TokenizeRequest, admission: Admission) -> TokenizeIntent:
    """Phase 1: the policy, the model, and the rendering options (checked against the conversation)."""
    admission.check_common(body, body.model)
    messages = None if body.messages is None else template_messages(body.messages)
    options = template_options(body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs, messages)
    add_special = body.add_special_tokens is not False
    return TokenizeIntent(body.prompt or "", messages, options, add_special, bool(body.return_token_strs))


def tokenize(intent: TokenizeIntent, renderer: ChatRenderer) -> tuple[tuple[int, ...], list[str] | None]:
    """Phases 2 and 3 (the body size limit bounds the text): the ids, and their vocabulary entries when asked for."""
    if intent.messages is not None:
        ids = renderer.encode_text(renderer.chat_text(intent.messages, intent.options))
    else:
        ids = renderer.encode_prompt(intent.prompt, intent.add_special_tokens)
    return ids, renderer.token_strings(ids) if intent.return_token_strs else None


def admit_detokenize(body: DetokenizeRequest, admission: Admission) -> list[int]:
    """The ids to decode, each in the model's vocabulary."""
    admission.check_common(body, body.model)
    vocab = admission.vocab_size()
    if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
        raise InvalidParameterError("tokens", f"Token ids must be from 0 to {vocab - 1}.")
    return list(body.tokens)
