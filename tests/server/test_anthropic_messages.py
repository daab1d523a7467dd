"""``POST /v1/messages`` (Anthropic's Messages API) through the official ``anthropic`` SDK against a real uvicorn:
over the fake engine for the HTTP shapes (answers, Anthropic's stream events, tool use, stop reasons, usage,
errors, the key in ``x-api-key``, ``preference`` through ``extra_body``, ``/v1/messages/count_tokens`` against
the usage of an answer), and over the embedded SmolLM2 for a few real answers (marked ``smollm``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import anthropic
import httpx
import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.method.preference_prompts import Placement
from amulet_core.model.loading import LoadedModel
from server.config import ServerConfig
from tests.support.fake_engine import REPLY_PIECES, REPLY_TEXT, TOKEN_ID_BASE, FakeEngine
from tests.support.http import API_KEY, WRONG_KEY
from tests.support.live_server import EngineServer, LiveServer, engine_server

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HI = [{"role": "user", "content": "Hi"}]


class DecodingFakeEngine(FakeEngine):
    """The fake engine, whose ``decode`` reads the token ids of its reply back as the reply's text, as a real
    tokenizer reads back what the model generated (the fake's n-th answer token is ``TOKEN_ID_BASE + n``, the n-th
    piece of its reply). Like a real engine's, the fake's last token ends past a stop string that ends inside it."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        pieces = len(REPLY_PIECES)
        return "".join(
            REPLY_PIECES[t - TOKEN_ID_BASE - 1] if TOKEN_ID_BASE < t <= TOKEN_ID_BASE + pieces else chr(t) for t in token_ids
        )


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return DecodingFakeEngine(max_model_len=8192)  # the fake's tokens are characters; tool descriptions are long


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(api_key=API_KEY, preference_placement=Placement.SYSTEM)


@pytest.fixture()
def client(server: LiveServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0) as c:
        yield c


def prompt_of(fake: FakeEngine, i: int = -1) -> str:
    return "".join(chr(t) for t in fake.requests[i].prompt_ids)


