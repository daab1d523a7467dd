"""The FastAPI application: thin routes over the serving classes, plus auth, body-size, draining and CORS layers.

Everything is built inside :func:`create_app`; there is no module-level app or state.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amulet_core.engine.protocol import EngineClient
from amulet_core.errors import EngineNotReadyError
from server.config import ServerConfig
from server.errors import SERVER_ERROR, APIError, describe_exception, error_response, install_error_handlers, send_error
from server.lifecycle import LifecycleMiddleware, ServerLifecycle, draining_error
from server.observer import NullObserver, RequestObserver
from server.playground import mount_playground
from server.protocol import ChatCompletionRequest
from server.protocol_answers import ErrorResponse, ModelCard, ModelList
from server.protocol_completions import CompletionRequest
from server.protocol_tokenize import DetokenizeRequest, TokenizeRequest, VersionResponse
from server.request_id import REQUEST_ID_HEADER, RequestIdMiddleware, request_id_of
from server.requests.policy import UnknownFieldLog
from server.serving_chat import OpenAIServingChat
from server.serving_completions import OpenAIServingCompletion
from server.serving_tokenize import OpenAIServingTokenization

RequestT = TypeVar("RequestT", bound=BaseModel)


def package_version() -> str:
    """This server's version (the installed distribution's, or the source tree's when not installed)."""
    try:
        return distribution_version("amulet-serve")
    except PackageNotFoundError:
        return "0+unknown"


PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")
"""Only the API needs the key; /health, /ready, /version, /metrics, the docs and the playground page stay open
(as in vLLM; the page's own API calls send the key the user types)."""

_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
HAND_PARSED: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)
"""Request models of the routes that parse their bodies by hand (see ``parse_body``)."""


def _openapi_extra(model: type[BaseModel]) -> dict[str, Any]:
    """The request body and error answers of a hand-parsed route, for /openapi.json."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        },
        "responses": _ERROR_RESPONSES,
    }


_ERROR_RESPONSES: dict[str, Any] = {
    str(status): {"description": description, "content": _ERROR_CONTENT}
    for status, description in (
        (400, "Invalid request (OpenAI error object)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full; see Retry-After"),
        (500, "Generation failed"),
        (503, "Model loading or server shutting down; see Retry-After"),
    )
}


async def parse_body(model: type[RequestT], request: Request) -> RequestT:
    """The request body as ``model``, parsed strictly from JSON whatever the content type (curl -d sends
    form encoding by default); pydantic's errors go through the same 400 handler as every invalid request."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request model of the hand-parsed chat route and the error object."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models: tuple[type[BaseModel], ...] = (*HAND_PARSED, ErrorResponse)
    for model in models:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    return schema


def create_app(
    engine: EngineClient,
    config: ServerConfig,
    observer: RequestObserver | None = None,
    *,
    lifespan: Callable[[FastAPI], Any] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``. ``lifespan`` lets the CLI start and drain the engine."""
    model_name = config.served_model_name or engine.model_name
    observer = observer or NullObserver()
    unknown_fields = UnknownFieldLog()
    chat = OpenAIServingChat(engine, model_name, config, observer, unknown_fields)
    completions = OpenAIServingCompletion(engine, model_name, config, observer, unknown_fields)
    tokenization = OpenAIServingTokenization(engine, model_name, config, observer, unknown_fields)
    app = FastAPI(title="Amulet Serve", summary="OpenAI-compatible API with Amulet preference decoding", lifespan=lifespan)
    install_error_handlers(app, config.retry_after_s)
    lifecycle = ServerLifecycle()
    app.state.lifecycle = lifecycle

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Liveness: 200 while the process serves HTTP, loaded model or not; 503 with the reason once the
        engine has stalled or its worker died (the process then exits for its supervisor to restart it)."""
        if lifecycle.engine_failure is not None:
            message = f"The engine failed: {lifecycle.engine_failure}."
            unhealthy = APIError(503, message, type=SERVER_ERROR, code="engine_stalled")
            return error_response(describe_exception(unhealthy), request_id_of(request.scope))
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    @app.get("/health/ready")
    async def ready(request: Request) -> Response:
        """Readiness: 503 until the model is loaded (and again while shutting down)."""
        request_id = request_id_of(request.scope)
        if lifecycle.draining:
            return error_response(describe_exception(draining_error(config.retry_after_s)), request_id)
        if not engine.ready:
            failed = engine.load_error
            message = f"The model failed to load: {failed}" if failed is not None else "The model is not loaded yet."
            not_ready = EngineNotReadyError(message)
            return error_response(describe_exception(not_ready, config.retry_after_s), request_id)
        return JSONResponse({"status": "ready", "model": model_name})

    def model_card() -> ModelCard:
        """The served model; its ``max_model_len`` is null while the model loads (the engine sizes it then)."""
        try:
            max_model_len: int | None = engine.max_model_len
        except EngineNotReadyError:
            max_model_len = None
        return ModelCard(id=model_name, max_model_len=max_model_len)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[model_card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card().model_dump()

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return VersionResponse(version=package_version()).model_dump()

    @app.post("/v1/chat/completions", openapi_extra=_openapi_extra(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await chat.create(await parse_body(ChatCompletionRequest, request), request)

    @app.post("/v1/completions", openapi_extra=_openapi_extra(CompletionRequest))
    async def text_completions(request: Request) -> Response:
        return await completions.create(await parse_body(CompletionRequest, request), request)

    @app.post("/tokenize", openapi_extra=_openapi_extra(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        answer = await tokenization.tokenize(await parse_body(TokenizeRequest, request))
        return answer.model_dump(exclude_none=True)

    @app.post("/detokenize", openapi_extra=_openapi_extra(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        return (await tokenization.detokenize(await parse_body(DetokenizeRequest, request))).model_dump()

    if config.playground:
        mount_playground(app)

    app.add_middleware(BodySizeLimit, max_body_bytes=config.max_body_bytes)
    if config.api_keys:
        app.add_middleware(ApiKeyAuth, api_keys=config.api_keys)
    app.add_middleware(
        LifecycleMiddleware, lifecycle=lifecycle, refused_prefixes=PROTECTED_PREFIXES, retry_after_s=config.retry_after_s
    )
    app.add_middleware(RequestIdMiddleware)  # outside every layer that may answer on its own
    if config.cors_origins:  # added last, so outermost: preflights never need the key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
        )
    return app


class ApiKeyAuth:
    """Requires ``Authorization: Bearer <key>`` under /v1 with any of ``api_keys`` (several during a rotation).

    The header is compared with every key in constant time (no early exit, so the timing tells neither
    which key matched nor how much of one did); keys are never logged."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        if not api_keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self._expected = tuple(f"Bearer {key}".encode() for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None and _matches_any(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = "Missing API key: send it as 'Authorization: Bearer <key>'." if given is None else "Incorrect API key provided."
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await send_error(scope, receive, send, error)


def _matches_any(given: bytes, expected: tuple[bytes, ...]) -> bool:
    """Whether ``given`` equals one of ``expected``, comparing with each (constant time per key, no early exit)."""
    matched = False
    for candidate in expected:
        matched |= hmac.compare_digest(given, candidate)
    return matched


class BodySizeLimit:
    """Refuses request bodies over ``max_body_bytes`` with 413, before the app reads them.

    A declared Content-Length is checked up front; a chunked body is read up to the limit and
    replayed to the app, so nothing bigger than the limit is ever held in memory.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the limit of {self.limit} bytes.", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_error(scope, receive, send, self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await send_error(scope, receive, send, self._too_large())
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


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
