"""A reasoning model's thinking (``--reasoning-parser``) through the Responses and the Messages APIs, with the
official SDKs against a real uvicorn over the fake engine (whose ``[say:...:say]`` answers arrive 3 characters a
token, so the ``<think>`` tags are cut across tokens; test_reasoning.py holds the parser's own tests):

* Responses: a ``reasoning`` item (``reasoning_text`` content) before the message, its tokens in
  ``usage.output_tokens_details.reasoning_tokens``, its events streamed before the message's (and the SDK's
  ``responses.stream`` rebuilding the same response), function calls read from the answer alone, reasoning items
  kept in the store but not in the next prompt, ``reasoning.effort`` reaching the template;
* Messages: a ``thinking`` block (the SDK's ``ThinkingBlock``) before the text, streamed as ``thinking_delta``s in
  its own block, tool calls read after it, and ``thinking`` (``enabled`` / ``disabled``) as the template's
  ``enable_thinking``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from amulet_core.engine.parallel_sampling import ChoiceOutput
from amulet_core.engine.protocol import GenerationOutput
from server.config import ServerConfig
from server.reasoning_parsers import THINK_END, ReasoningParser
from server.responses.reasoning import ThinkingTokens, counting
from tests.server.test_reasoning import CALL, THOUGHT, ask
from tests.support.fake_engine import SAY_PIECE, FakeEngine
from tests.support.http import WEATHER_TOOL
from tests.support.live_server import LiveServer

MODEL = "fake-model"
SAID = json.loads(f'"{THOUGHT}"')
"""What the fake answers: ``<think>\\nThe user wants a capital.\\n</think>\\n\\nParis.``."""
THINKING = "\nThe user wants a capital.\n"
THINKING_TOKENS = math.ceil((SAID.index(THINK_END) + len(THINK_END)) / SAY_PIECE)
"""The fake's tokens up to the one that closes the thinking."""
TOOL_THOUGHT = "I should call the tool; a <tool_call> here is only thought."
FUNCTION: dict[str, Any] = WEATHER_TOOL["function"]  # type: ignore[assignment]
WEATHER_FUNCTION = {"type": "function", **FUNCTION}
"""The weather tool as the Responses API takes it."""
WEATHER_INPUT = {"name": FUNCTION["name"], "description": FUNCTION["description"], "input_schema": FUNCTION["parameters"]}
"""The weather tool as the Messages API takes it."""


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=8192)  # the fake's tokens are characters; tool descriptions are long


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(reasoning_parser="qwen3", tool_call_parser="hermes", log_level="warning")


