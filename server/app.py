"""The FastAPI application: thin routes over the serving classes, inside the layers that guard them.

Everything is built inside :func:`create_app`; there is no module-level app or state. The layers, outermost
first: request ids; trusted Host names (:mod:`server.http_guards`); CORS when configured (so preflights never
need the key); draining and the in-flight count (:mod:`server.lifecycle`); the API key, deny by default
(:mod:`server.auth`, :mod:`server.access`); a JSON content type on request bodies; the body's size and read
deadline. ``/docs`` and ``/redoc`` (third-party script) are served only with ``docs`` on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from amulet_core.engine.protocol import EngineClient
from amulet_core.errors import EngineNotReadyError
from server.access import open_routes
from server.anthropic.errors import COUNT_TOKENS_PATH, MESSAGES_PATH
from server.anthropic.openapi import count_tokens_openapi_extra, messages_openapi_extra
from server.anthropic.protocol import CountTokensRequest, MessagesRequest
from server.anthropic.serving import AnthropicServingMessages
from server.auth import ApiKeyAuth
from server.config import ServerConfig
from server.errors import SERVER_ERROR, APIError, describe_exception, error_response, install_error_handlers
from server.http_guards import JsonContentType, RequestBodyLimits, TrustedHosts, trusted_hosts
from server.lifecycle import LifecycleMiddleware, ServerLifecycle, draining_error
from server.observer import NullObserver, RequestObserver
from server.playground import mount_playground
from server.profiles.protocol import ProfileCreate, ProfileUpdate
from server.profiles.routes import mount_preference_profiles
from server.profiles.service import PreferenceProfiles
from server.protocol import ChatCompletionRequest
from server.protocol_answers import ErrorResponse, ModelCard, ModelList
from server.protocol_completions import CompletionRequest
from server.protocol_tokenize import DetokenizeRequest, TokenizeRequest, VersionResponse
from server.request_body import parse_body
from server.request_id import REQUEST_ID_HEADER, RequestIdMiddleware, request_id_of
from server.requests.policy import UnknownFieldLog
from server.requests.preparation import PreparationPool
from server.responses.routes import mount_responses
from server.responses.serving import OpenAIServingResponses
from server.serving_chat import OpenAIServingChat
from server.serving_completions import OpenAIServingCompletion
from server.serving_tokenize import OpenAIServingTokenization
from server.store.lifespan import store_lifespan
from server.store.profiles import ProfileStore
from server.store.responses import open_response_store

logger = logging.getLogger(__name__)
MODEL_LOAD_FAILED_MESSAGE = "The model failed to load; the server log has the details."


def package_version() -> str:
    """This server's version (the installed distribution's, or the source tree's when not installed)."""
    try:
        return distribution_version("amulet-serve")
    except PackageNotFoundError:
        return "0+unknown"


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
HAND_PARSED: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
    ProfileCreate,
    ProfileUpdate,
)
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
        (408, "Request body not received in time"),
        (413, "Request body too large"),
        (415, "Request body not declared application/json"),
        (429, "Queue full; see Retry-After"),
        (500, "Generation failed"),
        (503, "Model loading or server shutting down; see Retry-After"),
    )
}


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
    pool = PreparationPool(config.request_limits, config.retry_after_s)  # one for every endpoint
    response_store = open_response_store(config.store)  # opened at start-up, closed at shutdown (store_lifespan)
    profiles = PreferenceProfiles(ProfileStore(response_store.database), config)  # on the same database
    chat = OpenAIServingChat(engine, model_name, config, observer, unknown_fields, preparation=pool, profiles=profiles)
    completions = OpenAIServingCompletion(
        engine, model_name, config, observer, unknown_fields, preparation=pool, profiles=profiles
    )
    tokenization = OpenAIServingTokenization(engine, model_name, config, observer, unknown_fields, preparation=pool)
    responses = OpenAIServingResponses(chat, response_store)
    app = FastAPI(
        title="Amulet Serve",
        summary="OpenAI-compatible API with Amulet preference decoding",
        lifespan=store_lifespan(lifespan, response_store.database),
        docs_url="/docs" if config.docs else None,
        redoc_url="/redoc" if config.docs else None,
    )
    # An app dropped without its lifespan's shutdown (tests, a failed start-up) ends its threads once collected
    # (FastAPI's caches keep its routes, and with them the pool and the database, alive). The finalizers take
    # no lock another thread's code may hold and wait for nothing: they run inside whatever allocation set off
    # the collection, possibly within a ThreadPoolExecutor.submit holding concurrent.futures' global lock.
    weakref.finalize(app, pool.close)  # shutdown(wait=False): the pool executor's own lock only
    weakref.finalize(app, response_store.database.release)
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

    load_error_logged = False

    @app.get("/ready")
    @app.get("/health/ready")
    async def ready(request: Request) -> Response:
        """Readiness: 503 until the model is loaded (and again while shutting down)."""
        request_id = request_id_of(request.scope)
        if lifecycle.draining:
            return error_response(describe_exception(draining_error(config.retry_after_s)), request_id)
        if not engine.ready:
            failed = engine.load_error
            if failed is not None:  # its text (paths, library messages) goes to the log, not to callers
                nonlocal load_error_logged
                if not load_error_logged:
                    load_error_logged = True
                    logger.error("Not ready: the model failed to load: %s: %s", type(failed).__name__, failed)
            message = MODEL_LOAD_FAILED_MESSAGE if failed is not None else "The model is not loaded yet."
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
        return await chat.create(await parse_body(ChatCompletionRequest, request, pool), request)

    @app.post("/v1/completions", openapi_extra=_openapi_extra(CompletionRequest))
    async def text_completions(request: Request) -> Response:
        return await completions.create(await parse_body(CompletionRequest, request, pool), request)

    anthropic_messages = AnthropicServingMessages(chat)  # Anthropic's Messages API, over the chat endpoint

    @app.post(MESSAGES_PATH, openapi_extra=messages_openapi_extra())
    async def messages(request: Request) -> Response:
        return await anthropic_messages.create(await parse_body(MessagesRequest, request, pool), request)

    @app.post(COUNT_TOKENS_PATH, openapi_extra=count_tokens_openapi_extra())
    async def count_message_tokens(request: Request) -> dict[str, int]:
        return await anthropic_messages.count_tokens(await parse_body(CountTokensRequest, request, pool), request)

    @app.post("/tokenize", openapi_extra=_openapi_extra(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        answer = await tokenization.tokenize(await parse_body(TokenizeRequest, request, pool))
        return answer.model_dump(exclude_none=True)

    @app.post("/detokenize", openapi_extra=_openapi_extra(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        return (await tokenization.detokenize(await parse_body(DetokenizeRequest, request, pool))).model_dump()

    mount_responses(app, responses)
    mount_preference_profiles(app, profiles)

    if config.playground:
        mount_playground(app)

    add_guards(app, config, lifecycle)
    return app


def cors_options(config: ServerConfig) -> dict[str, Any]:
    """Starlette's ``CORSMiddleware`` options for ``--cors-origins`` (the server's, and the Ray ingress's)."""
    return {
        "allow_origins": list(config.cors_origins),
        "allow_methods": ["*"],
        "allow_headers": ["*"],
        "expose_headers": [REQUEST_ID_HEADER],
    }


def add_guards(app: FastAPI, config: ServerConfig, lifecycle: ServerLifecycle) -> None:
    """The layers around the routes (see the module docstring); each ``add_middleware`` wraps the ones before it."""
    routes = open_routes(config)
    app.add_middleware(RequestBodyLimits, max_body_bytes=config.max_body_bytes, read_timeout_s=config.body_read_timeout_s)
    app.add_middleware(JsonContentType)
    if config.api_keys:
        app.add_middleware(ApiKeyAuth, api_keys=config.api_keys, open_routes=routes)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle, open_routes=routes, retry_after_s=config.retry_after_s)
    if config.cors_origins:  # outside the key check: preflights never need the key
        app.add_middleware(CORSMiddleware, **cors_options(config))
    app.add_middleware(TrustedHosts, allowed=trusted_hosts(config))
    app.add_middleware(RequestIdMiddleware)  # outside every layer that may answer on its own
