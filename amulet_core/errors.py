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

    def __reduce__(self) -> tuple[type[InvalidParameterError], tuple[str, str]]:
        return (type(self), (self.param, self.message))  # pickles (its ``__init__`` takes two arguments)


class ContextLengthExceededError(InvalidParameterError):
    """The prompt (plus the tokens asked for) does not fit the model's context (HTTP 400)."""

    code = "context_length_exceeded"


class GrammarLimitExceededError(InvalidParameterError):
    """A request's grammar compiled, then failed while its answer was generated: it ran past llguidance's limits
    (an Earley row of more items than allowed, a lexer out of fuel ...), or llguidance failed on it. Only that
    request ends (HTTP 400, code ``grammar_limit_exceeded``, ``param`` the field the grammar came from)."""

    code = "grammar_limit_exceeded"


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


def is_rust_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a Rust panic that a PyO3 extension (llguidance, tokenizers) raised:
    ``pyo3_runtime.PanicException``, a BaseException, not an Exception. Each extension has its own class of that
    name, so it is known by its name. A panic in a per-request call fails that request, never the engine."""
    cls = type(exc)
    return cls.__name__ == "PanicException" and cls.__module__ == "pyo3_runtime"


def is_request_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by work done for one request, fails that request alone: any Exception or a Rust
    panic (:func:`is_rust_panic`); never KeyboardInterrupt, SystemExit, CancelledError and the like."""
    return isinstance(exc, Exception) or is_rust_panic(exc)