@pytest.fixture()
def openai_client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture()
def anthropic_client(server: LiveServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as c:
        yield c


def prompt_of(fake: FakeEngine, i: int = -1) -> str:
    return "".join(chr(t) for t in fake.requests[i].prompt_ids)


def without_ids(items: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.model_dump().items() if k not in ("id", "call_id")} for item in items]


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: {")]


# ---------------------------------------------------------------- counting the thinking's tokens


@pytest.mark.parametrize(
    ("in_reasoning", "pieces", "expected"),
    [
        (False, ["<th", "ink>", "a b", "</t", "hink", ">", "\n\nx"], 6),  # the token that closes it counts
        (False, ["<think>a", "</think>x"], 2),
        (True, ["a", " b", "</think>", "x", "y"], 3),  # the prompt opened it
        (True, ["a", " b"], 2),  # cut off inside the thinking: all of it
        (False, ["Par", "is.", " </think>"], 0),  # an answer without thinking
        (False, ["<think>", "</think>", "x"], 2),  # an empty thinking still took its tags' tokens
    ],
)
def test_thinking_tokens_are_counted_up_to_the_closing_one(in_reasoning: bool, pieces: list[str], expected: int) -> None:
    thinking = ThinkingTokens(ReasoningParser(starts_in_reasoning=in_reasoning))
    for piece in pieces:
        thinking.feed(piece, 1)
    assert thinking.count == expected


def test_counting_passes_the_outputs_on_and_closes_them() -> None:
    closed: list[bool] = []

    async def outputs() -> AsyncIterator[ChoiceOutput]:
        try:
            for text in ("<think>a", "</think>", "b", "c"):
                yield ChoiceOutput(0, GenerationOutput("r", text=text, token_ids=(1, 2)))
        finally:
            closed.append(True)

    async def first_three() -> list[str]:
        thinking = ThinkingTokens(ReasoningParser())
        seen = []
        stream = counting(outputs(), thinking)  # type: ignore[arg-type]
        async for choice in stream:
            seen.append(choice.output.text)
            if len(seen) == 3:
                break
        await stream.aclose()
        assert thinking.count == 4
        return seen

    assert asyncio.run(first_three()) == ["<think>a", "</think>", "b"]
    assert closed == [True]


# ---------------------------------------------------------------- the Responses API


def test_a_response_begins_with_its_reasoning_item(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(model=MODEL, input=ask(THOUGHT))  # type: ignore[arg-type]
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0]
    assert isinstance(reasoning, openai.types.responses.ResponseReasoningItem)
    assert reasoning.id.startswith("rs_") and reasoning.summary == [] and reasoning.status == "completed"
    assert [(part.type, part.text) for part in reasoning.content or []] == [("reasoning_text", THINKING)]
    assert response.output_text == "Paris."
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == THINKING_TOKENS
    assert response.usage.output_tokens == math.ceil(len(SAID) / SAY_PIECE) > THINKING_TOKENS
    assert openai_client.responses.retrieve(response.id).model_dump() == response.model_dump()


def test_the_reasoning_events_stream_before_the_message(openai_client: openai.OpenAI) -> None:
    events: list[Any] = list(openai_client.responses.create(model=MODEL, input=ask(THOUGHT), stream=True))  # type: ignore[arg-type]
    kinds = [event.type for event in events]
    reasoning_kinds = [
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * kinds.count("response.reasoning_text.delta"),
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[2 : 2 + len(reasoning_kinds)] == reasoning_kinds
    assert kinds.count("response.reasoning_text.delta") > 1  # streamed as it came, not held to the end
    message_kinds = kinds[2 + len(reasoning_kinds) :]
    assert message_kinds[:2] == ["response.output_item.added", "response.content_part.added"]
    assert message_kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(e.delta for e in deltas) == THINKING
    assert {(e.output_index, e.content_index) for e in deltas} == {(0, 0)}
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == THINKING
    text = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in text) == "Paris." and {e.output_index for e in text} == {1}
    final = events[-1].response
    assert final.output[0].id == deltas[0].item_id and [i.type for i in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens_details.reasoning_tokens == THINKING_TOKENS
    whole = openai_client.responses.create(model=MODEL, input=ask(THOUGHT))  # type: ignore[arg-type]
    assert without_ids(final.output) == without_ids(whole.output)


def test_the_sdks_stream_helper_rebuilds_the_response(openai_client: openai.OpenAI) -> None:
    with openai_client.responses.stream(model=MODEL, input=ask(THOUGHT)) as stream:  # type: ignore[arg-type]
        response = stream.get_final_response()
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == THINKING and response.output_text == "Paris."  # type: ignore[union-attr,index]


def test_function_calls_are_read_after_the_thinking(openai_client: openai.OpenAI) -> None:
    said = f"<think>{TOOL_THOUGHT}</think>{CALL}"
    kwargs: dict[str, Any] = {"model": MODEL, "input": ask(said), "tools": [WEATHER_FUNCTION]}
    whole = openai_client.responses.create(**kwargs)
    assert [item.type for item in whole.output] == ["reasoning", "function_call"]  # no empty message
    assert whole.output[0].content[0].text == TOOL_THOUGHT
    call = whole.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    events: list[Any] = list(openai_client.responses.create(**kwargs, stream=True))
    final = events[-1].response
    assert without_ids(final.output) == without_ids(whole.output)
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1]


def test_a_continued_conversation_leaves_the_thinking_out(openai_client: openai.OpenAI, fake: FakeEngine) -> None:
    first = openai_client.responses.create(model=MODEL, input=ask(THOUGHT))  # type: ignore[arg-type]
    openai_client.responses.create(model=MODEL, input="And Italy?", previous_response_id=first.id)
    assert "<|assistant|>Paris.\n<|user|>And Italy?" in prompt_of(fake) and THINKING not in prompt_of(fake)
    sent_back = [*ask(THOUGHT), *first.output, {"role": "user", "content": "Hm?"}]  # the SDK's objects, as they came
    again = openai_client.responses.create(model=MODEL, input=sent_back)  # type: ignore[arg-type]
    assert "<|assistant|>Paris.\n<|user|>Hm?" in prompt_of(fake) and THINKING not in prompt_of(fake)
    stored = list(openai_client.responses.input_items.list(again.id, order="asc"))
    assert [item.type for item in stored] == ["message", "reasoning", "message", "message"]
    assert stored[1].model_dump()["content"] == [{"type": "reasoning_text", "text": THINKING}]


def test_reasoning_effort_reaches_the_template(openai_client: openai.OpenAI, fake: FakeEngine) -> None:
    openai_client.responses.create(model=MODEL, input="Hi", reasoning={"effort": "low", "summary": "auto"})
    assert ("reasoning_effort", "low") in fake.template_options[-1].template_kwargs
    openai_client.responses.create(model=MODEL, input="Hi", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert ("enable_thinking", False) in fake.template_options[-1].template_kwargs


def test_an_answer_without_thinking_has_no_reasoning_item(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(model=MODEL, input=ask("Paris."))  # type: ignore[arg-type]
    assert [item.type for item in response.output] == ["message"] and response.output_text == "Paris."
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 0


# ---------------------------------------------------------------- the Messages API


def test_a_message_begins_with_its_thinking_block(anthropic_client: anthropic.Anthropic) -> None:
    message = anthropic_client.messages.create(model=MODEL, max_tokens=100, messages=ask(THOUGHT))  # type: ignore[arg-type]
    assert [block.type for block in message.content] == ["thinking", "text"]
    thinking, text = message.content
    assert isinstance(thinking, anthropic.types.ThinkingBlock) and isinstance(text, anthropic.types.TextBlock)
    assert (thinking.thinking, thinking.signature, text.text) == (THINKING, "", "Paris.")
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == math.ceil(len(SAID) / SAY_PIECE)


def test_the_thinking_streams_in_its_own_block(anthropic_client: anthropic.Anthropic, server: LiveServer) -> None:
    body = {"model": MODEL, "max_tokens": 100, "messages": ask(THOUGHT), "stream": True}
    events = sse_events(httpx.post(f"{server.url}/v1/messages", json=body, timeout=30))
    blocks = [(e["type"], e.get("index"), (e.get("content_block") or e.get("delta") or {}).get("type")) for e in events]
    blocks = [b for b in blocks if b[0].startswith("content_block")]
    thinking = [b for b in blocks if b[1] == 0]
    assert thinking[0] == ("content_block_start", 0, "thinking") and thinking[-1] == ("content_block_stop", 0, None)
    assert {b for b in thinking[1:-1]} == {("content_block_delta", 0, "thinking_delta")} and len(thinking) > 3
    assert blocks[len(thinking)] == ("content_block_start", 1, "text")  # the text's block after the thinking's stop
    deltas = [e["delta"]["thinking"] for e in events if e.get("delta", {}).get("type") == "thinking_delta"]
    assert "".join(deltas) == THINKING
    with anthropic_client.messages.stream(model=MODEL, max_tokens=100, messages=ask(THOUGHT)) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_message()
    whole = anthropic_client.messages.create(model=MODEL, max_tokens=100, messages=ask(THOUGHT))  # type: ignore[arg-type]
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert isinstance(streamed.content[0], anthropic.types.ThinkingBlock)


def test_tool_use_is_read_after_the_thinking(anthropic_client: anthropic.Anthropic) -> None:
    said = f"<think>{TOOL_THOUGHT}</think>{CALL}"
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 500, "messages": ask(said), "tools": [WEATHER_INPUT]}
    message = anthropic_client.messages.create(**kwargs)
    assert [block.type for block in message.content] == ["thinking", "tool_use"] and message.stop_reason == "tool_use"
    assert message.content[0].thinking == TOOL_THOUGHT
    assert message.content[1].input == {"city": "Paris"}
    with anthropic_client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["thinking", "tool_use"] and streamed.stop_reason == "tool_use"
    assert streamed.content[0].thinking == TOOL_THOUGHT  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("thinking", "template_kwarg"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, ("enable_thinking", True)),
        ({"type": "disabled"}, ("enable_thinking", False)),
        ({"type": "adaptive"}, None),
    ],
)
def test_thinking_is_the_templates_enable_thinking(
    anthropic_client: anthropic.Anthropic, fake: FakeEngine, thinking: Any, template_kwarg: tuple[str, bool] | None
) -> None:
    anthropic_client.messages.create(model=MODEL, max_tokens=2048, messages=ask("ok"), thinking=thinking)  # type: ignore[arg-type]
    kwargs = dict(fake.template_options[-1].template_kwargs or ())
    if template_kwarg is None:
        assert "enable_thinking" not in kwargs
    else:
        assert kwargs["enable_thinking"] == template_kwarg[1]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"thinking": {"type": "enabled"}}, "thinking"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        (
            {"thinking": {"type": "disabled"}, "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
            "thinking",
        ),
    ],
)
def test_bad_thinking_is_an_invalid_request_error_naming_the_field(
    anthropic_client: anthropic.Anthropic, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client.messages.create(model=MODEL, max_tokens=2048, messages=ask("ok"), **fields)  # type: ignore[arg-type]
    error = raised.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"], error
