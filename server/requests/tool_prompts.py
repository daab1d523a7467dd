"""A conversation with tools, written for a chat template that does not render them (SmolLM2's ignores them).

Nothing is dropped: the tools are described in the system message in the Hermes format, past calls are
written into the assistant's content as ``<tool_call>`` blocks and tool results become user turns in
``<tool_response>`` blocks. Every context of a preference request gets the same tools, so they still differ
by their preference sentences alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from server.tool_parsers import ToolFunction, describe_tools_for_system_prompt


def for_template_without_tools(
    conversations: Sequence[Sequence[dict[str, Any]]], tools: Sequence[ToolFunction] | None, default_system_prompt: str
) -> list[list[dict[str, Any]]]:
    """Each conversation with its tool roles written as text (:func:`without_tool_roles`) and, when ``tools``
    are offered, those tools described in its system message (:func:`with_tools_described`)."""
    out = [without_tool_roles(c) for c in conversations]
    if tools:
        out = [with_tools_described(c, tools, default_system_prompt) for c in out]
    return out


def without_tool_roles(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history for a template that does not render tools: calls as ``<tool_call>`` text in the assistant's
    content, tool results as user turns in ``<tool_response>`` blocks (the Hermes format); consecutive results
    share one user turn, so templates that want user and assistant turns to alternate (Gemma, Mistral) take it."""
    out: list[dict[str, Any]] = []
    previous_was_result = False
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
        is_result = message["role"] == "tool"
        if is_result:
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_was_result:  # one user turn for consecutive results: some templates want roles to alternate
                out[-1]["content"] += "\n" + block
                continue
            message = {"role": "user", "content": block}
        previous_was_result = is_result
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
