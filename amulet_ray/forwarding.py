"""The ingress's ASGI app: read a request, key it, forward it unchanged to a replica, relay the answer.

Nothing of the API is implemented here: every route is the replica's (``amulet-server``'s own app). The
ingress adds only what a second hop needs:

* the server's own guards, before anything is read, keyed or forwarded (:func:`ingress_app`): trusted Host
  names, the API key (deny by default, on the routed path: the same open routes as the server, whatever
  the Ray ``route_prefix``), a JSON content type, the body's size limit and read deadline; a request
  refused there never reaches a replica (each replica's app checks them again);
* the routing key (:class:`~amulet_ray.prefix.PrefixKeyer`), unless the routing is ``pow2`` (the
  ``--ray-routing`` default, or the request's ``x-amulet-routing`` header);
* a clean end when the replica dies mid-request: before the answer has started, a 503 OpenAI error
  (``replica_failed``, ``Retry-After``); once a stream has started, an error event and ``[DONE]``, as the
  server ends a stream that fails (a Messages stream: Anthropic's ``error`` event); the failure is logged under
  the request id the client sees;
* ``/metrics`` is refused (404): it would show one replica picked at random; each replica serves its own
  (:mod:`amulet_ray.replica_metrics`).

Request ids come from the server's own middleware too. No Ray here: the replica is reached through ``call_replica``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amulet_ray.asgi_bridge import ForwardedRequest, header
from amulet_ray.config import ROUTING_HEADER, ROUTING_POW2, ROUTING_PREFIX
from amulet_ray.prefix import PrefixKeyer
from server.access import open_routes, routed_path
from server.anthropic.errors import is_messages_route, stream_error_event
from server.app import cors_options
from server.auth import ApiKeyAuth
from server.config import ServerConfig
from server.errors import SERVER_ERROR, APIError, describe_exception, error_payload, send_error
from server.http_guards import JsonContentType, RequestBodyLimits, TrustedHosts, trusted_hosts
from server.request_id import REQUEST_ID_HEADER, RequestIdMiddleware, request_id_of
from server.serving_choices import sse

logger = logging.getLogger(__name__)

REPLICA_FAILED = "replica_failed"
REPLICA_FAILED_MESSAGE = "The replica serving this request stopped before its answer was complete; retry the request."
METRICS_PATH = "/metrics"

ReplicaCall = Callable[[ForwardedRequest], AsyncIterator[list[Message]]]
"""Send a forwarded request to a replica; iterate its answer's ASGI messages (a Ray streaming handle call)."""


def replica_failed(retry_after_s: int) -> APIError:
    return APIError(
        503, REPLICA_FAILED_MESSAGE, type=SERVER_ERROR, code=REPLICA_FAILED, headers={"Retry-After": str(retry_after_s)}
    )


def wants_prefix_routing(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], default: str) -> bool:
    """Whether a request is routed by prefix: its ``x-amulet-routing`` header if valid, else ``default``."""
    asked = header(headers, ROUTING_HEADER.encode())
    choice = asked.decode("latin-1").strip().lower() if asked is not None else default
    return (choice if choice in (ROUTING_PREFIX, ROUTING_POW2) else default) == ROUTING_PREFIX


class ForwardingApp:
    """The ASGI app of the ingress (see the module docstring). ``keyer`` None: no prefix routing at all."""

    def __init__(
        self,
        call_replica: ReplicaCall,
        keyer: PrefixKeyer | None,
        default_routing: str,
        retry_after_s: int,
    ) -> None:
        self._call_replica = call_replica
        self._keyer = keyer
        self._default_routing = default_routing
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        root_path: str = scope.get("root_path", "")
        route = routed_path(scope)
        if route == METRICS_PATH:
            message = "Behind Ray Serve each replica serves its own metrics on its own port (--ray-metrics-port)."
            await send_error(scope, receive, send, APIError(404, message, code="not_found"))
            return
        body = await _read_body(receive)
        if body is None:  # the client left while sending
            return
        chain: tuple[int, ...] = ()
        keyer = self._keyer
        if keyer is not None and wants_prefix_routing(scope["headers"], self._default_routing):
            chain = await keyer.chain(scope["method"], route, body)
        client = scope.get("client")
        forwarded = ForwardedRequest(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=tuple((bytes(k), bytes(v)) for k, v in scope["headers"]),
            body=body,
            client=(str(client[0]), int(client[1])) if client else None,
            root_path=root_path,
            prefix_chain=chain,
        )
        await self._relay(forwarded, scope, receive, send)

    async def _relay(self, forwarded: ForwardedRequest, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the replica's answer on; a failure of the replica (not of ``send``: the client) ends it cleanly."""
        answer = self._call_replica(forwarded)
        batches = aiter(answer)
        held: Message | None = None  # a JSON answer's start, sent with its first body (so a failure between is a 503)
        sent_start = streaming = done = False
        request_id = request_id_of(scope)
        try:
            while True:
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # the replica died, or Ray could not reach it
                    if not done:  # (after a whole answer: the app raised past its own 500, logged there)
                        await self._failed(exc, request_id, sent_start, streaming, scope, receive, send)
                    return
                for message in batch:
                    if message["type"] == "http.response.start":
                        headers = message.get("headers", [])
                        streaming = (header(headers, b"content-type") or b"").startswith(b"text/event-stream")
                        request_id = (header(headers, REQUEST_ID_HEADER.encode()) or b"").decode() or request_id
                        if not streaming:
                            held = message
                            continue
                    elif message["type"] == "http.response.body":
                        if held is not None:
                            await send(held)
                            held = None
                        done = not message.get("more_body", False)
                    sent_start = True
                    await send(message)
            if held is not None:  # an answer without a body message
                await send(held)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                done = True
        finally:
            cancel = getattr(answer, "cancel", None)
            if not done and callable(cancel):
                cancel()  # the client left (or the replica failed): stop the replica's work

    async def _failed(
        self,
        exc: Exception,
        request_id: str | None,
        sent_start: bool,
        streaming: bool,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """End an answer whose replica failed: a 503 before it started, an error event and [DONE] in a stream."""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        logger.error("Request %s: the replica failed (%s: %s)", request_id, type(exc).__name__, reason)
        error = replica_failed(self._retry_after_s)
        if not sent_start:
            await send_error(scope, receive, send, error)
        elif streaming:
            payload = error_payload(describe_exception(error).info, request_id)
            # a Messages stream ends as Anthropic's do (an error event, no [DONE]); the others as the server's chat
            event = stream_error_event(payload) if is_messages_route(scope) else sse(payload) + sse("[DONE]")
            await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
        else:  # a JSON answer cut after its first bytes: nothing valid can follow them
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Any = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def ingress_app(app: ForwardingApp, config: ServerConfig) -> ASGIApp:
    """``app`` inside the server's own guards, in the server's order (see the module docstring), and its
    request-id middleware (an answer the replica gave keeps the replica's ``x-request-id``; one the ingress
    gives gets its own, which its log line names)."""
    guarded: ASGIApp = JsonContentType(RequestBodyLimits(app, config.max_body_bytes, config.body_read_timeout_s))
    if config.api_keys:
        guarded = ApiKeyAuth(guarded, config.api_keys, open_routes(config))
    if config.cors_origins:  # preflights are answered here, without the key, as the server answers them
        guarded = CORSMiddleware(guarded, **cors_options(config))
    return RequestIdMiddleware(TrustedHosts(guarded, trusted_hosts(config)))
