"""A Responses request as the chat request it is served by, and what only the Responses API refuses.

The request's own fields map onto chat's (``max_output_tokens`` -> ``max_completion_tokens``, ``text.format`` ->
``response_format``, ``reasoning.effort`` -> ``reasoning_effort``, the flat function tools -> chat's); every field
it does not declare passes through unchanged (``preference``, ``top_k``, ``seed``, ``cache_salt``,
``chat_template_kwargs`` ...: the SDK's ``extra_body``), so the chat request's policy judges them exactly as on
``/v1/chat/completions``. Chat's own names for what the Responses API names otherwise (``messages``, ``max_tokens``,
``reasoning_effort`` ...) are refused, naming the field to use. Errors raised while the chat request is
prepared name the Responses field (:func:`responses_param`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from amulet_core.errors import InvalidParameterError
from server.protocol import ChatCompletionRequest
from server.protocol_limits import MAX_MESSAGES
from server.responses.items import Item, chat_messages
from server.responses.protocol import ResponsesRequest


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == 0


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "background": (_unset, "background mode is not supported; stream the response or wait for it."),
    "include": (_unset, "no extra output (log-probabilities, reasoning, sources) can be included."),
    "conversation": (lambda v: v is None, "conversation objects are not supported; continue with 'previous_response_id'."),
    "prompt": (lambda v: v is None, "stored prompt templates are not supported; send 'input' and 'instructions'."),
    "top_logprobs": (_unset, "log-probabilities are only available on /v1/chat/completions."),
    "max_tool_calls": (lambda v: v is None, "the number of tool calls cannot be capped here."),
    "truncation": (lambda v: v in (None, "disabled"), "inputs are never truncated here (only 'disabled')."),
}
"""The Responses API's own fields this server does not implement: (is this value harmless?, why others are refused)."""

CHAT_NAMES: dict[str, str] = {
    "messages": "send the conversation as 'input'",
    "max_tokens": "use 'max_output_tokens'",
    "max_completion_tokens": "use 'max_output_tokens'",
    "response_format": "use 'text.format'",
    "n": "a response has one output; send several requests for several answers",
    "logprobs": "log-probabilities are only available on /v1/chat/completions",
    "functions": "use 'tools'",
    "function_call": "use 'tools' and 'tool_choice'",
    "reasoning_effort": "use 'reasoning.effort'",
}
"""Chat completion fields that the Responses API names (or does) otherwise."""


def refuse_unsupported(body: ResponsesRequest) -> None:
    """InvalidParameterError naming the first unsupported field the request sets."""
    for name, (harmless, why) in UNSUPPORTED.items():
        if not harmless(getattr(body, name)):
            raise InvalidParameterError(name, f"'{name}' is not supported by this server: {why}")
    for name in body.model_extra or {}:
        if name in CHAT_NAMES:
            raise InvalidParameterError(name, f"'{name}' is not a field of /v1/responses: {CHAT_NAMES[name]}.")


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    schema: dict[str, Any] = {"name": fmt.name}
    for key, value in (("schema", fmt.schema_), ("description", fmt.description), ("strict", fmt.strict)):
        if value is not None:
            schema[key] = value
    return {"type": "json_schema", "json_schema": schema}


def _tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if body.tools is None:
        return None
    fields = {"name", "description", "parameters", "strict"}
    return [{"type": "function", "function": tool.model_dump(include=fields, exclude_none=True)} for tool in body.tools]


def _tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def chat_request(body: ResponsesRequest, conversation: list[Item]) -> ChatCompletionRequest:
    """The chat request that serves ``body`` over ``conversation`` (the earlier items, then this input):
    ``instructions`` first as a system message."""
    messages = chat_messages(conversation)
    if body.instructions is not None:
        messages.insert(0, {"role": "system", "content": body.instructions})
    if len(messages) > MAX_MESSAGES:
        param = "previous_response_id" if body.previous_response_id else "input"
        raise InvalidParameterError(
            param, f"The conversation holds {len(messages)} messages, more than the {MAX_MESSAGES} allowed."
        )
    fields: dict[str, Any] = {
        **(body.model_extra or {}),
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tools": _tools(body),
        "tool_choice": _tool_choice(body),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
        "reasoning_effort": body.reasoning.effort if body.reasoning is not None else None,
        "stream": bool(body.stream),
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        errors = [{**e, "loc": _responses_loc(tuple(e.get("loc", ())))} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def _responses_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    if loc and loc[0] == "messages":
        return ("input",)
    if loc and loc[0] == "response_format":
        return ("text", "format", *loc[2:])
    return loc


_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^max_(completion_)?tokens$"), "max_output_tokens"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
    (re.compile(r"^messages(\[\d+\].*)?$"), "input"),
)


def responses_param(param: str | None) -> str | None:
    """The Responses API's name of a chat request's field (``max_tokens`` -> ``max_output_tokens`` ...)."""
    if param is None:
        return None
    for pattern, replacement in _RENAMES:
        if pattern.search(param):
            return pattern.sub(replacement, param)
    return param


def renamed(exc: InvalidParameterError) -> InvalidParameterError:
    """``exc`` naming the Responses field (in place)."""
    name = responses_param(exc.param)
    if name is not None and name != exc.param:
        old = exc.param
        exc.param = name
        exc.message = exc.message.replace(f"'{old}'", f"'{name}'")
        exc.args = (exc.message,)
    return exc
