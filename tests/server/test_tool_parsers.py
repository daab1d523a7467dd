"""Tool-call parsers (server/tool_parsers): parsing each family's outputs, choosing the parser from a
chat template, and the forced-call grammars, run by llguidance on the embedded model's tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable

import llguidance
import llguidance.hf
import pytest

from server.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    ParsedOutput,
    ParsedToolCall,
    ToolFunction,
    ToolParser,
    auto_tool_parser,
    describe_tools_for_system_prompt,
    get_tool_parser,
)

WEATHER = ToolFunction(
    name="get_weather",
    description='Current weather. Units: "c" or "f" # not // a comment',
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
WEATHER_ENTRY = {
    "type": "function",
    "function": {"name": WEATHER.name, "description": WEATHER.description, "parameters": WEATHER.parameters},
}
TIME = ToolFunction(name="get_time", description=None, parameters={})
TOOLS = (WEATHER, TIME)
HERMES = HermesToolParser()
LLAMA = Llama3JsonToolParser()


def call(name: str, **arguments: object) -> ParsedToolCall:
    return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))


# ------------------------------------------------------------------------------------ Hermes / Qwen

QWEN_TWO_CALLS = (  # the shape Qwen2.5-Instruct answers in (its docs' parallel example)
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "San Francisco, CA, USA"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)

HERMES_CASES = {
    "single": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
        ParsedOutput(None, (call("get_weather", city="Paris", unit="c"),)),
    ),
    "two calls": (
        QWEN_TWO_CALLS,
        ParsedOutput(None, (call("get_weather", city="San Francisco, CA, USA"), call("get_time"))),
    ),
    "text before": (
        'Let me look that up.\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        ParsedOutput("Let me look that up.", (call("get_time"),)),
    ),
    "arguments as a string": (
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}\n</tool_call>',
        ParsedOutput(None, (call("get_weather", city="Zürich"),)),
    ),
    "parameters alias, no newlines": (
        '<tool_call>{"name":"get_weather","parameters":{"city":"Oslo"}}</tool_call>',
        ParsedOutput(None, (call("get_weather", city="Oslo"),)),
    ),
    "pretty-printed, blank lines": (
        '<tool_call>\n\n  {\n    "name": "get_weather",\n    "arguments": {\n      "city": "Rome"\n    }\n  }\n\n</tool_call>\n',
        ParsedOutput(None, (call("get_weather", city="Rome"),)),
    ),
    "no arguments key": ('<tool_call>\n{"name": "get_time"}\n</tool_call>', ParsedOutput(None, (call("get_time"),))),
    "valid and malformed": (
        'A\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_time", \n</tool_call>',
        ParsedOutput('A\n\n<tool_call>\n{"name": "get_time", \n</tool_call>', (call("get_time"),)),
    ),
    "malformed then valid": (
        '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_time"}\n</tool_call>',
        ParsedOutput('<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>', (call("get_time"),)),
    ),
}

HERMES_CONTENT_ONLY = {
    "malformed JSON": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
    "unknown function": '<tool_call>\n{"name": "delete_files", "arguments": {}}\n</tool_call>',
    "missing name": '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',
    "arguments not an object": '<tool_call>\n{"name": "get_weather", "arguments": ["Paris"]}\n</tool_call>',
    "arguments string not JSON": '<tool_call>\n{"name": "get_weather", "arguments": "city=Paris"}\n</tool_call>',
    "truncated": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    "plain text": "  The weather in Paris is mild today.\n",
    "nested too deep": "<tool_call>" + "[" * 100_000 + "</tool_call>",
    "arguments nested too deep": '<tool_call>{"name": "get_time", "arguments": "' + "[" * 100_000 + '"}</tool_call>',
}


@pytest.mark.parametrize("text,expected", HERMES_CASES.values(), ids=HERMES_CASES.keys())
def test_hermes_parses_calls(text: str, expected: ParsedOutput) -> None:
    assert HERMES.parse(text, TOOLS) == expected


@pytest.mark.parametrize("text", HERMES_CONTENT_ONLY.values(), ids=HERMES_CONTENT_ONLY.keys())
def test_hermes_leaves_anything_else_as_content(text: str) -> None:
    assert HERMES.parse(text, TOOLS) == ParsedOutput(text, ())


def test_hermes_without_tools_and_empty_output() -> None:
    assert HERMES.parse(QWEN_TWO_CALLS, []) == ParsedOutput(QWEN_TWO_CALLS, ())
    assert HERMES.parse(" \n", TOOLS) == ParsedOutput(None, ())


# ------------------------------------------------------------------------------------ Llama 3 JSON

LLAMA_CASES = {
    "single": (
        '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "f"}}',
        ParsedOutput(None, (call("get_weather", city="San Francisco, CA", unit="f"),)),
    ),
    "python tag": (
        '<|python_tag|>{"name": "get_time", "parameters": {}}',
        ParsedOutput(None, (call("get_time"),)),
    ),
    "two calls with ;": (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
        ParsedOutput(None, (call("get_weather", city="Paris"), call("get_time"))),
    ),
    "two calls, tight ; and newlines": (
        '\n{"name":"get_time","parameters":{}};\n{"name":"get_weather","arguments":{"city":"Lima"}}\n',
        ParsedOutput(None, (call("get_time"), call("get_weather", city="Lima"))),
    ),
    "arguments as a string": (
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Kyiv\\", \\"days\\": 2}"}',
        ParsedOutput(None, (call("get_weather", city="Kyiv", days=2),)),
    ),
    "a JSON list of calls": (
        '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Nice"}}]',
        ParsedOutput(None, (call("get_time"), call("get_weather", city="Nice"))),
    ),
    "text before the tag, text after": (
        'Checking.<|python_tag|>{"name": "get_time", "parameters": {}}\nDone.',
        ParsedOutput("Checking.\n\nDone.", (call("get_time"),)),
    ),
}

LLAMA_CONTENT_ONLY = {
    "malformed JSON": '{"name": "get_weather", "parameters": {"city": "Paris"}',
    "unknown function": '{"name": "delete_files", "parameters": {}}',
    "one of two unknown": '{"name": "get_time", "parameters": {}}; {"name": "rm", "parameters": {}}',
    "JSON that is not a call": '{"answer": 42}',
    "truncated": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa',
    "prose before the JSON": 'Call it like {"name": "get_time", "parameters": {}}',
    "plain text": "It is sunny in Paris.",
    "empty list": "[]",
    "nested too deep": "[" * 100_000,
}


@pytest.mark.parametrize("text,expected", LLAMA_CASES.values(), ids=LLAMA_CASES.keys())
def test_llama3_json_parses_calls(text: str, expected: ParsedOutput) -> None:
    assert LLAMA.parse(text, TOOLS) == expected


@pytest.mark.parametrize("text", LLAMA_CONTENT_ONLY.values(), ids=LLAMA_CONTENT_ONLY.keys())
def test_llama3_json_leaves_anything_else_as_content(text: str) -> None:
    assert LLAMA.parse(text, TOOLS) == ParsedOutput(text, ())


# ------------------------------------------------------------------------------ registry and prompt

QWEN25_TEMPLATE = (  # excerpt of Qwen2.5-Instruct's chat template
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
)
LLAMA31_TEMPLATE = (  # excerpts of Llama 3.1-Instruct's chat template
    '{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
    '{{- "<|python_tag|>" + tool_call.name + ".call(" }}'
)
LLAMA32_TEMPLATE = (  # excerpt of Llama 3.2-Instruct's chat template (no <|python_tag|>)
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}"
)


def test_registry() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"}
    for name, parser_class in TOOL_PARSERS.items():
        parser = get_tool_parser(name)
        assert isinstance(parser, parser_class) and isinstance(parser, ToolParser) and parser.name == name
    assert HERMES.start_marker == "<tool_call>" and LLAMA.start_marker == "{"
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("mistral")


def test_auto_tool_parser(smollm_tokenizer) -> None:
    assert auto_tool_parser(QWEN25_TEMPLATE) == "hermes"
    assert auto_tool_parser(LLAMA31_TEMPLATE) == "llama3_json"
    assert auto_tool_parser(LLAMA32_TEMPLATE) == "llama3_json"
    assert auto_tool_parser(LLAMA31_TEMPLATE + QWEN25_TEMPLATE) == "hermes"
    assert auto_tool_parser(smollm_tokenizer.chat_template) == "hermes"  # no tool hints: the default
    assert auto_tool_parser(None) == "hermes"


def test_tools_description_follows_qwen_and_its_answer_parses() -> None:
    text = describe_tools_for_system_prompt(TOOLS)
    assert text.startswith("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n")
    assert text.endswith('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    lines = text.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in lines] == [
        WEATHER_ENTRY,
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
    ]
    answer = text.rsplit("XML tags:\n", 1)[1].replace("<function-name>", '"get_time"').replace("<args-json-object>", "{}")
    assert HERMES.parse(answer, TOOLS) == ParsedOutput(None, (call("get_time"),))


# ----------------------------------------------------------------------------------- forced grammars

FORMATS: dict[str, tuple[ToolParser, Callable[[str, str], str], str]] = {
    # parser, how one call is written (name, arguments JSON), what joins parallel calls
    "hermes": (HERMES, lambda n, a: f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>', "\n"),
    "llama3_json": (LLAMA, lambda n, a: f'{{"name": "{n}", "parameters": {a}}}', "; "),
}


@pytest.fixture(scope="module")
def lltokenizer(smollm_tokenizer) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(smollm_tokenizer)


@pytest.fixture(params=FORMATS.values(), ids=FORMATS.keys())
def fmt(request, lltokenizer, smollm_tokenizer):
    """(grammar(tools, parallel), write_call(name, args), joiner, parse(text)) for one format;
    ``grammar`` also returns ``matches(text) -> (consumed, accepting)``."""
    parser, write, joiner = request.param

    def grammar(tools, parallel):
        lark = parser.forced_grammar(tools, parallel)
        compiled = llguidance.LLMatcher.grammar_from_lark(lark)
        assert llguidance.LLMatcher.validate_grammar(compiled) == ""
        assert llguidance.LLMatcher.validate_grammar(compiled, lltokenizer) == ""

        def matches(text: str) -> tuple[bool, bool]:
            matcher = llguidance.LLMatcher(lltokenizer, compiled, log_level=0)
            consumed = matcher.consume_tokens(smollm_tokenizer.encode(text, add_special_tokens=False))
            assert consumed != matcher.is_error()
            return consumed, matcher.is_accepting()

        return matches

    return grammar, write, joiner, lambda text: parser.parse(text, TOOLS)


ACCEPTED = (True, True)


def test_forced_grammar_accepts_a_call_to_each_tool_and_it_parses_back(fmt) -> None:
    grammar, write, _, parse = fmt
    matches = grammar(TOOLS, False)
    weather = write("get_weather", '{"city": "Paris", "unit": "c", "days": 3}')
    assert matches(weather) == ACCEPTED
    assert parse(weather).tool_calls == (call("get_weather", city="Paris", unit="c", days=3),)
    assert matches(write("get_weather", '{"city": "Paris"}')) == ACCEPTED
    assert matches(write("get_time", "{}")) == ACCEPTED
    assert parse(write("get_time", "{}")).tool_calls == (call("get_time"),)


@pytest.mark.parametrize(
    "name,arguments",
    [
        ("get_date", "{}"),  # a tool not offered
        ("get_weather", '{"city": 7}'),  # wrong type
        ("get_weather", '{"unit": "c"}'),  # required key missing
        ("get_weather", '{"city": "Paris", "unit": "kelvin"}'),  # not in the enum
        ("get_weather", '{"city": "Paris", "days": 1.5}'),  # not an integer
        ("get_time", "[1]"),  # {} parameters still mean an object
    ],
)
def test_forced_grammar_rejects_calls_outside_the_schemas(fmt, name: str, arguments: str) -> None:
    grammar, write, _, _ = fmt
    consumed, _ = grammar(TOOLS, False)(write(name, arguments))
    assert not consumed


def test_forced_grammar_named_function_excludes_the_others(fmt) -> None:
    grammar, write, _, _ = fmt
    matches = grammar([TIME], False)
    assert matches(write("get_time", "{}")) == ACCEPTED
    assert not matches(write("get_weather", '{"city": "Paris"}'))[0]


def test_forced_grammar_parallel(fmt) -> None:
    grammar, write, joiner, parse = fmt
    two = joiner.join([write("get_weather", '{"city": "Paris"}'), write("get_time", "{}")])
    three = joiner.join([two, write("get_time", "{}")])
    single = grammar(TOOLS, False)
    assert not single(two)[0]
    parallel = grammar(TOOLS, True)
    assert parallel(two) == ACCEPTED and parallel(three) == ACCEPTED
    assert parse(two).tool_calls == (call("get_weather", city="Paris"), call("get_time"))
    assert parallel("") == (True, False)  # at least one call
    assert not parallel("Sure. " + two)[0]  # nothing before the calls


def test_forced_grammar_resolves_refs_within_the_tool_schema(fmt) -> None:
    grammar, write, _, _ = fmt
    tool = ToolFunction(
        "add",
        None,
        {"type": "object", "$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"]},
    )
    matches = grammar([tool], False)
    assert matches(write("add", '{"a": 2}')) == ACCEPTED
    assert not matches(write("add", '{"a": "two"}'))[0]


@pytest.mark.parametrize("parser", [HERMES, LLAMA], ids=["hermes", "llama3_json"])
def test_forced_grammar_needs_a_tool(parser: ToolParser) -> None:
    with pytest.raises(ValueError):
        parser.forced_grammar([], parallel=True)


def test_tool_function_from_openai() -> None:
    bare = ToolFunction.from_openai({"type": "function", "function": {"name": "get_time", "parameters": None}})
    assert bare == ToolFunction("get_time", None, {"type": "object"})
    assert ToolFunction.from_openai(WEATHER_ENTRY) == WEATHER
    with pytest.raises(ValueError):
        ToolFunction.from_openai({"type": "function", "function": {"description": "no name"}})
