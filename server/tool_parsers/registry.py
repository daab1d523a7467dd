"""Which tool-call parser a model uses: the registry of formats by name, and the choice made from
the chat template when the operator names none."""

from __future__ import annotations

from server.tool_parsers.base import ToolParser
from server.tool_parsers.hermes import TOOL_CALL_OPEN, HermesToolParser
from server.tool_parsers.llama3_json import PYTHON_TAG, Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}
"""The formats by name. Constant: read it, never add to it at run time."""

DEFAULT_TOOL_PARSER = HermesToolParser.name
"""The format used when the template gives no hint: the server then describes the tools in the
system message in the Hermes format (:func:`server.tool_parsers.hermes.describe_tools_for_system_prompt`)."""


def get_tool_parser(name: str) -> ToolParser:
    """A parser for the format ``name``; ``ValueError`` naming the known formats when it is unknown."""
    parser_class = TOOL_PARSERS.get(name)
    if parser_class is None:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool call parser {name!r}; known parsers: {known}")
    return parser_class()


def auto_tool_parser(chat_template: str | None) -> str:
    """The name of the format a chat template teaches its model.

    ``"hermes"`` when the template mentions ``<tool_call>`` (Hermes, Qwen2.5, Qwen3);
    ``"llama3_json"`` when it mentions ``<|python_tag|>``, ``"parameters"`` or ``ipython`` (Llama 3.1
    to 3.3); else :data:`DEFAULT_TOOL_PARSER`, also for no template. ``<tool_call>`` wins when both
    kinds of hint appear.
    """
    if not chat_template:
        return DEFAULT_TOOL_PARSER
    if TOOL_CALL_OPEN in chat_template:
        return HermesToolParser.name
    if any(hint in chat_template for hint in (PYTHON_TAG, '"parameters"', "ipython")):
        return Llama3JsonToolParser.name
    return DEFAULT_TOOL_PARSER
