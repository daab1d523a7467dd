"""Closed by default (issue 27 item 6), over the fake engine behind a real uvicorn with ``amulet-server``'s own
uvicorn settings (``server.cli.uvicorn_config``):

* with a key, every route but the open ones (:mod:`server.access`) answers 401, matched on the routed path,
  so a route prefix (Ray Serve's ``route_prefix``, an ASGI ``root_path``) skips neither the key nor draining;
  several Authorization headers are a 400; with several keys each request carries its key's tenant id;
* request bodies must be declared ``application/json`` (415); only trusted Host names are answered (400);
* ``/docs`` and ``/redoc`` are off unless asked for; ``/ready`` says nothing of the load error but logs it;
* a body that does not arrive in time is a 408; beyond ``--max-connections`` a request gets 503; no ``server``
  header.

Every refusal is checked for its status and OpenAI error, and the server is checked to answer afterwards.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette._utils import get_route_path

from server.access import routed_path
from server.app import MODEL_LOAD_FAILED_MESSAGE, create_app
from server.auth import TENANT_STATE_KEY, tenant_id, tenant_of
from server.cli import uvicorn_config
from server.config import ServerConfig
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY, USER, WRONG_KEY, assert_openai_error
from tests.support.live_server import LiveServer, live_server, wait_until

SECOND_KEY = "sk-test-second-4b1e0d"
GOOD = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"messages": USER, "max_tokens": 2}
OPEN_ROUTES = [
    "/health",
    "/ready",
    "/health/ready",
    "/",
    "/playground",
    "/playground/playground.js",
    "/playground/playground.css",
]
CLOSED_ROUTES = ["/v1/models", "/version", "/openapi.json", "/docs", "/redoc", "/nowhere", "/health/", "/playground/x", "/v1"]


def with_whoami(app: FastAPI) -> FastAPI:
    """A test route that reports the tenant the auth layer set (an API route: it needs the key)."""

    async def whoami(request: Request) -> dict[str, Any]:
        return {"tenant": tenant_of(request.scope), "state": getattr(request.state, TENANT_STATE_KEY, None)}

    app.add_api_route("/v1/whoami", whoami, methods=["GET"])
    return app


def serve(app: FastAPI, config: ServerConfig) -> Any:
    return live_server(app, make_config=lambda a: uvicorn_config(a, config))


@pytest.fixture(scope="module")
def keyed() -> Iterator[LiveServer]:
    config = ServerConfig(api_key=API_KEY, extra_api_keys=(SECOND_KEY,), log_level="warning")
    with serve(with_whoami(create_app(FakeEngine(), config)), config) as running:
        yield running


def still_serving(url: str, headers: dict[str, str] | None = None) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


def raw_request(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is and read until the server closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_raw_error(status: int, headers: dict[str, str], body: bytes, want: int) -> dict[str, Any]:
    assert status == want, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------- the key: deny by default


@pytest.mark.parametrize("path", OPEN_ROUTES)
def test_the_open_routes_need_no_key(keyed: LiveServer, path: str) -> None:
    assert httpx.get(f"{keyed.url}{path}").status_code in (200, 307)


@pytest.mark.parametrize("path", CLOSED_ROUTES)
def test_every_other_route_needs_the_key(keyed: LiveServer, path: str) -> None:
    for method in ("GET", "POST", "OPTIONS", "DELETE"):
        response = httpx.request(method, f"{keyed.url}{path}", json={})
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key", (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    with_key = httpx.get(f"{keyed.url}{path}", headers=GOOD)
    assert with_key.status_code != 401
    if path in ("/version", "/openapi.json", "/v1/models"):
        assert with_key.status_code == 200
    still_serving(keyed.url, GOOD)


def test_a_wrong_key_and_the_second_key(keyed: LiveServer) -> None:
    wrong = httpx.post(f"{keyed.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {WRONG_KEY}"})
    assert assert_openai_error(wrong, 401)["message"] == "Incorrect API key provided."
    still_serving(keyed.url, {"Authorization": f"Bearer {SECOND_KEY}"})


@pytest.mark.parametrize("second", [API_KEY, WRONG_KEY])
def test_several_authorization_headers_are_refused(keyed: LiveServer, second: str) -> None:
    headers = [("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {second}")]
    response = httpx.post(f"{keyed.url}/v1/chat/completions", json=CHAT, headers=headers)
    error = assert_openai_error(response, 400)
    assert error["code"] == "duplicate_authorization_header"
    assert API_KEY not in response.text
    still_serving(keyed.url, GOOD)


def test_each_key_has_its_own_stable_tenant_id(keyed: LiveServer) -> None:
    first = httpx.get(f"{keyed.url}/v1/whoami", headers=GOOD).json()
    second = httpx.get(f"{keyed.url}/v1/whoami", headers={"Authorization": f"Bearer {SECOND_KEY}"}).json()
    assert first == {"tenant": tenant_id(API_KEY), "state": tenant_id(API_KEY)}
    assert second["tenant"] == tenant_id(SECOND_KEY) != first["tenant"]
    assert httpx.get(f"{keyed.url}/v1/whoami", headers=GOOD).json() == first  # stable
    assert len(first["tenant"]) == 16 and int(first["tenant"], 16) >= 0
    assert API_KEY not in json.dumps(first) and API_KEY[:16] not in first["tenant"]


def test_with_one_key_or_none_there_is_no_tenant() -> None:
    for config in (ServerConfig(api_key=API_KEY), ServerConfig()):
        with live_server(with_whoami(create_app(FakeEngine(), config))) as running:
            assert httpx.get(f"{running.url}/v1/whoami", headers=GOOD).json() == {"tenant": None, "state": None}


# ---------------------------------------------------------------- a route prefix skips nothing

PREFIX = "/api"


def prefixed(app: FastAPI) -> httpx.AsyncClient:
    """The app as served under a route prefix (what Ray Serve's proxy does: ``root_path`` set, ``path`` whole)."""
    transport = httpx.ASGITransport(app=app, root_path=PREFIX)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


async def _prefixed_calls(app: FastAPI) -> dict[str, httpx.Response]:
    async with prefixed(app) as client:
        return {
            "models": await client.get(f"{PREFIX}/v1/models"),
            "chat": await client.post(f"{PREFIX}/v1/chat/completions", json=CHAT),
            "version": await client.get(f"{PREFIX}/version"),
            "health": await client.get(f"{PREFIX}/health"),
            "keyed_chat": await client.post(f"{PREFIX}/v1/chat/completions", json=CHAT, headers=GOOD),
        }


def test_a_route_prefix_skips_neither_the_key_nor_draining() -> None:
    import asyncio

    app = create_app(FakeEngine(), ServerConfig(api_key=API_KEY))
    answers = asyncio.run(_prefixed_calls(app))
    for name in ("models", "chat", "version"):
        assert assert_openai_error(answers[name], 401)["code"] == "invalid_api_key", name
    assert answers["health"].status_code == 200 and answers["keyed_chat"].status_code == 200
    app.state.lifecycle.start_draining()
    draining = asyncio.run(_prefixed_calls(app))
    assert assert_openai_error(draining["keyed_chat"], 503)["code"] == "server_shutting_down"
    assert draining["health"].status_code == 200


@pytest.mark.parametrize(
    ("path", "root_path"),
    [("/v1/models", ""), ("/api/v1/models", "/api"), ("/api", "/api"), ("/apix/v1", "/api"), ("/other/v1", "/api"), ("/", "/")],
)
def test_the_routed_path_is_the_routers(path: str, root_path: str) -> None:
    scope = {"type": "http", "path": path, "root_path": root_path}
    assert routed_path(scope) == get_route_path(scope)  # type: ignore[arg-type]


# ---------------------------------------------------------------- request bodies are JSON


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/json; charset=latin-1",
        "application/json; boundary=x",
        "text/json",
    ],
)
def test_a_body_not_declared_json_is_415(server: LiveServer, content_type: str | None) -> None:
    body = json.dumps(CHAT).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        response = httpx.post(f"{server.url}{path}", content=body, headers=headers)
        error = assert_openai_error(response, 415)
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"], path
    still_serving(server.url)


