"""Tool calling on the request side: the tools a chat request offers and what the grammar forces. How a
conversation with tools is written for a template that cannot render them is ``server.requests.tool_prompts``;
the answer side, the model's text as OpenAI tool calls, is ``server.tool_calls``.

The model's chat template renders the tools, the assistant ``tool_calls`` and the ``tool`` results of
the history when it can (``tools=`` of ``apply_chat_template``). When it cannot (SmolLM2's template
ignores them), nothing is dropped: the tools are described in the system message in the Hermes
format (:func:`describe_tools_for_system_prompt`), past calls are written into the assistant's
content as ``<tool_call>`` blocks and tool results become user turns in ``<tool_response>`` blocks.
Both contexts of a preference request get the same tools: they still differ by the preference alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.spec import MAX_GRAMMAR_CHARS, GrammarKind, GrammarSpec
from server.protocol import ChatCompletionRequest
from server.requests.json_values import check_json_depth
from server.tool_parsers import (
    ParsedOutput,
    ToolFunction,
    ToolParser,
    auto_tool_parser,
    get_tool_parser,
)

logger = logging.getLogger(__name__)

MAX_TOOL_SCHEMA_CHARS = MAX_GRAMMAR_CHARS
"""Characters of one tool's ``parameters`` schema, written out as JSON (as a JSON schema grammar is capped)."""
MAX_TOOLS_CHARS = 2 * MAX_GRAMMAR_CHARS
"""Characters of all the tools' schemas and descriptions together: they are described to the model and,
for ``tool_choice`` ``required`` or a named function, written into one grammar."""


class ConfiguredToolParser:
    """The server's tool-call parser (``--tool-call-parser``): the one named, or for ``auto`` the one the chat
    template's format picks, found once (``template_text`` gives the template) and logged."""

    def __init__(self, name: str, template_text: Callable[[], str | None]) -> None:
        self._name = name
        self._template_text = template_text
        self._parser: ToolParser | None = None

    def __call__(self) -> ToolParser:
        if self._parser is None:
            name = self._name
            if name == "auto":
                name = auto_tool_parser(self._template_text())
                logger.info("Tool calls are parsed as '%s' (picked from the chat template; see --tool-call-parser).", name)
            self._parser = get_tool_parser(name)
        return self._parser


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
    forced_grammar: GrammarSpec | None
    """The grammar forcing the call(s) for ``required`` and a named function; None for ``auto``."""

    def parse(self, text: str) -> ParsedOutput:
        return self.parser.parse(text, self.tools)


def _check_parameters(parameters: Any, index: int) -> int:
    """Refuse a ``parameters`` that is not an object schema, nests too deep or is too long; its length as JSON."""
    param = f"tools[{index}].function.parameters"
    check_json_depth(parameters, param)
    size = len(json.dumps(parameters, ensure_ascii=False))
    if size > MAX_TOOL_SCHEMA_CHARS:
        raise InvalidParameterError(
            param, f"'{param}' is {size} characters long as JSON, more than the {MAX_TOOL_SCHEMA_CHARS} allowed."
        )
    if parameters.get("type", "object") != "object":
        raise InvalidParameterError(param, f"'{param}' must be a JSON schema of type 'object'.")
    if not isinstance(parameters.get("properties", {}), dict):
        raise InvalidParameterError(param, f"'{param}.properties' must be an object.")
    required = parameters.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise InvalidParameterError(param, f"'{param}.required' must be a list of property names.")
    return size


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
    total = 0
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
        total += _check_parameters(parameters, i) + len(tool.function.description or "")
        functions.append(ToolFunction(tool.function.name, tool.function.description, parameters))
    if total > MAX_TOOLS_CHARS:
        raise InvalidParameterError(
            "tools",
            f"The tools' schemas and descriptions are {total} characters long in all, more than the {MAX_TOOLS_CHARS} allowed.",
        )
    named = None
    if choice is not None and not isinstance(choice, str):
        named = choice.function.name
        if named not in names:
            raise InvalidParameterError("tool_choice", f"'tool_choice' names '{named}', which is not in 'tools'.")
    mode = "named" if named else (choice if isinstance(choice, str) else "auto")
    openai_tools = tuple(t.model_dump(exclude_none=True) for t in tools)
    parallel = body.parallel_tool_calls is not False
    chosen = parser()
    forced = None
    if mode != "auto":
        offered = [f for f in functions if f.name == named] if named else functions
        forced = GrammarSpec(GrammarKind.LARK, chosen.forced_grammar(offered, parallel and not named), "tool_choice")
    return ToolRequest(tuple(functions), openai_tools, mode, named, parallel and not named, chosen, forced)
