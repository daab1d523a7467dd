"""Tool calling for chat requests: what the prompt shows of the tools, what the grammar forces, and how
the model's text becomes OpenAI tool calls (whole or streamed).

The model's chat template renders the tools, the assistant ``tool_calls`` and the ``tool`` results of
the history when it can (``tools=`` of ``apply_chat_template``). When it cannot (SmolLM2's template
ignores them), nothing is dropped: the tools are described in the system message in the Hermes
format (:func:`describe_tools_for_system_prompt`), past calls are written into the assistant's
content as ``<tool_call>`` blocks and tool results become user turns in ``<tool_response>`` blocks.
Both contexts of a preference request get the same tools: they still differ by the preference alone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from server.protocol import ChatCompletionRequest
from server.protocol_answers import DeltaFunctionCall, DeltaToolCall, FunctionCallOut, ToolCallOut
from server.tool_parsers import ParsedOutput, ToolFunction, ToolParser, describe_tools_for_system_prompt


@dataclass(frozen=True)
class ToolRequest:
    """The tools a chat request offers and how it lets the model use them."""

    tools: tuple[ToolFunction, ...]
    openai_tools: tuple[dict[str, Any], ...]
    choice: str
    """``auto``, ``required`` or ``named``."""
    named: str | None
    parallel: bool
    parser: ToolParser

    def grammar(self) -> GrammarSpec | None:
        """The grammar forcing the call(s) for ``required`` and a named function; None for ``auto``."""
        if self.choice == "auto":
            return None
        offered = [t for t in self.tools if t.name == self.named] if self.named else list(self.tools)
        return GrammarSpec(GrammarKind.LARK, self.parser.forced_grammar(offered, self.parallel), "tool_choice")

    def parse(self, text: str) -> ParsedOutput:
        return self.parser.parse(text, self.tools)


def _check_parameters(parameters: Any, index: int) -> None:
    param = f"tools[{index}].function.parameters"
    if parameters.get("type", "object") != "object":
        raise InvalidParameterError(param, f"'{param}' must be a JSON schema of type 'object'.")
    if not isinstance(parameters.get("properties", {}), dict):
        raise InvalidParameterError(param, f"'{param}.properties' must be an object.")
    required = parameters.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise InvalidParameterError(param, f"'{param}.required' must be a list of property names.")


def tool_request(body: ChatCompletionRequest, parser: Callable[[], ToolParser]) -> ToolRequest | None:
    """The request's tool use, or None when the answer is plain text (no tools, or ``tool_choice: "none"``).
    ``parser`` gives the server's tool-call parser (only asked for when there are tools)."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidParameterError("tool_choice", "'tool_choice' names or requires a tool, but 'tools' is empty.")
        return None
    if choice == "none":
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidParameterError("tools", "Tool names must be unique.")
    functions = []
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
        _check_parameters(parameters, i)
        functions.append(ToolFunction(tool.function.name, tool.function.description, parameters))
    named = None
    if choice is not None and not isinstance(choice, str):
        named = choice.function.name
        if named not in names:
            raise InvalidParameterError("tool_choice", f"'tool_choice' names '{named}', which is not in 'tools'.")
    mode = "named" if named else (choice if isinstance(choice, str) else "auto")
    openai_tools = tuple(t.model_dump(exclude_none=True) for t in tools)
    parallel = body.parallel_tool_calls is not False
    return ToolRequest(tuple(functions), openai_tools, mode, named, parallel and not named, parser())


def without_tool_roles(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history for a template that does not render tools: calls as ``<tool_call>`` text in the assistant's
    content, tool results as user turns in ``<tool_response>`` blocks (the Hermes format)."""
    out = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            blocks = [
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                + "\n</tool_call>"
                for c in calls
            ]
            message["content"] = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        out.append(message)
    return out


def with_tools_described(
    messages: Sequence[dict[str, Any]], tools: Sequence[ToolFunction], default_system_prompt: str
) -> list[dict[str, Any]]:
    """The conversation with the tools described at the end of its system message; a conversation without
    one gets ``default_system_prompt`` (the template's own default) followed by the description."""
    description = describe_tools_for_system_prompt(tools)
    out = [dict(m) for m in messages]
    if not out or out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": default_system_prompt})
    content = out[0].get("content") or ""
    out[0]["content"] = f"{content}\n\n{description}" if content else description
    return out


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
