"""Conversation items: the request's input in the shape they are stored and listed in (each with an id, as
OpenAI lists them), and a stored conversation as the chat messages it is decoded from.

An item is a plain dict, as stored: ``message`` (``role``, ``content`` parts of ``input_text``, or ``output_text``
for the assistant's), ``function_call`` (``call_id``, ``name``, ``arguments``), ``function_call_output``
(``call_id``, ``output``) or ``reasoning`` (a reasoning model's thinking, ``content`` parts of ``reasoning_text``;
left out of the chat messages, as chat templates leave out earlier turns' thinking).
"""

from __future__ import annotations

import uuid
from typing import Any

from server.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    joined,
)

Item = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(role: str, text: str, item_id: str | None = None) -> Item:
    """A message item; the assistant's text is ``output_text`` (as it was answered), anyone else's ``input_text``."""
    part: Item = {"type": "input_text", "text": text}
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id or new_id("msg"), "type": "message", "role": role, "status": "completed", "content": [part]}


def function_call_item(call_id: str, name: str, arguments: str, item_id: str | None = None) -> Item:
    return {
        "id": item_id or new_id("fc"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def reasoning_item(item_id: str, text: str | None, status: str = "completed", summary: list[str] | None = None) -> Item:
    """A ``reasoning`` item, as OpenAI's Responses API gives open models' thinking (and vLLM's does): its text as
    one ``reasoning_text`` part (``text`` None: none yet, as the item opens), no summary of this server's."""
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    summaries = [{"type": "summary_text", "text": s} for s in summary or ()]
    return {"id": item_id, "type": "reasoning", "summary": summaries, "content": content, "status": status}


def input_items(body: ResponsesRequest) -> list[Item]:
    """The request's ``input`` as stored items (a string is one user message)."""
    if isinstance(body.input, str):
        return [message_item("user", body.input)]
    items: list[Item] = []
    for item in body.input:
        if isinstance(item, MessageItem):
            items.append(message_item(item.role, joined(item.content), item.id))
        elif isinstance(item, FunctionCallItem):
            items.append(function_call_item(item.call_id, item.name, item.arguments, item.id))
        elif isinstance(item, FunctionCallOutputItem):
            output = joined(item.output)
            fco = {"id": item.id or new_id("fco"), "type": "function_call_output", "call_id": item.call_id, "output": output}
            items.append({**fco, "status": "completed"})
        elif isinstance(item, ReasoningItem):
            text = "".join(part.text for part in item.content or ())
            items.append(reasoning_item(item.id or new_id("rs"), text, summary=[part.text for part in item.summary]))
    return items


def item_text(item: Item) -> str:
    return "\n".join(str(part.get("text", "")) for part in item.get("content", ()))


def chat_messages(items: list[Item]) -> list[dict[str, Any]]:
    """Stored items as chat messages: a function call joins the assistant message just before it (or makes one),
    its output is a ``tool`` message."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append({"role": item["role"], "content": item_text(item)})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages
