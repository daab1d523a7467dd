"""Admission before work (issue 27, items 2 and 3): bounded preparation, early refusals, a responsive /health.

* the preparation pool runs at most ``threads`` jobs and queues at most ``queue`` more; one more is a 429 with
  Retry-After before any of its work, over HTTP too (a renderer held on a gate); a caller that leaves keeps
  its slot until its job has ended;
* bodies of up to a million invalid items cost pydantic one error, not one per item (counted, not timed);
  bodies past the JSON structure caps are refused before they are parsed, exactly (strings do not count);
* every context of a request (each preference context, the contrast one) and every prompt is measured
  before the tokenizer runs on any;
* the fan-out budget names the field that takes a request over it;
* the unknown-field log keeps a bounded set of escaped, shortened names;
* ``/health`` keeps answering (every answer a 200 within a bound generous for a busy machine) while the
  largest bodies the server takes are being refused, and ``benchmarks.health_latency`` measures it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from amulet_core.errors import InvalidParameterError
from benchmarks import health_latency
from server.app import create_app
from server.config import ServerConfig
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.protocol_completions import CompletionRequest
from server.protocol_limits import MAX_JSON_CONTAINERS, MAX_JSON_SEPARATORS, check_json_structure
from server.protocol_tokenize import DetokenizeRequest
from server.requests.json_values import MAX_JSON_DEPTH, json_depth, load_json
from server.requests.limits import RequestLimits, check_fanout
from server.requests.policy import UnknownFieldLog, shown_name
from server.requests.preparation import PreparationPool
from tests.support.fake_engine import FakeEngine
from tests.support.http import USER, assert_openai_error
from tests.support.live_server import LiveServer, live_server

HEALTH_BOUND_S = 5.0
"""Every /health answer under load comes within this (the goal is 100 ms; this bound holds on a busy machine)."""

# ---------------------------------------------------------------- the preparation pool


def test_the_pool_runs_threads_jobs_queues_queue_more_and_refuses_the_next_with_429() -> None:
    pool = PreparationPool(RequestLimits(preparation_threads=1, preparation_queue=1), retry_after_s=3)
    gate, started = threading.Event(), threading.Event()

    def held() -> str:
        started.set()
        gate.wait(30)
        return "done"

    running = pool.submit(held)
    started.wait(30)
    queued = pool.submit(lambda: "queued")
    with pytest.raises(APIError) as refused:
        pool.submit(lambda: "refused")
    assert (refused.value.status, refused.value.code, refused.value.headers) == (429, "server_busy", {"Retry-After": "3"})
    gate.set()
    assert (running.result(30), queued.result(30)) == ("done", "queued")
    assert asyncio.run(pool.run(lambda: 7)) == 7  # the slots are free again
    pool.close()


def test_a_caller_that_leaves_keeps_its_slot_until_its_job_ends() -> None:
    pool = PreparationPool(RequestLimits(preparation_threads=1, preparation_queue=0))
    gate, started = threading.Event(), threading.Event()

    def held() -> None:
        started.set()
        gate.wait(30)

    async def leave_early() -> None:
        task = asyncio.ensure_future(pool.run(held))
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_early())
    with pytest.raises(APIError):  # the job still runs on the thread: no room yet
        pool.submit(lambda: None)
    gate.set()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert pool.submit(lambda: 1).result(30) == 1
            break
        except APIError:
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.01)
    pool.close()


def test_a_jobs_error_reaches_its_caller() -> None:
    pool = PreparationPool(RequestLimits())

    def fail() -> None:
        raise InvalidParameterError("messages", "bad")

    with pytest.raises(InvalidParameterError):
        asyncio.run(pool.run(fail))
    pool.close()


class HeldRenderer(FakeEngine):
    """A fake whose tokenizer waits for ``gate`` (it runs on the preparation pool's threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def encode_text(self, text: str) -> tuple[int, ...]:
        self.gate.wait(60)
        return super().encode_text(text)


def test_a_full_preparation_pool_is_a_429_with_retry_after_over_http() -> None:
    """The chat endpoint's pool takes 2 + 32 requests (RequestLimits' defaults); of 40 sent at once while the
    tokenizer is held, 6 are answered 429 at once, and the 34 others are served once it is let go."""
    engine = HeldRenderer()
    limits = RequestLimits()
    capacity = limits.preparation_threads + limits.preparation_queue
    with live_server(create_app(engine, ServerConfig(retry_after_s=2))) as running, ThreadPoolExecutor(40) as senders:
        url = f"{running.url}/v1/chat/completions"
        futures = [senders.submit(httpx.post, url, json={"messages": USER, "max_tokens": 2}, timeout=120) for _ in range(40)]
        refused: list[httpx.Response] = []
        deadline = time.monotonic() + 60
        while len(refused) < 40 - capacity and time.monotonic() < deadline:
            refused = [f.result() for f in futures if f.done()]
            time.sleep(0.02)
        assert len(refused) == 40 - capacity
        for response in refused:
            error = assert_openai_error(response, 429)
            assert (error["type"], error["code"]) == ("rate_limit_error", "server_busy")
            assert response.headers["retry-after"] == "2"
        assert httpx.get(f"{running.url}/health", timeout=30).status_code == 200  # the event loop is free
        engine.gate.set()
        statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200] * capacity + [429] * (40 - capacity)


