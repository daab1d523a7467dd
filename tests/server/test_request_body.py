"""Request bodies (:mod:`server.request_body`): a large body is parsed on the preparation pool, off the event loop
(so ``/health`` keeps answering while it parses), a small one in place; a full pool answers 429; errors are the
same either way."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, ClassVar

import pytest
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request

from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.request_body import OFF_LOOP_BODY_BYTES, parse_body
from server.requests.limits import RequestLimits
from server.requests.preparation import PreparationPool


class RecordingRequest(ChatCompletionRequest):
    """A chat request that records the thread each parse ran on."""

    threads: ClassVar[list[str]] = []

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any) -> Any:
        cls.threads.append(threading.current_thread().name)
        return super().model_validate_json(json_data, **kwargs)


def request_of(body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive)


def chat_body(chars: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x" * chars}]}).encode()


def parse(body: bytes, pool: PreparationPool | None) -> Any:
    RecordingRequest.threads.clear()
    return asyncio.run(parse_body(RecordingRequest, request_of(body), pool))


@pytest.fixture
def pool() -> Any:
    pool = PreparationPool(RequestLimits(preparation_threads=1, preparation_queue=0))
    yield pool
    pool.close()


def test_a_large_body_is_parsed_on_the_pool_a_small_one_in_place(pool: PreparationPool) -> None:
    large = parse(chat_body(OFF_LOOP_BODY_BYTES), pool)
    assert large.messages[0].content == "x" * OFF_LOOP_BODY_BYTES
    assert RecordingRequest.threads[0].startswith("amulet-prepare")
    small = parse(chat_body(10), pool)
    assert small.messages[0].content == "x" * 10 and RecordingRequest.threads == [threading.main_thread().name]
    parse(chat_body(OFF_LOOP_BODY_BYTES), None)  # no pool: in place
    assert RecordingRequest.threads == [threading.main_thread().name]


def test_errors_are_the_same_on_the_pool(pool: PreparationPool) -> None:
    bad = {"messages": [{"role": "user", "content": "x" * OFF_LOOP_BODY_BYTES}], "temperature": "hot"}
    for where in (pool, None):
        with pytest.raises(RequestValidationError) as refused:
            parse(json.dumps(bad).encode(), where)
        assert refused.value.errors()[0]["loc"] == ("temperature",)
    deep = b'{"messages": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"  # over the structure caps: refused before parsing
    with pytest.raises(APIError) as too_complex:
        parse(deep, pool)
    assert too_complex.value.code == "request_too_complex"


def test_a_full_pool_answers_429(pool: PreparationPool) -> None:
    gate = threading.Event()
    held = pool.submit(gate.wait)  # its one thread busy and no queue: full
    try:
        with pytest.raises(APIError) as busy:
            parse(chat_body(OFF_LOOP_BODY_BYTES), pool)
        assert busy.value.status == 429
        assert parse(chat_body(10), pool).messages[0].content == "x" * 10  # a small body does not need the pool
    finally:
        gate.set()
        held.result(timeout=30)
