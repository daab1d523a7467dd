"""The engine client for asyncio code: one worker thread owns the model and runs the steps.

Requests and aborts reach the worker through a thread-safe queue; outputs come back to
each request's asyncio queue through ``call_soon_threadsafe`` (:mod:`amulet_core.engine.client_streams`), so the
event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from amulet_core.engine.client_streams import ClientStreams
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.host_heap import keep_freed_memory
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import EngineStats, GenerationOutput, GenerationRequest
from amulet_core.engine.watchdog import Clock, StepWatch
from amulet_core.errors import (
    EngineNotReadyError,
    EngineStalledError,
    InvalidParameterError,
    is_request_failure,
)
from amulet_core.model.chat_template import ChatTokenizer
from amulet_core.model.loading import (
    LoadedModel,
    ModelConfig,
    load_model,
    model_display_name,
    resolve_device,
    serving_cpu_threads,
)

logger = logging.getLogger(__name__)

StepObserver = Callable[[float, int], None]
NO_PROGRESS_WAIT_S = 0.01
"""How long the worker waits for a message before its next step when pending work did not progress in the last
one (a request that cannot be scheduled yet): the time of a step, not a busy loop."""


@dataclass(frozen=True)
class _Add:
    request: GenerationRequest


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(
        self,
        model_config: ModelConfig | None = None,
        engine_config: EngineConfig | None = None,
        step_observer: StepObserver | None = None,
        loader: Callable[[ModelConfig], LoadedModel] = load_model,
        stall_timeout_s: float | None = None,
        fault_hook: Callable[[GenerationRequest], None] | None = None,
        clock: Clock | None = None,
        freeze_gc_after_load: bool = False,
    ) -> None:
        """``stall_timeout_s``: see :class:`StepWatch` (None: sized from the measured step time).
        ``fault_hook``: test-only, set as the loaded ``LLMEngine.fault_hook``. ``clock``: the watch's monotonic
        seconds (None: ``time.monotonic``; tests inject one). ``freeze_gc_after_load``: once the model is loaded,
        move every object the process holds out of the cyclic collector's generations (``gc.freeze``), for a
        server process that keeps its model for life (not for a process that loads many)."""
        self.model_config = model_config or ModelConfig()
        self.engine_config = engine_config or EngineConfig()
        self.model_name = model_display_name(self.model_config)
        self._step_observer = step_observer
        self._loader = loader
        self._inbox: queue.Queue[_Add | _Abort | None] = queue.Queue()
        self._streams = ClientStreams()
        self._engine: LLMEngine | None = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._text: ChatTokenizer | None = None
        self._watch = StepWatch(stall_timeout_s, clock)
        self._fault_hook = fault_hook
        self._failure: str | None = None
        self._freeze_gc_after_load = freeze_gc_after_load

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> AsyncEngine:
        """Start the worker; the model loads there while the caller goes on."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="amulet-engine", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; re-raise its load error."""
        if not self._loaded.wait(timeout):
            raise TimeoutError("the model did not load in time")
        if self._load_error is not None:
            raise self._load_error

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._engine is not None and self._accepting

    @property
    def load_finished(self) -> bool:
        """True once the worker has loaded the model or failed to (see :attr:`load_error`)."""
        return self._loaded.is_set()

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    def failure(self) -> str | None:
        """Why the loaded engine can serve no more (its worker thread died, a step has run past the stall timeout,
        or requests are waiting or running and none has progressed for that long: see :class:`StepWatch`), or
        None while it is healthy (or not loaded). Polled by the server's watchdog."""
        if self._failure is not None:
            return self._failure
        thread = self._thread
        if self._engine is None or thread is None:
            return None
        if not thread.is_alive() and self._accepting:
            return "the engine's worker thread died"
        return self._watch.problem(self._streams.stats)

    def fail(self, reason: str) -> None:
        """Stop taking requests and end every open stream with :class:`EngineStalledError` (the worker may
        be stuck: nothing waits for it). Called from the event loop once :meth:`failure` reported ``reason``."""
        self._failure = reason
        self._accepting = False
        self._streams.end_all(EngineStalledError(reason))

    @property
    def engine(self) -> LLMEngine:
        """The synchronous engine (for tests and in-process tools); raises until loaded."""
        if self._engine is None:
            raise EngineNotReadyError("The model is still loading.")
        return self._engine

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish up to the timeout, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._streams.ids() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in self._streams.ids():
            self._inbox.put(_Abort(request_id))
        self.close()

    def close(self) -> None:
        """Stop the worker thread (requests still open are aborted)."""
        self._accepting = False
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=30 if self._failure is None else 1)  # a stuck worker never ends
            self._thread = None

    # ---- client API ---------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        """The loaded engine's longest context (``LLMEngine.max_model_len``: sized with the KV cache once the
        weights are loaded); raises EngineNotReadyError until then."""
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def renderer(self) -> ChatTokenizer:
        """The loaded model's chat template and tokenizer; raises until loaded, as :attr:`engine` does."""
        if self._text is None:
            self._text = ChatTokenizer(self.engine.tokenizer)
        return self._text

    def stats(self) -> EngineStats:
        return self._streams.stats

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs. Before anything is queued, raises EngineNotReadyError, an
        InvalidParameterError for a request the engine would refuse (``LLMEngine.validate``: context
        length, a KV need above the whole cache, ``logit_bias`` ids, a grammar that does not compile; checked
        on a worker thread, since compiling a large schema takes a while), or EngineOverloadedError when the
        queue is full."""
        if self._failure is not None:
            raise EngineStalledError(self._failure)
        if not self.ready:
            raise EngineNotReadyError("The model is loading or the server is shutting down.")
        request.max_new_tokens(self.max_model_len)  # a request too long for the context fails here, before a thread
        await asyncio.to_thread(self.engine.validate, request)  # and one the KV cache can never hold there
        stream = self._streams.open(request.request_id, self.engine_config.max_queue)
        self._inbox.put(_Add(request))
        finished = False
        try:
            while not finished:
                output = await stream.queue.get()
                if isinstance(output, BaseException):  # see fail()
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._inbox.put(_Abort(request.request_id))
            self._streams.close(request.request_id)

    # ---- worker -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if resolve_device(self.model_config.device).type == "cpu":
                torch.set_num_threads(serving_cpu_threads(self.model_config))
                logger.info("serving on the CPU with %d torch threads (--cpu-threads)", torch.get_num_threads())
                keep_freed_memory()
            self._engine = LLMEngine(self._loader(self.model_config), self.engine_config)
            self._engine.fault_hook = self._fault_hook
            self._streams.stats = self._engine.stats()
            if self._freeze_gc_after_load:
                # The loaded model's hundreds of thousands of objects live as long as the process: out of the
                # collector's generations, a full collection (set off by a request's parsing) no longer walks
                # them while it holds the interpreter lock (/health under hostile load: benchmarks/health_latency.py).
                gc.collect()
                gc.freeze()
        except BaseException as exc:  # reported through load_error / wait_ready
            logger.exception("model load failed")
            self._load_error = exc
            self._loaded.set()
            return
        self._loaded.set()
        engine = self._engine
        progressed = True
        while True:
            try:
                if not engine.has_work():  # idle: wait for a message
                    message = self._inbox.get()
                elif progressed:
                    message = self._inbox.get_nowait()
                else:  # pending work that did not progress: look again soon, without spinning a core
                    message = self._inbox.get(timeout=NO_PROGRESS_WAIT_S)
            except queue.Empty:
                message = _Empty
            stop = False
            adds = 0
            outputs: list[GenerationOutput] = []
            while message is not _Empty:
                if message is None:
                    stop = True
                else:
                    adds += isinstance(message, _Add)
                    outputs.extend(self._handle(engine, message))
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = _Empty
            if stop:
                for request_id in list(engine.requests):
                    aborted = engine.abort(request_id)
                    if aborted is not None:
                        outputs.append(aborted)
                self._streams.deliver(outputs)
                return
            steps = engine.steps
            if engine.has_work():
                outputs.extend(self._step(engine))
            progressed = bool(outputs) or engine.steps != steps  # a token generated or prefilled, a request ended
            self._watch.round_done(engine.has_work(), progressed)
            self._streams.counted(engine.stats(), adds)
            self._streams.deliver(outputs)

    def _handle(self, engine: LLMEngine, message: _Add | _Abort) -> list[GenerationOutput]:
        if isinstance(message, _Abort):
            output = engine.abort(message.request_id)
            return [output] if output is not None else []
        try:
            engine.add_request(message.request)
        except BaseException as exc:  # a Rust panic (starting its grammar) is a BaseException: it fails this request only
            if not is_request_failure(exc):
                raise
            logger.warning("request %s could not start: %s: %s", message.request.request_id, type(exc).__name__, exc)
            client_error = exc if isinstance(exc, InvalidParameterError) else None
            rid = message.request.request_id
            return [GenerationOutput(rid, finish_reason="error", error=str(exc), client_error=client_error)]
        return []

    def _step(self, engine: LLMEngine) -> list[GenerationOutput]:
        start = time.perf_counter()
        self._watch.started()
        try:
            outputs = engine.step()
        except BaseException as exc:  # keep serving: fail what was in flight, not the worker (a Rust panic too)
            if not is_request_failure(exc):
                raise
            logger.exception("engine step failed")
            message = f"Engine step failed: {type(exc).__name__}"
            aborted = [engine.abort(rid) for rid in list(engine.requests)]
            return [replace(o, finish_reason="error", error=message) for o in aborted if o is not None]
        finally:
            self._watch.finished()
        if self._step_observer is not None:
            try:
                self._step_observer(time.perf_counter() - start, engine.last_step_sequences)
            except Exception:
                logger.exception("step observer failed")
        return outputs


_Empty: Any = object()
