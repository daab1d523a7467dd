"""Tool calls on the answer side: the model's text as OpenAI tool calls, whole (:func:`tool_calls_out`) or
streamed (:class:`ToolCallStream`). The request side (the tools offered, the forcing grammar) is
``server.requests.tools``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from server.protocol_answers import DeltaFunctionCall, DeltaToolCall, FunctionCallOut, ToolCallOut
from server.requests.tools import ToolRequest
from server.tool_parsers import ParsedOutput


def tool_calls_out(parsed: ParsedOutput) -> list[ToolCallOut]:
    """OpenAI tool calls, each with an id unique to this answer."""
    return [
        ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in parsed.tool_calls
    ]


@dataclass
class ToolCallStream:
    """One streamed choice of a request with tools: text is passed on as content until it may be a tool call
    (the parser's start marker, or a prefix of it at the end), then held; at the finish the held text is
    parsed and sent as content and ``delta.tool_calls`` (id and name first, then the arguments)."""

    tools: ToolRequest
    held: str = ""
    holding: bool = False

    def feed(self, text: str) -> str:
        """The part of ``text`` that can be sent as content now."""
        if self.holding:
            self.held += text
            return ""
        pending = self.held + text
        marker = self.tools.parser.start_marker
        if self.tools.choice != "auto":  # the grammar makes the whole answer the call
            self.holding, self.held = True, pending
            return ""
        at = pending.find(marker)
        if at >= 0 and (marker != "{" or not pending[:at].strip()):
            self.holding, self.held = True, pending[at:]
            return pending[:at]
        keep = _partial_marker(pending, marker)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """The content still to send and the tool-call deltas (empty when the held text is no call)."""
        parsed = self.tools.parse(self.held)
        self.held = ""
        if not parsed.tool_calls:
            return parsed.content or "", []
        deltas = []
        for i, call in enumerate(tool_calls_out(parsed)):
            deltas.append(
                DeltaToolCall(
                    index=i, id=call.id, type="function", function=DeltaFunctionCall(name=call.function.name, arguments="")
                )
            )
            deltas.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=call.function.arguments)))
        return parsed.content or "", deltas


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
