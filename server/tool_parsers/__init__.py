"""Tool calling: parse the calls a model writes as text into OpenAI tool calls, and write the
grammars (llguidance Lark syntax) that force a call for ``tool_choice: "required"`` or a named
function. One :class:`ToolParser` per model family's format; see :mod:`server.tool_parsers.registry`.
"""

from __future__ import annotations

from server.tool_parsers.base import ParsedOutput, ParsedToolCall, ToolFunction, ToolParser
from server.tool_parsers.hermes import HermesToolParser, describe_tools_for_system_prompt
from server.tool_parsers.llama3_json import Llama3JsonToolParser
from server.tool_parsers.registry import DEFAULT_TOOL_PARSER, TOOL_PARSERS, auto_tool_parser, get_tool_parser

__all__ = [
    "DEFAULT_TOOL_PARSER",
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "ParsedOutput",
    "ParsedToolCall",
    "ToolFunction",
    "ToolParser",
    "auto_tool_parser",
    "describe_tools_for_system_prompt",
    "get_tool_parser",
]
