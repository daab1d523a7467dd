"""Pydantic models of ``POST /v1/completions`` (OpenAI's legacy text completions, as vLLM serves them)."""

from __future__ import annotations

import time
from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator

from amulet_core.errors import InvalidParameterError
from server.protocol import GenerationFields
from server.protocol_answers import PreferenceEcho, UsageInfo
from server.protocol_limits import PromptInput

MAX_COMPLETION_LOGPROBS = 20
"""Top alternatives per token for the integer ``logprobs`` (OpenAI allows 5, vLLM 20)."""


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list
    of such lists; every prompt gets ``n`` choices, numbered ``prompt_index * n + j``."""

    prompt: PromptInput
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool | None = True
    """vLLM's: add the tokenizer's special tokens (BOS) to text prompts."""

    @model_validator(mode="after")
    def _rules_between_fields(self) -> Self:
        if self.suffix:
            raise InvalidParameterError("suffix", "'suffix' (fill in the middle) is not supported.")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise InvalidParameterError("best_of", "'best_of' is not supported; it may only equal 'n'.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidParameterError(
                "logprobs", f"'logprobs' must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {self.logprobs}."
            )
        if self.echo and self.logprobs is not None:
            raise InvalidParameterError(
                "echo", "'echo' with 'logprobs' needs the prompt's log-probabilities, which this server does not compute."
            )
        return self


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
