"""Failures stay with their request, in the engine on a tiny random Llama with SmolLM2's tokenizer.

* A grammar that compiles, then runs past llguidance's limits while generating, ends its request with a typed
  client error (``GenerationOutput.client_error``: a GrammarLimitExceededError naming the grammar's field); the
  requests decoded in the same steps, constrained or not, produce exactly what they produce alone.
* A Rust panic (``pyo3_runtime.PanicException``, a BaseException) in a per-request call fails that request only:
  a real one from the tokenizers library in the detokenizer (a tokenizer whose ``Strip`` decoder panics on one
  token's text), and the library's own PanicException class raised by a stand-in for llguidance's matcher
  (llguidance turns its own panics into an error state, which the first case covers) when the mask is filled,
  a token consumed or the matcher created. The worker thread keeps serving.
* The watchdog fires when work is pending and nothing progresses for its interval while steps still complete
  (a request that can never be scheduled, as one could before issue 26), on an injected clock.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from amulet_core.engine import watchdog
from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from amulet_core.errors import EngineStalledError, GrammarLimitExceededError, is_request_failure, is_rust_panic
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.model.loading import LoadedModel, ModelConfig
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain, tokens_of
from tests.engine.test_kv_fit import request as kv_request
from tests.engine.test_structured_output import AMULET, BASE, JSON_SCHEMA, assert_follows_schema, request

TOO_MANY_ALTERNATIVES = GrammarSpec(
    GrammarKind.LARK, "start: " + " | ".join(f'"q{i}"' for i in range(2100)), param="guided_grammar"
)
"""Compiles; its first token leaves 2,100 live alternatives in llguidance's Earley row, which allows 2,000."""
CONFIG = EngineConfig(max_model_len=256, kv_cache_tokens=8192)
PANIC_CHAR = "Q"
"""The panicking tokenizer's decoder panics on text that is exactly this character (one token of SmolLM2's vocabulary)."""


