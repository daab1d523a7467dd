"""``POST /v1/responses`` through the official SDK against a real uvicorn over the fake engine (the fake says
whatever ``[say:...:say]`` asks, so function calls and JSON answers are scripted), then the real SmolLM2.

Covered: ``responses.create`` / ``responses.stream`` (the event sequence and its numbers), ``previous_response_id``,
``retrieve``, ``delete``, ``input_items.list``, function calls and their outputs, ``text.format`` (the grammar the
engine gets), ``preference`` through ``extra_body``, API keys that cannot see each other's responses, failures,
and bad input answered with an error naming the field. The database itself is test_response_store.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from amulet_core.engine.config import EngineConfig
from amulet_core.grammar.spec import GrammarKind
from amulet_core.model.loading import LoadedModel
from server.app import create_app
from server.config import ServerConfig
from tests.support.fake_engine import REPLY_PIECES, REPLY_TEXT, FakeEngine
from tests.support.http import assert_openai_error
from tests.support.live_server import EngineServer, LiveServer, engine_server, live_server

MODEL = "fake-model"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
KEY_A, KEY_B = "sk-responses-a", "sk-responses-b"


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=8192)  # the fake's tokens are characters; tool descriptions are long


@pytest.fixture()
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def prompt_of(fake: FakeEngine, i: int = -1) -> str:
    return "".join(chr(t) for t in fake.requests[i].prompt_ids)


def post(server: LiveServer, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/responses", json=body, headers=headers, timeout=30)


# ---------------------------------------------------------------- create, retrieve, continue, delete


def test_create_answers_and_stores_the_response(client: openai.OpenAI, fake: FakeEngine) -> None:
    response = client.responses.create(model=MODEL, input="Hi", instructions="Be brief.", metadata={"topic": "greeting"})
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == REPLY_TEXT
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert response.usage is not None and response.usage.output_tokens == len(REPLY_PIECES)
    assert response.usage.input_tokens == len(fake.requests[-1].prompt_ids)
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert prompt_of(fake).startswith("<|system|>Be brief.\n<|user|>Hi\n")
    stored = client.responses.retrieve(response.id)
    assert stored.model_dump() == response.model_dump()
    assert stored.instructions == "Be brief." and stored.metadata == {"topic": "greeting"} and stored.store is True


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, fake: FakeEngine) -> None:
    first = client.responses.create(model=MODEL, input="[say:Paris.:say] What is the capital of France?", instructions="Once.")
    second = client.responses.create(model=MODEL, input="And of Italy? [say:Rome.:say]", previous_response_id=first.id)
    assert (first.output_text, second.output_text) == ("Paris.", "Rome.")
    assert second.previous_response_id == first.id
    assert prompt_of(fake) == (
        "<|user|>[say:Paris.:say] What is the capital of France?\n<|assistant|>Paris.\n"
        "<|user|>And of Italy? [say:Rome.:say]\n<|assistant|>"
    )  # the instructions are this response's only, as OpenAI's
    third = client.responses.create(model=MODEL, input="[say:Berlin.:say] Germany?", previous_response_id=second.id)
    assert "<|assistant|>Paris.\n" in prompt_of(fake) and "<|assistant|>Rome.\n" in prompt_of(fake)
    assert third.output_text == "Berlin."
    items = client.responses.input_items.list(third.id)
    assert [item.type for item in items.data] == ["message"] and items.data[0].content[0].text == "[say:Berlin.:say] Germany?"


def test_an_unknown_previous_response_is_a_404_naming_it(server: LiveServer, client: openai.OpenAI) -> None:
    error = assert_openai_error(post(server, {"model": MODEL, "input": "Hi", "previous_response_id": "resp_nope"}), 404)
    assert error["param"] == "previous_response_id" and "resp_nope" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")


def test_delete_removes_the_response(server: LiveServer, client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi")
    client.responses.delete(response.id)
    for call in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    error = assert_openai_error(post(server, {"model": MODEL, "input": "Hi", "previous_response_id": response.id}), 404)
    assert error["param"] == "previous_response_id"


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi", store=False)
    assert response.output_text == REPLY_TEXT and response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_input_items_are_listed_with_ids_in_pages(client: openai.OpenAI) -> None:
    given = [{"role": "user", "content": f"Line {i}"} for i in range(5)]
    response = client.responses.create(model=MODEL, input=given)
    listed = client.responses.input_items.list(response.id, order="asc")
    texts = [item.content[0].text for item in listed.data]
    assert texts == [f"Line {i}" for i in range(5)]
    assert all(item.id and item.id.startswith("msg_") for item in listed.data)
    newest_first = client.responses.input_items.list(response.id)  # OpenAI's default order: desc
    assert [item.content[0].text for item in newest_first.data] == texts[::-1]
    page = client.responses.input_items.list(response.id, order="asc", limit=2, after=listed.data[1].id)
    assert [item.content[0].text for item in page.data] == ["Line 2", "Line 3"] and page.has_more is True
    assert [item.content[0].text for item in page.get_next_page().data] == ["Line 4"]


# ---------------------------------------------------------------- streaming


def test_stream_emits_the_event_sequence_with_numbers(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="[say:Yes, sir.:say]") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas == 3  # "Yes", ", s", "ir." in the fake's 3-character pieces
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Yes, sir." and final.status == "completed"
    assert client.responses.retrieve(final.id).output_text == "Yes, sir."
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == "Yes, sir."


def test_a_streamed_response_is_continued(client: openai.OpenAI, fake: FakeEngine) -> None:
    with client.responses.stream(model=MODEL, input="[say:One.:say]") as stream:
        first = stream.get_final_response()
    second = client.responses.create(model=MODEL, input="[say:Two.:say]", previous_response_id=first.id, stream=False)
    assert "<|assistant|>One.\n" in prompt_of(fake) and second.output_text == "Two."


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.output_text == "Hello,"
    streamed = httpx.post(
        f"{server.url}/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2, "stream": True}
    )
    assert "event: response.incomplete\n" in streamed.text and "response.completed" not in streamed.text


def test_a_failed_generation_streams_error_and_response_failed(server: LiveServer, client: openai.OpenAI) -> None:
    streamed = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "[fail]", "stream": True}, timeout=30)
    assert streamed.status_code == 200
    kinds = [line.removeprefix("event: ") for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert kinds[-2:] == ["error", "response.failed"] and "[DONE]" not in streamed.text
    failed = json.loads(streamed.text.rstrip().splitlines()[-1].removeprefix("data: "))
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "generation_failed"
    assert "secret" not in streamed.text
    error = assert_openai_error(post(server, {"model": MODEL, "input": "[fail]"}), 500)
    assert error["code"] == "generation_failed"


# ---------------------------------------------------------------- function calls and structured output


def test_function_call_round_trip(client: openai.OpenAI, fake: FakeEngine) -> None:
    asked = client.responses.create(model=MODEL, input=f"Weather in Paris? [say:{CALL}:say]", tools=[WEATHER])
    calls = [item for item in asked.output if item.type == "function_call"]
    assert len(calls) == 1 and [item.type for item in asked.output] == ["function_call"]
    call = calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert '"name": "get_weather"' in prompt_of(fake)  # the tool was described to the model
    answered = client.responses.create(
        model=MODEL,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C [say:It is 18 C.:say]"}],
        tools=[WEATHER],
    )
    assert answered.output_text == "It is 18 C."
    prompt = prompt_of(fake)
    assert '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>" in prompt and "18 C" in prompt
    # The same round trip with the whole history sent back instead of previous_response_id.
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}, *[c.model_dump(exclude_none=True) for c in calls]]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "[say:Sunny.:say]"})
    again = client.responses.create(model=MODEL, input=history, tools=[WEATHER])
    assert again.output_text == "Sunny." and "<tool_response>" in prompt_of(fake)
    assert '<|assistant|><tool_call>\n{"name": "get_weather"' in prompt_of(fake)


def test_a_streamed_function_call_sends_its_argument_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=f"[say:{CALL}:say]", tools=[WEATHER], tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (call,) = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


def test_a_streamed_answer_with_text_then_a_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=f"[say:Let me check. {CALL}:say]", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    message, call = final.output
    assert message.type == "message" and message.content[0].text.strip() == "Let me check."
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1] and "<tool_call>" not in "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_named_tool_choice_forces_the_call(client: openai.OpenAI, fake: FakeEngine) -> None:
    client.responses.create(
        model=MODEL,
        input=f"[say:{CALL}:say]",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and grammar.kind is GrammarKind.LARK and "get_weather" in grammar.source


class City(BaseModel):
    name: str
    country: str


def test_text_format_json_schema_goes_to_the_grammar(client: openai.OpenAI, fake: FakeEngine) -> None:
    answer = '{"name": "Paris", "country": "France"}'
    parsed = client.responses.parse(model=MODEL, input=f"A city? [say:{answer}:say]", text_format=City)
    assert parsed.output_parsed == City(name="Paris", country="France")
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and grammar.kind is GrammarKind.JSON_SCHEMA and '"country"' in grammar.source
    assert parsed.text is not None and parsed.text.format is not None and parsed.text.format.type == "json_schema"
    client.responses.create(model=MODEL, input="Hi", text={"format": {"type": "json_object"}})
    grammar = fake.requests[-1].sampling.grammar
    assert grammar is not None and grammar.kind is GrammarKind.JSON_OBJECT


# ---------------------------------------------------------------- our own fields through extra_body


def test_a_preference_through_extra_body(client: openai.OpenAI, fake: FakeEngine) -> None:
    response = client.responses.create(
        model=MODEL, input="Hi", extra_body={"preference": {"text": "concise", "method": "la"}, "seed": 7, "top_k": 5}
    )
    request = fake.requests[-1]
    assert len(request.contexts) == 2 and request.method.method.value == "la"
    assert request.sampling.top_k == 5 and request.sampling.seed == 7
    echo = (response.model_extra or {})["preference"]
    assert echo["method"] == "la" and echo["text"]
    assert echo["text"] in prompt_of(fake)
    plain = client.responses.create(model=MODEL, input="Hi")
    assert "preference" not in (plain.model_extra or {}) and len(fake.requests[-1].contexts) == 1


# ---------------------------------------------------------------- bad input names the field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": 5}, "input"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"model": MODEL, "input": [{"role": "robot", "content": "Hi"}]}, "input[0].role"),
        ({"model": MODEL, "input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0]"),
        (
            {"model": MODEL, "input": [{"type": "reasoning", "summary": [], "content": [{"type": "image"}]}]},
            "input[0].content[0].type",
        ),
        ({"model": MODEL, "input": "Hi", "reasoning": {"effort": ""}}, "reasoning.effort"),
        ({"model": MODEL, "input": "Hi", "reasoning_effort": "low"}, "reasoning_effort"),
        ({"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"model": MODEL, "input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"model": MODEL, "input": "Hi", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"model": MODEL, "input": "Hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "Hi", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"model": MODEL, "input": "Hi", "temperature": -1}, "temperature"),
        ({"model": MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"model": MODEL, "input": "Hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": MODEL, "input": "Hi", "background": True}, "background"),
        ({"model": MODEL, "input": "Hi", "include": ["reasoning.encrypted_content"]}, "include"),
        ({"model": MODEL, "input": "Hi", "conversation": "conv_1"}, "conversation"),
        ({"model": MODEL, "input": "Hi", "truncation": "auto"}, "truncation"),
        ({"model": MODEL, "input": "Hi", "max_tokens": 5}, "max_tokens"),
        ({"model": MODEL, "input": "Hi", "messages": []}, "messages"),
        ({"model": MODEL, "input": "Hi", "best_of": 3}, "best_of"),
        ({"model": MODEL, "input": "Hi", "preference": {"text": "concise", "methd": "la"}}, "preference.methd"),
        ({"model": MODEL, "input": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"model": MODEL, "input": "Hi", "stream_options": {}}, "stream_options"),
        ({"model": "gpt-5", "input": "Hi"}, "model"),
    ],
)
def test_bad_input_names_the_field(server: LiveServer, body: dict[str, Any], param: str) -> None:
    response = post(server, body)
    error = assert_openai_error(response, 404 if param == "model" else 400)
    assert error["param"] == param, error


def test_bad_query_parameters_name_the_field(server: LiveServer, client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi")
    url = f"{server.url}/v1/responses/{response.id}/input_items"
    for query, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after")):
        assert assert_openai_error(httpx.get(url, params=query), 400)["param"] == param
    assert (
        assert_openai_error(httpx.get(f"{server.url}/v1/responses/{response.id}", params={"stream": "true"}))["param"] == "stream"
    )


# ---------------------------------------------------------------- one key cannot see another key's responses


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    with live_server(create_app(FakeEngine(), ServerConfig(api_key=KEY_A, extra_api_keys=(KEY_B,)))) as running:
        yield running


def test_a_key_cannot_reach_another_keys_responses(keyed_server: LiveServer) -> None:
    url = f"{keyed_server.url}/v1"
    with (
        openai.OpenAI(base_url=url, api_key=KEY_A, max_retries=0) as a,
        openai.OpenAI(base_url=url, api_key=KEY_B, max_retries=0) as b,
    ):
        mine = a.responses.create(model=MODEL, input="Secret plans")
        for call in (
            lambda: b.responses.retrieve(mine.id),
            lambda: b.responses.input_items.list(mine.id),
            lambda: b.responses.delete(mine.id),
            lambda: b.responses.create(model=MODEL, input="Go on", previous_response_id=mine.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert a.responses.retrieve(mine.id).output_text == REPLY_TEXT  # still there for its owner
        continued = a.responses.create(model=MODEL, input="Go on", previous_response_id=mine.id)
        assert continued.previous_response_id == mine.id
    assert httpx.get(f"{url}/responses/{mine.id}").status_code == 401


# ---------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smollm_server(smollm: LoadedModel) -> Iterator[EngineServer]:
    with engine_server(smollm, EngineConfig(max_model_len=1024, max_num_seqs=8, kv_cache_tokens=8192)) as running:
        yield running


@pytest.mark.smollm
@pytest.mark.parametrize("preference", [None, "concise"])
def test_smollm_answers_paris_and_continues(smollm_server: EngineServer, preference: str | None) -> None:
    extra = {"preference": preference} if preference else None
    with openai.OpenAI(base_url=f"{smollm_server.url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        model = client.models.list().data[0].id
        first = client.responses.create(
            model=model, input="What is the capital of France?", temperature=0, max_output_tokens=40, extra_body=extra
        )
        assert "Paris" in first.output_text, first.output_text
        assert ((first.model_extra or {}).get("preference") is not None) == (preference is not None)
        second = client.responses.create(
            model=model, input="Thank you!", previous_response_id=first.id, temperature=0, max_output_tokens=8, extra_body=extra
        )
        assert second.output_text and second.usage is not None and first.usage is not None
        # The second prompt holds the whole first exchange, and the server's prefix cache has its start.
        assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        assert second.usage.input_tokens_details.cached_tokens >= 16