def say(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is the weather in Paris? [say:{text}:say]"}]


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The error object of an Anthropic-shaped error answer, after checking the shape exactly."""
    body = exc.response.json()
    assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    assert "Traceback" not in exc.response.text
    return dict(body["error"])


# ---------------------------------------------------------------- answers


def test_create_answers_with_text_stop_reason_and_usage(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    message = client.messages.create(model="fake-model", max_tokens=100, messages=HI)
    assert isinstance(message, anthropic.types.Message)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == REPLY_TEXT
    assert (message.model, message.stop_reason, message.stop_sequence) == ("fake-model", "end_turn", None)
    prompt_tokens = len(fake.requests[-1].prompt_ids)
    usage = message.usage
    assert usage.output_tokens == len(REPLY_PIECES)
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == prompt_tokens and usage.cache_read_input_tokens == 3
    assert "preference" not in (message.model_extra or {})
    assert len(fake.requests[-1].contexts) == 1
    assert fake.requests[-1].sampling.max_tokens == 100


def test_system_blocks_and_sampling_fields_reach_the_engine(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    client.messages.create(
        model="fake-model",
        max_tokens=20,
        system=[
            {"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}],
        metadata={"user_id": "u-1"},
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 7},  # this SDK sends sampling fields through extra_body
    )
    assert prompt_of(fake).startswith("<|system|>Be brief.\nBe kind.\n<|user|>Hello\nthere\n<|assistant|>")
    sampling = fake.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.5, 0.9, 7, 20)
    client.messages.create(model="fake-model", max_tokens=20, system="Plain system.", messages=HI)
    assert prompt_of(fake).startswith("<|system|>Plain system.\n<|user|>Hi\n")


def test_max_tokens_ends_with_max_tokens(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="fake-model", max_tokens=3, messages=HI)
    assert message.content[0].text == "".join(REPLY_PIECES[:3])
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


def test_a_stop_sequence_ends_with_stop_sequence(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    message = client.messages.create(model="fake-model", max_tokens=50, messages=HI, stop_sequences=["zzz", "ld"])
    assert fake.requests[-1].sampling.stop == ("zzz", "ld")
    assert message.content[0].text == "Hello, wör"
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "ld")
    unmatched = client.messages.create(model="fake-model", max_tokens=50, messages=HI, stop_sequences=["zzz"])
    assert (unmatched.stop_reason, unmatched.stop_sequence) == ("end_turn", None)
    with client.messages.stream(model="fake-model", max_tokens=50, messages=HI, stop_sequences=["ld"]) as stream:
        final = stream.get_final_message()
    assert (final.content[0].text, final.stop_reason, final.stop_sequence) == ("Hello, wör", "stop_sequence", "ld")


def test_output_config_format_is_a_json_schema_grammar(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    output = {"format": {"type": "json_schema", "schema": schema}}
    message = client.messages.create(model="fake-model", max_tokens=50, messages=say('{"city": "Paris"}'), output_config=output)
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and json.loads(grammar.source) == schema
    assert json.loads(message.content[0].text) == {"city": "Paris"}


def test_a_last_assistant_message_is_continued(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    messages = [*HI, {"role": "assistant", "content": "The answer is"}]
    client.messages.create(model="fake-model", max_tokens=5, messages=messages)
    options = fake.template_options[-1]
    assert options.continue_final_message and not options.add_generation_prompt
    assert prompt_of(fake).endswith("<|assistant|>The answer is\n")


# ---------------------------------------------------------------- streaming


def test_stream_sends_anthropics_events_and_the_sdk_rebuilds_the_message(client: anthropic.Anthropic) -> None:
    raw = client.messages.create(model="fake-model", max_tokens=100, messages=HI, stream=True)
    types = [event.type for event in raw]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[2:-3] == ["content_block_delta"] * len(REPLY_PIECES)
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    with client.messages.stream(model="fake-model", max_tokens=100, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    whole = client.messages.create(model="fake-model", max_tokens=100, messages=HI)
    assert text == REPLY_TEXT
    assert final.content[0].text == REPLY_TEXT and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    with client.messages.stream(model="fake-model", max_tokens=4, messages=HI) as short:
        assert short.get_final_message().stop_reason == "max_tokens"


def test_the_stream_on_the_wire_has_named_events_a_ping_and_no_done(server: LiveServer) -> None:
    body = {"model": "fake-model", "max_tokens": 5, "messages": HI, "stream": True}
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block]
    names = [block.split("\n")[0] for block in blocks]
    assert names[:2] == ["event: message_start", "event: ping"] and names[-1] == "event: message_stop"
    for block in blocks:
        event, data = block.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")
    assert "[DONE]" not in response.text
    delta = json.loads(blocks[-2].split("\n")[1].removeprefix("data: "))
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None} and delta["usage"]["output_tokens"] == 5


def test_a_failure_mid_stream_is_an_error_event(client: anthropic.Anthropic, server: LiveServer) -> None:
    failing = [{"role": "user", "content": "[fail]"}]
    with (
        pytest.raises(anthropic.APIStatusError) as raised,
        client.messages.stream(model="fake-model", max_tokens=50, messages=failing) as stream,
    ):
        for _ in stream:
            pass
    assert raised.value.body["error"]["type"] == "api_error"
    body = {"max_tokens": 50, "messages": [{"role": "user", "content": "[fail]"}], "stream": True}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": API_KEY})
    last = response.text.strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: error" and "[DONE]" not in response.text
    error = json.loads(last[1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert "message_stop" not in response.text


def test_a_full_queue_is_a_rate_limit_error_before_the_stream(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    fake.overloaded = True
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(model="fake-model", max_tokens=5, messages=HI, stream=True)
    assert error_of(raised.value)["type"] == "rate_limit_error"
    assert raised.value.response.headers["retry-after"]


# ---------------------------------------------------------------- tools


def test_tool_use_round_trip(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    asked = say("Let me check. " + CALL)
    message = client.messages.create(model="fake-model", max_tokens=200, messages=asked, tools=[WEATHER])
    assert [block.type for block in message.content] == ["text", "tool_use"]
    text, call = message.content
    assert text.text == "Let me check."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_") and message.stop_reason == "tool_use"
    assert "get_weather" in prompt_of(fake)  # the tools are described to the model
    history = [
        *asked,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "18 C and sunny"},
                {"type": "text", "text": "[say:It is sunny.:say]"},
            ],
        },
    ]
    answer = client.messages.create(model="fake-model", max_tokens=200, messages=history, tools=[WEATHER])
    assert [b.type for b in answer.content] == ["text"] and answer.stop_reason == "end_turn"
    assert answer.content[0].text == "It is sunny."
    prompt = prompt_of(fake)
    assert '"name": "get_weather"' in prompt.split("<|assistant|>")[1]  # the call, in the assistant's turn
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt


def test_a_streamed_tool_call_equals_the_whole_one(client: anthropic.Anthropic) -> None:
    asked = say("Sure. " + CALL)
    whole = client.messages.create(model="fake-model", max_tokens=200, messages=asked, tools=[WEATHER])
    kinds = []
    with client.messages.stream(model="fake-model", max_tokens=200, messages=asked, tools=[WEATHER]) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = stream.get_final_message()
    assert "input_json_delta" in kinds and "text_delta" in kinds
    assert [b.type for b in final.content] == [b.type for b in whole.content] == ["text", "tool_use"]
    assert final.content[1].input == whole.content[1].input == {"city": "Paris"}
    # streamed text goes out before the call is seen, so it keeps the space the whole answer strips
    assert final.content[0].text.strip() == whole.content[0].text == "Sure."
    assert final.stop_reason == whole.stop_reason == "tool_use"
    assert final.content[1].id.startswith("toolu_")


@pytest.mark.parametrize(
    ("choice", "forced"),
    [({"type": "tool", "name": "get_weather"}, True), ({"type": "any"}, True), ({"type": "auto"}, False)],
)
def test_tool_choice_forces_a_call_by_grammar(client: anthropic.Anthropic, fake: FakeEngine, choice: Any, forced: bool) -> None:
    client.messages.create(model="fake-model", max_tokens=200, messages=say(CALL), tools=[WEATHER], tool_choice=choice)
    grammar = fake.requests[-1].sampling.grammar
    assert (grammar is not None) is forced
    if forced:
        assert grammar is not None and grammar.param == "tool_choice"


def test_tool_choice_none_leaves_the_tools_out(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    message = client.messages.create(
        model="fake-model",
        max_tokens=200,
        messages=say(CALL),
        tools=[WEATHER],
        tool_choice={"type": "none"},
    )
    assert "get_weather" not in prompt_of(fake).split("[say:")[0]
    assert [b.type for b in message.content] == ["text"] and message.stop_reason == "end_turn"


# ---------------------------------------------------------------- our fields through extra_body


def test_preference_through_extra_body_is_applied_and_echoed(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    message = client.messages.create(model="fake-model", max_tokens=20, messages=HI, extra_body={"preference": "concise"})
    request = fake.requests[-1]
    assert len(request.contexts) == 2 and request.method.method.value == "amulet"
    echo = (message.model_extra or {})["preference"]
    assert echo["method"] == "amulet" and "concise" in echo["text"]
    assert "concise" in prompt_of(fake)  # the decoded context carries the sentence (system placement)
    spec = {"text": "formal", "method": "la", "coefficient": 2.0}
    la = client.messages.create(model="fake-model", max_tokens=20, messages=HI, extra_body={"preference": spec, "seed": 3})
    assert (la.model_extra or {})["preference"]["method"] == "la"
    assert (la.model_extra or {})["preference"]["coefficient"] == 2.0
    assert fake.requests[-1].method.method.value == "la" and fake.requests[-1].sampling.seed == 3


def test_the_stream_echoes_the_preference_in_message_start(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    raw = client.messages.create(model="fake-model", max_tokens=5, messages=HI, stream=True, extra_body={"preference": "concise"})
    start = next(iter(raw))
    assert start.type == "message_start"
    assert (start.message.model_extra or {})["preference"]["method"] == "amulet"
    raw.close()
    assert len(fake.requests[-1].contexts) == 2


def test_unknown_keys_are_accepted_and_logged_once(client: anthropic.Anthropic, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server.requests.policy")
    block = {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}, "sparkle": 1}
    message = client.messages.create(
        model="fake-model", max_tokens=5, messages=[{"role": "user", "content": [block]}], extra_body={"glitter": True}
    )
    assert message.stop_reason == "max_tokens"
    lines = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert any("'messages[].content[].sparkle'" in line for line in lines), lines
    assert any("'glitter'" in line for line in lines), lines
    assert not any("cache_control" in line for line in lines)


# ---------------------------------------------------------------- errors and the key


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content"),
        ({"messages": [*HI, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]}, "messages[1]"),
        ({"tools": [{"name": "web_search", "type": "web_search_20250305"}]}, "tools[0]"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]}, "tools[0].name"),
        ({"tool_choice": {"type": "tool", "name": "nowhere"}, "tools": [WEATHER]}, "tool_choice"),
        ({"extra_body": {"stop": ["x"]}}, "stop_sequences"),
        ({"extra_body": {"preference": {"text": "formal", "lamda": 1}}}, "preference.lamda"),
        ({"extra_body": {"n": 2}}, "'n'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"extra_body": {"temperature": -1}}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_sequences": ["s"] * 100}, "stop_sequences"),
        (
            {
                "output_config": {"format": {"type": "json_schema", "schema": {}}},
                "extra_body": {"response_format": {"type": "text"}},
            },
            "output_config.format",
        ),
    ],
)
def test_bad_input_is_an_invalid_request_error_naming_the_field(
    client: anthropic.Anthropic, fields: dict[str, Any], named: str
) -> None:
    request: dict[str, Any] = {"model": "fake-model", "max_tokens": 20, "messages": HI} | fields
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(**request)
    error = error_of(raised.value)
    assert error["type"] == "invalid_request_error" and named in error["message"], error


def test_a_missing_max_tokens_and_an_unknown_model(server: LiveServer, client: anthropic.Anthropic) -> None:
    response = httpx.post(f"{server.url}/v1/messages", json={"messages": HI}, headers={"x-api-key": API_KEY})
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=HI)
    error = error_of(raised.value)
    assert error["type"] == "not_found_error" and "claude-sonnet-4-5" in error["message"]


def test_the_key_in_x_api_key_or_the_bearer_header(server: LiveServer) -> None:
    beta = {"anthropic-beta": "prompt-caching-2024-07-31"}
    with anthropic.Anthropic(
        base_url=server.url, api_key=None, default_headers={"x-api-key": API_KEY, **beta}, max_retries=0
    ) as c:
        assert c.messages.create(model="fake-model", max_tokens=5, messages=HI).content
    for headers in ({"x-api-key": WRONG_KEY}, {"Authorization": f"Bearer {WRONG_KEY}"}):
        with anthropic.Anthropic(base_url=server.url, api_key=None, default_headers=headers, max_retries=0) as c:
            with pytest.raises(anthropic.AuthenticationError) as raised:
                c.messages.create(model="fake-model", max_tokens=5, messages=HI)
            assert error_of(raised.value) == {"type": "authentication_error", "message": "Incorrect API key provided."}
            assert WRONG_KEY not in raised.value.response.text
    missing = httpx.post(f"{server.url}/v1/messages", json={"max_tokens": 5, "messages": HI})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in missing.json()["error"]["message"]
    both = {"x-api-key": API_KEY, "Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(f"{server.url}/v1/messages", json={"max_tokens": 5, "messages": HI}, headers=both).status_code == 200
    two_keys = {"x-api-key": WRONG_KEY}
    with (
        anthropic.Anthropic(base_url=server.url, api_key=API_KEY, default_headers=two_keys, max_retries=0) as c,
        pytest.raises(anthropic.BadRequestError) as conflicting,
    ):
        c.messages.create(model="fake-model", max_tokens=5, messages=HI)
    assert "different keys" in error_of(conflicting.value)["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HI}, headers={"x-api-key": API_KEY})
    assert chat.status_code == 200  # the header works on every route; other routes keep the OpenAI error shape
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HI}, headers={"x-api-key": WRONG_KEY})
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- counting tokens


COUNTED: dict[str, Any] = {
    "model": "fake-model",
    "system": "Be brief.",
    "messages": [*HI, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "The weather in Paris?"}],
    "tools": [WEATHER],
}


def test_count_tokens_counts_the_prompt_a_message_is_billed_for(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    counted = client.messages.count_tokens(**COUNTED)
    assert isinstance(counted, anthropic.types.MessageTokensCount)
    assert fake.requests == []  # counted without the engine
    message = client.messages.create(max_tokens=5, **COUNTED)
    assert counted.input_tokens == len(fake.requests[-1].prompt_ids)
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == counted.input_tokens
    shorter = client.messages.count_tokens(model="fake-model", messages=HI)
    assert 0 < shorter.input_tokens < counted.input_tokens


def test_count_tokens_counts_the_preference_context(client: anthropic.Anthropic, fake: FakeEngine) -> None:
    preference = {"preference": {"text": "Answer like a pirate."}}
    counted = client.messages.count_tokens(model="fake-model", messages=HI, extra_body=preference)
    message = client.messages.create(model="fake-model", max_tokens=5, messages=HI, extra_body=preference)
    request = fake.requests[-1]
    assert len(request.contexts) > 1 and "pirate" in "".join(chr(t) for t in request.prompt_ids)
    assert (
        counted.input_tokens
        == len(request.prompt_ids)
        > client.messages.count_tokens(model="fake-model", messages=HI).input_tokens
    )
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == counted.input_tokens


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": "fake-model"}, "messages"),
        ({"model": "fake-model", "messages": []}, "messages"),
        ({"model": "fake-model", "messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
        ({"model": "fake-model", "messages": HI, "tools": [{"name": "bad name!", "input_schema": {}}]}, "tools[0].name"),
        ({"model": "fake-model", "messages": HI, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"model": "fake-model", "messages": HI, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_count_tokens_bad_input_names_the_field(server: LiveServer, body: dict[str, Any], named: str) -> None:
    response = httpx.post(f"{server.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": API_KEY})
    assert response.status_code == 400, response.text
    assert set(response.json()) <= {"type", "error", "request_id"}
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"], error


def test_count_tokens_for_an_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.count_tokens(model="claude-sonnet-4-5", messages=HI)
    assert error_of(raised.value)["type"] == "not_found_error"


def test_the_route_is_in_the_openapi_schema(server: LiveServer) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", headers={"x-api-key": API_KEY}).json()
    operation = schema["paths"]["/v1/messages"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"max_tokens", "messages"} <= set(body["required"])
    assert "$ref" not in json.dumps(operation)
    assert operation["responses"]["401"]["content"]["application/json"]["schema"]["properties"]["type"]
    counting = schema["paths"]["/v1/messages/count_tokens"]["post"]
    body = counting["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in body["required"] and "max_tokens" not in body["required"]
    assert "$ref" not in json.dumps(counting)
    answer = counting["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["required"] == ["input_tokens"]
    assert counting["responses"]["400"]["content"]["application/json"]["schema"]["properties"]["error"]


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm_server(smollm: LoadedModel) -> Iterator[EngineServer]:
    with engine_server(smollm, EngineConfig(max_model_len=2048, max_num_seqs=4, kv_cache_tokens=8192)) as running:
        yield running


@pytest.fixture(scope="module")
def smollm_client(smollm_server: EngineServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=smollm_server.url, api_key="unused", max_retries=0, timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def smollm_model(smollm_server: EngineServer) -> str:
    return str(httpx.get(f"{smollm_server.url}/v1/models").json()["data"][0]["id"])


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.smollm
@pytest.mark.parametrize("preference", [None, "concise"])
def test_smollm_answers_paris(smollm_client: anthropic.Anthropic, smollm_model: str, preference: str | None) -> None:
    extra = {"temperature": 0} | ({"preference": preference} if preference else {})
    message = smollm_client.messages.create(model=smollm_model, max_tokens=40, messages=FRANCE, extra_body=extra)
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert "Paris" in message.content[0].text
    assert ("preference" in (message.model_extra or {})) is bool(preference)


@pytest.mark.smollm
def test_smollm_stream_equals_the_greedy_answer_and_stops_at_a_sequence(
    smollm_client: anthropic.Anthropic, smollm_model: str
) -> None:
    fields: dict[str, Any] = {"model": smollm_model, "max_tokens": 40, "messages": FRANCE, "extra_body": {"temperature": 0}}
    whole = smollm_client.messages.create(**fields)
    with smollm_client.messages.stream(**fields) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    cut = smollm_client.messages.create(**fields, stop_sequences=["Paris"])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "Paris")
    assert whole.content[0].text.startswith(cut.content[0].text + "Paris")
