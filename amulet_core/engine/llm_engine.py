"""The synchronous engine: add requests, run steps, get outputs. Owned by one worker thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from amulet_core.device_tensors import to_device
from amulet_core.engine.block_manager import BlockManager
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.deferred_contrasts import DeferredContrasts
from amulet_core.engine.detokenizer import IncrementalDetokenizer
from amulet_core.engine.model_runner import LaunchedForward, ModelRunner, logits_width
from amulet_core.engine.overlap import PendingStep, PendingTokens, follows_tokens, overlappable
from amulet_core.engine.protocol import EngineStats, GenerationOutput, GenerationRequest
from amulet_core.engine.request_checks import RequestChecks
from amulet_core.engine.request_state import RequestState
from amulet_core.engine.scheduler import Scheduler, SequenceGroup, StepPlan
from amulet_core.engine.sequence import Sequence
from amulet_core.engine.step_outputs import step_outputs
from amulet_core.engine.step_rows import (
    plausible_contrast_rows,
    request_rows,
    row_history,
    row_specs,
    rule_out_early_stops,
    step_masks,
    tail_inputs,
)
from amulet_core.errors import InvalidParameterError, is_request_failure
from amulet_core.grammar.compiler import GrammarCompiler
from amulet_core.method.rows import method_logprobs
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.sampler import DeviceSamples, RowSample, make_generator, sample_on_device, sample_tokens
from amulet_core.sampling.seeded import SeededDraws

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = logits_width(loaded.model)
        self.runner = ModelRunner(loaded, config)
        self.max_model_len = self.runner.max_model_len
        """Longest context in tokens: ``config.max_model_len``, else the model's capped by the KV cache."""
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.batched_tokens(loaded.device.type))
        self.checks = RequestChecks(
            loaded.tokenizer, self.vocab_size, loaded.eos_token_ids, self.max_model_len, config, self.blocks.num_blocks
        )
        self.requests: dict[str, RequestState] = {}
        self.steps = 0
        self.last_step_sequences = 0
        self.overlap_host = config.overlap_on(loaded.device.type)
        """Read each step's tokens a step later, while the device runs the next (:mod:`amulet_core.engine.overlap`)."""
        self.pending: PendingStep | None = None
        self.overlapped_steps = 0
        self.fault_hook: Callable[[GenerationRequest], None] | None = None
        """Test-only: called for each request as its token is processed; an exception fails that request."""

    # ---- requests -----------------------------------------------------------------
    def grammars(self, param: str = "response_format") -> GrammarCompiler:
        """The model's grammar compiler (:meth:`RequestChecks.grammars`)."""
        return self.checks.grammars(param)

    def new_tokens(self, request: GenerationRequest) -> int:
        """The tokens a request may generate (:meth:`RequestChecks.new_tokens`)."""
        return self.checks.new_tokens(request)

    def validate(self, request: GenerationRequest) -> int:
        """Everything that can be checked about a request without running it (:meth:`RequestChecks.validate`)."""
        return self.checks.validate(request)

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; raises InvalidParameterError (see :meth:`validate`, and a running request's id)."""
        if request.request_id in self.requests:
            raise InvalidParameterError("request_id", f"Request id {request.request_id!r} is already running.")
        max_tokens = self.validate(request)
        sp = request.sampling
        contexts = [Sequence(list(ids), cache_salt=request.cache_salt) for ids in request.contexts]
        group = SequenceGroup(request.request_id, contexts)
        self.requests[request.request_id] = RequestState(
            request=request,
            group=group,
            coefficient=request.method.effective_strength,
            generator=make_generator(sp),
            detokenizer=IncrementalDetokenizer(self.tokenizer, sp.stop, sp.skip_special_tokens, sp.min_tokens),
            stop_ids=frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_token_ids),
            max_tokens=max_tokens,
            arrival=time.monotonic(),
            matcher=self.checks.matcher(sp.grammar),
            num_prefs=len(request.contexts) - (request.contrast_prompt_ids is not None),
            weights=request.method.normalized_weights,
            thinking=request.thinking is not None and request.thinking.open_at_start,
        )
        self.scheduler.add(group)

    def abort(self, request_id: str) -> GenerationOutput | None:
        """Drop a request and free its KV now; returns its final output, or None if unknown."""
        state = self.requests.get(request_id)
        return self._drop(state).finish("abort") if state is not None else None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.pending is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            running_requests=len(self.scheduler.running),
            waiting_requests=len(self.scheduler.waiting),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            steps=self.steps,
        )

    # ---- stepping -----------------------------------------------------------------
    def step(self) -> list[GenerationOutput]:
        """One forward pass over every running request, then one token for each sampled one. With ``overlap_host``
        the tokens of an overlappable step are read by the next call, which returns their outputs (the last call
        returns them alone)."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return self._resolve()
        self.steps += 1
        self.last_step_sequences = len(plan.chunks)
        now = time.monotonic()
        for group in plan.admitted:
            state = self.requests[group.request_id]
            if state.scheduled_at is None:
                state.scheduled_at = now
                state.cached_prompt_tokens = group.leader.num_cached_prompt
        logits_for = [seq for group in plan.sampled for seq in group.seqs]
        states = [self.requests[g.request_id] for g in plan.sampled]
        pending = self.pending.tokens if self.pending is not None else None
        # A grammar's or a thinking span's step while the step before is in flight: its masks follow those tokens.
        follows = pending is not None and any(follows_tokens(s) for s in states)
        if follows and (forward := self.runner.launch_forward(plan.chunks, pending)) is not None:
            return self._choose_after(plan, states, forward)
        try:
            samples = None if follows else self._tail_samples(plan, logits_for, states, pending)
            logits, contrasts = None, None
            if samples is None:
                deferred = plausible_contrast_rows(states) if self.runner.plausible_contrasts else []
                logits, contrasts = self.runner.run_deferring(plan.chunks, logits_for, deferred, pending)
        except Exception as exc:  # the shared pass failed: fail its requests, keep the engine
            logger.exception("forward pass failed")
            outputs = self._resolve()
            return outputs + self._fail_plan(plan, f"The forward pass failed: {type(exc).__name__}")
        if samples is not None:  # chosen in the decode graph: only the tokens are read (now, or a step later)
            chosen = PendingStep.launch(states, samples)
            outputs = self._resolve()  # the previous step's tokens
            self.scheduler.complete_step(plan)
            self.pending = chosen
            if self.overlap_host:  # (a grammar's or a thinking span's next step: :meth:`_choose_after`)
                self.overlapped_steps += 1
                return outputs
            return outputs + self._resolve()
        assert logits is not None
        if self.overlap_host and overlappable(states):
            launched, failed = self._launch(states, logits, contrasts)
            outputs = self._resolve()  # the previous step's tokens, while the device runs this one
            self.scheduler.complete_step(plan)
            self.pending = launched
            self.overlapped_steps += launched is not None
            return outputs + failed
        outputs = self._resolve()
        self.scheduler.complete_step(plan)
        live = [i for i, s in enumerate(states) if self._running(s)]  # not finished by the previous step's tokens
        if len(live) < len(states):
            ranges = request_rows(states)
            rows = [r for i in live for r in ranges[i]]
            states, logits = [states[i] for i in live], logits.index_select(0, to_device(rows, logits.device, torch.long))
            contrasts = contrasts.select(rows) if contrasts is not None else None
        return outputs + self._sample(states, logits, contrasts)

    def _tail_samples(
        self, plan: StepPlan, logits_for: list[Sequence], states: list[RequestState], pending: PendingTokens | None
    ) -> DeviceSamples | None:
        """The step run through the decode graphs with its method and choice of tokens inside (the grammar masks of
        this step made on the host first), when the step replays; None, having run nothing, otherwise."""
        if not self.runner.tail_replayable(plan.chunks):
            return None  # (before the requests' rows are worked out: most such steps prefill)
        masks = step_masks(states, self.vocab_size)  # (their last tokens are on the host)
        samples = self.runner.run_with_tail(plan.chunks, logits_for, *tail_inputs(states), pending, masks)
        if samples is not None:
            self._drew(states)
        return samples

    def _choose_after(self, plan: StepPlan, states: list[RequestState], launched: LaunchedForward) -> list[GenerationOutput]:
        """A decode step whose requests' masks or rows follow the tokens of the step in flight (a grammar, a thinking
        span), its forward pass launched: those tokens read and accepted while it runs (as SGLang's overlap scheduler
        does), then the masks and rows made and the tail launched alone; the host chooses instead where the tail
        cannot (from the step's logits). The step stays in flight."""
        outputs = self._resolve()
        self.scheduler.complete_step(plan)
        states = [s for s in states if self._running(s)]  # not finished by the previous step's tokens
        logits_for = [seq for state in states for seq in state.group.seqs]
        try:
            masks = step_masks(states, self.vocab_size)
            samples = self.runner.choose_after(launched, logits_for, *tail_inputs(states), masks) if states else None
        except BaseException as exc:  # the masks failed: no row has a distribution
            if not is_request_failure(exc):
                raise
            logger.exception("method application failed")
            return outputs + [self._drop(s).finish("error", f"Decoding failed: {type(exc).__name__}") for s in states]
        if samples is None:
            return outputs + (self._sample(states, self.runner.logits_after(launched, logits_for)) if states else [])
        self._drew(states)
        self.pending = PendingStep.launch(states, samples)
        self.overlapped_steps += 1
        return outputs

    @staticmethod
    def _drew(states: list[RequestState]) -> None:
        """The tail chose the tokens of ``states``: their seeded requests drew in the graph (their next draw is the
        next one)."""
        for state in states:
            if isinstance(state.generator, SeededDraws) and not state.request.sampling.greedy:
                state.generator.take()

    def _running(self, state: RequestState) -> bool:
        return self.requests.get(state.request.request_id) is state

    def _fail_plan(self, plan: StepPlan, message: str) -> list[GenerationOutput]:
        ids = {c.seq for c in plan.chunks}
        failed = [s for s in self.requests.values() if any(seq in ids for seq in s.group.seqs)]
        return [self._drop(s).finish("error", message) for s in failed]

    def _launch(
        self, states: list[RequestState], logits: torch.Tensor, contrasts: DeferredContrasts | None = None
    ) -> tuple[PendingStep | None, list[GenerationOutput]]:
        """Queue the requests' method and sampling on the device (no grammar, no history: :func:`overlappable`) and
        give their sequences placeholders; or, where that fails, their error outputs."""
        try:
            logprobs = method_logprobs(logits, row_specs(states), None, contrasts)
            samples = sample_on_device(logprobs, [s.request.sampling for s in states], [s.generator for s in states])
        except BaseException as exc:  # the batched closed form or the sampler failed: no row has a token
            if not is_request_failure(exc):
                raise
            logger.exception("decoding failed")
            return None, [self._drop(s).finish("error", f"Decoding failed: {type(exc).__name__}") for s in states]
        return PendingStep.launch(states, samples), []

    def _resolve(self) -> list[GenerationOutput]:
        """The outputs of the step in flight, if any: its tokens read and put in place of the placeholders."""
        pending, self.pending = self.pending, None
        if pending is None:
            return []
        try:
            samples = pending.read()
        except BaseException as exc:
            if not is_request_failure(exc):
                raise
            logger.exception("reading the sampled tokens failed")
            live = [s for s in pending.states if self._running(s)]
            return [self._drop(s).finish("error", f"Decoding failed: {type(exc).__name__}") for s in live]
        keep = [i for i, s in enumerate(pending.states) if self._running(s)]  # not finished or aborted since
        states = [pending.states[i] for i in keep]
        return self._outputs(states, [samples[i] for i in keep], [pending.positions[i] for i in keep])

    def _sample(
        self, states: list[RequestState], logits: torch.Tensor, contrasts: DeferredContrasts | None = None
    ) -> list[GenerationOutput]:
        specs = row_specs(states)
        try:
            rule_out_early_stops(states, logits)
            # The grammars mask the distribution each method produced (for la and amulet the combined
            # one, once; their plausibility mask counts from the most likely allowed token), all
            # constrained rows at once, before the processors and the sampler.
            masks = step_masks(states, logits.shape[-1], logits.device)
            logprobs = method_logprobs(logits, specs, masks, contrasts)
        except BaseException as exc:  # the batched closed form or the masks failed: no row has a distribution
            if not is_request_failure(exc):
                raise
            logger.exception("method application failed")
            return [self._drop(s).finish("error", f"Decoding failed: {type(exc).__name__}") for s in states]
        try:
            params = [s.request.sampling for s in states]
            histories = [row_history(s) if s.request.sampling.needs_history else None for s in states]
            samples = sample_tokens(logprobs, params, [s.generator for s in states], histories)
        except BaseException as exc:  # the batched sampler failed: no row has a token
            if not is_request_failure(exc):
                raise
            logger.exception("sampling failed")
            return [self._drop(s).finish("error", f"Decoding failed: {type(exc).__name__}") for s in states]
        return self._outputs(states, samples)

    def _outputs(
        self, states: list[RequestState], samples: list[RowSample], positions: list[tuple[int, ...]] | None = None
    ) -> list[GenerationOutput]:
        return step_outputs(states, samples, positions, self.tokenizer, self._drop, self.fault_hook)

    def _drop(self, state: RequestState) -> RequestState:
        """The request dropped (its KV freed); its last output is ``state.finish(...)`` (:meth:`RequestState.finish`)."""
        self.requests.pop(state.request.request_id, None)
        self.scheduler.remove(state.group)
        return state