def test_two_content_types_are_415(server: LiveServer) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Type", "text/plain")]
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
    assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
)
def test_json_with_or_without_a_utf8_charset_is_read(server: LiveServer, content_type: str) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=json.dumps(CHAT).encode(), headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text


def test_without_the_key_the_content_type_is_not_even_looked_at(keyed: LiveServer) -> None:
    response = httpx.post(f"{keyed.url}/v1/chat/completions", content=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401


# ---------------------------------------------------------------- trusted hosts


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "[::2]"])
def test_an_untrusted_host_is_400(server: LiveServer, host: str) -> None:
    for method, path in (("GET", "/health"), ("POST", "/v1/chat/completions"), ("GET", "/playground")):
        response = httpx.request(method, f"{server.url}{path}", json=CHAT, headers={"Host": host})
        error = assert_openai_error(response, 400)
        assert error["code"] == "invalid_host" and "--allowed-hosts" in error["message"]
    still_serving(server.url)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}"])
def test_the_loopback_names_are_trusted(server: LiveServer, host: str) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Host": host.format(port=server.port)})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /health HTTP/1.0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    ],
)
def test_no_host_or_two_are_400(server: LiveServer, request_head: bytes) -> None:
    error = assert_raw_error(*raw_request(server.port, request_head), want=400)
    assert error["code"] == "invalid_host"
    still_serving(server.url)


