"""The engine's public data types and the small interface the serving layer talks to.

The HTTP layer depends only on this module: it can run over the real engine
(:class:`amulet_core.engine.async_engine.AsyncEngine`) or over a fake one in tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from amulet_core.errors import ContextLengthExceededError, InvalidParameterError
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import ChatRenderer
from amulet_core.sampling.params import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class ThinkingSpan:
    """A reasoning model's thinking, between two special tokens: decoded without the method's contrast (each
    row's closed form with A = 1, the preference contexts' own distribution) and without the grammar, which
    both begin with the token after ``end_token_id``.

    ``open_at_start``: the prompt left the thinking open (its generation prompt ends with the start token);
    otherwise ``start_token_id`` as the first generated token opens it (None: only an open prompt does)."""

    end_token_id: int
    start_token_id: int | None = None
    open_at_start: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it: token ids of its context(s), method and sampling.

    ``prompt_ids`` is the context the answer continues: the first preference context for pref, la and
    amulet, the plain conversation for base. ``extra_prompt_ids`` are preference contexts 2..K
    (``method.weights`` gives K and their weights; empty for K = 1 and for base). ``contrast_prompt_ids`` is
    the contrast context, present exactly when the method has one (la and amulet). Raises
    InvalidParameterError naming ``messages`` (an empty prompt) or ``preference`` (contexts that do not
    match the method and its weights).
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    method: MethodSettings = field(default_factory=lambda: MethodSettings(method=Method.BASE))
    contrast_prompt_ids: tuple[int, ...] | None = None
    extra_prompt_ids: tuple[tuple[int, ...], ...] = ()
    cache_salt: str | None = None
    """The tenant's prefix-cache salt: the request reuses cached blocks only of requests of the same salt
    (None: the unsalted cache), and its ``cached_tokens`` count only those."""
    thinking: ThinkingSpan | None = None
    """Where a reasoning model's thinking is (None: the method and the grammar apply from the first token)."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidParameterError("messages", "The prompt is empty.")
        has_contrast = self.method.method.has_contrast
        if has_contrast != (self.contrast_prompt_ids is not None):
            needs = "a contrast context" if has_contrast else "no contrast context"
            raise InvalidParameterError("preference", f"Method '{self.method.method.value}' needs {needs}.")
        object.__setattr__(self, "extra_prompt_ids", tuple(tuple(ids) for ids in self.extra_prompt_ids))
        extra = 0 if self.method.method is Method.BASE else self.method.num_preferences - 1
        if len(self.extra_prompt_ids) != extra:
            raise InvalidParameterError(
                "preference",
                f"Method '{self.method.method.value}' with {len(self.method.weights) or 1} weight(s) needs {extra} extra "
                f"preference context(s), got {len(self.extra_prompt_ids)}.",
            )
        if any(not ids for ids in self.extra_prompt_ids):
            raise InvalidParameterError("preference", "A preference context is empty.")

    @classmethod
    def from_contexts(
        cls,
        request_id: str,
        contexts: Sequence[tuple[int, ...]],
        sampling: SamplingParams,
        method: MethodSettings,
        cache_salt: str | None = None,
        thinking: ThinkingSpan | None = None,
    ) -> GenerationRequest:
        """The request of ``contexts`` in :attr:`contexts`' order: the decoded one first, then preference
        contexts 2..K, then the contrast one when the method has one (la and amulet)."""
        k = 1 if method.method is Method.BASE else method.num_preferences
        return cls(
            request_id=request_id,
            prompt_ids=contexts[0],
            sampling=sampling,
            method=method,
            contrast_prompt_ids=contexts[-1] if method.method.has_contrast else None,
            extra_prompt_ids=tuple(contexts[1:k]),
            cache_salt=cache_salt,
            thinking=thinking,
        )

    @property
    def contexts(self) -> list[tuple[int, ...]]:
        """Token ids of every context: the decoded one first, then preference contexts 2..K, then the contrast one."""
        tail = [] if self.contrast_prompt_ids is None else [self.contrast_prompt_ids]
        return [self.prompt_ids, *self.extra_prompt_ids, *tail]

    def max_new_tokens(self, max_model_len: int) -> int:
        """The tokens this request may generate: ``sampling.max_tokens``, or all the room the longest
        context leaves when it is None. The one context-length rule: raises ContextLengthExceededError
        (param ``messages`` or ``max_tokens``) when a context leaves no room or asks for more than there is."""
        longest = max(len(ids) for ids in self.contexts)
        room = max_model_len - longest
        if room <= 0:
            raise ContextLengthExceededError(
                "messages",
                f"This model's maximum context length is {max_model_len} tokens, but the messages take {longest} "
                "tokens (with the preference applied). Shorten the messages.",
            )
        requested = self.sampling.max_tokens
        if requested is None:
            return room
        if requested > room:
            raise ContextLengthExceededError(
                "max_tokens",
                f"This model's maximum context length is {max_model_len} tokens, but {longest + requested} were "
                f"requested ({longest} in the messages, {requested} for the completion). Lower 'max_tokens' to {room} "
                "or less, or shorten the messages.",
            )
        return requested


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token under the distribution it was drawn from."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. ``prompt_tokens`` counts the decoded context once;
    ``base_prompt_tokens`` is what every other context cost on top: the extra preference contexts
    (2..K) and the contrast context, together. ``num_contexts`` is how many contexts were decoded
    (1 for base, K for pref, K + 1 for la and amulet)."""

    prompt_tokens: int
    completion_tokens: int
    base_prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    num_contexts: int = 1

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of_choices(cls, usages: Sequence[Usage]) -> Usage:
        """The usage of n choices of one prompt (OpenAI's rule): the prompt counted once (the first
        choice's, which paid for it, with its other contexts and their count), the completions summed."""
        first = usages[0]
        return cls(
            prompt_tokens=first.prompt_tokens,
            completion_tokens=sum(u.completion_tokens for u in usages),
            base_prompt_tokens=first.base_prompt_tokens,
            cached_prompt_tokens=first.cached_prompt_tokens,
            num_contexts=first.num_contexts,
        )


@dataclass(frozen=True)
class RequestTimings:
    """Engine-side times of one request, in seconds: waiting in the queue, and its first step."""

    queue_s: float
    prefill_s: float


@dataclass(frozen=True)
class GenerationOutput:
    """One event of a request's stream: new tokens and their text, and finally the finish.

    A request that ended with finish reason ``"error"`` says why in ``error`` (for the server's log). When its own
    input made it fail (its grammar ran past llguidance's limits while generating: a
    :class:`~amulet_core.errors.GrammarLimitExceededError`), ``client_error`` is the error to answer the client
    with (a 400 naming the field at fault); without one the engine failed it (a server error)."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    timings: RequestTimings | None = None
    client_error: InvalidParameterError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for health and metrics."""

    running_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    steps: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineClient(Protocol):
    """What the serving layer needs from an engine: generation, its state, and its :attr:`renderer`."""

    model_name: str

    @property
    def max_model_len(self) -> int:
        """Longest context in tokens (prompt and answer of each context); may raise EngineNotReadyError
        until the model is loaded (it is sized with the KV cache from the memory the weights leave)."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def load_error(self) -> BaseException | None:
        """Why the model failed to load, or None (still loading, or loaded)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output layer: token ids run from 0 to ``vocab_size - 1``."""
        ...

    @property
    def renderer(self) -> ChatRenderer:
        """The model's chat template and tokenizer (:class:`~amulet_core.model.chat_template.ChatRenderer`);
        raises EngineNotReadyError until the model is loaded."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs. Raises EngineOverloadedError before the first output when the
        queue is full. Closing the iterator early aborts the request and frees its KV."""
        ...

    def stats(self) -> EngineStats: ...
