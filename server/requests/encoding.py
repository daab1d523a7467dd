"""Texts to token ids, refusing a text too long for the model's context before the tokenizer reads it."""

from __future__ import annotations

from collections.abc import Sequence

from amulet_core.errors import ContextLengthExceededError
from amulet_core.model.chat_template import ChatRenderer


def check_length_in_chars(text: str, renderer: ChatRenderer, max_model_len: int, param: str, what: str) -> None:
    """Raise ContextLengthExceededError naming ``param`` when ``text`` has more characters than ``max_model_len``
    tokens can hold (each token stands for at most ``renderer.max_token_chars`` characters): such a text
    can never fit, and tokenizing megabytes of it first would cost the server for nothing."""
    limit = max_model_len * max(1, renderer.max_token_chars)
    if len(text) > limit:
        raise ContextLengthExceededError(
            param,
            f"This model's maximum context length is {max_model_len} tokens, but the {what} take {len(text)} "
            f"characters, more than {max_model_len} tokens can hold. Shorten the {what}.",
        )


def encode_chat_texts(texts: Sequence[str], renderer: ChatRenderer, max_model_len: int) -> list[tuple[int, ...]]:
    """Token ids of rendered conversations, each checked by :func:`check_length_in_chars` first."""
    for text in texts:
        check_length_in_chars(text, renderer, max_model_len, "messages", "messages")
    return [renderer.encode_text(text) for text in texts]