def test_the_host_option_and_allowed_hosts_are_trusted() -> None:
    config = ServerConfig(host="box.lan", allowed_hosts=("api.example", "*.corp.example"))
    with live_server(create_app(FakeEngine(), config)) as running:
        for host, status in (
            ("box.lan:8000", 200),
            ("api.example", 200),
            ("a.corp.example", 200),
            ("a.b.corp.example", 200),
            ("corp.example", 400),
            ("api.example.evil", 400),
            ("localhost", 200),
        ):
            assert httpx.get(f"{running.url}/health", headers={"Host": host}).status_code == status, host
    with live_server(create_app(FakeEngine(), ServerConfig(allowed_hosts=("*",)))) as anyone:
        assert httpx.get(f"{anyone.url}/health", headers={"Host": "whatever.example"}).status_code == 200


# ---------------------------------------------------------------- docs off, /ready generic


def test_the_docs_are_off_by_default_and_no_page_loads_third_party_script(server: LiveServer) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert assert_openai_error(httpx.get(f"{server.url}{path}"), 404)["code"] == "not_found"
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200  # JSON, no script
    for path in ("/", "/playground", "/playground/playground.js", "/playground/playground.css"):
        assert "cdn.jsdelivr" not in httpx.get(f"{server.url}{path}", follow_redirects=True).text


def test_docs_turn_on_with_the_option_and_are_open_then() -> None:
    with live_server(create_app(FakeEngine(), ServerConfig(api_key=API_KEY, docs=True))) as running:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{running.url}{path}").status_code == 200, path
        assert httpx.get(f"{running.url}/version").status_code == 401  # the rest stays closed


def test_ready_does_not_tell_the_load_error_but_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEngine()
    fake.ready = False
    fake.load_error = OSError("cannot open /srv/secret-models/weights.bin")
    with caplog.at_level(logging.ERROR), live_server(create_app(fake, ServerConfig())) as running:
        for _ in range(3):
            response = httpx.get(f"{running.url}/ready")
            error = assert_openai_error(response, 503)
            assert error["message"] == MODEL_LOAD_FAILED_MESSAGE and "/srv" not in response.text
        assert httpx.get(f"{running.url}/health").status_code == 200
    logged = [r.getMessage() for r in caplog.records if "/srv/secret-models" in r.getMessage()]
    assert len(logged) == 1  # once, not at every probe


# ---------------------------------------------------------------- slow bodies, connections, server header


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    config = ServerConfig(body_read_timeout_s=0.5, log_level="warning")
    with serve(create_app(FakeEngine(), config), config) as running:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        )
        started = time.monotonic()
        status, headers, body = raw_request(running.port, head.encode() + b'{"messages": [')  # then nothing
        error = assert_raw_error(status, headers, body, want=408)
        assert error["code"] == "request_timeout" and headers.get("connection") == "close"
        assert time.monotonic() - started < 30  # the server cut it, not the client's timeout
        still_serving(running.url)


def test_beyond_max_connections_a_request_gets_503_and_no_server_header() -> None:
    config = ServerConfig(max_connections=3, log_level="warning")
    assert uvicorn_config(FastAPI(), config).limit_concurrency == 3
    with serve(create_app(FakeEngine(), config), config) as running:
        answer = httpx.get(f"{running.url}/health")
        assert answer.status_code == 200 and "server" not in answer.headers
        idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(3)]
        try:
            wait_until(lambda: httpx.get(f"{running.url}/health").status_code == 503, what="the connection limit")
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: httpx.get(f"{running.url}/health").status_code == 200, what="the connections to close")
        still_serving(running.url)


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry() -> None:
    """uvicorn closes an idle connection after 5 s by default, the same as httpx's (and so the OpenAI SDK's)
    pool expiry: a client then sends on a connection the server is closing and gets "server disconnected
    without sending a response". The server keeps idle connections longer (``--keep-alive-timeout``)."""
    config = ServerConfig(log_level="warning")
    assert uvicorn_config(FastAPI(), config).timeout_keep_alive == config.keep_alive_timeout_s > 15
    events: list[str] = []
    with (
        serve(create_app(FakeEngine(), config), config) as running,
        httpx.Client(base_url=running.url, limits=httpx.Limits(keepalive_expiry=60)) as client,
    ):
        assert client.get("/health").status_code == 200
        time.sleep(6)  # idle past uvicorn's default; the server must not have closed the connection
        answer = client.get("/health", extensions={"trace": lambda name, info: events.append(name)})
        assert answer.status_code == 200
        assert not any(name.startswith("connection.connect_tcp") for name in events), events  # the same connection
