"""Pydantic models of a Messages request (``POST /v1/messages``, and ``/v1/messages/count_tokens``), as the
``anthropic`` SDK sends it.

Typed strictly and bounded like the chat request (:mod:`server.protocol_limits`: every list capped, its count
checked before its items). Content blocks are ``text``, ``tool_use`` and ``tool_result`` (and ``thinking`` /
``redacted_thinking`` echoed back in the history, which change nothing); any other block (``image``,
``document`` ...) is a 400 naming it. Fields this model does not declare are kept (``model_extra``): this
server's own fields (``preference`` ...) arrive that way, through the SDK's ``extra_body``
(:mod:`server.anthropic.conversion` passes them on to the chat request).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from amulet_core.sampling.params import MAX_STOP_SEQUENCES
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

MAX_TOOL_USE_ID_CHARS = 256
"""Characters of a ``tool_use`` block's id (and of a ``tool_result``'s ``tool_use_id``)."""

SUPPORTED_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class _Part(BaseModel):
    """Request objects: strictly typed, tolerant of keys they do not declare (``cache_control``, ``citations`` ...)."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextBlock(_Part):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Part):
    """An assistant's tool call, in the history a client sends back."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=MAX_TOOL_USE_ID_CHARS)
    name: str = Field(pattern=FUNCTION_NAME)
    input: dict[str, Any]


TextBlocks = Annotated[list[TextBlock], Field(max_length=MAX_CONTENT_PARTS)]


class ToolResultBlock(_Part):
    """A tool's result, in a user message."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=MAX_TOOL_USE_ID_CHARS)
    content: Annotated[
        str | TextBlocks | None, items_at_most(MAX_CONTENT_PARTS), BeforeValidator(lambda v: _only(v, ("text",)))
    ] = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


class ThinkingBlock(_Part):
    """A thinking block echoed back in the history (this server writes none; dropped, as Anthropic drops them)."""

    type: Literal["thinking", "redacted_thinking"]


def _only(value: Any, allowed: tuple[str, ...]) -> Any:
    """Refuse a list holding a block of another type than ``allowed``, naming the type, before the union tries it."""
    if isinstance(value, list):
        for i, block in enumerate(value):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(block, dict) and kind not in allowed:
                supported = ", ".join(map(repr, allowed))
                raise ValueError(f"block {i} is of type {kind!r}, which is not supported here (only {supported})")
    return value


def _block_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return {
        "text": "TextBlock",
        "tool_use": "ToolUseBlock",
        "tool_result": "ToolResultBlock",
        "thinking": "ThinkingBlock",
        "redacted_thinking": "ThinkingBlock",
    }.get(kind)


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("TextBlock")]
    | Annotated[ToolUseBlock, Tag("ToolUseBlock")]
    | Annotated[ToolResultBlock, Tag("ToolResultBlock")]
    | Annotated[ThinkingBlock, Tag("ThinkingBlock")],
    Discriminator(_block_tag),
]
"""A content block of a message (the tags start with a capital so that error locations leave them out)."""


class MessageParam(_Part):
    role: Literal["user", "assistant"]
    content: Annotated[
        str | Annotated[list[ContentBlock], Field(max_length=MAX_CONTENT_PARTS)],
        items_at_most(MAX_CONTENT_PARTS),
        BeforeValidator(lambda v: _only(v, SUPPORTED_BLOCKS)),
    ]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        if isinstance(self.content, list):
            kinds = {block.type for block in self.content}
            if self.role == "user" and kinds & {"tool_use", "thinking", "redacted_thinking"}:
                raise ValueError("a 'user' message cannot hold 'tool_use' or 'thinking' blocks (they are the assistant's)")
            if self.role == "assistant" and "tool_result" in kinds:
                raise ValueError("an 'assistant' message cannot hold 'tool_result' blocks (they go in a 'user' message)")
        return self


class ToolDefinition(_Part):
    """A client tool: a name, a description and the JSON schema of its input. Server tools (``web_search_...``,
    ``bash_...``: a ``type`` other than ``custom``) are refused by name."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(
                f"server tools (type {data.get('type')!r}) are not supported; only client tools with an 'input_schema'"
            )
        return data


class ToolChoice(_Part):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_a_name(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("a 'tool' tool_choice needs the tool's 'name'")
        return self


class ThinkingConfig(_Part):
    """``thinking``: a reasoning model's thinking on (``enabled``: ``enable_thinking`` true in the chat template)
    or off (``disabled``: false); ``adaptive`` leaves it to the template. ``budget_tokens`` is checked as
    Anthropic's (below ``max_tokens``) but caps nothing: the thinking and the answer share ``max_tokens``."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _enabled_needs_a_budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("'thinking' of type 'enabled' needs 'budget_tokens'")
        return self


class JsonOutputFormat(_Part):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Part):
    """Structured outputs (``format``, through the grammar engine); ``effort`` changes nothing here."""

    format: JsonOutputFormat | None = None
    effort: str | None = None


class MessagesBody(RequestBody):
    """The fields of a Messages request (:class:`MessagesRequest`) and of a token count (:class:`CountTokensRequest`)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    messages: list[MessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: Annotated[
        str | TextBlocks | None, items_at_most(MAX_CONTENT_PARTS), BeforeValidator(lambda v: _only(v, ("text",)))
    ] = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stream: bool | None = False
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # Accepted, no effect here.
    metadata: Annotated[
        Annotated[dict[str, Any], Field(max_length=MAX_METADATA_ENTRIES)] | None, entries_at_most(MAX_METADATA_ENTRIES)
    ] = None
    service_tier: str | None = None
    inference_geo: str | None = None
    speed: str | None = None
    cache_control: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesRequest(MessagesBody):
    """``POST /v1/messages``. ``max_tokens`` is required, as Anthropic's is."""

    max_tokens: int = Field(ge=1)


class CountTokensRequest(MessagesBody):
    """``POST /v1/messages/count_tokens``: the Messages request whose prompt is counted (``max_tokens`` optional,
    as Anthropic's count takes none; the sampling fields are accepted and count nothing)."""
