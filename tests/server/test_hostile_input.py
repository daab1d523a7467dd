"""Hostile input gets a 4xx with an OpenAI-shaped error, never a 500, and the server stays up.

* schemathesis, from the app's own OpenAPI schema (valid and invalid bodies), finds no 5xx and
  only OpenAI-shaped errors (in-process app over the fake engine; examples bounded);
* hand-written cases that tests/server/test_errors.py does not cover, over the fake engine: bodies
  that are not JSON, not UTF-8 or nested without end; wrong types; huge numbers; NaN and
  infinities; Amulet parameters out of range; a 1 MB message; unknown roles and keys;
* by category (issue 27), each asserting the status, the error's ``param`` and that the server still
  answers: client JSON nested without end (schemas given as text, tool-call arguments, in chat and in
  /tokenize: never a RecursionError's 500); numeric extremes that would overflow float32 scores
  (``repetition_penalty``); grammar sizes (regex, Lark, choices, JSON schemas, tool schemas); list sizes (every
  capped list one item over its cap, and bodies of about a million items refused by their shape); the
  fan-out budget (prompts x ``n`` x contexts); unknown fields (20,000 of them, with newlines in their names:
  a bounded, escaped log);
* with the real engine (SmolLM2 and its tokenizer): prompts longer than max_model_len (one of
  1 MB), odd text (control characters, NUL, bidi and zero-width characters), and extreme but
  valid sampling values decoded in one batch with an ordinary request, which must not be hurt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.method.settings import MAX_COEFFICIENT, MAX_ITERATIONS
from amulet_core.model.loading import LoadedModel
from server.app import create_app
from server.config import ServerConfig
from server.protocol_limits import MAX_JSON_CONTAINERS
from tests.support.fake_engine import FakeEngine
from tests.support.http import USER, assert_openai_error
from tests.support.live_server import EngineServer, LiveServer, engine_server, live_server

USER_JSON = json.dumps(USER)
FAKE_MAX_MODEL_LEN = 512
MEGABYTE_MESSAGE = "Tell me about the sea. " * (1_000_000 // 23)


# ---------------------------------------------------------------- the fake engine, over HTTP


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=FAKE_MAX_MODEL_LEN)  # the server has the default body limit (4 MiB)


def post_raw(server: LiveServer, content: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def still_serving(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    ok = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def body_with(extra: str) -> bytes:
    return ('{"messages": ' + USER_JSON + ", " + extra + "}").encode()


NOT_JSON: list[tuple[str, bytes]] = [
    ("truncated", b'{"messages": [{"role": "user", "content": "Hi"'),
    ("trailing garbage", body_with('"max_tokens": 2') + b" trailing"),
    ("single quotes", b"{'messages': []}"),
    ("top-level string", b'"hello"'),
    ("top-level null", b"null"),
    ("top-level number", b"42"),
    ("deeply nested arrays", b"[" * 100_000 + b"]" * 100_000),
    ("deeply nested objects", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    ("invalid UTF-8 byte", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("truncated UTF-8 sequence", b'{"messages": [{"role": "user", "content": "\xc3("}]}'),
    ("overlong UTF-8", b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}'),
    ("UTF-8-encoded surrogate", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    ("raw NUL in a string", b'{"messages": [{"role": "user", "content": "a\x00b"}]}'),
    ("raw control character in a string", b'{"messages": [{"role": "user", "content": "a\x1bb"}]}'),
    ("lone surrogate escape", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("lone low surrogate escape in a stop", body_with('"stop": ["\\udc00"]')),
    ("UTF-16 body", '{"messages": []}'.encode("utf-16")),
]


@pytest.mark.parametrize("content", [c for _, c in NOT_JSON], ids=[name for name, _ in NOT_JSON])
def test_bodies_that_are_not_json_are_400(server: LiveServer, content: bytes) -> None:
    error = assert_openai_error(post_raw(server, content), 400)
    assert error["type"] == "invalid_request_error"
    still_serving(server)


NAN, INF = "NaN", "Infinity"
BAD_VALUES: list[tuple[str, str, str | None]] = [
    # (extra JSON members, param named by the error, expected code)
    ('"temperature": -1', "temperature", None),
    ('"temperature": -0.0001', "temperature", None),
    (f'"temperature": {NAN}', "temperature", None),
    (f'"temperature": {INF}', "temperature", None),
    (f'"temperature": -{INF}', "temperature", None),
    ('"temperature": true', "temperature", None),
    ('"temperature": 1e400', "temperature", None),
    (f'"top_p": {NAN}', "top_p", None),
    ('"top_p": -0.5', "top_p", None),
    ('"top_k": -5', "top_k", None),
    ('"max_tokens": 1000000000000000000000000000000', "max_tokens", "context_length_exceeded"),
    ('"max_tokens": 9223372036854775808', "max_tokens", "context_length_exceeded"),
    ('"max_completion_tokens": 4294967296', "max_completion_tokens", "context_length_exceeded"),
    ('"max_tokens": -1', "max_tokens", None),
    ('"max_tokens": 1.5', "max_tokens", None),
    ('"max_tokens": 1e400', "max_tokens", None),
    ('"max_tokens": "10"', "max_tokens", None),
    ('"seed": 18446744073709551616', "seed", None),
    ('"seed": -9223372036854775809', "seed", None),
    ('"seed": 1.5', "seed", None),
    ('"top_logprobs": 100000000000000000000, "logprobs": true', "top_logprobs", None),
    ('"stream": "yes"', "stream", None),
    ('"logprobs": "true"', "logprobs", None),
    ('"n": "1"', "n", None),
    ('"stop": 5', "stop", None),
    ('"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]', "stop", None),
    ('"preference": 5', "preference", None),
    ('"preference": []', "preference", None),
    ('"preference": [5]', "preference[0]", None),
    ('"preference": {"text": 5}', "preference.text", None),
    ('"preference": {"text": "x", "eta": -1}', "preference.eta", None),
    (f'"preference": {{"text": "x", "eta": {NAN}}}', "preference.eta", None),
    (f'"preference": {{"text": "x", "eta": {INF}}}', "preference.eta", None),
    ('"preference": {"text": "x", "alpha": -0.5}', "preference.alpha", None),
    (f'"preference": {{"text": "x", "alpha": {NAN}}}', "preference.alpha", None),
    ('"preference": {"text": "x", "lambda": -2}', "preference.lambda", None),
    (f'"preference": {{"text": "x", "lambda": -{INF}}}', "preference.lambda", None),
    ('"preference": {"text": "x", "method": "la", "ratio": -1}', "preference.ratio", None),
    (f'"preference": {{"text": "x", "method": "la", "ratio": {NAN}}}', "preference.ratio", None),
    ('"preference": {"text": "x", "method": "la", "ratio": 1e300}', "preference.ratio", None),
    (f'"preference": {{"text": "x", "plausibility": {NAN}}}', "preference.plausibility", None),
    ('"preference": {"text": "x", "plausibility": 1}', "preference.plausibility", None),
    ('"preference": {"text": "x", "plausibility": -0.1}', "preference.plausibility", None),
    (f'"preference": {{"text": "x", "iterations": {MAX_ITERATIONS + 1}}}', "preference.iterations", None),
    ('"preference": {"text": "x", "iterations": 100000000000000000000}', "preference.iterations", None),
    ('"preference": {"text": "x", "iterations": 1.5}', "preference.iterations", None),
    ('"preference": {"text": "x", "iterations": "60"}', "preference.iterations", None),
    ('"preference": {"text": "x", "Lambda": 2}', "preference.Lambda", None),
    ('"preference": {"text": "x", "nested": {"deep": [1, 2]}}', "preference.nested", None),
]


@pytest.mark.parametrize(("extra", "param", "code"), BAD_VALUES, ids=[b[0][:60] for b in BAD_VALUES])
def test_bad_values_are_400_naming_the_param(server: LiveServer, extra: str, param: str, code: str | None) -> None:
    error = assert_openai_error(post_raw(server, body_with(extra)), 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    still_serving(server)


BAD_MESSAGES: list[tuple[str, Any]] = [
    ("messages is a string", "Hi"),
    ("messages is an object", {"role": "user", "content": "Hi"}),
    ("messages is null", None),
    ("an empty message", [{}]),
    ("a message that is a string", ["Hi"]),
    ("content is a number", [{"role": "user", "content": 5}]),
    ("content parts of the wrong type", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("role is a number", [{"role": 1, "content": "Hi"}]),
    ("role 'function'", [{"role": "function", "content": "Hi"}]),
    ("role 'ipython'", [{"role": "ipython", "content": "Hi"}]),
    ("role 'User'", [{"role": "User", "content": "Hi"}]),
    ("empty role", [{"role": "", "content": "Hi"}]),
    ("null role", [{"role": None, "content": "Hi"}]),
    ("tool calls", [{"role": "assistant", "tool_calls": [{"id": "x"}]}]),
]


@pytest.mark.parametrize("messages", [m for _, m in BAD_MESSAGES], ids=[name for name, _ in BAD_MESSAGES])
def test_malformed_messages_are_400(server: LiveServer, messages: Any) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages}, timeout=60)
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error" and (error["param"] or "").startswith("messages")
    still_serving(server)


def test_a_megabyte_message_is_refused_as_too_long(server: LiveServer, fake: FakeEngine) -> None:
    body = {"messages": [{"role": "user", "content": MEGABYTE_MESSAGE}], "max_tokens": 4}
    error = assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert str(FAKE_MAX_MODEL_LEN) in error["message"] and len(error["message"]) < 500  # the text is not echoed
    still_serving(server)


def test_valid_odd_text_is_served(server: LiveServer, fake: FakeEngine) -> None:
    odd = "NUL\u0000 ESC\u001b DEL\u007f bidi\u202eoverride zero\u200bwidth \ufeffBOM \U0001f600 e\u0301 \uffff"
    body = {"messages": [{"role": "user", "content": odd}], "max_tokens": 3, "stop": ["\u0000"], "user": "\u202e"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert odd in "".join(chr(i) for i in fake.requests[-1].prompt_ids)


# ---------------------------------------------------------------- by category (issue 27)


def deep_schema(levels: int) -> dict[str, Any]:
    """A JSON schema of ``levels`` nested objects, ``2 * levels`` JSON levels (the body parser's own limit is about 200)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


DEEP_TEXT = "[" * 20_000
"""JSON text nested 20,000 levels deep: Python's json raises RecursionError on it."""
MANY_ARRAYS = "[" * 100_000
"""More arrays than a whole request body may hold (MAX_JSON_CONTAINERS): refused unread."""


def assistant_call(arguments: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}],
    }


