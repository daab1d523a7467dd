"""The HTTP server's settings, parsed once by the CLI (or built directly by tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from amulet_core.method.preference_prompts import TEMPLATE, Placement
from server.reasoning_parsers import REASONING_PARSERS
from server.requests.limits import RequestLimits
from server.store.config import StoreConfig

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_READ_TIMEOUT_S = 60.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 75
"""Longer than the idle-pool expiry of common clients (httpx and the OpenAI SDK 5 s, aiohttp 15 s) and than a
cloud load balancer's idle timeout (60 s): the server never closes an idle connection at the moment the client
sends a request on it (which the client sees as "server disconnected without sending a response")."""
ANY_HOST = "*"


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP layer needs besides the engine.

    ``served_model_name`` None means "use the engine's model name". ``api_key`` None leaves the
    API open; ``extra_api_keys`` are further keys accepted alongside it (several lines of an
    ``--api-key-file``, for rotation). Keys are never logged (``repr`` leaves them out). An empty
    ``cors_origins`` turns CORS off.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    extra_api_keys: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    served_model_name: str | None = None
    log_level: str = "info"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S
    """A request body must arrive whole within this many seconds of the first read, else 408."""
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    """uvicorn's ``limit_concurrency``: beyond this many open connections (or running requests) a new request
    gets 503 at once; None: no limit."""
    keep_alive_timeout_s: int = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    """How long an idle keep-alive connection stays open (uvicorn's ``timeout_keep_alive``)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host header names answered besides localhost, 127.0.0.1, [::1] and ``host`` (``*``: any; ``*.example.com``:
    its subdomains). Others get 400: a web page cannot reach the server through a DNS name rebound to it."""
    allow_open_api: bool = False
    """Let ``amulet-server`` listen on an address other than loopback without an API key (checked by the CLI)."""
    docs: bool = False
    """Serve ``/docs`` (Swagger UI) and ``/redoc``, whose pages load their script from cdn.jsdelivr.net, and leave
    them and ``/openapi.json`` open without a key; off by default (``/openapi.json`` is then behind the key)."""
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    """The fan-out budget of one request and the size of the pool that renders and tokenizes requests."""
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    """Value of the Retry-After header on 429 (queue full) and 503 (not ready) answers."""
    tool_call_parser: str = "auto"
    """How tool calls are read from the model's text: ``hermes``, ``llama3_json`` or ``auto`` (from the chat template)."""
    reasoning_parser: str | None = None
    """How a reasoning model's thinking is told from its answer (``deepseek_r1``, ``qwen3``: ``<think>`` blocks,
    :mod:`server.reasoning_parsers`); None leaves the thinking in ``content``."""
    max_preferences: int = 4
    """Most preferences one request may combine (each is a context decoded with the answer)."""
    max_n: int = 8
    """Most choices (``n``) one request may ask for; each decodes its own sequences."""
    playground: bool = True
    """Serve the browser playground at ``/playground`` (``/`` redirects to it); ``--no-playground`` turns it off."""
    default_system_prompt: str = TEMPLATE
    """System message given to both contexts of a preference request whose conversation has none:
    ``template`` (the model's chat template's own default), ``paper``, ``none`` or the text itself
    (amulet_core.method.preference_prompts.resolve_default_system_prompt)."""
    preference_placement: Placement = Placement.END
    """Where a preference request's sentences go when it does not say (``"mode": "paper"`` keeps ``system``):
    ``end`` (the last user message, the contexts sharing the conversation before it; chosen by measured
    effect, README "Where the preference goes") or ``system`` (the first system message);
    ``--preference-placement``."""
    store: StoreConfig = field(default_factory=StoreConfig)
    """The database of stored responses (``--data-dir``, ``--database-url``, ``--response-ttl``); by default in memory."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        if not (math.isfinite(self.body_read_timeout_s) and self.body_read_timeout_s > 0):
            raise ValueError(f"body_read_timeout_s must be above 0, got {self.body_read_timeout_s}")
        if self.keep_alive_timeout_s < 1:
            raise ValueError(f"keep_alive_timeout_s must be at least 1, got {self.keep_alive_timeout_s}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if any(not name.strip() for name in self.allowed_hosts):
            raise ValueError("allowed_hosts must not hold an empty name")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be at least 0, got {self.drain_timeout_s}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS} or None, got {self.reasoning_parser!r}")
        if not 1 <= self.max_preferences <= 8:
            raise ValueError(f"max_preferences must be from 1 to 8, got {self.max_preferences}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable authentication)")
        if self.extra_api_keys and (self.api_key is None or not all(self.extra_api_keys)):
            raise ValueError("extra_api_keys need an api_key, and none of them may be empty")

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Every accepted key (none: the API is open)."""
        return () if self.api_key is None else (self.api_key, *self.extra_api_keys)
