"""The SSE events of a streamed response, in the order the official SDK parses them, each numbered
(``sequence_number``) and named (``event:``) as OpenAI sends them:

``response.created``, ``response.in_progress``; for a reasoning model's thinking (``--reasoning-parser``), first
``response.output_item.added`` (the ``reasoning`` item), ``response.content_part.added`` (a ``reasoning_text``
part), ``response.reasoning_text.delta`` ..., ``response.reasoning_text.done``, ``response.content_part.done``,
``response.output_item.done``; for the text, ``response.output_item.added`` (the message),
``response.content_part.added``, ``response.output_text.delta`` ..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``; for each function call, its
``output_item.added``, ``function_call_arguments.delta`` and ``.done``, ``output_item.done``; then
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it short). A failure is an
``error`` event and ``response.failed``.

:class:`ResponseEvents` is the :class:`~server.serving_choices.ChunkFormat` of :func:`stream_response`; its last
event (:data:`FINAL`) is a marker that :func:`finished_stream` turns into the final event once the response is
stored (a store that fails makes it ``response.failed``), and the chat stream's error payloads into
``error`` + ``response.failed``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from amulet_core.engine.parallel_sampling import ChoiceOutput
from amulet_core.engine.protocol import Usage
from server.reasoning_parsers import ReasoningParser
from server.responses.answer import ParsedAnswer, ToolCall, calls_of, output_items, status_of
from server.responses.items import Item, new_id, reasoning_item
from server.responses.reasoning import ThinkingTokens
from server.tool_calls import ToolCallStream

logger = logging.getLogger(__name__)

FINAL = "\x00response.final\x00"
"""The marker :meth:`ResponseEvents.usage` returns in place of the final event."""

ResponseBuilder = Callable[..., dict[str, Any]]
"""``build(status=..., output=..., usage=..., reasoning_tokens=..., incomplete=..., error=...)``: the response object."""


def event(kind: str, payload: dict[str, Any]) -> str:
    data = json.dumps({"type": kind, **payload}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


class ResponseEvents:
    """See the module docstring. ``build`` makes the response object; ``tools`` streams tool calls (held until
    the end, then parsed, as chat's stream does); ``reasoning`` tells the thinking from the answer."""

    def __init__(self, build: ResponseBuilder, tools: ToolCallStream | None, reasoning: ReasoningParser | None = None) -> None:
        self.build = build
        self.tools = tools
        self.reasoning = reasoning.stream() if reasoning is not None else None
        self.thinking = ThinkingTokens(reasoning) if reasoning is not None else None
        self.sequence = 0
        self.next_index = 0
        """The next output item's ``output_index``."""
        self.thought = ""
        self.reasoning_id: str | None = None
        self.reasoning_index = 0
        self.reasoning_open = False
        self.text = ""
        self.message_id: str | None = None
        self.message_index = 0
        self.calls: list[ToolCall] = []
        self.finish_reason: str | None = None
        self.usage_seen: Usage | None = None
        self.output: list[Item] = []

    def _event(self, kind: str, **payload: Any) -> str:
        text = event(kind, {**payload, "sequence_number": self.sequence})
        self.sequence += 1
        return text

    def _lifecycle(self, kind: str, response: dict[str, Any]) -> str:
        return self._event(kind, response=response)

    def _take_index(self) -> int:
        index, self.next_index = self.next_index, self.next_index + 1
        return index

    # ---- ChunkFormat
    def opening(self, num_choices: int) -> list[str]:
        started = self.build(status="in_progress", output=[])
        return [self._lifecycle("response.created", started), self._lifecycle("response.in_progress", started)]

    def _reasoning_delta(self, text: str) -> list[str]:
        if not text:
            return []
        events: list[str] = []
        if self.reasoning_id is None:
            self.reasoning_id, self.reasoning_index, self.reasoning_open = new_id("rs"), self._take_index(), True
            item = reasoning_item(self.reasoning_id, None, status="in_progress")
            part = {"type": "reasoning_text", "text": ""}
            where = {"item_id": self.reasoning_id, "output_index": self.reasoning_index, "content_index": 0}
            events += [
                self._event("response.output_item.added", output_index=self.reasoning_index, item=item),
                self._event("response.content_part.added", **where, part=part),
            ]
        self.thought += text
        where = {"item_id": self.reasoning_id, "output_index": self.reasoning_index, "content_index": 0}
        return [*events, self._event("response.reasoning_text.delta", **where, delta=text)]

    def _close_reasoning(self) -> list[str]:
        if not self.reasoning_open or self.reasoning_id is None:
            return []
        self.reasoning_open = False
        where = {"item_id": self.reasoning_id, "output_index": self.reasoning_index, "content_index": 0}
        part = {"type": "reasoning_text", "text": self.thought}
        return [
            self._event("response.reasoning_text.done", **where, text=self.thought),
            self._event("response.content_part.done", **where, part=part),
            self._event(
                "response.output_item.done",
                output_index=self.reasoning_index,
                item=reasoning_item(self.reasoning_id, self.thought),
            ),
        ]

    def _open_message(self) -> list[str]:
        if self.message_id is not None:
            return []
        self.message_id, self.message_index = new_id("msg"), self._take_index()
        item = {"id": self.message_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": self.message_id, "output_index": self.message_index, "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=self.message_index, item=item),
            self._event("response.content_part.added", **where, part=part),
        ]

    def _text_delta(self, text: str) -> list[str]:
        if not text:
            return []
        events = self._open_message()
        self.text += text
        payload: dict[str, Any] = {
            "item_id": self.message_id,
            "output_index": self.message_index,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        }
        return [*events, self._event("response.output_text.delta", **payload)]

    def _answer(self, text: str) -> list[str]:
        """The events of a piece of the answer (after the thinking, which it closes)."""
        if not text:
            return []
        events = self._close_reasoning()
        return events + self._text_delta(self.tools.feed(text) if self.tools is not None else text)

    def delta(self, choice: ChoiceOutput) -> list[str]:
        out = choice.output
        if self.reasoning is None or self.thinking is None:
            return self._answer(out.text)
        self.thinking.feed(out.text, len(out.token_ids))
        split = self.reasoning.feed(out.text)
        return self._reasoning_delta(split.reasoning or "") + self._answer(split.content or "")

    def finish(self, index: int, reason: str) -> list[str]:
        events: list[str] = []
        if self.reasoning is not None:
            split = self.reasoning.finish()
            events += self._reasoning_delta(split.reasoning or "") + self._answer(split.content or "")
        events += self._close_reasoning()
        if self.tools is not None:
            content, self.calls = calls_of(self.tools.tools, self.tools.held)  # the text held since a call may begin
            self.tools.held = ""
            events += self._text_delta(content)
        if self.message_id is not None or not (self.calls or self.reasoning_id):
            events += self._open_message()
            events += self._close_message()
        self.output = output_items(ParsedAnswer(self.thought or None, self.text, self.calls), self.message_id, self.reasoning_id)
        for call_item in self.output:
            if call_item["type"] == "function_call":
                events += self._function_call(call_item)
        self.finish_reason = reason
        return events

    def _close_message(self) -> list[str]:
        where = {"item_id": self.message_id, "output_index": self.message_index, "content_index": 0}
        part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
        item = {"id": self.message_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        return [
            self._event("response.output_text.done", **where, text=self.text, logprobs=[]),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=self.message_index, item=item),
        ]

    def _function_call(self, item: Item) -> list[str]:
        index = self._take_index()
        where = {"item_id": item["id"], "output_index": index}
        return [
            self._event(
                "response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}
            ),
            self._event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
            self._event("response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def usage(self, usage: Usage) -> str:
        self.usage_seen = usage
        return FINAL

    # ---- the end of the stream
    def final(self) -> dict[str, Any]:
        """The finished response object."""
        status, incomplete = status_of(self.finish_reason)
        reasoning_tokens = self.thinking.count if self.thinking is not None else 0
        return self.build(
            status=status, output=self.output, usage=self.usage_seen, reasoning_tokens=reasoning_tokens, incomplete=incomplete
        )

    def final_event(self, response: dict[str, Any]) -> str:
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return self._lifecycle(kind, response)

    def failure(self, error: dict[str, Any]) -> list[str]:
        """``error`` and ``response.failed`` for an error object (``message``, ``type``, ``code``, ``param``)."""
        code = error.get("code") or error.get("type") or "server_error"
        failed = self.build(status="failed", output=self.output, error={"code": code, "message": error.get("message", "")})
        details = {k: error.get(k) for k in ("code", "message", "param")}
        if error.get("request_id") is not None:
            details["request_id"] = error["request_id"]
        return [self._event("error", **details), self._lifecycle("response.failed", failed)]


async def finished_stream(
    events: AsyncIterator[str], chunks: ResponseEvents, store: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
) -> AsyncIterator[str]:
    """The chat stream's events as the Responses API's (see the module docstring): :data:`FINAL` becomes the final
    event once ``store(response)`` has run (an error object it returns makes it a failure), ``[DONE]`` is dropped
    and an error payload becomes ``error`` + ``response.failed``."""
    async for text in events:
        if text == FINAL:
            response = chunks.final()
            failed = await store(response)
            for out in [chunks.final_event(response)] if failed is None else chunks.failure(failed):
                yield out
        elif text.startswith("data: [DONE]"):
            continue
        elif text.startswith('data: {"error"'):
            for out in chunks.failure(json.loads(text[len("data: ") :])["error"]):
                yield out
        else:
            yield text
