"""A deterministic EngineClient for HTTP tests: no model, instant, and it records what it was asked.

* The fake is its own renderer (``renderer``): ``chat_text`` renders ``<|role|>content\\n`` lines plus
  ``<|assistant|>`` and ``encode_text`` returns one token id per character (its code point), so prompt
  lengths are easy to reason about and the fake can read its own prompts back; ``renderer_calls``
  records which renderer methods ran.
* The answer is :data:`REPLY_PIECES`, one piece per token, with multi-byte UTF-8 characters
  (ö, 你好, 🙂); ``max_tokens`` ends it with "length", ``stop`` strings cut it with "stop". A sampled
  (not greedy) request with a seed starts with ``[<seed>]``, so the choices of ``n`` differ.
* ``[say:TEXT:say]`` in the conversation makes TEXT the answer (tool calls, JSON ...), 3 characters a token.
* ``encode_prompt`` / ``decode`` map characters to code points (``encode_prompt`` adds ``BOS_ID``).
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
import re
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
from amulet_core.model.chat_template import DEFAULT_TEMPLATE_OPTIONS, ChatTemplateOptions
from server.observer import RequestRecord

REPLY_PIECES: tuple[str, ...] = ("Hello", ",", " wö", "rld", "!", " 你", "好", " ", "🙂", " ", "ça", " va", "?")
REPLY_TEXT = "".join(REPLY_PIECES)
CACHED_TOKENS = 3
QUEUE_S = 0.001
SLOW_TOKEN_S = 0.02
GATE_POLL_S = 0.005
TOKEN_ID_BASE = 1000


SAY = re.compile(r"\[say:(.*?):say\]", re.DOTALL)
"""``[say:TEXT:say]`` in the conversation makes TEXT the answer (``\\n`` for a newline), in pieces of SAY_PIECE characters."""
SAY_PIECE = 3
VOCAB_SIZE = 0x110000
"""The fake's token ids are Unicode code points."""
BOS_ID = 2
"""The fake's special token that ``encode_prompt`` adds (U+0002)."""


def render(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The fake chat template (a message's ``name`` is written after its role)."""
    lines = "".join(f"<|{m['role']}{':' + m['name'] if 'name' in m else ''}|>{m['content']}\n" for m in messages)
    return lines + ("<|assistant|>" if add_generation_prompt else "")


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
        self.template_options: list[ChatTemplateOptions] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.active = 0
        self.renderer_calls: list[str] = []
        """The renderer methods called (``chat_text``, ``encode_text``, ``encode_prompt`` ...), in order."""

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    vocab_size = VOCAB_SIZE

    # ---- the renderer: the fake is its own ChatRenderer (one token per character) ----
    @property
    def renderer(self) -> FakeEngine:
        if not self._ready:
            raise EngineNotReadyError("The fake model is not loaded.")
        return self

    max_token_chars = 1

    def chat_text(self, messages: Sequence[dict[str, Any]], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS) -> str:
        if not self._ready:
            raise EngineNotReadyError("The fake model is not loaded.")
        self.renderer_calls.append("chat_text")
        self.template_options.append(options)
        return render(messages, options.add_generation_prompt)

    def encode_text(self, text: str) -> tuple[int, ...]:
        self.renderer_calls.append("encode_text")
        return tuple(ord(c) for c in text)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS
    ) -> tuple[int, ...]:
        return self.encode_text(self.chat_text(messages, options))

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> tuple[int, ...]:
        self.renderer_calls.append("encode_prompt")
        return ((BOS_ID,) if add_special_tokens else ()) + tuple(ord(c) for c in text)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if t == BOS_ID and skip_special_tokens else chr(t) for t in token_ids)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [f"<{t}>" for t in token_ids]

    def template_system_prompt(self) -> str | None:
        """The fake template inserts no system message of its own."""
        return None

    def chat_template_text(self) -> str | None:
        return None

    def template_renders_tools(self) -> bool:
        """Like SmolLM2's, the fake template ignores tools (the server describes them in the system message)."""
        return False

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
        said = SAY.findall(prompt)
        if said:
            text = said[-1].replace("\\n", "\n")
            pieces = [text[i : i + SAY_PIECE] for i in range(0, len(text), SAY_PIECE)][:limit]
            return pieces, "length" if len(pieces) * SAY_PIECE < len(text) else "stop"
        if "[slow]" in prompt:
            pieces = [REPLY_PIECES[i % len(REPLY_PIECES)] for i in range(limit)]
            reason = "length"
        else:
            pieces = list(REPLY_PIECES[:limit])
            reason = "length" if limit < len(REPLY_PIECES) else "stop"
        sampling = request.sampling
        if sampling.seed is not None and not sampling.greedy:  # a seeded sample says its seed first
            pieces[0] = f"[{sampling.seed}]{pieces[0]}"
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
            base_prompt_tokens=sum(len(ids) for ids in request.contexts[1:]),
            cached_prompt_tokens=CACHED_TOKENS,
        )

    @staticmethod
    def _logprobs(request: GenerationRequest, n: int, piece: str) -> tuple[TokenLogprob, ...] | None:
        if not request.sampling.logprobs:
            return None
        alternatives = ((TOKEN_ID_BASE + n, piece, -0.25), (7, "x", -2.0), (8, "y", float("-inf")))
        top = alternatives[: request.sampling.top_logprobs]
        return (TokenLogprob(token_id=TOKEN_ID_BASE + n, token=piece, logprob=-0.25, top=top),)
