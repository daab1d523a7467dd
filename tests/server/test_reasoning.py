"""Reasoning models' thinking apart from the answer (``--reasoning-parser``, :mod:`server.reasoning_parsers`):

* the parser splits a text whole, and streamed in any pieces gives the same thinking and answer;
* where the thinking starts is read from the rendered prompt: the real Qwen3 template with
  ``enable_thinking: false`` begins in the answer, a generation prompt ending with ``<think>`` in the thinking,
  a ``<think>`` inside a user's message opens nothing;
* through a real uvicorn (fake engine, whose ``[say:...:say]`` answers arrive 3 characters a token, so the tags
  are cut across tokens), with the official OpenAI SDK: ``message.reasoning_content`` and the streamed
  ``delta.reasoning_content`` hold the thinking, ``content`` the answer; tool calls are read from the answer
  alone; without the parser the text is untouched and answers carry no ``reasoning_content``;
* ``reasoning_effort`` reaches the chat template;
* the engine is told where the thinking is (``GenerationRequest.thinking``: no contrast, no grammar inside it;
  tests/engine/test_thinking_span.py) when ``</think>`` is one token.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from amulet_core.engine.protocol import ThinkingSpan
from amulet_core.model.chat_template import ChatTemplateOptions, ChatTokenizer
from server.app import create_app
from server.config import ServerConfig
from server.protocol import ChatCompletionRequest
from server.reasoning_parsers import ReasoningParser, ReasoningSplit
from server.requests.chat import RenderedChat, thinking_span
from tests.support.fake_engine import FakeEngine
from tests.support.http import WEATHER_TOOL
from tests.support.live_server import LiveServer, live_server

QWEN3_TEMPLATE = Path(__file__).parents[1] / "core" / "model" / "templates" / "qwen3.jinja"

SPLITS = [
    (False, "Paris.", ReasoningSplit(None, "Paris.")),
    (False, "<think>\nThe capital.\n</think>\n\nParis.", ReasoningSplit("\nThe capital.\n", "Paris.")),
    (False, "  <think>a</think>b", ReasoningSplit("a", "b")),
    (False, "<think>cut off by max_tokens", ReasoningSplit("cut off by max_tokens", None)),
    (False, "<think>done</think>", ReasoningSplit("done", None)),
    (False, "An answer that mentions <think> later.", ReasoningSplit(None, "An answer that mentions <think> later.")),
    (False, "<thin", ReasoningSplit(None, "<thin")),
    (True, "The capital.\n</think>\n\nParis.", ReasoningSplit("The capital.\n", "Paris.")),
    (True, "still thinking <", ReasoningSplit("still thinking <", None)),
    (True, "a </thi b</think>c", ReasoningSplit("a </thi b", "c")),
]


def streamed(parser: ReasoningParser, pieces: list[str]) -> ReasoningSplit:
    stream = parser.stream()
    reasoning: list[str] = []
    content: list[str] = []
    for piece in [*(stream.feed(p) for p in pieces), stream.finish()]:
        reasoning.append(piece.reasoning or "")
        content.append(piece.content or "")
    return ReasoningSplit("".join(reasoning) or None, "".join(content) or None)


def pieces_of(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(("in_reasoning", "text", "expected"), SPLITS)
def test_split_whole_and_streamed_in_any_pieces(in_reasoning: bool, text: str, expected: ReasoningSplit) -> None:
    parser = ReasoningParser(starts_in_reasoning=in_reasoning)
    assert parser.split(text) == expected
    assert streamed(parser, list(text)) == expected  # a character a token: every tag cut
    rng = random.Random(text)
    for _ in range(20):
        assert streamed(parser, pieces_of(text, rng)) == expected


def test_where_the_thinking_starts_is_read_from_the_rendered_prompt(smollm_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.chat_template = QWEN3_TEMPLATE.read_text()
    renderer = ChatTokenizer(tokenizer)
    question = [{"role": "user", "content": "What does <think> mean in a prompt?"}]
    thinking = renderer.chat_text(question)
    assert not ReasoningParser.for_prompt(thinking).starts_in_reasoning  # Qwen3 opens the block itself
    no_thinking = renderer.chat_text(question, ChatTemplateOptions(template_kwargs=(("enable_thinking", False),)))
    assert "<think>\n\n</think>" in no_thinking and not ReasoningParser.for_prompt(no_thinking).starts_in_reasoning
    assert ReasoningParser.for_prompt("<｜User｜>Hi<｜Assistant｜><think>\n").starts_in_reasoning  # DeepSeek-R1's


THOUGHT = "<think>\\nThe user wants a capital.\\n</think>\\n\\nParis."
CALL = '<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>'


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def server(engine: FakeEngine) -> Iterator[LiveServer]:
    config = ServerConfig(reasoning_parser="qwen3", tool_call_parser="hermes", log_level="warning")
    with live_server(create_app(engine, config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"[say:{text}:say]"}]


def test_the_thinking_goes_to_reasoning_content(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="fake-model", messages=ask(THOUGHT))  # type: ignore[arg-type]
    message = answer.choices[0].message
    assert message.content == "Paris."
    assert message.model_dump()["reasoning_content"] == "\nThe user wants a capital.\n"


def test_streamed_thinking_arrives_as_reasoning_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="fake-model", messages=ask(THOUGHT), stream=True)  # type: ignore[arg-type]
    reasoning, content, order = [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning_content"):
                reasoning.append(delta["reasoning_content"])
                order.append("reasoning")
            if delta.get("content"):
                content.append(delta["content"])
                order.append("content")
    assert "".join(reasoning) == "\nThe user wants a capital.\n" and "".join(content) == "Paris."
    assert order == sorted(order, key=lambda kind: kind == "content")  # all the thinking, then the answer
    assert len(reasoning) > 1  # streamed as it came, not held to the end


def test_a_prompt_that_ends_in_think_begins_in_the_thinking(client: openai.OpenAI) -> None:
    messages: list[Any] = [*ask("Hmm, France.</think>Paris."), {"role": "assistant", "content": "<think>"}]
    answer = client.chat.completions.create(
        model="fake-model",
        messages=messages,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    message = answer.choices[0].message
    assert (message.model_dump()["reasoning_content"], message.content) == ("Hmm, France.", "Paris.")


def test_tool_calls_are_read_from_the_answer_after_the_thinking(client: openai.OpenAI) -> None:
    text = f"<think>I should call the tool; a <tool_call> here is only thought.</think>{CALL}"
    kwargs: dict[str, Any] = {"model": "fake-model", "messages": ask(text), "tools": [WEATHER_TOOL]}
    message = client.chat.completions.create(**kwargs).choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]  # type: ignore[union-attr]
    assert calls == [("get_weather", {"city": "Paris"})]
    assert message.model_dump()["reasoning_content"] == "I should call the tool; a <tool_call> here is only thought."

    thought: list[str] = []
    streamed_calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            thought.append(choice.delta.model_dump().get("reasoning_content") or "")
            for call in choice.delta.tool_calls or []:
                entry = streamed_calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or "" if call.function else ""
                entry["arguments"] += call.function.arguments or "" if call.function else ""
            finish = choice.finish_reason or finish
    assert "".join(thought) == "I should call the tool; a <tool_call> here is only thought."
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls.values()] == calls
    assert finish == "tool_calls"


def test_without_the_parser_the_text_is_untouched(engine: FakeEngine) -> None:
    with (
        live_server(create_app(engine, ServerConfig(log_level="warning"))) as plain,
        openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0) as c,
    ):
        answer = c.chat.completions.create(model="fake-model", messages=ask(THOUGHT))  # type: ignore[arg-type]
    message = answer.choices[0].message.model_dump(exclude_unset=True)
    assert message["content"] == json.loads(f'"{THOUGHT}"') and "reasoning_content" not in message


def test_reasoning_effort_reaches_the_template(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.reset()
    client.chat.completions.create(model="fake-model", messages=ask("ok"), reasoning_effort="low")  # type: ignore[arg-type]
    assert ("reasoning_effort", "low") in engine.template_options[-1].template_kwargs


def test_the_engine_is_told_where_the_thinking_is(smollm_tokenizer: Any) -> None:
    """With ``</think>`` one token of the tokenizer, the request carries its span (from the prompt); without
    the parser, with ``preference_in_reasoning`` or where the tag is several tokens, none."""
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.chat_template = QWEN3_TEMPLATE.read_text()
    several = ChatTokenizer(copy.deepcopy(tokenizer))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    renderer = ChatTokenizer(tokenizer)
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    question = [{"role": "user", "content": "Hi"}]

    def intent(**fields: Any) -> Any:
        return SimpleNamespace(body=ChatCompletionRequest(messages=question, **fields))

    def rendered(text: str) -> RenderedChat:
        return RenderedChat([text], None, False)

    opens = rendered(renderer.chat_text(question))
    assert thinking_span(intent(), opens, renderer, "qwen3") == ThinkingSpan(end, start, open_at_start=False)
    opened = rendered("<｜User｜>Hi<｜Assistant｜><think>\n")
    assert thinking_span(intent(), opened, renderer, "deepseek_r1") == ThinkingSpan(end, start, open_at_start=True)
    assert thinking_span(intent(), opens, renderer, None) is None
    assert thinking_span(intent(preference_in_reasoning=True), opens, renderer, "qwen3") is None
    assert thinking_span(intent(), opens, several, "qwen3") is None
