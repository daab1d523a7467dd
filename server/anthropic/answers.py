"""A Messages answer: its content blocks (with ``--reasoning-parser``, a ``thinking`` block first, the model's
thinking; then text, then ``tool_use`` blocks parsed by the chat's tool parser from the text after the thinking), its
``stop_reason`` and ``stop_sequence``, and its usage, in Anthropic's shapes (whole here; streamed in :mod:`.events`).
A thinking block's ``signature`` is empty: this server signs nothing (and ignores the thinking blocks sent back).

``usage.input_tokens`` counts the prompt tokens that were not read from the prefix cache; those are
``cache_read_input_tokens`` (Anthropic's split: the prompt is their sum). ``preference`` is this server's extension,
as on chat completions (the effective settings; absent for a request without a preference).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from amulet_core.engine.protocol import Usage
from server.protocol_answers import PreferenceEcho
from server.requests.tools import ToolRequest


class ThinkingContent(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]

    def input_json(self) -> str:
        return json.dumps(self.input, ensure_ascii=False, separators=(",", ":"))


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def from_engine(cls, usage: Usage) -> MessageUsage:
        cached = usage.cached_prompt_tokens
        return cls(
            input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens, cache_read_input_tokens=cached
        )


class AnthropicMessage(BaseModel):
    """A Messages answer (``type: "message"``)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ThinkingContent | TextContent | ToolUseContent]
    model: str
    stop_reason: str | None
    stop_sequence: str | None
    usage: MessageUsage
    preference: PreferenceEcho | None = None

    def payload(self) -> dict[str, Any]:
        """The JSON object (``preference`` only when there is one; its ``lambda`` under that name)."""
        payload = self.model_dump(by_alias=True)
        if self.preference is None:
            del payload["preference"]
        return payload


def message_id(request_id: str) -> str:
    """The message's id for the engine request's (the same hex, so the server's log lines name it)."""
    return "msg_" + request_id.removeprefix("chatcmpl-")


def split_content(text: str, tools: ToolRequest | None) -> tuple[str, list[ToolUseContent]]:
    """The answer's text (after any thinking) and its tool calls (none without tools), each call with an id unique
    to this answer."""
    if tools is None:
        return text, []
    parsed = tools.parse(text)
    calls = [
        ToolUseContent(id=f"toolu_{uuid.uuid4().hex[:24]}", name=c.name, input=json.loads(c.arguments)) for c in parsed.tool_calls
    ]
    return parsed.content or "", calls


def stop_reason(finish_reason: str | None, stop_sequence: str | None, called: bool) -> str:
    """Anthropic's ``stop_reason``: ``max_tokens`` (ran out), ``tool_use``, ``stop_sequence`` or ``end_turn``."""
    if finish_reason == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


@dataclass(frozen=True)
class StopSequences:
    """Which of the request's stop sequences ended an answer, if one did.

    The engine cuts the text before a stop string and says only ``stop``; the answer's token ids, decoded whole,
    go on past the text with the stop string that ended it (an answer that ended at its end-of-sequence token does
    not)."""

    stops: tuple[str, ...]
    decode: Callable[[Sequence[int]], str]
    """The answer's token ids as text, as the engine decoded them."""

    def matched(self, finish_reason: str | None, text: str, token_ids: Sequence[int]) -> str | None:
        if finish_reason != "stop" or not self.stops or not token_ids:
            return None
        whole = self.decode(token_ids)
        if not whole.startswith(text):
            return None
        return next((stop for stop in self.stops if whole.startswith(stop, len(text))), None)


def message_of(
    request_id: str,
    model: str,
    text: str,
    calls: list[ToolUseContent],
    reason: str,
    stop_sequence: str | None,
    usage: Usage,
    preference: PreferenceEcho | None,
    thinking: str | None = None,
) -> AnthropicMessage:
    """The whole answer: a thinking block (when there is thinking), a text block (when there is text), then the tool
    calls."""
    content: list[ThinkingContent | TextContent | ToolUseContent] = [ThinkingContent(thinking=thinking)] if thinking else []
    if text:
        content.append(TextContent(text=text))
    content.extend(calls)
    return AnthropicMessage(
        id=message_id(request_id),
        content=content,
        model=model,
        stop_reason=reason,
        stop_sequence=stop_sequence if reason == "stop_sequence" else None,
        usage=MessageUsage.from_engine(usage),
        preference=preference,
    )
