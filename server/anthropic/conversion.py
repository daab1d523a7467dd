"""A Messages request as the chat completions request it stands for (:class:`ChatConversion`), so that it goes
through the chat's preparation and admission unchanged: the same rendering, preference, grammar, tools and limits.

* ``system`` (a string or text blocks) is the system message; a user message's text blocks are a user message
  and each ``tool_result`` block a ``tool`` message (in their order); an assistant message's text blocks are its
  content and its ``tool_use`` blocks its ``tool_calls``; thinking blocks of the history are dropped. A last
  assistant message is continued (Anthropic's prefill: ``continue_final_message``).
* ``thinking`` is the chat template's ``enable_thinking`` (``enabled``: true, ``disabled``: false; ``adaptive``
  leaves the template's default), for reasoning models (``--reasoning-parser``; without it ``enabled`` is refused
  where the request is served, :mod:`.serving`).
* ``max_tokens``, ``temperature``, ``top_p``, ``top_k``; ``stop_sequences`` are ``stop``; ``tools`` (``input_schema``
  is the function's ``parameters``) and ``tool_choice`` (``auto``, ``any`` = ``required``, ``tool`` = a named
  function, ``none``; ``disable_parallel_tool_use``); ``output_config.format`` is a JSON schema ``response_format``.
* Every other field (``preference``, ``seed``, ``min_p`` ... anything ``extra_body`` carries) is passed on as it
  is, and the chat request's own policy applies to it; the chat fields that the Messages API names otherwise
  (:data:`NOT_FOR_MESSAGES`) are refused, naming what to use.

An error the chat request's preparation raises names the Messages request's field (:meth:`MessagesNames.rename`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from amulet_core.errors import InvalidParameterError
from server.anthropic.protocol import MessageParam, MessagesBody, TextBlock, ToolResultBlock, ToolUseBlock
from server.errors import describe_validation_errors
from server.protocol import ChatCompletionRequest
from server.requests.json_values import check_json_depth

KNOWN_NO_EFFECT = frozenset(
    {
        "cache_control",
        "citations",
        "signature",
        "thinking",
        "data",
        "caller",
        "toolset_name",
        "strict",
        "input_examples",
        "defer_loading",
        "eager_input_streaming",
        "allowed_callers",
        "display",
    }
)
"""Keys of Anthropic's request objects (content blocks, tools ...) that change nothing here: not logged as unknown."""


def unknown_nested_fields(body: MessagesBody) -> list[str]:
    """The generic paths (``messages[].content[].x``) of the keys the request's objects do not declare, less the
    known ones that change nothing. (The top-level ones go on to the chat request, whose policy logs them.)"""
    found: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, f"{path}[]")
        elif isinstance(value, BaseModel):
            found.extend(f"{path}.{key}" for key in value.model_extra or {} if key not in KNOWN_NO_EFFECT)
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{path}.{name}")

    for name in type(body).model_fields:
        walk(getattr(body, name), name)
    return found


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


NOT_FOR_MESSAGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # name: (is this value harmless?, what to do instead)
    "stop": (_unset, "use 'stop_sequences'."),
    "max_completion_tokens": (lambda v: v is None, "use 'max_tokens'."),
    "n": (lambda v: v is None or v == 1, "a message is one answer; send several requests."),
    "logprobs": (_unset, "the Messages API returns no log-probabilities; use /v1/chat/completions."),
    "top_logprobs": (_unset, "the Messages API returns no log-probabilities; use /v1/chat/completions."),
    "stream_options": (_unset, "a stream always ends with its usage (in 'message_delta')."),
    "parallel_tool_calls": (lambda v: v is None, "use 'tool_choice.disable_parallel_tool_use'."),
    "mcp_servers": (_unset, "MCP servers are not supported."),
    "container": (_unset, "code execution containers are not supported."),
}
"""Fields of a chat request (or of Anthropic's) that a Messages request may not carry here, unless harmless."""

CONTINUE_FIELDS = ("add_generation_prompt", "continue_final_message")


@dataclass(frozen=True)
class MessagesNames:
    """The Messages request's names of the chat request's fields (for errors)."""

    origins: tuple[str, ...]
    """The Messages request's name of each chat message (``system``, ``messages[i]``, ``messages[i].content[j]``)."""
    format_from_output_config: bool = False

    def rename(self, exc: InvalidParameterError) -> InvalidParameterError:
        """``exc`` (about the chat request) naming the Messages request's field instead (in place; returned)."""
        param = self.messages_param(exc.param)
        if param != exc.param:
            exc.message = exc.message.replace(exc.param, param)
            exc.param = param
            exc.args = (exc.message,)
        return exc

    def messages_param(self, param: str) -> str:
        """The Messages request's name of the chat request's field ``param``."""
        if param == "stop":
            return "stop_sequences"
        if param == "response_format" and self.format_from_output_config:
            return "output_config.format"
        tool = re.match(r"^tools\[(\d+)\]\.function\.(parameters|name|description)", param)
        if tool:
            field = "input_schema" if tool.group(2) == "parameters" else tool.group(2)
            return f"tools[{tool.group(1)}].{field}{param[tool.end() :]}"
        message = re.match(r"^messages\[(\d+)\]", param)
        if message and int(message.group(1)) < len(self.origins):
            return self.origins[int(message.group(1))] + param[message.end() :]
        return param