def tool(name: str = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


RECURSION: list[tuple[str, dict[str, Any], str]] = [
    ("guided_json as text", {"guided_json": DEEP_TEXT}, "guided_json"),
    ("guided_json as text of objects", {"guided_json": '{"a":' * 15_000}, "guided_json"),
    ("structured_outputs.json as text", {"structured_outputs": {"json": DEEP_TEXT}}, "structured_outputs"),
    ("guided_json as an object", {"guided_json": deep_schema(40)}, "guided_json"),
    (
        "response_format's schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(40)}}},
        "response_format.json_schema.schema",
    ),
    ("a tool's parameters", {"tools": [tool(parameters=deep_schema(40))]}, "tools[0].function.parameters"),
    (
        "an assistant's tool-call arguments",
        {"messages": [*USER, assistant_call(DEEP_TEXT), *USER]},
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "tool-call arguments of 100,000 arrays",
        {"messages": [assistant_call(MANY_ARRAYS), *USER]},
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        "tool-call arguments nested within the parser's reach",
        {"messages": [assistant_call("[" * 500 + "]" * 500), *USER]},
        "messages[0].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("extra", "param"), [c[1:] for c in RECURSION], ids=[c[0] for c in RECURSION])
def test_json_nested_without_end_is_400_naming_the_field(server: LiveServer, extra: dict[str, Any], param: str) -> None:
    body = {"messages": USER, "max_tokens": 2} | extra
    error = assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "nested" in error["message"] or f"more than {MAX_JSON_CONTAINERS} JSON objects and arrays" in error["message"]
    still_serving(server)


def test_tokenize_with_deep_tool_call_arguments_is_400(server: LiveServer) -> None:
    body = {"messages": [*USER, assistant_call(DEEP_TEXT)]}
    error = assert_openai_error(httpx.post(f"{server.url}/tokenize", json=body, timeout=60), 400)
    assert error["param"] == "messages[1].tool_calls[0].function.arguments"
    still_serving(server)


NUMERIC_EXTREMES: list[tuple[str, str | None]] = [
    # A factor that underflows float32 (1e-46 is 0 there) divides a biased (positive) score into +inf.
    ('"repetition_penalty": 1e-45, "logit_bias": {"5": 100}', "repetition_penalty"),
    ('"repetition_penalty": 1e-46, "logit_bias": {"5": 100}', "repetition_penalty"),
    ('"repetition_penalty": 0.001', "repetition_penalty"),
    ('"repetition_penalty": 1e39', "repetition_penalty"),
    ('"repetition_penalty": 100.5', "repetition_penalty"),
    ('"repetition_penalty": -1', "repetition_penalty"),
    ('"logit_bias": {"5": 1e39}', "logit_bias"),
    ('"logit_bias": {"5": -101}', "logit_bias"),
    ('"presence_penalty": 3e38', "presence_penalty"),
    ('"frequency_penalty": -1e-400', None),  # underflows to -0.0 in JSON: a valid 0
    ('"temperature": 101', "temperature"),
]


@pytest.mark.parametrize(("extra", "param"), NUMERIC_EXTREMES, ids=[e for e, _ in NUMERIC_EXTREMES])
def test_factors_that_would_overflow_float32_are_400(server: LiveServer, extra: str, param: str | None) -> None:
    response = post_raw(server, body_with(extra + ', "max_tokens": 2'))
    if param is None:
        assert response.status_code == 200, response.text
    else:
        error = assert_openai_error(response, 400)
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
    still_serving(server)


def test_the_bounds_of_repetition_penalty_are_served(server: LiveServer) -> None:
    for value in (0.01, 100):
        body = {"messages": USER, "max_tokens": 2, "repetition_penalty": value, "logit_bias": {"5": 100}}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200


LONG = 100_001
"""One character more than a grammar's text may have (amulet_core.grammar.spec.MAX_GRAMMAR_CHARS)."""
GRAMMAR_SIZES: list[tuple[str, dict[str, Any], str]] = [
    ("guided_regex", {"guided_regex": "a" * LONG}, "guided_regex"),
    ("guided_grammar", {"guided_grammar": 'start: "' + "a" * LONG + '"'}, "guided_grammar"),
    ("structured_outputs.regex", {"structured_outputs": {"regex": "a" * LONG}}, "structured_outputs"),
    ("structured_outputs.grammar", {"structured_outputs": {"grammar": 'start: "' + "a" * LONG + '"'}}, "structured_outputs"),
    ("guided_json text", {"guided_json": '{"type": "object"}' + " " * LONG}, "guided_json"),
    ("guided_json object", {"guided_json": {"type": "object", "description": "a" * LONG}}, "guided_json"),
    ("guided_choice of 1,025", {"guided_choice": [f"c{i}" for i in range(1025)]}, "guided_choice"),
    ("guided_choice of 120,000 characters", {"guided_choice": ["a" * 60_000, "b" * 60_000]}, "guided_choice"),
    (
        "structured_outputs.choice of 1,025",
        {"structured_outputs": {"choice": [f"c{i}" for i in range(1025)]}},
        "structured_outputs.choice",
    ),
    (
        "a tool schema",
        {"tools": [tool(parameters={"type": "object", "description": "a" * LONG})]},
        "tools[0].function.parameters",
    ),
    ("the tools together", {"tools": [tool(f"f{i}", description="a" * 70_000) for i in range(3)]}, "tools"),
]


@pytest.mark.parametrize(("extra", "param"), [c[1:] for c in GRAMMAR_SIZES], ids=[c[0] for c in GRAMMAR_SIZES])
def test_grammars_over_their_caps_are_400_naming_the_field(server: LiveServer, extra: dict[str, Any], param: str) -> None:
    body = {"messages": USER, "max_tokens": 2} | extra
    error = assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    still_serving(server)


def test_grammars_at_their_caps_are_served(server: LiveServer) -> None:
    for extra in (
        {"guided_choice": [f"c{i}" for i in range(1024)]},
        {"guided_regex": "a" * (LONG - 1)},
        {"structured_outputs": {"choice": ["a" * 50_000, "b" * 50_000]}},
    ):
        body = {"messages": USER, "max_tokens": 2} | extra
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text[:300]


def text_part(text: str = "a") -> dict[str, str]:
    return {"type": "text", "text": text}


LIST_SIZES: list[tuple[str, str, dict[str, Any], str]] = [
    # (name, route, body, param): every capped list or object one item over its cap.
    ("messages", "/v1/chat/completions", {"messages": USER * 4097}, "messages"),
    (
        "content parts",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [text_part()] * 257}]},
        "messages[0].content",
    ),
    (
        "tool calls",
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "tool_calls": [assistant_call("{}")["tool_calls"][0]] * 129}, *USER]},
        "messages[0].tool_calls",
    ),
    ("tools", "/v1/chat/completions", {"messages": USER, "tools": [tool(f"f{i}") for i in range(129)]}, "tools"),
    ("stop", "/v1/chat/completions", {"messages": USER, "stop": ["x"] * 17}, "stop"),
    ("stop_token_ids", "/v1/chat/completions", {"messages": USER, "stop_token_ids": [1] * 257}, "stop_token_ids"),
    ("logit_bias", "/v1/chat/completions", {"messages": USER, "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ("preference list", "/v1/chat/completions", {"messages": USER, "preference": ["concise"] * 9}, "preference"),
    ("preference.text", "/v1/chat/completions", {"messages": USER, "preference": {"text": ["concise"] * 9}}, "preference.text"),
    (
        "preference.weights",
        "/v1/chat/completions",
        {"messages": USER, "preference": {"text": ["concise", "formal"], "weights": [1] * 9}},
        "preference.weights",
    ),
    ("metadata", "/v1/chat/completions", {"messages": USER, "metadata": {str(i): "x" for i in range(17)}}, "metadata"),
    (
        "chat_template_kwargs",
        "/v1/chat/completions",
        {"messages": USER, "chat_template_kwargs": {str(i): 1 for i in range(65)}},
        "chat_template_kwargs",
    ),
    ("prompts", "/v1/completions", {"prompt": ["a"] * 257}, "prompt"),
    ("prompt token ids", "/v1/completions", {"prompt": [1] * 131_073}, "prompt"),
    ("tokenize messages", "/tokenize", {"messages": USER * 4097}, "messages"),
    ("detokenize tokens", "/detokenize", {"tokens": [1] * 131_073}, "tokens"),
]


@pytest.mark.parametrize(("route", "body", "param"), [c[1:] for c in LIST_SIZES], ids=[c[0] for c in LIST_SIZES])
def test_lists_over_their_caps_are_400_naming_the_field(server: LiveServer, route: str, body: dict[str, Any], param: str) -> None:
    error = assert_openai_error(httpx.post(f"{server.url}{route}", json=body, timeout=60), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    still_serving(server)


def million_items(field: str, item: str) -> bytes:
    return body_with(f'"{field}": [' + ",".join([item] * 1_000_000) + "]")


MILLION_ITEMS: list[tuple[str, bytes]] = [
    ("stop: numbers", million_items("stop", "1")),
    ("stop_token_ids: strings", million_items("stop_token_ids", '"a"')),
    ("guided_choice: empty lists", million_items("guided_choice", "[]")),
    ("messages: numbers", b'{"messages": [' + b",".join([b"1"] * 1_000_000) + b"]}"),
    ("logit_bias: 250,000 invalid values", body_with('"logit_bias": {' + ",".join(f'"{i}":"a"' for i in range(250_000)) + "}")),
]


@pytest.mark.parametrize("content", [c for _, c in MILLION_ITEMS], ids=[name for name, _ in MILLION_ITEMS])
def test_a_million_items_are_refused_by_the_bodys_shape(server: LiveServer, content: bytes) -> None:
    assert len(content) < 4 * 1024 * 1024  # within the body limit: refused for its shape, not its size
    error = assert_openai_error(post_raw(server, content), 400)
    assert (error["param"], error["code"]) == (None, "request_too_complex")
    still_serving(server)


FANOUT: list[tuple[str, str, dict[str, Any], str]] = [
    ("65 prompts", "/v1/completions", {"prompt": ["a"] * 65}, "prompt"),
    ("16 prompts x n = 8", "/v1/completions", {"prompt": ["a"] * 16, "n": 8}, "n"),
    ("33 token-id prompts x n = 2", "/v1/completions", {"prompt": [[5]] * 33, "n": 2}, "n"),
]


@pytest.mark.parametrize(("route", "body", "param"), [c[1:] for c in FANOUT], ids=[c[0] for c in FANOUT])
def test_a_request_over_the_fanout_budget_is_400(
    server: LiveServer, fake: FakeEngine, route: str, body: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(httpx.post(f"{server.url}{route}", json=body | {"max_tokens": 2}, timeout=60), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "64" in error["message"] and "sequences" in error["message"]
    assert not fake.requests  # refused before anything reached the engine
    still_serving(server)


def test_the_fanout_budget_counts_preference_contexts() -> None:
    """Eight preferences (--max-preferences 8) decode 9 contexts: n = 7 is 63 sequences, n = 8 is 72, over 64."""
    engine = FakeEngine(max_model_len=FAKE_MAX_MODEL_LEN)
    with live_server(create_app(engine, ServerConfig(max_preferences=8))) as running:
        url = f"{running.url}/v1/chat/completions"
        body = {"messages": USER, "max_tokens": 2, "preference": ["concise"] * 8}
        assert httpx.post(url, json=body | {"n": 7}, timeout=60).status_code == 200
        engine.reset()
        error = assert_openai_error(httpx.post(url, json=body | {"n": 8}, timeout=60), 400)
        assert error["param"] == "n" and "72 sequences" in error["message"]
        assert not engine.requests
        still_serving(running)


def policy_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "server.requests.policy"]


def test_unknown_fields_are_logged_bounded_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """20,000 unknown fields, their names long and with newlines and escape sequences: accepted, and the log
    gets at most the first 64 names (cut short, escaped: no raw newline), then one line saying more are not
    logged; another such request logs nothing."""
    with live_server(create_app(FakeEngine(), ServerConfig())) as running, caplog.at_level(logging.WARNING):
        url = f"{running.url}/v1/chat/completions"
        names = [f"field{i}\nINJECTED\x1b[31m" + "x" * 100 for i in range(20_000)]
        response = httpx.post(url, json={"messages": USER, "max_tokens": 2} | dict.fromkeys(names, 1), timeout=60)
        assert response.status_code == 200, response.text[:300]
        lines = policy_lines(caplog)
        assert len(lines) == 65 and "not logged" in lines[-1]
        for line in lines:
            assert "\n" not in line and "\x1b" not in line and len(line) < 300
        assert "\\n" in lines[0] and "field0" in lines[0]  # escaped, still readable
        caplog.clear()
        more = {"messages": USER, "max_tokens": 2} | {f"other{i}": 1 for i in range(20_000)}
        assert httpx.post(url, json=more, timeout=60).status_code == 200
        assert policy_lines(caplog) == []
        still_serving(running)


# ---------------------------------------------------------------- schemathesis, from the OpenAPI schema


FAKE_MARKERS = ("[fail]", "[crash]", "[crash-early]", "[abort]", "[slow]", "[say:")


def is_openai_error_if_4xx(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every 4xx answer is the OpenAI error object (Anthropic's on ``/v1/messages``)."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, body
            assert set(body["error"]) == {"type", "message"}, body
            return None
        assert set(body) == {"error"} and {"message", "type", "param", "code"} == set(body["error"]), body
    return None


def with_content(case_and_text: tuple[Any, str]) -> Any:
    """A generated case whose messages all have content: the schema cannot say that only an
    assistant message may leave it out, so most generated bodies would stop at that 400."""
    case, text = case_and_text
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        body["model"] = None  # a random model name would stop at 404 just as early
        for message in body["messages"]:
            if isinstance(message, dict) and message.get("content") is None and message.get("role") != "assistant":
                message["content"] = text
    return case


def without_fake_markers(value: Any) -> Any:
    """``value`` with the fake engine's test triggers (``[fail]``, ``[crash]`` ...: a deliberate engine failure,
    a 500 by design) disarmed in every string. Hypothesis draws strings from the constants of the code it runs,
    so it finds them."""
    if isinstance(value, str):
        return value.replace("[", "(") if any(marker in value for marker in FAKE_MARKERS) else value
    if isinstance(value, list):
        return [without_fake_markers(v) for v in value]
    if isinstance(value, dict):
        return {k: without_fake_markers(v) for k, v in value.items()}
    return value


def fuzz(operation: Any, mode: Any, max_examples: int, fake: FakeEngine, statuses: set[int]) -> None:
    """Run ``max_examples`` generated cases of one operation through the in-process app."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = st.tuples(strategy, st.text()).map(with_content)

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        fake.reset()
        case.body = without_fake_markers(case.body)
        response = case.call()
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, is_openai_error_if_4xx])

    run()


def as_localhost(app: Any) -> Any:
    """``app`` reached as ``localhost`` (schemathesis' ASGI client names the host ``testserver``, which the
    server's trusted-hosts guard refuses)."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(k, b"localhost" if k.lower() == b"host" else v) for k, v in scope["headers"]]
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return asgi


def test_schemathesis_finds_no_server_error() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis.errors import Unsatisfiable

    fake = FakeEngine(max_model_len=FAKE_MAX_MODEL_LEN)
    app = as_localhost(create_app(fake, ServerConfig(max_body_bytes=64 * 1024)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    assert {"POST /v1/chat/completions", "GET /v1/models/{model_id}"} <= set(operations)
    statuses: dict[str, set[int]] = {}
    for label, operation in operations.items():
        chat = label == "POST /v1/chat/completions"
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, 150 if chat else 10, fake, statuses.setdefault(label, set()))
            except Unsatisfiable:
                if chat or mode is schemathesis.GenerationMode.POSITIVE:
                    raise  # only a route without parameters has no invalid request to generate
    chat_statuses = statuses["POST /v1/chat/completions"]
    assert 200 in chat_statuses and 400 in chat_statuses, chat_statuses  # both valid and invalid bodies were sent


# ---------------------------------------------------------------- the real engine and tokenizer

REAL_MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def real(smollm: LoadedModel) -> Iterator[EngineServer]:
    with engine_server(smollm, EngineConfig(max_model_len=REAL_MAX_MODEL_LEN, max_num_seqs=16, kv_cache_tokens=4096)) as running:
        yield running


@pytest.mark.smollm
def test_real_prompts_longer_than_max_model_len(real: EngineServer) -> None:
    url = f"{real.url}/v1/chat/completions"
    words = " ".join(f"word{i}" for i in range(REAL_MAX_MODEL_LEN))  # well over 256 tokens
    for content, preference in ((words, None), (words, "concise"), (MEGABYTE_MESSAGE, None), ("x" * 300_000, "formal")):
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "preference": preference}
        error = assert_openai_error(httpx.post(url, json=body, timeout=120), 400)
        assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
        assert f"maximum context length is {REAL_MAX_MODEL_LEN} tokens" in error["message"]
    # The prompt fits but asks for more tokens than the context has left.
    error = assert_openai_error(httpx.post(url, json={"messages": USER, "max_tokens": REAL_MAX_MODEL_LEN}, timeout=120), 400)
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    ok = httpx.post(url, json={"messages": USER, "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200


@pytest.mark.smollm
def test_real_tokenizer_takes_odd_text(real: EngineServer) -> None:
    odd = "NUL\u0000 ESC\u001b DEL\u007f bidi\u202eoverride zero\u200bwidth \ufeffBOM \U0001f600 e\u0301 \uffff <|im_end|>"
    for stream in (False, True):
        body = {"messages": [{"role": "system", "content": odd}, {"role": "user", "content": odd}], "max_tokens": 3}
        body |= {"stream": stream, "temperature": 0, "preference": odd}
        response = httpx.post(f"{real.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        if stream:
            assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.smollm
def test_real_extreme_values_do_not_hurt_a_shared_batch(real: EngineServer) -> None:
    """Valid but extreme values, decoded in one batch with ordinary requests: everyone gets an answer.

    A vanishing temperature once divided the log-probabilities into -inf and NaN, and the sampler
    then failed the whole batch; so did a huge Linear Alignment ratio. The server now decodes
    such temperatures greedily and caps the ratio.
    """
    url = f"{real.url}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "Name three fruits."}], "max_tokens": 6}
    extremes = [
        {"temperature": 1e-300},
        {"temperature": 5e-324, "top_p": 1e-300},
        {"temperature": 1e-5, "preference": {"text": "concise", "method": "la", "ratio": MAX_COEFFICIENT}},
        {"temperature": 100, "top_k": 1},
        {"preference": {"text": "concise", "eta": 1e-300, "alpha": 1e300, "lambda": 1e-300, "iterations": MAX_ITERATIONS}},
        {"preference": {"text": "concise", "plausibility": 0.999999}},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
    ]
    ordinary = [{"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "seed": 4, "preference": "formal"}]
    bodies = [base | extra for extra in extremes + ordinary]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(url, json=b, timeout=300), bodies))
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, (body, response.text)
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