def real_panic() -> BaseException:
    """A genuine Rust panic from the tokenizers library: a ``Strip`` decoder whose cuts cross on a one-character token."""
    tokenizer = Tokenizer(models.WordLevel({PANIC_CHAR: 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.decoder = decoders.Strip(content=PANIC_CHAR, left=1, right=1)
    try:
        tokenizer.decode([0])
    except BaseException as exc:
        return exc
    raise AssertionError("the crafted decoder did not panic")


@pytest.fixture(scope="module")
def panic_class() -> type[BaseException]:
    exc = real_panic()
    assert is_rust_panic(exc) and not isinstance(exc, Exception)
    return type(exc)


@pytest.fixture(scope="module")
def panicky(tiny_model) -> LoadedModel:
    """The tiny Llama with a copy of SmolLM2's tokenizer whose decoder panics on the text "Q" (a real Rust panic)."""
    loaded = tiny_model("llama")
    tokenizer = copy.deepcopy(loaded.tokenizer)
    backend = tokenizer._tokenizer
    backend.decoder = decoders.Sequence([backend.decoder, decoders.Strip(content=PANIC_CHAR, left=1, right=1)])
    return dataclasses.replace(loaded, tokenizer=tokenizer)


def panic_token(loaded: LoadedModel) -> int:
    token = loaded.tokenizer.convert_tokens_to_ids(PANIC_CHAR)
    assert isinstance(token, int) and loaded.tokenizer.convert_ids_to_tokens(token) == PANIC_CHAR
    with pytest.raises(BaseException) as panicked:  # a real Rust panic, not an Exception
        loaded.tokenizer.decode([token])
    assert is_rust_panic(panicked.value)
    return token


def final(outputs: dict[str, list[GenerationOutput]], rid: str) -> GenerationOutput:
    return outputs[rid][-1]


def alone(tiny_model, r: GenerationRequest) -> list[int]:
    engine = LLMEngine(tiny_model("llama"), CONFIG)
    engine.add_request(r)
    return tokens_of(drain(engine)[r.request_id])


# ---------------------------------------------------------------- (a) a grammar past llguidance's limits


def test_reasons_a_request_fails_for_are_told_apart_from_those_that_end_the_worker(panic_class) -> None:
    assert is_request_failure(ValueError()) and is_request_failure(panic_class("boom"))
    for fatal in (KeyboardInterrupt(), SystemExit(), asyncio.CancelledError(), GeneratorExit()):
        assert not is_request_failure(fatal) and not is_rust_panic(fatal)


@pytest.mark.parametrize("settings", [BASE, AMULET], ids=["base", "amulet"])
def test_a_grammar_past_llguidances_limits_fails_its_request_alone(tiny_model, settings) -> None:
    engine = LLMEngine(tiny_model("llama"), CONFIG)
    ordinary = request("ordinary", settings, None, seed=7, max_tokens=12)
    constrained = request("json", settings, JSON_SCHEMA, seed=9)
    for r in (ordinary, request("bad", settings, TOO_MANY_ALTERNATIVES, seed=8), constrained):
        engine.add_request(r)
    outputs = drain(engine)
    bad = final(outputs, "bad")
    assert bad.finish_reason == "error" and isinstance(bad.client_error, GrammarLimitExceededError)
    assert bad.client_error.param == "guided_grammar" and bad.client_error.code == "grammar_limit_exceeded"
    assert "max is 2000" in bad.client_error.message and "<non-verbose/>" not in bad.client_error.message
    assert tokens_of(outputs["bad"]) == []  # the token the grammar could not take was never emitted
    assert tokens_of(outputs["ordinary"]) == alone(tiny_model, ordinary)
    assert tokens_of(outputs["json"]) == alone(tiny_model, constrained)
    assert_follows_schema("".join(o.text for o in outputs["json"]))
    assert final(outputs, "ordinary").client_error is None and engine.blocks.num_used == 0 and not engine.requests


def test_a_grammar_that_fails_filling_its_mask_fails_its_request_alone(tiny_model) -> None:
    """llguidance's matcher in an error state after computing a mask (a limit hit there): the row is not used."""
    engine = LLMEngine(tiny_model("llama"), CONFIG)
    engine.add_request(request("bad", BASE, JSON_SCHEMA, seed=1))
    engine.add_request(request("good", BASE, JSON_SCHEMA, seed=2))
    engine.requests["bad"].matcher._matcher = FailingLLMatcher(engine.requests["bad"].matcher._matcher, fail_on="mask")
    outputs = drain(engine)
    bad = final(outputs, "bad")
    assert isinstance(bad.client_error, GrammarLimitExceededError) and bad.client_error.param == "response_format"
    assert "step limit reached" in bad.client_error.message
    assert final(outputs, "good").finish_reason == "stop"
    assert_follows_schema("".join(o.text for o in outputs["good"]))


def test_a_token_the_mask_refused_is_still_an_engine_failure(tiny_model) -> None:
    """Only a token the grammar's own mask allowed makes a consume failure the grammar's fault."""
    engine = LLMEngine(tiny_model("llama"), CONFIG)
    engine.add_request(request("bad", BASE, JSON_SCHEMA))
    engine.requests["bad"].matcher.accept = lambda token: False  # as if the sampler broke the grammar
    bad = final(drain(engine), "bad")
    assert bad.finish_reason == "error" and bad.client_error is None and "breaks the grammar" in (bad.error or "")


# ---------------------------------------------------------------- (b) Rust panics in per-request calls


class FailingLLMatcher:
    """An ``llguidance.LLMatcher`` stand-in: the real one, but one call fails (``raise_`` raised, or an error state)."""

    def __init__(self, real: Any, fail_on: str, raise_: BaseException | None = None) -> None:
        self._real = real
        self._fail_on = fail_on
        self._raise = raise_
        self._errored = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _fail(self) -> None:
        if self._raise is not None:
            raise self._raise
        self._errored = True

    def unsafe_compute_mask_ptr(self, ptr: int, size: int) -> None:
        self._real.unsafe_compute_mask_ptr(ptr, size)
        if self._fail_on == "mask":
            self._fail()

    def consume_token(self, token: int) -> bool:
        if self._fail_on == "consume":
            self._fail()
        return self._real.consume_token(token)

    def is_error(self) -> bool:
        return self._errored or self._real.is_error()

    def get_error(self) -> str:
        return "Parser Error: step limit reached\n<non-verbose/>" if self._errored else self._real.get_error()


@pytest.mark.parametrize("call", ["mask", "consume"])
def test_a_panic_in_llguidance_fails_its_request_alone(tiny_model, panic_class, call: str) -> None:
    engine = LLMEngine(tiny_model("llama"), CONFIG)
    free = request("free", BASE, None, seed=5, max_tokens=10)
    engine.add_request(free)
    engine.add_request(request("bad", BASE, JSON_SCHEMA, seed=1))
    engine.add_request(request("good", AMULET, JSON_SCHEMA, seed=2))
    matcher = engine.requests["bad"].matcher
    matcher._matcher = FailingLLMatcher(matcher._matcher, call, panic_class("index out of bounds"))
    outputs = drain(engine)
    bad = final(outputs, "bad")
    assert isinstance(bad.client_error, GrammarLimitExceededError) and "PanicException" in bad.client_error.message
    assert final(outputs, "good").finish_reason == "stop"
    assert_follows_schema("".join(o.text for o in outputs["good"]))
    assert tokens_of(outputs["free"]) == alone(tiny_model, free)


def test_a_real_panic_in_the_detokenizer_fails_its_request_alone(tiny_model, panicky: LoadedModel) -> None:
    token = panic_token(panicky)
    engine = LLMEngine(panicky, CONFIG)
    ordinary = request("ordinary", AMULET, None, seed=7, max_tokens=12)
    forced = request("bad", BASE, None, seed=8, max_tokens=12, logit_bias=((token, 100.0),))
    engine.add_request(ordinary)
    engine.add_request(forced)
    outputs = drain(engine)
    bad = final(outputs, "bad")
    assert bad.finish_reason == "error" and bad.client_error is None and "PanicException" in (bad.error or "")
    assert token not in tokens_of(outputs["ordinary"])
    assert tokens_of(outputs["ordinary"]) == alone(tiny_model, ordinary)
    assert final(outputs, "ordinary").finish_reason == "length" and engine.blocks.num_used == 0
    engine.add_request(request("after", BASE, None, seed=9, max_tokens=4))  # the engine keeps serving
    assert len(tokens_of(drain(engine)["after"])) == 4


def run_async(engine: AsyncEngine, requests: list[GenerationRequest]) -> dict[str, list[GenerationOutput]]:
    async def one(r: GenerationRequest) -> list[GenerationOutput]:
        return [o async for o in engine.generate(r)]

    async def every() -> list[list[GenerationOutput]]:  # a dead worker would leave the streams open: fail, not hang
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), timeout=120)

    return {r.request_id: outs for r, outs in zip(requests, asyncio.run(every()), strict=True)}


def started(loaded: LoadedModel, **kwargs: Any) -> AsyncEngine:
    threads = ModelConfig(cpu_threads=torch.get_num_threads())
    engine = AsyncEngine(threads, kwargs.pop("config", CONFIG), loader=lambda _: loaded, **kwargs).start()
    engine.wait_ready(60)
    return engine


def test_the_worker_survives_panics_and_keeps_serving(panicky: LoadedModel, panic_class) -> None:
    token = panic_token(panicky)
    engine = started(panicky)
    try:
        forced = request("bad", BASE, None, seed=8, max_tokens=12, logit_bias=((token, 100.0),))
        outputs = run_async(engine, [request("ordinary", BASE, None, seed=7, max_tokens=12), forced])
        assert final(outputs, "bad").finish_reason == "error" and "PanicException" in (final(outputs, "bad").error or "")
        assert final(outputs, "ordinary").finish_reason == "length"
        # A panic while starting a request's grammar (llguidance copying the compiled one) fails that request.
        compiler = engine.engine.grammars()
        compiled = compiler._compiled
        compiler._compiled = lambda spec: PanickyCopy(compiled(spec), panic_class)  # type: ignore[method-assign]
        try:
            outputs = run_async(engine, [request("grammar", BASE, JSON_SCHEMA, seed=1), request("free", BASE, None)])
        finally:
            compiler._compiled = compiled  # type: ignore[method-assign]
        failed = final(outputs, "grammar")
        assert isinstance(failed.client_error, GrammarLimitExceededError) and "PanicException" in failed.client_error.message
        assert final(outputs, "free").finish_reason == "length"
        assert engine.failure() is None and engine._thread is not None and engine._thread.is_alive()
        after = run_async(engine, [request("after", BASE, JSON_SCHEMA, seed=3)])["after"]
        assert after[-1].finish_reason == "stop"
        assert_follows_schema("".join(o.text for o in after))
    finally:
        engine.close()


class PanickyCopy:
    """A compiled grammar whose copy for a new request panics."""

    def __init__(self, real: Any, panic_class: type[BaseException]) -> None:
        self._real, self._panic = real, panic_class

    def deep_copy(self) -> Any:
        raise self._panic("called `Option::unwrap()` on a `None` value")


# ---------------------------------------------------------------- (d) the watchdog sees pending work that never progresses


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pending_work_without_progress_is_a_stall_even_though_steps_complete() -> None:
    clock = FakeClock()
    watch = watchdog.StepWatch(30.0, clock)
    watch.round_done(pending=False, progressed=False)  # idle for ever: never a stall
    clock.now += 1000
    assert watch.no_progress_for() is None
    watch.round_done(pending=True, progressed=False)  # a request arrived, and cannot be scheduled
    for _ in range(29):
        watch.started()
        watch.finished()  # empty steps complete at once ...
        clock.now += 1.0
        watch.round_done(pending=True, progressed=False)
    assert watch.no_progress_for() is None and watch.stalled_for() is None
    clock.now += 1.5
    assert watch.no_progress_for() == pytest.approx(30.5) and watch.stalled_for() is None  # ... the step watch sees nothing
    watch.round_done(pending=True, progressed=True)  # a token: the clock starts again
    assert watch.no_progress_for() is None
    clock.now += 29.0
    assert watch.no_progress_for() is None
    watch.round_done(pending=False, progressed=False)  # the work is done
    clock.now += 100.0
    assert watch.no_progress_for() is None


def test_the_automatic_interval_follows_the_step_time_for_pending_work_too() -> None:
    clock = FakeClock()
    watch = watchdog.StepWatch(None, clock)
    for _ in range(100):  # steps of 10 s: the interval becomes 20 x 10 s
        watch.started()
        clock.now += 10.0
        watch.finished()
        watch.round_done(pending=True, progressed=True)
    watch.round_done(pending=True, progressed=False)
    clock.now += 150.0
    assert watch.no_progress_for() is None
    clock.now += 60.0
    assert watch.no_progress_for() == pytest.approx(210.0)


def test_the_engine_reports_a_request_that_is_never_scheduled(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """As before issue 26: the KV check is taken out, and a request that needs more blocks than the cache has for
    its prompts alone waits at the head of the queue for ever while the worker's steps complete, empty."""
    clock = FakeClock()
    engine = started(
        tiny_model("llama"),
        config=EngineConfig(max_model_len=256, kv_cache_tokens=512, max_num_seqs=8),
        stall_timeout_s=30.0,
        clock=clock,
    )
    llm = engine.engine
    monkeypatch.setattr(llm.checks, "new_tokens", lambda r: r.max_new_tokens(llm.max_model_len))
    stuck = kv_request("stuck", k=4, prompt=120, max_tokens=4)  # 5 contexts x 8 blocks at admission; the cache has 32

    async def go() -> str:
        stream = engine.generate(stuck)
        first = asyncio.ensure_future(anext(stream))
        for _ in range(6000):  # the worker has seen it pending (its stats come after the watch); bounded: never a hang
            if engine.stats().waiting_requests == 1:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the request never reached the queue")
        steps = engine.stats().steps
        clock.now += 29.0
        assert engine.failure() is None
        clock.now += 2.0
        reason = engine.failure()
        assert reason is not None
        engine.fail(reason)  # what the server's watchdog does next: the open stream ends with EngineStalledError
        with pytest.raises(EngineStalledError):
            await first
        assert engine.stats().steps == steps  # nothing was ever computed for it
        return reason

    try:
        reason = asyncio.run(go())
    finally:
        engine.close()
    assert reason.startswith("no token was generated or prefilled for 31 s with 1 request(s) waiting and 0 running")
    assert "stall timeout 30 s" in reason


def test_a_request_that_progresses_is_no_stall(tiny_model) -> None:
    """Time passing while tokens come (the clock jumps between steps) never reads as a stall."""
    clock = FakeClock()
    engine = started(tiny_model("llama"), stall_timeout_s=30.0, clock=clock)
    reasons: list[str | None] = []

    def hook(_: GenerationRequest) -> None:  # in the worker, at each token: long steps, but tokens come
        clock.now += 20.0
        reasons.append(engine.failure())

    engine.engine.fault_hook = hook
    try:
        outs = run_async(engine, [GenerationRequest("slow", (100, 101, 102), SamplingParams(max_tokens=6, ignore_eos=True))])
    finally:
        engine.close()
    assert outs["slow"][-1].finish_reason == "length" and reasons == [None] * 6