# ---------------------------------------------------------------- early refusals, counted


def errors_of(model: Any, body: str) -> list[Any]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate_json(body)
    return caught.value.errors(include_url=False)


def items(n: int, item: str) -> str:
    return "[" + ",".join([item] * n) + "]"


U = json.dumps(USER)
UNDER_THE_CAPS = MAX_JSON_SEPARATORS - 100
"""Items a body may hold and still be parsed (so the fields' own caps are what refuses it)."""
NUMBERS = items(UNDER_THE_CAPS, "1")
MANY_INVALID_ITEMS: list[tuple[str, Any, str]] = [
    ("stop", ChatCompletionRequest, f'{{"messages":{U},"stop":{NUMBERS}}}'),
    ("messages", ChatCompletionRequest, f'{{"messages":{NUMBERS}}}'),
    ("stop_token_ids", ChatCompletionRequest, f'{{"messages":{U},"stop_token_ids":{items(UNDER_THE_CAPS, "true")}}}'),
    ("guided_choice", ChatCompletionRequest, f'{{"messages":{U},"guided_choice":{NUMBERS}}}'),
    ("tools", ChatCompletionRequest, f'{{"messages":{U},"tools":{NUMBERS}}}'),
    ("preference", ChatCompletionRequest, f'{{"messages":{U},"preference":{NUMBERS}}}'),
    (
        "logit_bias",
        ChatCompletionRequest,
        '{"messages":' + U + ',"logit_bias":{' + ",".join(f'"{i}":"a"' for i in range(UNDER_THE_CAPS // 2)) + "}}",
    ),
    ("content parts", ChatCompletionRequest, f'{{"messages":[{{"role":"user","content":{NUMBERS}}}]}}'),
    ("prompt", CompletionRequest, f'{{"prompt":{items(MAX_JSON_CONTAINERS - 100, "{}")}}}'),
    ("prompt ids", CompletionRequest, f'{{"prompt":{NUMBERS}}}'),
    ("tokens", DetokenizeRequest, f'{{"tokens":{NUMBERS}}}'),
]


@pytest.mark.parametrize(("model", "body"), [c[1:] for c in MANY_INVALID_ITEMS], ids=[c[0] for c in MANY_INVALID_ITEMS])
def test_a_list_of_many_invalid_items_costs_one_error_not_one_per_item(model: Any, body: str) -> None:
    """About 260,000 invalid items (as many as a body may hold and still be parsed): pydantic stops at the count
    (one or two errors: a union reports each of its branches), it never validates the items one by one."""
    check_json_structure(body)  # parsed, not refused by its shape
    errors = errors_of(model, body)
    assert 1 <= len(errors) <= 2, errors[:3]
    assert any(e["type"] in ("too_long", "value_error") for e in errors)


def test_a_million_item_body_is_refused_before_it_is_parsed() -> None:
    for item in ("1", "[]", '"a"', "{}"):
        body = f'{{"messages":{U},"stop":{items(1_000_000, item)}}}'
        with pytest.raises(APIError) as refused:
            ChatCompletionRequest.model_validate_json(body)
        assert (refused.value.status, refused.value.code, refused.value.param) == (400, "request_too_complex", None)
    for body in ("[" * 2_000_000 + "]" * 2_000_000,):
        with pytest.raises(APIError) as refused:
            ChatCompletionRequest.model_validate_json(body)
        assert (refused.value.status, refused.value.code, refused.value.param) == (400, "request_too_complex", None)


def test_the_structure_caps_do_not_count_what_is_inside_strings() -> None:
    prose = "Hello, world: [a], {b}; " * 100_000  # 300,000 separators and 200,000 brackets, all inside a string
    for text in (prose, prose + '\\ "quoted", and a backslash \\'):
        check_json_structure(json.dumps({"messages": [{"role": "user", "content": text}]}))
    outside = '{"a":' + items(MAX_JSON_SEPARATORS + 1, "1") + "}"
    with pytest.raises(APIError):
        check_json_structure(outside)
    with pytest.raises(APIError):
        check_json_structure('{"a":"\\\\",' + items(MAX_JSON_CONTAINERS + 1, "[]")[1:] + "}")  # escapes: the exact path
    check_json_structure(items(MAX_JSON_CONTAINERS - 1, "[]"))


def test_a_tool_call_or_schema_nested_without_end_is_a_400_never_recursion() -> None:
    assert json_depth(load_json("[" * 10 + "]" * 10, "p")) == 10
    deep: list[Any] = []
    for _ in range(100_000):  # deeper than any recursion limit: the depth is counted without recursing
        deep = [deep]
    assert json_depth(deep) == MAX_JSON_DEPTH + 1
    for text in ("[" * 100_000, "[" * 65 + "]" * 65):
        with pytest.raises(InvalidParameterError) as refused:
            load_json(text, "guided_json")
        assert refused.value.param == "guided_json"


# ---------------------------------------------------------------- contexts measured before the tokenizer runs


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=512)  # the fake's tokens are characters: 512 characters fit


def test_every_context_is_measured_before_any_is_tokenized(server: LiveServer, fake: FakeEngine) -> None:
    """The contrast context comes last and alone is too long (it carries a long negative sentence): nothing is
    tokenized, not even the preference contexts before it."""
    body = {
        "messages": [{"role": "user", "content": "y" * 300}],
        "max_tokens": 2,
        "preference": {"text": ["concise", "formal"], "negative": "n" * 300},
    }
    error = assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert fake.renderer_calls.count("chat_text") == 3 and "encode_text" not in fake.renderer_calls


def test_every_prompt_is_measured_before_any_is_tokenized(server: LiveServer, fake: FakeEngine) -> None:
    body = {"prompt": ["short", "s" * 600], "max_tokens": 2}
    error = assert_openai_error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60), 400)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "encode_prompt" not in fake.renderer_calls
    error = assert_openai_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": [5] * 600}, timeout=60), 400)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")


