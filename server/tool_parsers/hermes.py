"""The Hermes format, used by Hermes 2/3, Qwen2.5 and Qwen3: each call is a JSON object between tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly several, possibly with text around them. It is also the server's default format: when a
chat template cannot render ``tools``, the server appends :func:`describe_tools_for_system_prompt`
to the system message, which asks for exactly this format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from server.tool_parsers.base import (
    ParsedOutput,
    ParsedToolCall,
    ToolFunction,
    ToolParser,
    call_grammar,
    text_only,
    tool_call_from_json,
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class HermesToolParser(ToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call.

    Parsing tolerates any whitespace inside the tags, ``"parameters"`` for ``"arguments"``, and
    arguments given as a JSON string. A block whose body is not a valid call to an offered tool, and
    an opening tag never closed (a truncated output), stay in the content as text. The forced grammar
    writes the canonical form, calls joined by one newline.
    """

    name: ClassVar[str] = "hermes"
    start_marker: ClassVar[str] = TOOL_CALL_OPEN

    def parse(self, text: str, tools: Sequence[ToolFunction]) -> ParsedOutput:
        """See :meth:`ToolParser.parse`; never raises."""
        names = {tool.name for tool in tools}
        calls: list[ParsedToolCall] = []
        pieces: list[str] = []
        position = 0
        for match in _CALL.finditer(text):
            call = _decode_block(match.group(1), names)
            if call is None:
                continue  # its text stays in the next piece of content
            pieces.append(text[position : match.start()])
            calls.append(call)
            position = match.end()
        if not calls:
            return text_only(text)
        pieces.append(text[position:])
        content = "".join(pieces).strip()
        return ParsedOutput(content=content or None, tool_calls=tuple(calls))

    def forced_grammar(self, tools: Sequence[ToolFunction], parallel: bool) -> str:
        """See :meth:`ToolParser.forced_grammar`: ``<tool_call>\\n{...}\\n</tool_call>`` blocks joined
        by ``"\\n"``."""
        return call_grammar(
            tools,
            parallel,
            prefix=TOOL_CALL_OPEN + "\n",
            arguments_key="arguments",
            suffix="\n" + TOOL_CALL_CLOSE,
            separator="\n",
        )


def _decode_block(body: str, names: set[str]) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # a too deeply nested value is not a call
        return None
    return tool_call_from_json(value, names)


def tool_schema_line(tool: ToolFunction) -> str:
    """One tool as the JSON line Qwen2.5's template writes inside ``<tools>``:
    ``{"type": "function", "function": {"name", "description" (when given), "parameters"}}``."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters
    return json.dumps({"type": "function", "function": function}, ensure_ascii=False)


def describe_tools_for_system_prompt(tools: Sequence[ToolFunction]) -> str:
    """The text the server appends to the system message when the chat template cannot render
    ``tools`` (Qwen2.5's wording): the tools as JSON lines in ``<tools></tools>``, then the
    instruction to answer each call as ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``.

    It starts with ``"# Tools"`` and has no leading or trailing newline; the caller separates it
    from the system message (Qwen2.5 uses a blank line).
    """
    lines = "\n".join(tool_schema_line(tool) for tool in tools)
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}'
    )
