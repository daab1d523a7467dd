"""The ingress and replica plumbing without a cluster: the server's own app (over the fake engine) called
in-process (:func:`call_app`), behind the ingress's :class:`ForwardingApp`, with the Ray handle replaced
by a direct call (or one that fails where a dead replica would).

* Answers pass through unchanged (JSON and SSE), with the replica's header and request id.
* A replica that dies before answering gives a 503 ``replica_failed`` with ``Retry-After``; one that dies
  mid-stream ends the stream with an error event and ``[DONE]``, as the server ends a failed stream.
* The routing key is computed unless the request (or the default) asks for ``pow2``; ``/metrics`` is refused;
  a caller that leaves makes the app abort.
* The server's guards apply at the ingress, before anything is keyed or forwarded: the API key (deny by
  default, on the routed path: a route prefix skips nothing), one Authorization header, trusted Host names,
  a JSON content type, the body limit. Behind a route prefix the replica still checks the key and drains.
* A forwarded request's repr shows neither its headers (the key) nor its body.
* The replica's health check (what Ray acts on) fails on an engine failure or an app that is not ready.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from amulet_ray.asgi_bridge import AsgiLifespan, ForwardedRequest, call_app, get
from amulet_ray.forwarding import ForwardingApp, ingress_app
from amulet_ray.health import check_app_health
from amulet_ray.replica_metrics import bind_metrics_socket, with_replica_label
from server.app import create_app
from server.config import ServerConfig
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY, WRONG_KEY, assert_openai_error

pytestmark = pytest.mark.ray

REPLICA = ((b"x-amulet-replica", b"replica-1"),)
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


class FakeKeyer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def chain(self, method: str, path: str, body: bytes) -> tuple[int, ...]:
        self.calls.append(path)
        return (11, 22, 33)


class Replica:
    """The handle's stand-in: calls the app in-process, records what it was sent, fails where asked."""

    def __init__(self, app: Any, fail_after_batches: int | None = None) -> None:
        self.app = app
        self.fail_after_batches = fail_after_batches
        self.sent: list[ForwardedRequest] = []

    def __call__(self, request: ForwardedRequest) -> AsyncIterator[list[Any]]:
        self.sent.append(request)
        return self._answer(request)

    async def _answer(self, request: ForwardedRequest) -> AsyncIterator[list[Any]]:
        batches = 0
        async for batch in call_app(self.app, request, REPLICA):
            if batches == self.fail_after_batches:
                raise RuntimeError("ActorDiedError: the replica's process died")
            batches += 1
            yield batch
        if self.fail_after_batches is not None and batches <= self.fail_after_batches:
            raise RuntimeError("ActorDiedError: the replica's process died")


def ingress(
    replica: Replica,
    keyer: Any = None,
    routing: str = "prefix",
    max_body: int = 4096,
    api_key: str | None = None,
    root_path: str = "",
) -> httpx.AsyncClient:
    """The ingress in front of ``replica``, as a client; ``root_path``: served under that Ray route prefix."""
    config = ServerConfig(max_body_bytes=max_body, api_key=api_key)
    app = ingress_app(ForwardingApp(replica, keyer, routing, retry_after_s=2), config)
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_answers_pass_through_with_the_replica_header_and_the_routing_key() -> None:
    fake, keyer = FakeEngine(), FakeKeyer()
    replica = Replica(create_app(fake, ServerConfig()))

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with ingress(replica, keyer) as client:
            whole = await client.post("/v1/chat/completions", json=CHAT)
            stream = await client.post("/v1/chat/completions?x=1", json={**CHAT, "stream": True})
            plain = await client.post("/v1/chat/completions", json=CHAT, headers={"x-amulet-routing": "pow2"})
            return whole, stream, plain

    whole, stream, plain = run(scenario())
    assert whole.status_code == 200 and whole.json()["object"] == "chat.completion"
    assert whole.headers["x-amulet-replica"] == "replica-1" and whole.headers["x-request-id"].startswith("req-")
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in stream.text
    assert [r.prefix_chain for r in replica.sent] == [(11, 22, 33), (11, 22, 33), ()]  # pow2 asked: no key computed
    assert keyer.calls == ["/v1/chat/completions"] * 2
    assert replica.sent[1].query_string == b"x=1" and json.loads(replica.sent[0].body) == CHAT


def test_pow2_routing_computes_no_key_unless_a_request_asks_for_prefix() -> None:
    keyer = FakeKeyer()
    replica = Replica(create_app(FakeEngine(), ServerConfig()))

    async def scenario() -> None:
        async with ingress(replica, keyer, routing="pow2") as client:
            await client.post("/v1/chat/completions", json=CHAT)
            await client.post("/v1/chat/completions", json=CHAT, headers={"x-amulet-routing": "prefix"})

    run(scenario())
    assert [r.prefix_chain for r in replica.sent] == [(), (11, 22, 33)]