# ---------------------------------------------------------------- the fan-out budget


@pytest.mark.parametrize(
    ("prompts", "n", "contexts", "param"),
    [(65, 1, 1, "prompt"), (8, 9, 1, "n"), (1, 1, 65, "preference"), (1, 8, 9, "n"), (3, 1, 22, "prompt")],
)
def test_the_fanout_error_names_the_field_that_takes_it_over(prompts: int, n: int, contexts: int, param: str) -> None:
    limits = RequestLimits(max_sequences=64)
    check_fanout(limits, n=1, contexts=1, prompts=64)
    with pytest.raises(InvalidParameterError) as refused:
        check_fanout(limits, n=n, contexts=contexts, prompts=prompts)
    assert refused.value.param == param and str(prompts * n * contexts) in refused.value.message


# ---------------------------------------------------------------- the unknown-field log


def test_the_unknown_field_log_is_bounded_escaped_and_shortened(caplog: pytest.LogCaptureFixture) -> None:
    log = UnknownFieldLog(capacity=3, max_name_chars=10)
    with caplog.at_level(logging.WARNING, logger="server.requests.policy"):
        for name in ["a\nb", "a\nb", "\x1b[31mred", "x" * 1000, "fourth", "fifth"]:
            log.note(name)
    assert log.seen == {repr("a\nb"), repr("\x1b[31mred"), repr("x" * 10 + "...")} and log.full
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and "not logged" in lines[-1]
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert shown_name("ok") == "'ok'"


# ---------------------------------------------------------------- /health while the largest bodies are refused


def send_until(url: str, bodies: list[bytes], stop: threading.Event, statuses: list[int | None]) -> None:
    with httpx.Client(timeout=120) as client:
        for body in bodies:
            if stop.is_set():
                return
            try:
                statuses.append(client.post(url, content=body, headers={"content-type": "application/json"}).status_code)
            except httpx.HTTPError:
                statuses.append(None)


@pytest.fixture(scope="module")
def hostile_bodies() -> list[bytes]:
    return [make(health_latency.DEFAULT_BODY_BYTES) for make in health_latency.HOSTILE_KINDS.values()]


def test_health_answers_while_the_largest_bodies_are_refused(server: LiveServer, hostile_bodies: list[bytes]) -> None:
    """Two clients send every hostile body of benchmarks.health_latency (each just under the 4 MiB limit) while
    /health is asked every 50 ms: every hostile body is a 400, every /health a 200 within HEALTH_BOUND_S."""
    url = f"{server.url}/v1/chat/completions"
    stop = threading.Event()
    statuses: list[int | None] = []
    half = len(hostile_bodies) // 2
    orders = [hostile_bodies, hostile_bodies[half:] + hostile_bodies[:half]]
    senders = [threading.Thread(target=send_until, args=(url, order, stop, statuses)) for order in orders]
    latencies: list[float] = []
    for sender in senders:
        sender.start()
    try:
        with httpx.Client(timeout=60) as client:
            while any(s.is_alive() for s in senders):
                start = time.monotonic()
                assert client.get(f"{server.url}/health").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.05)
    finally:
        stop.set()
        for sender in senders:
            sender.join(120)
    assert statuses == [400] * (2 * len(hostile_bodies)), statuses
    assert latencies and max(latencies) < HEALTH_BOUND_S, sorted(latencies)[-5:]
    assert httpx.post(url, json={"messages": USER, "max_tokens": 2}, timeout=60).status_code == 200


@pytest.fixture
def output(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "health_latency.json"


def test_the_health_latency_script_measures_a_running_server(server: LiveServer, output: Path) -> None:
    """benchmarks.health_latency against the fake server, briefly: it reports the percentiles and passes."""
    argv = ["--base-url", server.url, "--senders", "1", "--quiet-s", "0.3", "--duration-s", "2.5", "--warmup-s", "0.5"]
    assert health_latency.main([*argv, "--output", str(output)]) == 0
    summary = json.loads(output.read_text())["summary"]
    assert summary["failures"] == [] and summary["hostile_answers"] >= 1
    assert summary["health_loaded_ms"]["count"] >= 1 and summary["health_loaded_ms"]["p99"] is not None
