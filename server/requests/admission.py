"""What admitting a request needs besides its body: the served model's name and limits, the server's
settings, where unknown fields are logged, the tool-call parser, the per-request limits and the pool that
prepares requests off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel

from amulet_core.errors import InvalidParameterError
from amulet_core.method.settings import MethodSettings
from server.config import ServerConfig
from server.errors import APIError
from server.protocol import GenerationFields
from server.requests.limits import RequestLimits, check_fanout
from server.requests.policy import UnknownFieldLog, apply_request_policy
from server.requests.preparation import PreparationPool
from server.tool_parsers import ToolParser

T = TypeVar("T")


def check_model(requested: str | None, served: str) -> None:
    """404 for a model this server does not serve (absent means the served one)."""
    if requested and requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}'.",
            param="model",
            code="model_not_found",
        )


def check_choices(body: GenerationFields, max_n: int) -> None:
    """``n`` within the server's limit."""
    n = body.num_choices
    if not 1 <= n <= max_n:
        raise InvalidParameterError("n", f"'n' must be from 1 to {max_n} (this server's --max-n), got {n}.")


@dataclass(frozen=True)
class Admission:
    """The server's side of admitting a request (the same for every request of one app).

    ``unknown_fields`` None: unknown fields are not logged (the Ray ingress renders every request a replica
    logs again). ``tool_parser`` gives the server's tool-call parser; it is only called for a request
    with tools. ``limits``: the fan-out budget (:meth:`check_fanout`). ``preparation``: where rendering and
    tokenizing run (:meth:`off_loop`); None runs them on asyncio's threads."""

    model_name: str
    config: ServerConfig
    max_model_len: Callable[[], int]
    """The model's context length in tokens, asked for per request: the engine sizes it with its KV cache once the
    model is loaded, and may raise EngineNotReadyError until then."""
    vocab_size: Callable[[], int]
    """The model's vocabulary size (token ids run below it); may raise EngineNotReadyError while the model
    loads: only the requests that carry token ids ask for it."""
    tool_parser: Callable[[], ToolParser]
    unknown_fields: UnknownFieldLog | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    preparation: PreparationPool | None = None

    def off_loop(self, work: Callable[[], T]) -> Awaitable[T]:
        """``work()`` (rendering, tokenizing) off the event loop, to be awaited: on the preparation pool (a 429
        APIError at once when it is full), or on a thread of asyncio's when there is none."""
        if self.preparation is not None:
            return asyncio.wrap_future(self.preparation.submit(work))
        return asyncio.to_thread(work)

    def check_fanout(self, n: int, *, prompts: int = 1, method: MethodSettings | None = None, source: str = "preference") -> None:
        """Refuse a request of ``prompts`` x ``n`` x the contexts ``method`` decodes (1 without) over the fan-out
        budget (:func:`~server.requests.limits.check_fanout`; ``source``: the field the contexts come from)."""
        contexts = method.num_contexts if method is not None else 1
        check_fanout(self.limits, n=n, contexts=contexts, prompts=prompts, source=source)

    def check_common(self, body: BaseModel, model: str | None) -> None:
        """The model asked for, then the request policy (unsupported and unknown fields)."""
        check_model(model, self.model_name)
        apply_request_policy(body, self.unknown_fields)

    def check_generation(self, body: GenerationFields) -> None:
        """:meth:`check_common`, then ``n`` within ``--max-n``."""
        self.check_common(body, body.model)
        check_choices(body, self.config.max_n)
