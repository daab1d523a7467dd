"""What admitting a request needs besides its body: the served model's name and limits, the server's
settings, where unknown fields are logged, and the tool-call parser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from server.config import ServerConfig
from server.protocol import GenerationFields
from server.requests.fields import check_choices, check_model
from server.requests.policy import UnknownFieldLog, apply_request_policy
from server.tool_parsers import ToolParser


class ModelLimits(Protocol):
    """The served model's sizes (an ``EngineClient`` has them; so does :class:`FixedLimits`)."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """May raise EngineNotReadyError while the model loads (only completions and detokenize read it)."""
        ...


@dataclass(frozen=True)
class FixedLimits:
    """Model limits known up front (the Ray ingress reads them from the configs and the tokenizer)."""

    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class Admission:
    """The server's side of admitting a request (the same for every request of one app).

    ``unknown_fields`` None: unknown fields are not logged (the Ray ingress renders every request a replica
    logs again). ``tool_parser`` gives the server's tool-call parser; it is only called for a request
    with tools."""

    model_name: str
    config: ServerConfig
    limits: ModelLimits
    tool_parser: Callable[[], ToolParser]
    unknown_fields: UnknownFieldLog | None = None

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.limits.vocab_size

    def check_common(self, body: BaseModel, model: str | None) -> None:
        """The model asked for, then the request policy (unsupported and unknown fields)."""
        check_model(model, self.model_name)
        apply_request_policy(body, self.unknown_fields)

    def check_generation(self, body: GenerationFields) -> None:
        """:meth:`check_common`, then ``n`` within ``--max-n``."""
        self.check_common(body, body.model)
        check_choices(body, self.config.max_n)