@dataclass(frozen=True)
class ChatConversion:
    """The chat request a Messages request stands for, and the Messages names of its fields."""

    body: ChatCompletionRequest
    names: MessagesNames


def _system_text(body: MessagesBody) -> str | None:
    if body.system is None or isinstance(body.system, str):
        return body.system
    return "\n".join(block.text for block in body.system)


def _assistant(message: MessageParam, where: str) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    texts, calls = [], []
    for j, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            check_json_depth(block.input, f"{where}.content[{j}].input")
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
    entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        entry["tool_calls"] = calls
    return entry


def _user(message: MessageParam, where: str) -> list[tuple[dict[str, Any], str]]:
    """The chat messages of a user message, each with its Messages name."""
    if isinstance(message.content, str):
        return [({"role": "user", "content": message.content}, where)]
    out: list[tuple[dict[str, Any], str]] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append(({"role": "user", "content": "\n".join(texts)}, where))
            texts.clear()

    for j, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            flush()
            out.append(({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}, f"{where}.content[{j}]"))
    flush()
    return out or [({"role": "user", "content": ""}, where)]


def chat_messages(body: MessagesBody) -> tuple[list[dict[str, Any]], list[str]]:
    """The conversation as chat messages, and the Messages name of each."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    system = _system_text(body)
    if system is not None:
        messages.append({"role": "system", "content": system})
        origins.append("system")
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        converted = [(_assistant(message, where), where)] if message.role == "assistant" else _user(message, where)
        for entry, origin in converted:
            messages.append(entry)
            origins.append(origin)
    return messages, origins


def _tool_fields(body: MessagesBody) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if body.tools is not None:
        fields["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "parameters": t.input_schema}
                | ({"description": t.description} if t.description is not None else {}),
            }
            for t in body.tools
        ]
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    return fields


def _passed_on(body: MessagesBody) -> dict[str, Any]:
    """The fields ``extra_body`` carries, once the ones the Messages API names otherwise are refused."""
    extras = dict(body.model_extra or {})
    for name, value in extras.items():
        rule = NOT_FOR_MESSAGES.get(name)
        if rule is not None and not rule[0](value):
            raise InvalidParameterError(name, f"'{name}' is not supported by the Messages API here: {rule[1]}")
    return {name: value for name, value in extras.items() if name not in NOT_FOR_MESSAGES}


def _prefilled(last: MessageParam) -> bool:
    """Whether the conversation ends with the start of the assistant's answer (Anthropic's prefill), not a tool call."""
    if last.role != "assistant":
        return False
    return isinstance(last.content, str) or not any(isinstance(block, ToolUseBlock) for block in last.content)


def _thinking_fields(body: MessagesBody, chat: dict[str, Any]) -> dict[str, Any]:
    """``thinking`` as ``chat_template_kwargs.enable_thinking`` (``enabled``: true, ``disabled``: false), with the
    other template variables ``extra_body`` carries."""
    thinking = body.thinking
    if thinking is None or thinking.type == "adaptive":
        return {}
    if thinking.budget_tokens is not None and body.max_tokens is not None and thinking.budget_tokens >= body.max_tokens:
        raise InvalidParameterError(
            "thinking.budget_tokens", "'max_tokens' must be greater than 'thinking.budget_tokens' (they share it)."
        )
    enabled = thinking.type == "enabled"
    kwargs = chat.get("chat_template_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    if kwargs.get("enable_thinking", enabled) != enabled:
        raise InvalidParameterError("thinking", "'thinking' and 'chat_template_kwargs.enable_thinking' disagree; send one.")
    return {"chat_template_kwargs": {**kwargs, "enable_thinking": enabled}}


def to_chat(body: MessagesBody) -> ChatConversion:
    """The chat request of a Messages request (see the module docstring). Raises InvalidParameterError naming the
    Messages request's field."""
    chat = _passed_on(body)
    chat.update(_thinking_fields(body, chat))
    messages, origins = chat_messages(body)
    if _prefilled(body.messages[-1]) and not any(name in chat for name in CONTINUE_FIELDS):
        chat.update(add_generation_prompt=False, continue_final_message=True)  # the answer continues it
    chat.update(model=body.model, messages=messages, max_tokens=body.max_tokens, stream=bool(body.stream))
    optional = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "stop": body.stop_sequences}
    chat.update({name: value for name, value in optional.items() if value is not None})
    chat.update(_tool_fields(body))
    output_format = body.output_config.format if body.output_config is not None else None
    if output_format is not None:
        if chat.get("response_format") is not None:
            raise InvalidParameterError("output_config.format", "Send 'output_config.format' or 'response_format', not both.")
        schema = {"name": "output", "schema": output_format.schema_, "strict": True}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    names = MessagesNames(tuple(origins), output_format is not None)
    try:
        converted = ChatCompletionRequest.model_validate_json(json.dumps(chat, ensure_ascii=False))
    except ValidationError as exc:
        info = describe_validation_errors(exc.errors())
        raise names.rename(InvalidParameterError(info.param or "messages", info.message)) from None
    return ChatConversion(converted, names)
