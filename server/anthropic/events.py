"""A streamed Messages answer: Anthropic's server-sent events, written by :class:`MessageEvents` (a
:class:`~server.serving_choices.ChunkFormat`, so :func:`~server.serving_choices.stream_response` runs the stream:
the disconnect watch, the 429/503 before the first event, the observer's report).

The events, in order: ``message_start`` (the message, no content yet) and a ``ping``; with ``--reasoning-parser``,
for the model's thinking, ``content_block_start`` (a ``thinking`` block), ``content_block_delta``
(``thinking_delta``) as it comes, ``content_block_stop``; for the text,
``content_block_start``, ``content_block_delta`` (``text_delta``) as it comes, ``content_block_stop``; for each
tool call, ``content_block_start`` (a ``tool_use`` block, empty ``input``), one ``content_block_delta``
(``input_json_delta``) and ``content_block_stop``; then ``message_delta`` (``stop_reason``, ``stop_sequence`` and
the usage) and ``message_stop``. With tools, text is sent as it comes until a call may begin, then held and parsed
at the end (:class:`~server.tool_calls.ToolCallStream`). A failure once the stream has begun is an ``error``
event (:func:`anthropic_stream`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse

from amulet_core.engine.parallel_sampling import ChoiceOutput
from amulet_core.engine.protocol import Usage
from server.anthropic.answers import MessageUsage, StopSequences, ToolUseContent, message_id, split_content, stop_reason
from server.anthropic.errors import sse_event, stream_error_event
from server.protocol_answers import PreferenceEcho
from server.reasoning_parsers import ReasoningParser
from server.requests.chat import PreparedChat
from server.tool_calls import ToolCallStream


class MessageEvents:
    """The events of one streamed answer (see the module docstring)."""

    def __init__(
        self,
        prepared: PreparedChat,
        model_name: str,
        stops: StopSequences,
        preference: PreferenceEcho | None,
        reasoning: ReasoningParser | None = None,
    ) -> None:
        self.request = prepared.request
        self.model_name = model_name
        self.stops = stops
        self.preference = preference
        self.tool_stream = ToolCallStream(prepared.tools) if prepared.tools is not None else None
        self.reasoning = reasoning.stream() if reasoning is not None else None
        self.thinking_open = False
        self.text_open = False
        self.blocks = 0
        """Content blocks started so far (the next one's index)."""
        self.raw_text: list[str] = []
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def opening(self, num_choices: int) -> list[str]:
        message: dict[str, Any] = {
            "id": message_id(self.request.request_id),
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model_name,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": MessageUsage(input_tokens=len(self.request.prompt_ids), output_tokens=0).model_dump(),
        }
        if self.preference is not None:
            message["preference"] = self.preference.model_dump(by_alias=True)
        return [sse_event("message_start", {"type": "message_start", "message": message}), sse_event("ping", {"type": "ping"})]

    def delta(self, choice: ChoiceOutput) -> list[str]:
        out = choice.output
        self.raw_text.append(out.text)
        self.token_ids.extend(out.token_ids)
        if self.reasoning is None:
            return self._answer(out.text)
        split = self.reasoning.feed(out.text)
        return self._thinking(split.reasoning or "") + self._answer(split.content or "")

    def _thinking(self, thinking: str) -> list[str]:
        if not thinking:
            return []
        events = []
        if not self.thinking_open:
            self.thinking_open = True
            block = {"type": "thinking", "thinking": "", "signature": ""}
            events.append(
                sse_event("content_block_start", {"type": "content_block_start", "index": self.blocks, "content_block": block})
            )
        delta = {"type": "content_block_delta", "index": self.blocks, "delta": {"type": "thinking_delta", "thinking": thinking}}
        events.append(sse_event("content_block_delta", delta))
        return events

    def _close_thinking(self) -> list[str]:
        if not self.thinking_open:
            return []
        self.thinking_open = False
        return [self._close_block()]

    def _answer(self, text: str) -> list[str]:
        """The events of a piece of the answer (after the thinking, whose block it closes)."""
        if not text:
            return []
        events = self._close_thinking()
        text = self.tool_stream.feed(text) if self.tool_stream is not None else text
        return events + (self._text(text) if text else [])

    def _text(self, text: str) -> list[str]:
        events = []
        if not self.text_open:
            self.text_open = True
            block = {"type": "content_block_start", "index": self.blocks, "content_block": {"type": "text", "text": ""}}
            events.append(sse_event("content_block_start", block))
        delta = {"type": "content_block_delta", "index": self.blocks, "delta": {"type": "text_delta", "text": text}}
        events.append(sse_event("content_block_delta", delta))
        return events

    def _close_block(self) -> str:
        event = sse_event("content_block_stop", {"type": "content_block_stop", "index": self.blocks})
        self.blocks += 1
        return event

    def _tool_use(self, call: ToolUseContent) -> list[str]:
        start = {"type": "content_block_start", "index": self.blocks, "content_block": call.model_dump() | {"input": {}}}
        delta = {
            "type": "content_block_delta",
            "index": self.blocks,
            "delta": {"type": "input_json_delta", "partial_json": call.input_json()},
        }
        return [sse_event("content_block_start", start), sse_event("content_block_delta", delta), self._close_block()]

    def finish(self, index: int, reason: str) -> list[str]:
        events: list[str] = []
        if self.reasoning is not None:
            split = self.reasoning.finish()
            events += self._thinking(split.reasoning or "") + self._answer(split.content or "")
        events += self._close_thinking()
        calls: list[ToolUseContent] = []
        if self.tool_stream is not None:
            held, self.tool_stream.held = self.tool_stream.held, ""
            content, calls = split_content(held, self.tool_stream.tools)
            if content:
                events.extend(self._text(content))
        if self.text_open:
            self.text_open = False
            events.append(self._close_block())
        for call in calls:
            events.extend(self._tool_use(call))
        matched = self.stops.matched(reason, "".join(self.raw_text), self.token_ids)
        self.stop_reason = stop_reason(reason, matched, bool(calls))
        self.stop_sequence = matched if self.stop_reason == "stop_sequence" else None
        return events

    def usage(self, usage: Usage) -> str:
        """The last events: ``message_delta`` (with the whole request's usage) and ``message_stop``."""
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": MessageUsage.from_engine(usage).model_dump(),
        }
        return sse_event("message_delta", delta) + sse_event("message_stop", {"type": "message_stop"})


def anthropic_stream(response: Response) -> Response:
    """``stream_response``'s answer with its own events made Anthropic's: its error object becomes an ``error`` event
    and its closing ``[DONE]`` is left out (the named events of :class:`MessageEvents` pass as they are)."""
    if isinstance(response, StreamingResponse):
        response.body_iterator = _anthropic_events(response.body_iterator)
    return response


async def _anthropic_events(events: AsyncIterable[Any]) -> AsyncIterator[str]:
    try:
        async for event in events:
            text = event if isinstance(event, str) else bytes(event).decode()
            if not text.startswith("data: "):  # a named event of MessageEvents
                yield text
                continue
            data = text.removeprefix("data: ").strip()
            if data != "[DONE]":
                yield stream_error_event(json.loads(data))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
