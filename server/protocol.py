"""Pydantic models of the OpenAI-compatible API's requests (the answers are in protocol_answers.py).

Requests are validated strictly from JSON (``model_validate_json``): numbers are not parsed out of
strings, and a wrong type is a 400. Fields the models do not declare are kept (``model_extra``) for
:mod:`server.requests.policy`, which refuses the known ones that would change the answer and logs the
unknown ones. ``preference`` is this server's extension. Every list and object field is capped, and its
count is checked before its items (:mod:`server.protocol_limits`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from amulet_core.errors import InvalidParameterError
from amulet_core.method.settings import MAX_PREFERENCES
from amulet_core.sampling.params import MAX_LOGIT_BIAS, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS, SEED_MAX, SEED_MIN
from server.protocol_base import RequestBody, RequestObject
from server.protocol_limits import (
    MAX_CHOICES,
    MAX_MESSAGES,
    MAX_METADATA_ENTRIES,
    MAX_TEMPLATE_KWARGS,
    MAX_TOOLS,
    entries_at_most,
    items_at_most,
)
from server.protocol_messages import ChatMessage, ChatTool, NamedToolChoice

MAX_CACHE_SALT_CHARS = 256
"""Characters of a ``cache_salt``."""
MAX_PROFILE_REF_CHARS = 128
"""Characters of a ``preference.profile`` (a stored profile's id or name)."""


class PreferenceItem(BaseModel):
    """One preference of a list, with its weight (default 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    weight: float | None = None


PreferenceList = Annotated[list[str | PreferenceItem], Field(max_length=MAX_PREFERENCES)]
"""Several preferences at once: presets, sentences or ``{"text", "weight"}`` objects."""


class PreferenceSpec(BaseModel):
    """The object form of ``preference``. Unset numbers take the defaults of ``mode`` (MethodSettings).

    Unlike the rest of a request, unknown keys here are refused: this object is the server's own, no
    client adds fields to it, and a misspelt parameter would silently decode differently."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)

    profile: str | None = Field(default=None, min_length=1, max_length=MAX_PROFILE_REF_CHARS)
    """A stored preference profile (``POST /v1/preference_profiles``), by id or name: its preference, with the
    other fields given here overriding its own (:mod:`server.profiles.service`); resolved before admission."""
    text: Annotated[str | PreferenceList | None, items_at_most(MAX_PREFERENCES)] = None
    """The preference(s); required unless ``profile`` gives them."""
    weights: list[float] | None = Field(default=None, max_length=MAX_PREFERENCES)
    """One weight per preference in ``text`` (default: 1 each); instead of per-item weights."""
    negative: str | None = None
    """A preset or sentence the contrast context carries (amulet and la), instead of nothing."""
    mode: Literal["default", "paper"] | None = None
    placement: Literal["system", "end"] | None = None
    """Where the sentences go (amulet_core.method.preference_prompts.Placement): ``system`` (appended to the
    first system message, the paper's) or ``end`` (appended to the last user message, so the contexts share
    the conversation before it). Unset: the server's ``--preference-placement``, or ``system`` for
    ``"mode": "paper"``."""
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
        given = self.model_dump(
            exclude={"profile", "text", "weights", "negative", "mode", "placement", "coefficient"}, exclude_none=True
        )
        if self.coefficient is not None:
            given["strength"] = self.coefficient
        return given


class StreamOptions(RequestObject):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Accepted, no effect: this server adds no obfuscation padding."""


class JsonSchemaFormat(RequestObject):
    """``response_format.json_schema``: the schema the answer must follow (always enforced, ``strict`` or not)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestObject):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(RequestObject):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES)
    grammar: str | None = None
    """An llguidance Lark grammar."""
    json_object: bool | None = None


class GenerationFields(RequestBody):
    """The fields the chat and text completion requests share: sampling (OpenAI's and vLLM's), streaming,
    the ``preference`` extension, and OpenAI's fields that change nothing here (accepted, typed, unused)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    stop: Annotated[
        str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None, items_at_most(MAX_STOP_SEQUENCES)
    ] = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: Annotated[
        Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None, entries_at_most(MAX_LOGIT_BIAS)
    ] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    preference: Annotated[str | PreferenceList | PreferenceSpec | None, items_at_most(MAX_PREFERENCES)] = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES)
    guided_grammar: str | None = None
    cache_salt: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CACHE_SALT_CHARS,
        description="Keeps this request's prompt out of the prefix cache of requests with another salt (or none): it "
        "reuses, and reports as cached_tokens, only blocks cached by requests of the same salt (and the same API key "
        "when the server has several).",
    )
    # Accepted, no effect here (request_policy.NO_EFFECT_FIELDS says why).
    user: str | None = None
    store: bool | None = None
    metadata: Annotated[
        Annotated[dict[str, str], Field(max_length=MAX_METADATA_ENTRIES)] | None, entries_at_most(MAX_METADATA_ENTRIES)
    ] = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    priority: int | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise InvalidParameterError("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``. ``top_k``, ``min_p``, ... and ``preference`` are extensions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=MAX_TEMPLATE_KWARGS)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    guidance_scale: float | None = None
    """Classifier-free guidance (transformers' name): A of ``A * l_pos + (1 - A) * l_neg``; needs ``negative_prompt``."""
    negative_prompt: str | None = None
    """The sentence the contrast context carries for classifier-free guidance."""
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    preference_in_reasoning: bool = False
    """With ``--reasoning-parser``: decode a reasoning model's thinking with the preference's contrast (and the
    grammar) too; by default they begin with the answer, after ``</think>``, and the thinking is decoded from
    the preference context alone."""
    reasoning_effort: str | None = Field(default=None, min_length=1, max_length=32)
    """Given to the chat template as ``reasoning_effort`` (templates that read it, like gpt-oss's, think less or
    more; others ignore it); ``chat_template_kwargs.enable_thinking`` turns a Qwen3 model's thinking off."""
    # Accepted, no effect here.
    prediction: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> Self:
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
