"""The API key check: every route but the open ones (:mod:`server.access`) needs ``Authorization: Bearer <key>``
or, as Anthropic's clients send it, ``x-api-key: <key>``.

Used by the server's app and, before anything is forwarded, by the Ray ingress (:mod:`amulet_ray.forwarding`).

* Deny by default: the routed path (less any route prefix) is matched against the open routes exactly.
* A request with more than one ``Authorization`` header (or more than one ``x-api-key``) is refused (400): which
  one counts would be up to whoever reads the headers, and a proxy and the server could read different ones. For
  the same reason a request with both headers must send the same key in each (else 400).
* The header is compared with every key in constant time (no early exit, so the timing tells neither
  which key matched nor how much of one did); keys are never logged.
* With several keys, the caller's tenant (:func:`tenant_id` of the key it sent, a stable id that is not the
  key) is set in the ASGI scope's state, ``scope["state"]["tenant"]`` (``request.state.tenant``;
  :func:`tenant_of`), for per-caller isolation such as salting the prefix cache. With one key (or none)
  there is no tenant: every caller is the same one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from server.access import routed_path
from server.errors import APIError, send_error

TENANT_STATE_KEY = "tenant"
"""Key of the caller's tenant id in ``scope["state"]`` (set only when several API keys are configured)."""
_TENANT_DOMAIN = b"amulet-serve tenant\x00"
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
_BEARER = b"Bearer "


def tenant_id(key: str) -> str:
    """A stable, non-secret id of an API key: 16 hex digits of SHA-256 over the key (domain-separated)."""
    return hashlib.sha256(_TENANT_DOMAIN + key.encode()).hexdigest()[:16]


def tenant_of(scope: Mapping[str, Any]) -> str | None:
    """The tenant :class:`ApiKeyAuth` set for this request; None with fewer than two keys or on an open route."""
    state = scope.get("state")
    return state.get(TENANT_STATE_KEY) if isinstance(state, dict) else None


class ApiKeyAuth:
    """Requires one of ``api_keys`` on every route not in ``open_routes`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], open_routes: frozenset[str]) -> None:
        if not api_keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self._open_routes = open_routes
        self._expected = tuple(f"Bearer {key}".encode() for key in api_keys)
        self._tenants = tuple(tenant_id(key) for key in api_keys) if len(api_keys) > 1 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and routed_path(scope) in self._open_routes):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: the API has none, and nothing unauthenticated gets in
            await send({"type": "websocket.close", "code": 1008})
            return
        given = _credential(scope["headers"])
        if isinstance(given, APIError):
            await send_error(scope, receive, send, given)
            return
        matched = _match(given, self._expected) if given is not None else None
        if matched is None:
            message = MISSING_KEY_MESSAGE if given is None else "Incorrect API key provided."
            await send_error(scope, receive, send, APIError(401, message, code="invalid_api_key", headers=UNAUTHORIZED_HEADERS))
            return
        if self._tenants is not None:
            scope.setdefault("state", {})[TENANT_STATE_KEY] = self._tenants[matched]
        await self.app(scope, receive, send)


MISSING_KEY_MESSAGE = "Missing API key: send it as 'Authorization: Bearer <key>' or as 'x-api-key: <key>'."


def _credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | APIError | None:
    """What the request authenticates with, as an ``Authorization`` value (``x-api-key: k`` reads ``Bearer k``); None
    without either header; the 400 APIError for a repeated header or two headers of different keys."""
    authorization: list[bytes] = []
    api_key: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            authorization.append(value)
        elif lowered == b"x-api-key":
            api_key.append(_BEARER + value)
    if len(authorization) > 1 or len(api_key) > 1:
        header = "Authorization" if len(authorization) > 1 else "x-api-key"
        message = f"Send one {header} header; this request has several."
        return APIError(400, message, code="duplicate_authorization_header")
    if authorization and api_key and not hmac.compare_digest(authorization[0], api_key[0]):
        message = "The Authorization and x-api-key headers carry different keys; send one key."
        return APIError(400, message, code="conflicting_api_keys")
    given = authorization or api_key
    return given[0] if given else None


def _match(given: bytes, expected: tuple[bytes, ...]) -> int | None:
    """The index of the one of ``expected`` that ``given`` equals, comparing with each (constant time per key,
    no early exit), or None."""
    matched: int | None = None
    for index, candidate in enumerate(expected):
        if hmac.compare_digest(given, candidate):
            matched = index
    return matched