def test_the_ingress_refuses_a_request_without_a_valid_key_before_keying_or_forwarding_it() -> None:
    keyer = FakeKeyer()
    replica = Replica(create_app(FakeEngine(), ServerConfig(api_key=API_KEY)))
    good = {"Authorization": f"Bearer {API_KEY}"}

    async def scenario() -> list[httpx.Response]:
        async with ingress(replica, keyer, api_key=API_KEY) as client:
            return [
                await client.post("/v1/chat/completions", json=CHAT),
                await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {WRONG_KEY}"}),
                await client.get("/version"),
                await client.get("/openapi.json"),
                await client.post("/v1/chat/completions", json=CHAT, headers=[("Authorization", f"Bearer {API_KEY}")] * 2),
                await client.get("/health"),  # open: forwarded without a key
                await client.post("/v1/chat/completions", json=CHAT, headers=good),
            ]

    *refused, duplicated, health, right = run(scenario())
    for response in refused:
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
    assert assert_openai_error(duplicated, 400)["code"] == "duplicate_authorization_header"
    assert health.status_code == 200 and right.status_code == 200
    assert keyer.calls == ["/health", "/v1/chat/completions"]  # nothing done for a refused caller
    assert [r.path for r in replica.sent] == ["/health", "/v1/chat/completions"]


def test_behind_a_route_prefix_the_key_and_draining_still_apply() -> None:
    keyer = FakeKeyer()
    replica_app = create_app(FakeEngine(), ServerConfig(api_key=API_KEY))
    replica = Replica(replica_app)
    good = {"Authorization": f"Bearer {API_KEY}"}

    async def scenario() -> list[httpx.Response]:
        async with ingress(replica, keyer, api_key=API_KEY, root_path="/api") as client:
            answers = [
                await client.post("/api/v1/chat/completions", json=CHAT),
                await client.get("/api/v1/models"),
                await client.get("/api/health"),
                await client.post("/api/v1/chat/completions", json=CHAT, headers=good),
            ]
            replica_app.state.lifecycle.start_draining()
            answers.append(await client.post("/api/v1/chat/completions", json=CHAT, headers=good))
            answers.append(await client.get("/api/health"))
            return answers

    chat, models, health, keyed, drained, health_draining = run(scenario())
    assert assert_openai_error(chat, 401)["code"] == "invalid_api_key" and models.status_code == 401
    assert health.status_code == 200 and keyed.status_code == 200
    assert keyed.json()["object"] == "chat.completion"
    assert keyer.calls == ["/health", "/v1/chat/completions", "/v1/chat/completions", "/health"]  # the routed paths
    assert assert_openai_error(drained, 503)["code"] == "server_shutting_down" and health_draining.status_code == 200
    assert [r.root_path for r in replica.sent] == ["/api"] * 4


def test_a_replica_refuses_a_prefixed_request_that_reached_it_without_the_key() -> None:
    """The replica's own check reads the routed path too (Ray's proxy sets ``root_path`` to the route prefix)."""
    direct = ForwardedRequest("GET", "/api/v1/models", headers=((b"host", b"localhost"),), root_path="/api")

    async def status(app: Any) -> int:
        async for batch in call_app(app, direct):
            return int(batch[0]["status"])
        return 0

    assert run(status(create_app(FakeEngine(), ServerConfig(api_key=API_KEY)))) == 401
    assert run(status(create_app(FakeEngine(), ServerConfig()))) == 200


def test_the_ingress_checks_the_host_and_the_content_type_before_forwarding() -> None:
    keyer = FakeKeyer()
    replica = Replica(create_app(FakeEngine(), ServerConfig()))

    async def scenario() -> list[httpx.Response]:
        async with ingress(replica, keyer) as client:
            return [
                await client.post("/v1/chat/completions", json=CHAT, headers={"Host": "rebound.example"}),
                await client.post("/v1/chat/completions", content=json.dumps(CHAT).encode()),
                await client.post(
                    "/v1/chat/completions", content=json.dumps(CHAT).encode(), headers={"Content-Type": "text/plain"}
                ),
            ]

    host, untyped, plain = run(scenario())
    assert assert_openai_error(host, 400)["code"] == "invalid_host"
    assert assert_openai_error(untyped, 415)["code"] == assert_openai_error(plain, 415)["code"] == "unsupported_media_type"
    assert replica.sent == [] and keyer.calls == []


def test_a_forwarded_requests_repr_shows_neither_its_headers_nor_its_body() -> None:
    secret_body = b'{"messages": [{"role": "user", "content": "my private question"}]}'
    request = ForwardedRequest(
        "POST", "/v1/chat/completions", b"token=abc", ((b"authorization", f"Bearer {API_KEY}".encode()),), secret_body
    )
    text = repr(request) + str(request)
    assert "POST" in text and "/v1/chat/completions" in text
    assert API_KEY not in text and "private question" not in text and "token=abc" not in text


def test_a_replica_that_dies_before_answering_gives_a_clean_503() -> None:
    replica = Replica(create_app(FakeEngine(), ServerConfig()), fail_after_batches=0)

    async def scenario() -> httpx.Response:
        async with ingress(replica) as client:
            return await client.post("/v1/chat/completions", json=CHAT)

    response = run(scenario())
    error = assert_openai_error(response, 503)
    assert error["code"] == "replica_failed" and error["type"] == "server_error"
    assert response.headers["retry-after"] == "2"


