"""``POST /v1/responses``: the request as the official SDK sends it, validated strictly like chat's
(:mod:`server.protocol`): every list capped and counted before its items, a wrong type a 400 naming the field.
Fields not declared here are kept (``model_extra``) and pass to the chat request (``preference``, ``top_k``,
``seed`` ... through the SDK's ``extra_body``), where the request policy judges them as on chat completions."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from amulet_core.errors import InvalidParameterError
from server.protocol_base import RequestBody
from server.protocol_limits import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_METADATA_ENTRIES,
    MAX_TOOLS,
    entries_at_most,
    items_at_most,
)
from server.protocol_messages import FUNCTION_NAME

MAX_INPUT_ITEMS = MAX_MESSAGES
"""Items of one request's ``input``."""
MAX_ID_CHARS = 256
"""Characters of an id a client sends (``previous_response_id``, an item's ``id`` or ``call_id``)."""
ITEM_TAGS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
    "reasoning": "Reasoning",
}
"""The input item types supported, and their union tags (capitalised: error locations leave them out)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def _text_part(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") not in ("input_text", "output_text"):
        raise ValueError(f"only text content parts (input_text, output_text) are supported, got type {value.get('type')!r}")
    return value


class TextPart(_Model):
    """A message's text part: ``input_text``, or ``output_text`` in an answer sent back (its ``annotations`` and
    ``logprobs`` are accepted and change nothing)."""

    type: Literal["input_text", "output_text"]
    text: str


TextParts = Annotated[
    str | Annotated[list[Annotated[TextPart, BeforeValidator(_text_part)]], Field(max_length=MAX_CONTENT_PARTS)],
    items_at_most(MAX_CONTENT_PARTS),
]


def joined(content: str | list[TextPart]) -> str:
    """A content's text (parts joined by newlines, as chat's)."""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


class MessageItem(_Model):
    """A message: ``{"role", "content"}`` (the SDK's easy form, without ``type``) or ``{"type": "message", ...}``."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: TextParts
    id: Id | None = None
    status: str | None = None


class FunctionCallItem(_Model):
    """A function call of the model's, sent back with its output."""

    type: Literal["function_call"]
    call_id: Id
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: Id | None = None
    status: str | None = None


class FunctionCallOutputItem(_Model):
    """The output of a function call (``call_id``: the call's)."""

    type: Literal["function_call_output"]
    call_id: Id
    output: TextParts
    id: Id | None = None
    status: str | None = None


class ReasoningText(_Model):
    type: Literal["reasoning_text", "summary_text"]
    text: str


ReasoningParts = Annotated[Annotated[list[ReasoningText], Field(max_length=MAX_CONTENT_PARTS)], items_at_most(MAX_CONTENT_PARTS)]


class ReasoningItem(_Model):
    """A reasoning item of an earlier answer, sent back with the conversation: accepted and left out of the prompt
    (as chat templates leave out earlier turns' thinking)."""

    type: Literal["reasoning"]
    id: Id | None = None
    summary: ReasoningParts = Field(default_factory=list)
    content: ReasoningParts | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _known_item(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("an input item must be an object (a message, function_call, function_call_output or reasoning)")
    kind = value.get("type", "message")
    if kind not in ITEM_TAGS:
        hint = "; previous_response_id continues a stored conversation" if kind == "item_reference" else ""
        raise ValueError(
            f"input items of type {kind!r} are not supported (only message, function_call, function_call_output and "
            f"reasoning){hint}"
        )
    return value


def _item_tag(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[ReasoningItem, Tag("Reasoning")],
    Discriminator(_item_tag),
    BeforeValidator(_known_item),
]


def _function_tool(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") != "function":
        raise ValueError(
            f"only function tools are supported; {value.get('type')!r} is a built-in tool, which this server does not run"
        )
    return value


class FunctionTool(_Model):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Model):
    """``tool_choice`` naming one function."""

    type: Literal["function"]
    name: str


class TextFormat(_Model):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (its ``name``, ``schema`` and ``strict``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_needs_name(self) -> Self:
        if self.type == "json_schema" and self.name is None:
            raise InvalidParameterError("text.format.name", "'text.format.name' is required for the type 'json_schema'.")
        return self


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    """Accepted, no effect."""


class ReasoningConfig(_Model):
    """``reasoning``: ``effort`` goes to the chat template as ``reasoning_effort`` (as chat's field); ``summary``
    is accepted and changes nothing (this server writes no summaries)."""

    effort: str | None = Field(default=None, min_length=1, max_length=32)
    summary: str | None = None
    generate_summary: str | None = None


class ResponseStreamOptions(_Model):
    include_obfuscation: bool | None = None
    """Accepted, no effect: this server adds no obfuscation padding."""


class ResponsesRequest(RequestBody):
    """``POST /v1/responses``."""

    model: str | None = None
    input: Annotated[str | Annotated[list[InputItem], Field(max_length=MAX_INPUT_ITEMS)], items_at_most(MAX_INPUT_ITEMS)]
    instructions: str | None = None
    """A system message for this response only (not carried on by ``previous_response_id``, as OpenAI's)."""
    previous_response_id: Id | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Annotated[FunctionTool, BeforeValidator(_function_tool)]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    stream_options: ResponseStreamOptions | None = None
    store: bool | None = True
    metadata: Annotated[
        Annotated[dict[str, str], Field(max_length=MAX_METADATA_ENTRIES)] | None, entries_at_most(MAX_METADATA_ENTRIES)
    ] = None
    # Refused unless the value changes nothing (chat_request.UNSUPPORTED says why).
    background: bool | None = None
    include: list[str] | None = Field(default=None, max_length=16)
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: ReasoningConfig | None = None
    # Accepted, no effect here.
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise InvalidParameterError("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        return self
