"""Incremental detokenization with stop strings.

Text comes out only in whole characters: a multi-byte character split across tokens is
held until its last byte arrives (the partial decode ends in U+FFFD). Text that could be the
start of a stop string is held back until it cannot be, so a stop string never reaches
the client. With ``min_tokens`` (vLLM's rule) a stop string counts only when it ends in text that a
token after the first ``min_tokens`` added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from amulet_core.errors import is_request_failure


def rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` that decodes for a transformers fast tokenizer whose class keeps the
    library's own ``decode`` (so its text is exactly that Tokenizer's), else None."""
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - both ship with transformers 5
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if not isinstance(backend, Tokenizer) or not isinstance(tokenizer, TokenizersBackend):
        return None
    if cls.decode is not TokenizersBackend.decode or cls._decode is not TokenizersBackend._decode:
        return None
    return backend


class IncrementalDetokenizer:
    """Text of generated tokens, one token at a time.

    With a fast tokenizer (:func:`rust_tokenizer`) the tokenizers library's ``DecodeStream`` does the
    incremental decoding in Rust (one call a token, as vLLM does); otherwise, or with ``fast=False``,
    two ``tokenizer.decode`` calls a token over a sliding window of ids give the same text.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
        fast: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._backend = rust_tokenizer(tokenizer) if fast else None
        self._stream: Any = None
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._min_tokens = min_tokens
        self._stop_floor = 0
        """A stop string must end past this many characters of ``text`` (the text of the first ``min_tokens`` tokens)."""
        self._ids: list[int] = []
        self._consumed = 0
        """Leading ids whose text is in ``text`` (the fast path's tokens still pending come after them)."""
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        """All decoded output text so far (up to a stop string, once one is found)."""
        self._emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id)
            except BaseException as exc:  # e.g. the library's "invalid prefix", or a panic: carry on with the Python window
                if not is_request_failure(exc):
                    raise
                self._stream = None
                self._prefix_offset = self._read_offset = self._consumed
            else:
                if piece:
                    self.text += piece
                    self._consumed = len(self._ids)
        if self._stream is None:
            self._add_windowed()
        if len(self._ids) <= self._min_tokens:
            self._stop_floor = len(self.text)
        return self._release(final=False)

    def _add_windowed(self) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            # The last read tokens stay as context, so merges such as leading spaces decode right.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _release(self, final: bool) -> str:
        if self._stop:
            start = max(0, self._emitted - self._hold)
            found = (self.text.find(s, max(start, self._stop_floor - len(s) + 1)) for s in self._stop)
            hits = [i for i in found if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._hold
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """The held-back text, at the end of generation."""
        return self._release(final=True)
