"""A deterministic EngineClient for HTTP tests: no model, instant, and it records what it was asked.

* ``encode_chat`` renders ``<|role|>content\\n`` lines plus ``<|assistant|>`` and returns one token
  id per character (its code point), so prompt lengths are easy to reason about and the fake can
  read its own prompts back.
* The answer is :data:`REPLY_PIECES`, one piece per token, with multi-byte UTF-8 characters
  (ö, 你好, 🙂); ``max_tokens`` ends it with "length", ``stop`` strings cut it with "stop".
* Markers in the conversation change the behaviour: ``[slow]`` (a token every 20 ms, endless up to
  max_tokens), ``[fail]`` (an error output after two tokens), ``[crash]`` (an exception after two
  tokens), ``[crash-early]`` (an exception before any output), ``[abort]`` (engine-side abort).
* ``overloaded = True`` makes ``generate`` raise EngineOverloadedError, like a full queue;
  ``ready = False`` makes it raise EngineNotReadyError.
* :meth:`FakeEngine.hold` lets the first requests through and holds every later one before its first
  token until the test sets the returned gate (a ``threading.Event``); the held ones are in ``held``.
* A stream closed before its finish is recorded in ``aborted`` (the real engine frees its KV then).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from amulet_core.engine.protocol import (
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestTimings,
    TokenLogprob,
    Usage,
)
from amulet_core.errors import EngineNotReadyError, EngineOverloadedError
from server.observer import RequestRecord

REPLY_PIECES: tuple[str, ...] = ("Hello", ",", " wö", "rld", "!", " 你", "好", " ", "🙂", " ", "ça", " va", "?")
REPLY_TEXT = "".join(REPLY_PIECES)
CACHED_TOKENS = 3
QUEUE_S = 0.001
SLOW_TOKEN_S = 0.02
GATE_POLL_S = 0.005
TOKEN_ID_BASE = 1000


def render(messages: Sequence[dict[str, Any]]) -> str:
    """The fake chat template."""
    return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"


@dataclass
class RecordingObserver:
    """A RequestObserver that keeps every record."""

    records: list[RequestRecord] = field(default_factory=list)

    def request_finished(self, record: RequestRecord) -> None:
        self.records.append(record)


class FakeEngine:
    """See the module docstring."""

    def __init__(self, model_name: str = "fake-model", max_model_len: int = 512) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.reset()

    def reset(self) -> None:
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.set()  # nothing stays held past its test
        self._gate: threading.Event | None = None
        self._hold_after = 0
        self.held: list[str] = []
        self._ready = True
        self.load_error: BaseException | None = None
        self.overloaded = False
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.active = 0

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> tuple[int, ...]:
        if not self._ready:
            raise EngineNotReadyError("The fake model is not loaded.")
        return tuple(ord(c) for c in render(messages))

    def template_system_prompt(self) -> str | None:
        """The fake template inserts no system message of its own."""
        return None

    def hold(self, after: int) -> threading.Event:
        """Let the first ``after`` requests run; hold every later one before its first token until the gate is set.

        The returned gate is a ``threading.Event`` (the test sets it from its own thread); while a request
        waits, its id is in ``held``. A held request whose client leaves is aborted like any other.
        """
        self._gate = threading.Event()
        self._hold_after = after
        return self._gate

    def stats(self) -> EngineStats:
        return EngineStats(running_requests=self.active)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self._ready:
            raise EngineNotReadyError("The fake model is not loaded.")
        if self.overloaded:
            raise EngineOverloadedError("The fake queue is full.")
        gate = self._gate if len(self.requests) >= self._hold_after else None
        self.requests.append(request)
        prompt = "".join(chr(i) for i in request.prompt_ids)
        if "[crash-early]" in prompt:
            raise RuntimeError("secret internal detail (early)")
        pieces, reason = self._script(request, prompt)
        self.active += 1
        done = False
        try:
            if gate is not None:
                await self._wait_for(gate, request.request_id)
            for n, piece in enumerate(pieces, start=1):
                if "[slow]" in prompt:
                    await asyncio.sleep(SLOW_TOKEN_S)
                else:
                    await asyncio.sleep(0)
                if n == 3 and "[crash]" in prompt:
                    raise RuntimeError("secret internal detail")
                if n == 3 and ("[fail]" in prompt or "[abort]" in prompt):
                    done = True
                    failed = "[fail]" in prompt
                    yield GenerationOutput(
                        request.request_id,
                        finish_reason="error" if failed else "abort",
                        error="The fake engine failed." if failed else None,
                        usage=self._usage(request, n - 1),
                    )
                    return
                last = n == len(pieces)
                done = last
                yield GenerationOutput(
                    request.request_id,
                    text=piece,
                    token_ids=(TOKEN_ID_BASE + n,),
                    logprobs=self._logprobs(request, n, piece),
                    finish_reason=reason if last else None,
                    usage=self._usage(request, n) if last else None,
                    timings=RequestTimings(queue_s=QUEUE_S, prefill_s=0.002) if last else None,
                )
        finally:
            self.active -= 1
            (self.finished if done else self.aborted).append(request.request_id)

    async def _wait_for(self, gate: threading.Event, request_id: str) -> None:
        """Poll the gate (a closed stream cancels the wait, as it would a running generation)."""
        self.held.append(request_id)
        try:
            while not gate.is_set():
                await asyncio.sleep(GATE_POLL_S)
        finally:
            self.held.remove(request_id)

    def _script(self, request: GenerationRequest, prompt: str) -> tuple[list[str], str]:
        """The pieces to emit and the finish reason: the reply (cycled when slow), cut by max_tokens and stop."""
        limit = request.max_new_tokens(self.max_model_len)
        if "[slow]" in prompt:
            pieces = [REPLY_PIECES[i % len(REPLY_PIECES)] for i in range(limit)]
            reason = "length"
        else:
            pieces = list(REPLY_PIECES[:limit])
            reason = "length" if limit < len(REPLY_PIECES) else "stop"
        text = "".join(pieces)
        cuts = [text.find(s) for s in request.sampling.stop if s in text]
        if not cuts:
            return pieces, reason
        cut, kept, used = min(cuts), [], 0
        for piece in pieces:
            if used + len(piece) >= cut:
                kept.append(piece[: cut - used])
                break
            kept.append(piece)
            used += len(piece)
        return kept, "stop"

    def _usage(self, request: GenerationRequest, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=completion_tokens,
            base_prompt_tokens=len(request.base_prompt_ids or ()),
            cached_prompt_tokens=CACHED_TOKENS,
        )

    @staticmethod
    def _logprobs(request: GenerationRequest, n: int, piece: str) -> tuple[TokenLogprob, ...] | None:
        if not request.sampling.logprobs:
            return None
        alternatives = ((TOKEN_ID_BASE + n, piece, -0.25), (7, "x", -2.0), (8, "y", float("-inf")))
        top = alternatives[: request.sampling.top_logprobs]
        return (TokenLogprob(token_id=TOKEN_ID_BASE + n, token=piece, logprob=-0.25, top=top),)
