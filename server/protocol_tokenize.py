"""Pydantic models of vLLM's ``/tokenize``, ``/detokenize`` and ``/version``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from server.protocol_base import RequestBody
from server.protocol_limits import MAX_MESSAGES, MAX_TEMPLATE_KWARGS, TokenIds
from server.protocol_messages import ChatMessage


class TokenizeRequest(RequestBody):
    """Either ``prompt`` (raw text) or ``messages`` (through the chat template), as in vLLM."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None
    """For a prompt: add the tokenizer's special tokens (default true). Chat templates add their own."""
    add_generation_prompt: bool | None = None
    """Default: true, unless ``continue_final_message`` continues the last message."""
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=MAX_TEMPLATE_KWARGS)
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
