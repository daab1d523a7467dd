"""The Llama 3.1 / 3.2 JSON format: the whole answer is the call, a JSON object

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally after the ``<|python_tag|>`` token (when the server keeps special tokens in the text),
several calls separated by ``;``. Anything else is a plain answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from server.tool_parsers.base import (
    ParsedOutput,
    ParsedToolCall,
    ToolFunction,
    ToolParser,
    call_grammar,
    text_only,
    tool_call_from_json,
)

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class Llama3JsonToolParser(ToolParser):
    """``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), calls joined by ``;``.

    The calls are the output's text after ``<|python_tag|>`` when it has one (text before the tag is
    content), else the whole output, which must then start (after whitespace) with ``{`` — or ``[``
    for a JSON list of calls. Text after the last call is content too (joined to the text before the
    tag by a blank line). The calls are all or nothing: when
    any of them is malformed or names a tool not offered, the whole output is content.

    The forced grammar writes plain JSON without ``<|python_tag|>`` (a special token that not every
    tokenizer has), calls joined by ``"; "``.
    """

    name: ClassVar[str] = "llama3_json"
    start_marker: ClassVar[str] = "{"

    def parse(self, text: str, tools: Sequence[ToolFunction]) -> ParsedOutput:
        """See :meth:`ToolParser.parse`; never raises."""
        tag = text.find(PYTHON_TAG)
        lead, body = (text[:tag], text[tag + len(PYTHON_TAG) :]) if tag >= 0 else ("", text)
        found = _decode_calls(body, {tool.name for tool in tools})
        if found is None:
            return text_only(text)
        calls, rest = found
        content = (lead.strip() + "\n\n" + rest.strip()).strip()
        return ParsedOutput(content=content or None, tool_calls=calls)

    def forced_grammar(self, tools: Sequence[ToolFunction], parallel: bool) -> str:
        """See :meth:`ToolParser.forced_grammar`: ``{"name": ..., "parameters": ...}`` objects joined
        by ``"; "``."""
        return call_grammar(tools, parallel, prefix="", arguments_key="parameters", suffix="", separator=SEPARATOR + " ")


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _decode_calls(body: str, names: set[str]) -> tuple[tuple[ParsedToolCall, ...], str] | None:
    """The calls at the start of ``body`` and the text after them, or ``None`` when ``body`` does not
    start with a valid call or any call in the ``;``-separated run is invalid."""
    position = _skip_whitespace(body, 0)
    if body[position : position + 1] not in ("{", "["):
        return None
    calls: list[ParsedToolCall] = []
    while True:
        try:
            value, position = _DECODER.raw_decode(body, position)
        except (ValueError, RecursionError):  # a too deeply nested value is not a call
            return None
        for item in value if isinstance(value, list) else [value]:
            call = tool_call_from_json(item, names)
            if call is None:
                return None
            calls.append(call)
        after = _skip_whitespace(body, position)
        if body[after : after + 1] != SEPARATOR:
            break
        following = _skip_whitespace(body, after + 1)
        if body[following : following + 1] not in ("{", "["):
            position = after + 1  # a trailing separator ends the run
            break
        position = following
    if not calls:
        return None
    return tuple(calls), body[position:]
