"""Pydantic models of the OpenAI-compatible API: what requests may contain and what answers look like.

Requests are validated strictly from JSON (``model_validate_json``): numbers are not parsed out of
strings, and a wrong type is a 400. Fields the models do not declare are kept (``model_extra``) for
:mod:`server.request_policy`, which refuses the known ones that would change the answer and logs the
unknown ones.
Answers carry two extensions that OpenAI clients ignore: ``preference`` (the effective Amulet
settings) and ``usage.base_prompt_tokens`` (what the second, preference-free context cost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from amulet_core.engine.protocol import TokenLogprob, Usage
from amulet_core.methods import MethodSettings

MIN_LOGPROB = -9999.0
"""OpenAI's floor for logprobs (JSON has no -inf)."""

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds torch's generators take; outside this range a seed would fail inside the engine."""


class _Request(BaseModel):
    """Request objects: strictly typed, and tolerant of fields they do not declare (see request_policy)."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Request):
    """One part of a message's content; only text parts are supported. Other keys (``cache_control``)
    are accepted and change nothing."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        # Checked before the fields so an image part gets this message, not "field 'text' missing".
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"only 'text' content parts are supported, got type {data.get('type')!r}")
        return data


class PreferenceSpec(BaseModel):
    """The object form of ``preference``. Unset numbers take the defaults of ``mode`` (MethodSettings).

    Unlike the rest of a request, unknown keys here are refused: this object is the server's own, no
    client adds fields to it, and a misspelt parameter would silently decode differently."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)

    text: str
    mode: Literal["default", "paper"] | None = None
    method: Literal["amulet", "la", "pref", "base"] | None = None
    iterations: int | None = None
    eta: float | None = None
    alpha: float | None = None
    lam: float | None = Field(default=None, alias="lambda")
    ratio: float | None = None
    coefficient: float | None = None
    """A set directly for la and amulet (MethodSettings.strength)."""
    plausibility: float | None = None

    def method_fields(self) -> dict[str, Any]:
        """The given method parameters under MethodSettings' names."""
        given = self.model_dump(exclude={"text", "mode", "coefficient"}, exclude_none=True)
        if self.coefficient is not None:
            given["strength"] = self.coefficient
        return given


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Accepted, no effect: this server adds no obfuscation padding."""


class GenerationFields(_Request):
    """The fields the chat and text completion requests share: sampling (OpenAI's and vLLM's), streaming,
    the ``preference`` extension, and OpenAI's fields that change nothing here (accepted, typed, unused)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    preference: str | PreferenceSpec | None = None
    # Accepted, no effect here (request_policy.NO_EFFECT_FIELDS says why).
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    priority: int | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n


class ChatMessage(_Request):
    """A chat message. Keys clients echo back from answers (``refusal``, ``annotations`` ...) are accepted."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    """Given to the chat template with the message (templates that know ``name`` render it)."""
    tool_calls: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls:
            raise ValueError("tool calls are not supported")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, like vLLM)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it (``developer`` is a system message)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``. ``top_k``, ``min_p``, ... and ``preference`` are extensions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # Accepted, no effect here.
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- answers


class PreferenceEcho(BaseModel):
    """The effective preference settings of a request (extension field ``preference``): everything that
    decides how the answer reads. Dump answers with ``by_alias=True`` so ``lam`` is written as ``lambda``."""

    model_config = ConfigDict(populate_by_name=True)

    text: str
    """The sentence that was added to the system message."""
    system_prompt: str
    """The system message both contexts share before the sentence: the conversation's own, or the
    server's default for conversations without one (``--default-system-prompt``)."""
    mode: str
    method: str
    iterations: int
    eta: float
    alpha: float
    lam: float = Field(alias="lambda")
    ratio: float
    plausibility: float
    coefficient: float | None
    """The closed-form A of ``A * l_pref + (1 - A) * l_base`` (None for base and pref)."""

    @classmethod
    def from_settings(cls, sentence: str, system_prompt: str, settings: MethodSettings) -> PreferenceEcho:
        return cls(
            text=sentence,
            system_prompt=system_prompt,
            mode=settings.mode.value,
            method=settings.method.value,
            iterations=settings.iterations,
            eta=settings.eta,
            alpha=settings.alpha,
            lam=settings.lam,
            ratio=settings.ratio,
            plausibility=settings.plausibility,
            coefficient=settings.coefficient,
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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


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
