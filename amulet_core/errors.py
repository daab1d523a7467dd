"""Errors the core raises; the server maps each class to an HTTP status."""

from __future__ import annotations


class AmuletError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameterError(AmuletError, ValueError):
    """A request parameter is out of range or of the wrong kind (HTTP 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message

    def rename(self, name: str, alias: str) -> None:
        """Report this error under the request's own name ``alias`` of the parameter ``name`` (in place;
        an error about another parameter is left as it is)."""
        if self.param != name or alias == name:
            return
        self.param = alias
        self.message = self.message.replace(f"'{name}'", f"'{alias}'")
        self.args = (self.message,)


class ContextLengthExceededError(InvalidParameterError):
    """The prompt (plus the tokens asked for) does not fit the model's context (HTTP 400)."""

    code = "context_length_exceeded"


class EngineOverloadedError(AmuletError):
    """The engine's waiting queue is full; the caller should retry later (HTTP 429/503)."""


class EngineNotReadyError(AmuletError):
    """The model is not loaded yet, or the engine is shutting down (HTTP 503)."""


class EngineStalledError(EngineNotReadyError):
    """The engine stopped making progress (a step that never returns, or its worker thread died); the
    server refuses work and exits so that its supervisor restarts it (HTTP 503, code ``engine_stalled``)."""


class ModelLoadError(AmuletError):
    """A model could not be found or loaded; the message says what to do."""


class RequestFailedError(AmuletError):
    """Decoding of one request failed inside the engine; other requests are unaffected."""
