"""What the HTTP tests share: a one-line conversation, a function tool, the API key they configure, and the OpenAI
error shape."""

from __future__ import annotations

from typing import Any

import httpx

USER = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
"""A chat-completions function tool with one required string argument."""
API_KEY = "sk-test-secret-7f3a9c"
"""The key a test server is configured with (distinctive, so a leak of it into a log or an answer is found)."""
WRONG_KEY = "sk-wrong-guess-0000"
IN_PROCESS_HOST = "testserver"
"""The Host name Starlette's TestClient and schemathesis's ASGI client send: an app they call in-process trusts it
only when its config says so (``ServerConfig(allowed_hosts=(IN_PROCESS_HOST,))``), as a deployment names its own."""


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The error object, after checking the status (any 4xx when ``status`` is None) and the exact OpenAI shape
    (no traceback); a server error (5xx) also names its request id, the one in the ``x-request-id`` header."""
    assert 400 <= response.status_code < 500 if status is None else response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    if error.get("type") == "server_error" and "x-request-id" in response.headers:
        assert error.pop("request_id") == response.headers["x-request-id"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


def assert_no_leak(response: httpx.Response, *secrets: str) -> None:
    """None of ``secrets`` is in the body or a header, and the body carries no traceback."""
    for secret in secrets:
        assert secret not in response.text
        assert all(secret not in value for value in response.headers.values())
    assert "Traceback" not in response.text and 'File "' not in response.text
