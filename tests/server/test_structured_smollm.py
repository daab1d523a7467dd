"""Structured outputs and tool calling with the embedded SmolLM2 behind a real server, through real
clients: the official SDK's ``.parse()``, langchain-openai's ``with_structured_output`` and
``bind_tools``. The grammar (llguidance) masks the distribution the method produced, so the answers
have the asked shape under ``base`` and under ``amulet`` with a preference alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from amulet_core.engine.config import EngineConfig
from amulet_core.model.loading import LoadedModel
from tests.support.http import assert_openai_error
from tests.support.live_server import EngineServer, engine_server

pytestmark = pytest.mark.smollm

QUESTIONS = [
    "Tell me about Paris.",
    "Describe a cat.",
    "What is the capital of Japan?",
    "Name a famous painter.",
    "Give me a fruit.",
    "What colour is the sky?",
    "Suggest a hobby.",
    "Name a planet.",
    "Recommend a book.",
    "What is a good breakfast?",
    "Name an ocean.",
    "Describe the weather today.",
    "What is your favourite number?",
    "Name a programming language.",
    "Describe a tree.",
    "Give me a city in Africa.",
    "Name a musical instrument.",
    "What do bees make?",
    "Name a sport.",
    "Describe the moon.",
]


class City(BaseModel):
    name: Annotated[str, Field(max_length=30)]
    country: Annotated[str, Field(max_length=30)]


class Weather(BaseModel):
    """The weather in a city."""

    model_config = ConfigDict(extra="forbid")

    city: Annotated[str, Field(max_length=30)]
    unit: Literal["celsius", "fahrenheit"]


MOOD_SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["mood", "score"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": Weather.model_json_schema(),
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def running(smollm: LoadedModel) -> Iterator[EngineServer]:
    config = EngineConfig(max_model_len=2048, max_num_seqs=48, kv_cache_tokens=32768)
    with engine_server(smollm, config) as server:
        yield server


@pytest.fixture(scope="module")
def client(running: EngineServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def model(running: EngineServer) -> str:
    return str(httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"])


@pytest.mark.parametrize("preference", [None, "concise"])
def test_sdk_parse_returns_a_validated_object(client: openai.OpenAI, model: str, preference: str | None) -> None:
    extra = {"preference": preference} if preference else None
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Name a city and its country."}],
        response_format=City,
        temperature=0,
        max_tokens=120,
        extra_body=extra,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name and parsed.country
    if preference:
        assert (completion.model_extra or {})["preference"]["method"] == "amulet"


def test_streamed_json_concatenates_to_valid_json(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe your mood."}],
        response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD_SCHEMA, "strict": True}},
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    mood = json.loads(text)
    assert mood["mood"] in ("happy", "sad", "neutral") and 0 <= mood["score"] <= 10


def ask_all(client: openai.OpenAI, model: str, **fields: Any) -> list[str]:
    def one(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=150, **fields)  # type: ignore[call-overload]
        assert response.choices[0].finish_reason == "stop", response.choices[0].message.content
        return response.choices[0].message.content or ""

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(one, QUESTIONS))


def test_json_object_parses_for_twenty_prompts(client: openai.OpenAI, model: str) -> None:
    # A frequency penalty keeps the small model from repeating one word inside a string until max_tokens. The seed
    # fixes the draws (amulet_core.sampling.seeded); with some seeds one of the twenty answers runs on in a string.
    for text in ask_all(client, model, response_format={"type": "json_object"}, temperature=0.7, seed=3, frequency_penalty=1.0):
        assert isinstance(json.loads(text), dict)


def test_enum_and_required_are_respected_for_twenty_prompts(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD_SCHEMA}}
    for text in ask_all(client, model, response_format=schema, temperature=1.0, seed=3, extra_body={"preference": "uplifting"}):
        mood = json.loads(text)
        assert set(mood) == {"mood", "score"} and mood["mood"] in ("happy", "sad", "neutral") and 0 <= mood["score"] <= 10


def forced_call(client: openai.OpenAI, model: str, tool_choice: Any, stream: bool = False) -> tuple[str, dict[str, Any]]:
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 100,
    }
    if not stream:
        response = client.chat.completions.create(**kwargs)
        assert response.choices[0].finish_reason == "tool_calls"
        (call,) = response.choices[0].message.tool_calls or []
        return call.function.name, json.loads(call.function.arguments)
    name, arguments, reasons = "", "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                name += call.function.name or "" if call.function else ""
                arguments += call.function.arguments or "" if call.function else ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    return name, json.loads(arguments)


def test_every_tool_choice_mode(client: openai.OpenAI, model: str) -> None:
    """The five requests are independent: sent at once, the engine decodes them in one batch (each answer the same
    bits as alone: the CPU engine is batch-invariant), about three times sooner than one after the other."""
    weather = {"type": "function", "function": {"name": "get_weather"}}

    def hello(**fields: Any) -> Any:
        kwargs: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi!"}], "tools": [WEATHER_TOOL]}
        return client.chat.completions.create(**kwargs, **fields, temperature=0)

    with ThreadPoolExecutor(5) as pool:
        forced = pool.submit(forced_call, client, model, weather)
        forced_streamed = pool.submit(forced_call, client, model, weather, stream=True)
        required = pool.submit(forced_call, client, model, "required")
        none_call = pool.submit(hello, tool_choice="none", max_tokens=20)
        auto_call = pool.submit(hello, max_tokens=40)
    name, arguments = forced.result()
    assert name == "get_weather"
    Weather.model_validate(arguments)
    assert forced_streamed.result() == (name, arguments)
    required_name, required_args = required.result()
    assert required_name in ("get_weather", "get_time")
    if required_name == "get_weather":
        Weather.model_validate(required_args)
    none = none_call.result()
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = auto_call.result()
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")  # the model decides; never a 500


def test_langchain_structured_output_and_tools(running: EngineServer, model: str) -> None:
    llm = ChatOpenAI(base_url=f"{running.url}/v1", api_key="unused", model=model, temperature=0, max_tokens=120)  # type: ignore[arg-type]
    with ThreadPoolExecutor(3) as pool:  # three independent calls, batched by the engine (see the test above)
        city_call = pool.submit(llm.with_structured_output(City, method="json_schema").invoke, "Name a city in Italy.")
        weather_call = pool.submit(
            llm.with_structured_output(Weather, method="function_calling").invoke, "Weather in Oslo, in celsius?"
        )
        message_call = pool.submit(llm.bind_tools([Weather], tool_choice="Weather").invoke, "What's the weather in Rome?")
    city = city_call.result()
    assert isinstance(city, City) and city.name
    weather = weather_call.result()
    assert isinstance(weather, Weather)
    message = message_call.result()
    assert isinstance(message, AIMessage) and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])
    follow_up = llm.bind_tools([Weather]).invoke(
        [HumanMessage("What's the weather in Rome?"), message, ToolMessage("22 degrees and sunny", tool_call_id=call["id"])]
    )
    assert isinstance(follow_up, AIMessage) and (follow_up.content or follow_up.tool_calls)


def test_bad_schemas_and_tools_are_400_and_the_server_keeps_serving(running: EngineServer) -> None:
    url = running.chat_url
    user = [{"role": "user", "content": "Hi"}]
    cases = [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
                }
            },
            "response_format",
        ),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ]
    for fields, param in cases:
        error = assert_openai_error(httpx.post(url, json={"messages": user, "max_tokens": 4, **fields}, timeout=120), 400)
        assert error["param"] == param, error
    assert httpx.post(url, json={"messages": user, "max_tokens": 4}, timeout=120).status_code == 200
