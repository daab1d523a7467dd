"""The answer: the model's text as output items (its thinking with ``--reasoning-parser``, a message, then the
function calls parsed from the message), and the response object (the request's settings echoed, as OpenAI's, plus
``preference``, the effective settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amulet_core.engine.protocol import Usage
from server.reasoning_parsers import ReasoningParser, ReasoningSplit
from server.requests.chat import PreparedChat
from server.requests.tools import ToolRequest
from server.responses.items import Item, function_call_item, message_item, new_id, reasoning_item
from server.responses.protocol import ResponsesRequest
from server.tool_calls import tool_calls_out


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str


def calls_of(tools: ToolRequest, text: str) -> tuple[str, list[ToolCall]]:
    """The message text and the function calls the tool parser reads in the model's ``text``."""
    parsed = tools.parse(text)
    calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in tool_calls_out(parsed)]
    return parsed.content or "", calls


@dataclass(frozen=True)
class ParsedAnswer:
    """The model's whole text, read: its thinking (None: none, or no reasoning parser), the message's text and the
    function calls read in it."""

    reasoning: str | None
    text: str
    calls: list[ToolCall]


def parsed_output(prepared: PreparedChat, text: str, parser: ReasoningParser | None) -> ParsedAnswer:
    """The model's whole ``text``: the thinking apart (with ``parser``), the calls read in the rest (with tools)."""
    split = parser.split(text) if parser is not None else ReasoningSplit(None, text)
    reasoning, content = split.reasoning, split.content or ""
    if prepared.tools is None:
        return ParsedAnswer(reasoning, content, [])
    message, calls = calls_of(prepared.tools, content)
    return ParsedAnswer(reasoning, message, calls)


def output_items(answer: ParsedAnswer, message_id: str | None = None, reasoning_id: str | None = None) -> list[Item]:
    """The thinking's ``reasoning`` item (when there is thinking), a message (left out when the answer is only
    thinking or calls), then one ``function_call`` item per call."""
    items = [reasoning_item(reasoning_id or new_id("rs"), answer.reasoning)] if answer.reasoning else []
    if answer.text or not (answer.calls or answer.reasoning):
        items.append(message_item("assistant", answer.text, message_id))
    return items + [function_call_item(c.call_id, c.name, c.arguments) for c in answer.calls]


def usage_object(usage: Usage, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.total_tokens,
        "base_prompt_tokens": usage.base_prompt_tokens,
    }


def status_of(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """The response's status and ``incomplete_details`` for the choice's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def _text_config(body: ResponsesRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None else None
    if fmt is None:
        return {"format": {"type": "text"}}
    return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}


def response_object(
    body: ResponsesRequest,
    *,
    response_id: str,
    created_at: float,
    model: str,
    status: str,
    output: list[Item],
    usage: Usage | None = None,
    reasoning_tokens: int = 0,
    incomplete: dict[str, str] | None = None,
    error: dict[str, str] | None = None,
    preference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object (``preference``: the echo of the effective settings, as on chat; None leaves it out;
    ``reasoning_tokens``: the answer's tokens of thinking)."""
    answer: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "store": body.store is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": _text_config(body),
        "tool_choice": (body.tool_choice.model_dump() if not isinstance(body.tool_choice, str | None) else body.tool_choice)
        or "auto",
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
        "truncation": "disabled",
        "usage": usage_object(usage, reasoning_tokens) if usage is not None else None,
        "metadata": body.metadata or {},
        "user": body.user,
    }
    if preference is not None:
        answer["preference"] = preference
    return answer
