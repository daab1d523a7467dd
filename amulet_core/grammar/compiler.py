"""Constrained decoding (structured outputs) with llguidance: grammars and their cache.

A request asks for a grammar with a :class:`GrammarSpec` (JSON object, JSON schema, regex, a choice of
strings, or an llguidance Lark grammar). A :class:`GrammarCompiler` per model turns specs into matchers:
it holds llguidance's view of the tokenizer (built once: it is slow to build) and an LRU cache of
compiled grammars, so a second request with the same spec neither validates nor compiles again (a fresh
matcher is a copy of the cached, never-used one, far cheaper than compiling a large schema). Each
request gets its own :class:`GrammarMatcher`; every step ``grammar.masks.grammar_masks`` builds the
masks of all constrained rows at once (only the filling of each row's bitmask is per row, in
llguidance's Rust), and ``GrammarMasks.apply_`` masks and renormalises those rows.

JSON grammars are compact (``JSON_OPTIONS``): no whitespace outside strings, ``,`` and ``:`` as
separators, as OpenAI's structured outputs come (llguidance's default allows any whitespace between
tokens, which small models emit at length). A schema's own ``"x-guidance"`` settings override these
(e.g. ``{"whitespace_flexible": true}``).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import llguidance
import torch

from amulet_core.errors import GrammarLimitExceededError, InvalidParameterError, is_request_failure
from amulet_core.grammar.spec import GrammarKind, GrammarSpec

T = TypeVar("T")

JSON_OPTIONS = MappingProxyType({"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"})
"""llguidance's JSON compile options for ``json_object`` and ``json_schema`` (defaults a schema's ``x-guidance`` overrides)."""
MAX_ERROR_CHARS = 1000
"""llguidance's error messages are cut to this length in the errors raised here."""
NON_VERBOSE_TAG = "<non-verbose/>"
"""What llguidance puts in its error messages in place of the parser state (``verbose_errors=False``)."""


