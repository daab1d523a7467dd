"""Pydantic models of ``POST /v1/completions`` (OpenAI's legacy text completions, as vLLM serves them)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from server.protocol import GenerationFields
from server.protocol_answers import PreferenceEcho, UsageInfo

MAX_COMPLETION_LOGPROBS = 20
"""Top alternatives per token for the integer ``logprobs`` (OpenAI allows 5, vLLM 20)."""


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list
    of such lists; every prompt gets ``n`` choices, numbered ``prompt_index * n + j``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool | None = True
    """vLLM's: add the tokenizer's special tokens (BOS) to text prompts."""


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: parallel lists over the choice's tokens."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    preference: PreferenceEcho | None = None