def test_a_replica_that_dies_mid_stream_ends_it_with_an_error_event_and_done() -> None:
    replica = Replica(create_app(FakeEngine(), ServerConfig()), fail_after_batches=2)

    async def scenario() -> httpx.Response:
        async with ingress(replica) as client:
            body = {**CHAT, "stream": True, "max_tokens": 40, "messages": [{"role": "user", "content": "[slow] Hi"}]}
            return await client.post("/v1/chat/completions", json=body)

    response = run(scenario())
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_failed" and error["request_id"] == response.headers["x-request-id"]
    assert all("error" not in json.loads(e) for e in events[:-2])


def test_a_messages_stream_whose_replica_dies_ends_with_anthropics_error_event() -> None:
    """The Messages API's streams end as Anthropic's: an ``error`` event, and no OpenAI ``[DONE]``."""
    replica = Replica(create_app(FakeEngine(), ServerConfig()), fail_after_batches=2)

    async def scenario() -> httpx.Response:
        async with ingress(replica) as client:
            body = {**CHAT, "stream": True, "max_tokens": 40, "messages": [{"role": "user", "content": "[slow] Hi"}]}
            return await client.post("/v1/messages", json=body)

    response = run(scenario())
    assert response.status_code == 200
    assert "[DONE]" not in response.text
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert blocks[0].startswith("event: message_start")
    last = blocks[-1].splitlines()
    assert last[0] == "event: error"
    error = json.loads(last[1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "replica" in error["error"]["message"] and error["request_id"] == response.headers["x-request-id"]
    assert not any(b.startswith("event: error") for b in blocks[:-1])


def test_metrics_are_refused_and_the_body_limit_applies_at_the_ingress() -> None:
    replica = Replica(create_app(FakeEngine(), ServerConfig()))

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with ingress(replica, max_body=64) as client:
            too_large = await client.post(
                "/v1/chat/completions", content=b"x" * 100, headers={"Content-Type": "application/json"}
            )
            return await client.get("/metrics"), too_large

    metrics, too_large = run(scenario())
    assert assert_openai_error(metrics, 404)["code"] == "not_found"
    assert assert_openai_error(too_large, 413)["code"] == "request_too_large"
    assert replica.sent == []


def test_a_caller_that_leaves_makes_the_app_abort_the_generation() -> None:
    fake = FakeEngine()
    app = create_app(fake, ServerConfig())
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": "[slow] Hi"}]})
    headers = ((b"content-type", b"application/json"), (b"host", b"localhost"))
    request = ForwardedRequest("POST", "/v1/chat/completions", headers=headers, body=body.encode())

    async def scenario() -> None:
        answer = call_app(app, request)
        seen = 0
        async for batch in answer:
            seen += sum(1 for m in batch if m["type"] == "http.response.body")
            if seen >= 3:
                break
        await answer.aclose()  # type: ignore[attr-defined]
        for _ in range(200):
            if fake.aborted:
                return
            await asyncio.sleep(0.02)

    run(scenario())
    assert len(fake.aborted) == 1 and fake.active == 0


def test_the_lifespan_runs_startup_and_shutdown_and_get_reads_a_route() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        else:
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": scope["path"].encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"!"})

    async def scenario() -> tuple[int, bytes]:
        lifespan = AsgiLifespan(app)
        await lifespan.startup()
        answer = await get(app, "/ready")
        await lifespan.shutdown()
        return answer

    assert run(scenario()) == (201, b"/ready!")
    assert events == ["lifespan.startup", "lifespan.shutdown"]


def test_replica_metrics_get_the_replica_label_and_a_free_port() -> None:
    text = '# HELP amulet_x_total x\n# TYPE amulet_x_total counter\namulet_x_total{model="m"} 3.0\n'
    assert b'amulet_x_total{model="m",replica="abc"} 3.0' in with_replica_label(text, "abc")
    first = bind_metrics_socket("127.0.0.1", 0, 0)  # port 0: the kernel picks one
    port = first.getsockname()[1]
    try:
        second = bind_metrics_socket("127.0.0.1", port, 0)  # taken: the next free one above
        assert second.getsockname()[1] > port
        second.close()
    finally:
        first.close()


def test_the_health_check_fails_when_the_engine_failed_or_the_app_is_not_ready() -> None:
    fake = FakeEngine()
    app = create_app(fake, ServerConfig())

    def check() -> str | None:
        try:
            run(check_app_health(app))
        except RuntimeError as exc:
            return str(exc)
        return None

    assert check() is None
    fake.ready = False
    assert (check() or "").startswith("/ready answered 503")
    fake.ready = True
    app.state.lifecycle.engine_failure = "a step ran past the stall timeout"  # what the watchdog marks first
    assert (check() or "").startswith("/health answered 503")
    app.state.lifecycle.fail(5, "a step ran past the stall timeout")
    assert "exit status 5" in (check() or "")
