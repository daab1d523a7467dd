"""ASGI layers that refuse a request before the app reads it: an untrusted Host, a body that is not JSON,
a body too large or too slow. Each answers with an OpenAI-shaped error (:func:`server.errors.send_error`).

* :class:`TrustedHosts`: 400 unless the ``Host`` header names this server (DNS-rebinding defence: a page on
  ``evil.example`` whose name is rebound to 127.0.0.1 sends ``Host: evil.example``).
* :class:`JsonContentType`: 415 for a request body (POST, PUT, PATCH) that is not ``application/json``. A
  web page can send a cross-origin ``text/plain`` or form POST without a CORS preflight; a JSON one needs
  the preflight, which the server answers only for ``--cors-origins``.
* :class:`RequestBodyLimits`: 413 for a body over the size limit (a declared Content-Length up front, a
  chunked body as it comes), 408 for one not whole within the read deadline (a slow sender otherwise holds
  a connection and a task for ever); the body is buffered and replayed to the app.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import ANY_HOST, ServerConfig
from server.errors import APIError, send_error

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_MEDIA_TYPE = "application/json"
UTF8_CHARSETS = frozenset({"utf-8", "utf8"})
_ECHO_LIMIT = 100
"""Characters of a refused header value quoted back in the error message."""


def host_name(value: str) -> str:
    """A Host header's (or a configured) name, lower case, without a port; IPv6 addresses in brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else "junk"
        return value[: end + 1] if not rest or rest.startswith(":") else value
    try:
        if ":" in value and ipaddress.ip_address(value).version == 6:  # a bare IPv6 address (--host ::1)
            return f"[{value}]"
    except ValueError:
        pass
    return value.rsplit(":", 1)[0] if ":" in value else value


def trusted_hosts(config: ServerConfig) -> frozenset[str] | None:
    """The Host names the server answers to (None: any, ``--allowed-hosts '*'``): the loopback names, the
    ``--host`` address and every ``--allowed-hosts`` name."""
    if ANY_HOST in config.allowed_hosts:
        return None
    return frozenset(host_name(name) for name in (*LOOPBACK_NAMES, config.host, *config.allowed_hosts))


def _quoted(value: bytes) -> str:
    return repr(value.decode("latin-1")[:_ECHO_LIMIT])


def _values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key.lower() == name]


class TrustedHosts:
    """400 for an HTTP request whose ``Host`` is missing, repeated or not in ``allowed`` (see the module docstring).

    ``allowed`` None lets any through; a name ``*.example.com`` allows that domain's subdomains."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str] | None) -> None:
        self.app = app
        names = None if allowed is None else frozenset(allowed)
        self._exact = None if names is None else frozenset(n for n in names if not n.startswith("*."))
        self._suffixes = () if names is None else tuple(n[1:] for n in names if n.startswith("*."))

    def _trusted(self, name: str) -> bool:
        return self._exact is None or name in self._exact or any(name.endswith(suffix) for suffix in self._suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._exact is None:
            await self.app(scope, receive, send)
            return
        hosts = _values(scope, b"host")
        if len(hosts) == 1 and self._trusted(host_name(hosts[0].decode("latin-1"))):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if len(hosts) == 1:
            message = (
                f"The Host header {_quoted(hosts[0])} does not name this server; an operator can allow the name "
                "with --allowed-hosts."
            )
        else:
            message = "Send exactly one Host header."
        await send_error(scope, receive, send, APIError(400, message, param=None, code="invalid_host"))


def json_media_type_error(values: list[bytes]) -> APIError | None:
    """Why a request body with these Content-Type headers is refused (415), or None for ``application/json``
    with at most a UTF-8 ``charset`` (JSON is UTF-8: RFC 8259)."""
    accepted = "Content-Type must be 'application/json' (optionally with '; charset=utf-8')"
    if len(values) != 1:
        reason = "this request has none" if not values else "this request has several"
        return APIError(415, f"{accepted}; {reason}.", code="unsupported_media_type")
    media_type, *parameters = values[0].decode("latin-1").split(";")
    valid = media_type.strip().lower() == JSON_MEDIA_TYPE
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() not in UTF8_CHARSETS:
            valid = False
    if valid:
        return None
    return APIError(415, f"{accepted}, got {_quoted(values[0])}.", code="unsupported_media_type")


class JsonContentType:
    """415 for a POST, PUT or PATCH whose body is not declared ``application/json`` (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            error = json_media_type_error(_values(scope, b"content-type"))
            if error is not None:
                await send_error(scope, receive, send, error)
                return
        await self.app(scope, receive, send)


class RequestBodyLimits:
    """Reads the whole body before the app runs: 413 over ``max_body_bytes``, 408 when it is not whole within
    ``read_timeout_s`` of the first read (see the module docstring). The app gets the buffered body, then the
    client's own events (a disconnect)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float | None = None) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.read_timeout_s = read_timeout_s

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the limit of {self.limit} bytes.", code="request_too_large")

    def _too_slow(self) -> APIError:
        message = f"The request body did not arrive within {self.read_timeout_s:g} s."
        return APIError(408, message, code="request_timeout", headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _values(scope, b"content-length")
        if declared and declared[0].isdigit() and int(declared[0]) > self.limit:
            await send_error(scope, receive, send, self._too_large())
            return
        try:
            async with asyncio.timeout(self.read_timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            await send_error(scope, receive, send, self._too_slow())
            return
        except _TooLarge:
            await send_error(scope, receive, send, self._too_large())
            return
        if body is not None:  # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                raise _TooLarge
            if not message.get("more_body", False):
                return b"".join(chunks)


class _TooLarge(Exception):
    pass


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the client's own events (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