def _limits() -> llguidance.LLParserLimits:
    """llguidance's default limits, with error messages that do not dump the parser state or the grammar."""
    return llguidance.LLParserLimits(verbose_errors=False)


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar text of this spec (not compiled: that is ``GrammarCompiler.check``).

    Raises InvalidParameterError naming ``param`` when the source is not of the right shape: a JSON
    schema that is not JSON text of an object, a choice that is not a non-empty list of strings.
    """
    defaults: Any = dict(JSON_OPTIONS)
    if spec.kind is GrammarKind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=defaults)
    if spec.kind is GrammarKind.JSON_SCHEMA:
        schema = _json(spec, "JSON schema")
        if not isinstance(schema, dict):
            raise InvalidParameterError(spec.param, "The JSON schema must be a JSON object.")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
        except ValueError as exc:
            raise InvalidParameterError(spec.param, f"Invalid JSON schema: {_short(str(exc))}") from None
    if spec.kind is GrammarKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind is GrammarKind.CHOICE:
        choices = _json(spec, "choice list")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidParameterError(spec.param, "The choices must be a non-empty list of strings.")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return llguidance.LLMatcher.grammar_from_lark(spec.source)


def _json(spec: GrammarSpec, what: str) -> Any:
    try:
        return json.loads(spec.source)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidParameterError(spec.param, f"The {what} is not valid JSON: {exc}.") from None


class GrammarMatcher:
    """One request's position in its grammar (wraps an ``llguidance.LLMatcher``); not thread-safe.

    Built by ``GrammarCompiler.matcher``. Each step: :meth:`fill_mask` (the allowed next tokens), then,
    for the chosen token, :meth:`accept`. Once :attr:`is_finished`, nothing but EOS may follow.

    A grammar that compiled can still fail while the answer is generated: it runs past llguidance's limits
    (more Earley items in a row than allowed, a lexer out of fuel), or llguidance raises or panics on it (a
    Rust panic is a ``BaseException``). The matcher then holds that :attr:`failure`, a
    :class:`GrammarLimitExceededError` naming ``param`` (the request's field the grammar came from), and
    :meth:`accept` raises it: the request ends with it, and no other request is touched. To tell such a failure
    from a token the grammar never allowed (the caller's fault), :meth:`accept` reads the row :meth:`fill_mask`
    last wrote: that bitmask must stay as it is until the step's token is accepted.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, param: str = "response_format") -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        """Token ids the bitmask covers (the llguidance tokenizer's vocabulary; ids past the tokenizer's are never allowed)."""
        self.param = param
        self.failure: GrammarLimitExceededError | None = None
        """Why the grammar failed while generating (see the class docstring), or None."""
        self._last_mask: torch.Tensor | None = None

    @property
    def mask_words(self) -> int:
        """int32 words per bitmask row: ``ceil(vocab_size / 32)``."""
        return (self.vocab_size + 31) // 32

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of ``bitmask``: a contiguous CPU int32 ``[N, mask_words]``
        tensor; bit ``t % 32`` of word ``t // 32`` is set where token ``t`` is allowed. A finished matcher
        allows EOS only. When the grammar fails here (:attr:`failure`), or had failed before, every token is
        allowed: the request ends with its failure, whatever is sampled for it. Raises ValueError for a
        bitmask of the wrong kind (the caller's fault, not the grammar's)."""
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
            raise ValueError("the bitmask must be a 2-D int32 CPU tensor")
        if bitmask.shape[1] != self.mask_words or not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} has no row {row} of {self.mask_words} words")
        target = bitmask[row]
        if not target.is_contiguous():
            raise ValueError("the bitmask row must be contiguous")
        size = target.numel() * target.element_size()
        self._last_mask = None
        if self.failure is None:
            self._call(lambda: self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), size))
            if self.failure is None and self._matcher.is_error():  # a limit hit while computing the mask
                self._fail(self._matcher.get_error())
        if self.failure is not None:
            target.fill_(-1)
            return
        self._last_mask = target

    def accept(self, token: int) -> bool:
        """Consume ``token``; False when it breaks the grammar (a token the last mask did not allow: the matcher is
        then in an error state). Raises :attr:`failure` when the grammar failed, now (a token the last mask
        allowed that the grammar cannot take: it ran past a limit) or before."""
        if self.failure is None and self._call(lambda: self._matcher.consume_token(token)):
            return True
        if self.failure is None and self._allowed_before(token):
            self._fail(self._matcher.get_error() or "llguidance refused a token its mask allowed")
        if self.failure is not None:
            raise self.failure
        return False

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and nothing but EOS may follow (False in an error state, or after a failure)."""
        return self.failure is None and bool(self._call(lambda: self._matcher.is_stopped() and not self._matcher.is_error()))

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a token broke the grammar, or :attr:`failure`), or None."""
        if self.failure is not None:
            return self.failure.message
        return _short(self._matcher.get_error()) if self._matcher.is_error() else None

    def _allowed_before(self, token: int) -> bool:
        """Whether the last mask :meth:`fill_mask` wrote allowed ``token``."""
        mask = self._last_mask
        if mask is None or not 0 <= token < self.vocab_size:
            return False
        return bool((int(mask[token // 32]) >> (token % 32)) & 1)

    def _call(self, call: Callable[[], T]) -> T | None:
        """One llguidance call's result; None, with :attr:`failure` set, when it raised (a Rust panic included)."""
        try:
            return call()
        except BaseException as exc:
            if not is_request_failure(exc):
                raise
            self._fail(f"llguidance failed on it ({type(exc).__name__}: {exc})")
            return None

    def _fail(self, reason: str) -> None:
        reason = _short(reason.replace(NON_VERBOSE_TAG, ""))
        message = f"The grammar of '{self.param}' ran past the structured-output engine's limits while generating: {reason}"
        self.failure = GrammarLimitExceededError(self.param, message)


@dataclass(frozen=True)
class CacheInfo:
    """A :class:`GrammarCompiler`'s cache counters: lookups answered from the cache, compiles done, entries."""

    hits: int
    compiles: int
    size: int
    max_size: int


@dataclass(frozen=True)
class _Compiled:
    """A cache entry: the pristine matcher of a grammar (never used itself, only copied), or why it failed."""

    matcher: llguidance.LLMatcher | None
    error: str | None


class GrammarCompiler:
    """One model's grammars: llguidance's tokenizer and a thread-safe LRU cache of compiled specs.

    ``tokenizer`` is the model's Hugging Face (fast) tokenizer, ``vocab_size`` the model's output width:
    the bitmasks cover ``max(vocab_size, len(tokenizer))`` ids, and ids past the tokenizer's vocabulary
    (a padded output layer) are never allowed. ``eos_token_ids`` are the ids llguidance allows where
    the grammar may end (default: the tokenizer's EOS). Raises ValueError for a tokenizer llguidance
    cannot use (a slow one). The cache is keyed by ``(kind, source)``: a failure is cached too, and
    raised again with the asking spec's ``param``.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, cache_size: int = 256, eos_token_ids: Collection[int] | None = None
    ) -> None:
        import llguidance.hf  # imports transformers

        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.vocab_size = max(int(vocab_size), len(tokenizer))
        eos = sorted(eos_token_ids) if eos_token_ids else None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[GrammarKind, str], _Compiled] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self.compiles = 0
        """Grammars compiled so far (cache misses)."""

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the model's tokenizer (``vocab_size`` ids)."""
        return self._tokenizer

    @property
    def eos_token(self) -> int:
        """The EOS id llguidance allows where the grammar may end (the first, if several)."""
        return int(self._tokenizer.eos_token)

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self.compiles, len(self._cache), self._cache_size)

    def check(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` (or find it in the cache); raises InvalidParameterError naming ``spec.param``
        with llguidance's reason when the source is malformed or the grammar cannot be compiled."""
        self._compiled(spec)

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the start of ``spec``'s grammar, for one request (checks ``spec`` first). Raises
        InvalidParameterError as :meth:`check` does, and GrammarLimitExceededError when llguidance fails to copy
        the compiled grammar (a panic included)."""
        pristine = self._compiled(spec)
        try:
            copy = pristine.deep_copy()
        except BaseException as exc:
            if not is_request_failure(exc):
                raise
            raise GrammarLimitExceededError(
                spec.param, f"The grammar of '{spec.param}' could not be started: llguidance failed on it ({type(exc).__name__})."
            ) from None
        return GrammarMatcher(copy, self.vocab_size, spec.param)

    def _compiled(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        key = (spec.kind, spec.source)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self._hits += 1
        if entry is None:  # compiled outside the lock: one slow schema does not hold up the others
            entry = self._compile(spec)
            with self._lock:
                self.compiles += 1
                self._cache[key] = entry
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if entry.matcher is None:
            raise InvalidParameterError(spec.param, entry.error or "The grammar cannot be compiled.")
        return entry.matcher

    def _compile(self, spec: GrammarSpec) -> _Compiled:
        try:
            text = grammar_text(spec)
            matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0, limits=_limits())
        except InvalidParameterError as exc:
            return _Compiled(None, exc.message)
        except BaseException as exc:  # llguidance raised or panicked on this source: the request's fault, not the server's
            if not is_request_failure(exc):
                raise
            return _Compiled(None, f"Invalid {spec.kind.value} grammar: llguidance failed on it ({type(exc).__name__}).")
        if matcher.is_error():
            return _Compiled(None, f"Invalid {spec.kind.value} grammar: {_short(matcher.get_error())}")
        return _Compiled(matcher, None)
