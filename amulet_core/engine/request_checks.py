"""What can be checked of a request before it runs: that it fits the context and the KV cache, its ``logit_bias``
ids, and that its grammar compiles (:class:`RequestChecks`, thread-safe: the server calls it from the event loop
while the engine's worker steps)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.memory import fitting_new_tokens, request_kv_blocks
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import ContextLengthExceededError, InvalidParameterError, is_request_failure
from amulet_core.grammar.compiler import GrammarCompiler, GrammarMatcher
from amulet_core.grammar.spec import GrammarSpec

logger = logging.getLogger(__name__)


class RequestChecks:
    """A request's limits against the engine's fixed sizes, and the model's grammar compiler (built on first use)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        config: EngineConfig,
        num_blocks: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.config = config
        self.num_blocks = num_blocks
        self._compiler: GrammarCompiler | None = None
        self._unavailable: str | None = None
        self._lock = threading.Lock()

    def grammars(self, param: str = "response_format") -> GrammarCompiler:
        """The model's grammar compiler, built on first use (thread-safe). Raises InvalidParameterError
        naming ``param`` when llguidance cannot use this model's tokenizer."""
        with self._lock:
            if self._compiler is None and self._unavailable is None:
                try:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, eos_token_ids=self.eos_token_ids)
                except BaseException as exc:  # e.g. a slow tokenizer (or a panic): no structured output with this model
                    if not is_request_failure(exc):
                        raise
                    logger.exception("the grammar compiler could not be built")
                    self._unavailable = f"{type(exc).__name__}: {exc}"
            if self._compiler is None:
                raise InvalidParameterError(
                    param, f"Structured output is not available with this model's tokenizer ({self._unavailable})."
                )
            return self._compiler

    def new_tokens(self, request: GenerationRequest) -> int:
        """The tokens a request may generate: :meth:`GenerationRequest.max_new_tokens` within ``max_model_len``,
        and such that the request fits the KV cache alone at its longest (:func:`request_kv_blocks`), else it
        would wait at the head of the queue for ever. Without ``max_tokens`` it gets as many as fit. Raises
        ContextLengthExceededError naming ``messages`` (not one new token fits) or ``max_tokens`` (too many)."""
        most = request.max_new_tokens(self.max_model_len)
        contexts, bs, total = request.contexts, self.config.block_size, self.num_blocks
        need = request_kv_blocks(contexts, most, bs)
        if need <= total:
            return most
        fits = fitting_new_tokens(contexts, most, total, bs)
        several = len(contexts) > 1

        def needs(blocks: int) -> str:
            who = f"This request's {len(contexts)} contexts need" if several else "This request needs"
            shared = "; leading blocks they share counted once" if several else ""
            return f"{who} {blocks} KV blocks of {bs} tokens ({blocks * bs} tokens{shared})"

        cache = f"the KV cache holds {total} blocks ({total * bs} tokens) in all"
        fewer = ", or use fewer preferences" if several else ""
        if fits == 0:
            alone = needs(request_kv_blocks(contexts, 1, bs))
            raise ContextLengthExceededError(
                "messages", f"{alone} for the messages alone, but {cache}. Shorten the messages{fewer}."
            )
        if request.sampling.max_tokens is None:
            return fits
        raise ContextLengthExceededError(
            "max_tokens",
            f"{needs(need)} with 'max_tokens' {most}, but {cache}. Lower 'max_tokens' to {fits} or less{fewer}.",
        )

    def validate(self, request: GenerationRequest) -> int:
        """Everything that can be checked about a request without running it: that it fits the context and
        the KV cache (:meth:`new_tokens`, whose count it returns), its ``logit_bias`` ids, and that its grammar
        compiles (through the compiler's cache, so a repeated spec costs a lookup). Thread-safe (it reads only
        the model's fixed sizes and the grammar cache); raises InvalidParameterError naming the parameter at fault."""
        if len(request.contexts) > self.config.max_num_seqs:
            raise InvalidParameterError(
                "preference",
                f"This request decodes {len(request.contexts)} contexts at once, but the engine runs at most "
                f"{self.config.max_num_seqs} sequences together (max_num_seqs). Use fewer preferences.",
            )
        new_tokens = self.new_tokens(request)
        sp = request.sampling
        for token, _ in sp.logit_bias:
            if token >= self.vocab_size:
                raise InvalidParameterError(
                    "logit_bias", f"'logit_bias' token id {token} is not in this model's vocabulary (0..{self.vocab_size - 1})."
                )
        if sp.grammar is not None:
            self.grammars(sp.grammar.param).check(sp.grammar)
        return new_tokens

    def matcher(self, spec: GrammarSpec | None) -> GrammarMatcher | None:
        """A new matcher of ``spec`` (None without one), from the compiler's cache."""
        return None if spec is None else self.grammars(spec.param).matcher(spec)
