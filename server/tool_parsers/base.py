"""The shapes every tool-call format shares: the tools a request offers, the calls parsed out of an
output, and the :class:`ToolParser` contract each model family implements.

A parser is stateless: it turns a finished output into text content plus OpenAI tool calls
(:meth:`ToolParser.parse`), and writes the llguidance Lark grammar that forces a call in its format
(:meth:`ToolParser.forced_grammar`) for ``tool_choice: "required"`` or a named function.

The helpers below are shared by the formats: :func:`tool_call_from_json` decides whether one decoded
JSON value is a call to an offered tool, and :func:`arguments_schema` / :func:`lark_literal` /
:func:`lark_json` build the pieces of a grammar.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolFunction:
    """One function the request offers (an entry of ``tools`` whose ``type`` is ``"function"``).

    ``parameters`` is the JSON schema of the arguments object; ``{}`` or ``{"type": "object"}`` when
    the request gave none (both mean "any object").
    """

    name: str
    description: str | None
    parameters: dict[str, Any]

    @classmethod
    def from_openai(cls, tool: Mapping[str, Any]) -> ToolFunction:
        """Build from an OpenAI ``tools`` entry ``{"type": "function", "function": {...}}``.

        A missing or null ``parameters`` becomes ``{"type": "object"}``. Raises ``ValueError`` when the
        entry is not a function tool with a string name (request validation should have caught it).
        """
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError("a tool must be {'type': 'function', 'function': {'name': ...}}")
        description = function.get("description")
        parameters = function.get("parameters")
        return cls(
            name=function["name"],
            description=description if isinstance(description, str) else None,
            parameters=dict(parameters) if isinstance(parameters, Mapping) else {"type": "object"},
        )


@dataclass(frozen=True)
class ParsedToolCall:
    """One call found in an output: the function's name and its arguments as compact JSON text
    (``json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))``), always a JSON object."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    """An output split into text and calls.

    ``content`` is the text outside the recognised calls, or ``None`` when that is empty or only
    whitespace. When there are calls it is stripped; when there are none it is the output verbatim.
    ``tool_calls`` are in the order they were written.
    """

    content: str | None
    tool_calls: tuple[ParsedToolCall, ...]


def text_only(text: str) -> ParsedOutput:
    """The output as plain content with no calls (``None`` when it is empty or whitespace)."""
    return ParsedOutput(content=text if text.strip() else None, tool_calls=())


class ToolParser(ABC):
    """A model family's tool-call format.

    ``name`` is the registry key (``--tool-call-parser``); ``start_marker`` is the text that begins a
    call in this format: while streaming, once the output's stripped text starts with or contains it,
    the server stops streaming deltas and buffers to parse the finished output.
    """

    name: ClassVar[str]
    start_marker: ClassVar[str]

    @abstractmethod
    def parse(self, text: str, tools: Sequence[ToolFunction]) -> ParsedOutput:
        """Split a finished output into content and calls to functions in ``tools``.

        Never raises. A malformed call (bad JSON, no name, arguments that are not an object), a call
        to a name not in ``tools`` and an unterminated call are left in the content as text.
        """

    @abstractmethod
    def forced_grammar(self, tools: Sequence[ToolFunction], parallel: bool) -> str:
        """A Lark grammar (llguidance syntax) accepting exactly one call (``parallel`` False) or one or
        more calls (``parallel`` True) in this format, nothing before or after them, each to one of
        ``tools`` with arguments matching that tool's ``parameters`` schema (embedded with ``%json``).

        For a named ``tool_choice`` the caller passes only that tool. Raises ``ValueError`` when
        ``tools`` is empty. The schemas are embedded as given: one llguidance cannot compile makes
        the grammar invalid, so the caller validates it (``LLMatcher.validate_grammar``).
        """


def tool_call_from_json(value: object, names: Collection[str]) -> ParsedToolCall | None:
    """The call that a decoded JSON value describes, or ``None`` when it is not a valid call.

    A call is an object with a string ``name`` in ``names`` and its arguments under ``arguments``
    (or its alias ``parameters``): an object, a JSON string holding an object, or absent/null (no
    arguments, ``{}``). Other keys (``"type": "function"``, an id) are ignored.
    """
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    arguments = value["arguments"] if "arguments" in value else value.get("parameters")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):  # a too deeply nested value is not a call
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


ARGUMENTS_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options for forced arguments: one space after ``,`` and ``:`` as these formats write
them, and no other whitespace (a flexible one lets a small model pad with newlines until max_tokens)."""


def arguments_schema(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The schema an arguments object must match: ``parameters`` with ``"type": "object"`` added when
    it names no type (so ``{}`` means "any object", never "any JSON value"), and the JSON layout of
    :data:`ARGUMENTS_JSON_OPTIONS` unless the schema sets its own ``x-guidance``."""
    schema = dict(parameters)
    schema.setdefault("type", "object")
    schema.setdefault("x-guidance", dict(ARGUMENTS_JSON_OPTIONS))
    return schema


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal (llguidance reads JSON string escapes)."""
    return json.dumps(text, ensure_ascii=False)


def lark_json(schema: Mapping[str, Any]) -> str:
    """An inline ``%json { ... }`` non-terminal for ``schema``, on one line."""
    return "%json " + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def require_tools(tools: Sequence[ToolFunction]) -> None:
    """Raise ``ValueError`` when there is no tool to force a call to."""
    if not tools:
        raise ValueError("a forced tool call needs at least one tool")


def call_grammar(
    tools: Sequence[ToolFunction],
    parallel: bool,
    *,
    prefix: str,
    arguments_key: str,
    suffix: str,
    separator: str,
) -> str:
    """The Lark grammar of calls written ``prefix {"name": "<name>", "<arguments_key>": <args>} suffix``.

    One call when ``parallel`` is False, else one or more joined by ``separator``. The name and the
    key order are fixed text (the formats' parsers read them in any order); each tool's arguments are
    a ``%json`` of :func:`arguments_schema`, so ``$ref``s in a schema resolve against that schema.
    Raises ``ValueError`` when ``tools`` is empty.
    """
    require_tools(tools)
    lines = [
        "start: call" + (f" ({lark_literal(separator)} call)*" if parallel else ""),
        "call: "
        + lark_literal(prefix + '{"name": ')
        + " ("
        + " | ".join(f"fn_{i}" for i in range(len(tools)))
        + ") "
        + lark_literal("}" + suffix),
    ]
    for i, tool in enumerate(tools):
        head = json.dumps(tool.name, ensure_ascii=False) + ", " + json.dumps(arguments_key) + ": "
        lines.append(f"fn_{i}: {lark_literal(head)} args_{i}")
        lines.append(f"args_{i}: {lark_json(arguments_schema(tool.parameters))}")
    return "\n".join(lines) + "\n"
