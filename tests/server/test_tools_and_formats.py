"""Tool calling and structured-output requests over the fake engine: the prompt, the grammar handed to the
engine, and the answers (whole and streamed). The fake says whatever ``[say:...:say]`` asks, so the
model's side of a tool call is scripted here; real decoding is in test_structured_smollm.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from amulet_core.grammar.spec import GrammarKind
from amulet_core.method.preference_prompts import Placement
from server.config import ServerConfig
from tests.support.fake_engine import FakeEngine
from tests.support.http import WEATHER_TOOL as WEATHER
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """These tests check the contexts of the system placement (the end placement's are in test_preference_placement.py)."""
    return ServerConfig(preference_placement=Placement.SYSTEM)


TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def say(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is the weather in Paris? [say:{text}:say]"}]


def chat(server: LiveServer, **fields: Any) -> httpx.Response:
    fields.setdefault("messages", say("Sunny."))
    return httpx.post(f"{server.url}/v1/chat/completions", json=fields)


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=8192)  # the fake's tokens are characters; tool descriptions are long


@pytest.fixture()
def client(server: LiveServer) -> Any:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def prompt_of(fake: FakeEngine, i: int = -1, base: bool = False) -> str:
    request = fake.requests[i]
    ids = request.contrast_prompt_ids if base else request.prompt_ids
    return "".join(chr(t) for t in ids or ())


def test_a_tool_call_is_parsed_into_tool_calls(client: Any, fake: FakeEngine) -> None:
    response = client.chat.completions.create(model="fake-model", messages=say("Let me check. " + CALL), tools=[WEATHER, TIME])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather", {"city": "Paris"})
    assert call.id.startswith("call_")
    # The fake template (like SmolLM2's) does not render tools: they are described in the system message.
    prompt = prompt_of(fake)
    assert prompt.startswith("<|system|>") and '"name": "get_weather"' in prompt and "<tool_call>" in prompt
    assert fake.requests[-1].sampling.grammar is None  # auto: the model decides, nothing is forced


def test_two_calls_get_distinct_ids(client: Any) -> None:
    two = CALL + "\n" + CALL.replace("Paris", "Rome")
    calls = client.chat.completions.create(model="fake-model", messages=say(two), tools=[WEATHER]).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c.id for c in calls}) == 2


def test_text_that_is_no_call_stays_content(client: Any) -> None:
    for text in (
        "Just sunny.",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
    ):
        choice = client.chat.completions.create(model="fake-model", messages=say(text), tools=[WEATHER]).choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")


def test_a_streamed_call_reassembles_to_the_same_call(client: Any) -> None:
    whole = client.chat.completions.create(model="fake-model", messages=say("Checking. " + CALL), tools=[WEATHER])
    stream = client.chat.completions.create(model="fake-model", messages=say("Checking. " + CALL), tools=[WEATHER], stream=True)
    content, name, arguments, ids, reasons = "", "", "", set(), []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                ids.add(call.id) if call.id else None
                name += call.function.name or ""
                arguments += call.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    call = whole.choices[0].message.tool_calls[0]
    assert content.strip() == whole.choices[0].message.content == "Checking."
    assert (name, json.loads(arguments)) == (call.function.name, json.loads(call.function.arguments))
    assert len(ids) == 1 and reasons == ["tool_calls"]


def test_forced_tool_choice_hands_the_engine_a_grammar(server: LiveServer, fake: FakeEngine) -> None:
    assert (
        chat(server, messages=say(CALL), tools=[WEATHER, TIME], tool_choice="required").json()["choices"][0]["finish_reason"]
        == "tool_calls"
    )
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and (grammar.kind, grammar.param) == (GrammarKind.LARK, "tool_choice")
    assert "get_weather" in grammar.source and "get_time" in grammar.source
    named = {"type": "function", "function": {"name": "get_time"}}
    assert chat(server, messages=say(CALL), tools=[WEATHER, TIME], tool_choice=named).status_code == 200
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and "get_time" in grammar.source and "get_weather" not in grammar.source


def test_tool_choice_none_leaves_tools_out(server: LiveServer, fake: FakeEngine) -> None:
    body = chat(server, messages=say(CALL), tools=[WEATHER], tool_choice="none").json()
    assert body["choices"][0]["message"]["content"] == CALL and body["choices"][0]["finish_reason"] == "stop"
    assert "get_weather" not in prompt_of(fake).split("[say:")[0]


def test_both_contexts_of_a_preference_request_see_the_same_tools(server: LiveServer, fake: FakeEngine) -> None:
    assert chat(server, tools=[WEATHER], preference="concise").status_code == 200
    pref, base = prompt_of(fake), prompt_of(fake, base=True)
    assert '"name": "get_weather"' in pref and '"name": "get_weather"' in base
    assert pref.replace(" Your answer should be concise as much as possible.", "") == base


def test_a_tool_history_is_accepted(server: LiveServer, fake: FakeEngine) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        {"role": "user", "content": "[say:It is 18 C and sunny.:say]"},
    ]
    body = chat(server, messages=messages, tools=[WEATHER]).json()
    assert body["choices"][0]["message"]["content"] == "It is 18 C and sunny."
    prompt = prompt_of(fake)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|user|><tool_response>\n18 C and sunny\n</tool_response>" in prompt


FORMATS: list[tuple[dict[str, Any], GrammarKind, str]] = [
    ({"response_format": {"type": "json_object"}}, GrammarKind.JSON_OBJECT, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": True}}},
        GrammarKind.JSON_SCHEMA,
        "response_format",
    ),
    ({"guided_json": {"type": "object"}}, GrammarKind.JSON_SCHEMA, "guided_json"),
    ({"guided_regex": "[a-z]+"}, GrammarKind.REGEX, "guided_regex"),
    ({"guided_choice": ["yes", "no"]}, GrammarKind.CHOICE, "guided_choice"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, GrammarKind.CHOICE, "structured_outputs"),
]


@pytest.mark.parametrize(("fields", "kind", "param"), FORMATS, ids=[p + ":" + k.value for _, k, p in FORMATS])
def test_formats_reach_the_engine_as_grammars(
    server: LiveServer, fake: FakeEngine, fields: dict[str, Any], kind: GrammarKind, param: str
) -> None:
    assert chat(server, **fields).status_code == 200
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and (grammar.kind, grammar.param) == (kind, param)
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", **fields}).status_code == 200
    assert fake.requests[-1].sampling.grammar == grammar


BAD: list[tuple[dict[str, Any], str]] = [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "nope"}}},
        "response_format.json_schema.schema",
    ),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_tools_and_formats_are_400_naming_the_field(
    server: LiveServer, fake: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(chat(server, **fields), 400)
    assert error["param"] == param
    assert fake.requests == []
    assert chat(server).status_code == 200
