"""Hostile input gets a 4xx with an OpenAI-shaped error, never a 500, and the server stays up.

* schemathesis, from the app's own OpenAPI schema (valid and invalid bodies), finds no 5xx and
  only OpenAI-shaped errors (in-process app over the fake engine; examples bounded);
* hand-written cases that tests/server/test_errors.py does not cover, over the fake engine: bodies
  that are not JSON, not UTF-8 or nested without end; wrong types; huge numbers; NaN and
  infinities; Amulet parameters out of range; a 1 MB message; unknown roles and keys;
* with the real engine (SmolLM2 and its tokenizer): prompts longer than max_model_len (one of
  1 MB), odd text (control characters, NUL, bidi and zero-width characters), and extreme but
  valid sampling values decoded in one batch with an ordinary request, which must not be hurt.
"""

from __future__ import annotations

import json
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
from tests.support.fake_engine import FakeEngine
from tests.support.http import USER, assert_openai_error
from tests.support.live_server import EngineServer, LiveServer, engine_server

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


# ---------------------------------------------------------------- schemathesis, from the OpenAPI schema


def is_openai_error_if_4xx(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every 4xx answer is the OpenAI error object."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
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
        response = case.call()
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, is_openai_error_if_4xx])

    run()


def test_schemathesis_finds_no_server_error() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis.errors import Unsatisfiable

    fake = FakeEngine(max_model_len=FAKE_MAX_MODEL_LEN)
    app = create_app(fake, ServerConfig(max_body_bytes=64 * 1024))
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
