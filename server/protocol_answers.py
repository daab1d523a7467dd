"""Pydantic models of the API's answers: chat completions and their chunks, usage, log-probabilities,
model cards and errors. Answers carry two extensions that OpenAI clients ignore: ``preference`` (the
effective Amulet settings) and ``usage.base_prompt_tokens`` (what the second, preference-free
context cost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from amulet_core.engine.protocol import TokenLogprob, Usage
from amulet_core.method.settings import MethodSettings

MIN_LOGPROB = -9999.0
"""OpenAI's floor for logprobs (JSON has no -inf)."""


class PreferenceEcho(BaseModel):
    """The effective preference settings of a request (extension field ``preference``): everything that
    decides how the answer reads. Dump answers with ``by_alias=True`` so ``lam`` is written as ``lambda``."""

    model_config = ConfigDict(populate_by_name=True)

    text: str
    """The sentence added to the (first) preference context, where ``placement`` says ("" for guidance)."""
    texts: list[str]
    """Every preference context's sentence, in order."""
    weights: list[float]
    """The preference contexts' normalised weights (summing to 1)."""
    negative: str | None
    """The sentence the contrast context carries (a negative preference or ``negative_prompt``), or None."""
    system_prompt: str
    """The system message all contexts share before their sentence: the conversation's own, or the
    server's default for conversations without one (``--default-system-prompt``)."""
    mode: str
    """``default``, ``paper``, or ``cfg`` for classifier-free guidance (``guidance_scale``)."""
    placement: str
    """Where the sentences (and the negative one) went: ``system`` (appended to the first system message) or
    ``end`` (appended to the last user message)."""
    method: str
    iterations: int
    eta: float
    alpha: float
    lam: float = Field(alias="lambda")
    ratio: float
    plausibility: float
    coefficient: float | None
    """The closed-form A of ``A * sum_i v_i l_pref_i + (1 - A) * l_contrast`` (None for base and pref)."""

    @classmethod
    def from_settings(
        cls,
        sentences: Sequence[str],
        system_prompt: str,
        settings: MethodSettings,
        negative: str | None = None,
        mode: str | None = None,
        *,
        placement: str,
    ) -> PreferenceEcho:
        return cls(
            text=sentences[0] if sentences else "",
            texts=list(sentences),
            weights=list(settings.normalized_weights),
            negative=negative,
            system_prompt=system_prompt,
            mode=mode or settings.mode.value,
            placement=str(placement),
            method=settings.method.value,
            iterations=settings.iterations,
            eta=settings.eta,
            alpha=settings.alpha,
            lam=settings.lam,
            ratio=settings.ratio,
            plausibility=settings.plausibility,
            coefficient=settings.effective_strength,
        )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    base_prompt_tokens: int = 0
    """Extension: prompt tokens of the second (base) context, on top of ``prompt_tokens``."""

    @classmethod
    def from_engine(cls, usage: Usage) -> UsageInfo:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
            base_prompt_tokens=usage.base_prompt_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, token: str, logprob: float) -> TopLogprob:
        return cls(token=token, logprob=max(logprob, MIN_LOGPROB), bytes=list(token.encode("utf-8")))


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo]

    @classmethod
    def from_engine(cls, items: Sequence[TokenLogprob]) -> ChoiceLogprobs:
        content = []
        for lp in items:
            first = TopLogprob.of(lp.token, lp.logprob)
            top = [TopLogprob.of(token, logprob) for _, token, logprob in lp.top]
            content.append(TokenLogprobInfo(token=first.token, logprob=first.logprob, bytes=first.bytes, top_logprobs=top))
        return cls(content=content)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """A reasoning model's thinking (``--reasoning-parser``); left out of answers that have none."""
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    preference: PreferenceEcho | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None
    preference: PreferenceEcho | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "amulet-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
