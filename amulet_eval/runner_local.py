"""The in-process runner: the engine (AsyncEngine) for base/pref/la/amulet/cfg, transformers beam search for beam16."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import (
    Message,
    Placement,
    preference_contexts,
    resolve_default_system_prompt,
)
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, model_display_name
from amulet_core.sampling.params import SamplingParams
from amulet_eval.conditions import parse_condition
from amulet_eval.config import BEAM_METHOD, BEAM_WIDTH, CFG_METHOD, GenerationConfig, LocalBackend
from amulet_eval.generate import Generated, GenerationError, Job, conversation

LOAD_POLL_S = 0.05
"""How often :meth:`LocalRunner.start` looks whether the model has loaded (a wait that Ctrl-C can cancel)."""


def contexts_per_request(generation: GenerationConfig) -> int:
    """The most contexts one request of this run decodes: K + 1 for the widest condition (K preference contexts and
    the contrast one of la, amulet and cfg), at least 2."""
    return 1 + max((len(parse_condition(p).texts) for p in generation.preferences), default=1)


def engine_config(backend: LocalBackend, concurrency: int, contexts: int = 2) -> EngineConfig:
    """Room for ``concurrency`` requests of ``contexts`` contexts each at once."""
    seqs = max(2, contexts * concurrency)
    return EngineConfig(max_num_seqs=seqs, max_model_len=backend.max_model_len, max_num_batched_tokens=max(512, seqs))


class StopWhenSet(StoppingCriteria):
    """Ends a ``generate`` call at its next step once ``event`` is set (a cancelled beam16 job)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, done)


@torch.inference_mode()
def beam_search(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: frozenset[int],
    num_beams: int = BEAM_WIDTH,
    cancel: threading.Event | None = None,
) -> Generated:
    """Beam search on one prompt with transformers ``generate`` (the paper's beam baseline); ``cancel``, once set,
    ends it at its next step (what it has then is returned).

    The engine switches the model to its paged attention; a call without the engine's batch falls
    back to SDPA, which is exact here: every beam shares the one unpadded prompt.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    eos = sorted(eos_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        num_return_sequences=1,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([StopWhenSet(cancel)]) if cancel is not None else None,
    )
    new = out[0, ids.shape[1] :].tolist()
    stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
    if stop is not None:
        new = new[: stop + 1]
    text = tokenizer.decode([t for t in new if t not in eos_ids], skip_special_tokens=True)
    return Generated(text, len(new), "stop" if stop is not None else "length")


def job_contexts(
    job: Job, messages: list[Message], default_system: str, placement: Placement
) -> tuple[MethodSettings, list[list[Message]]]:
    """The settings and the conversations of an engine job, as the server builds them for the same request
    (server/requests/preference.py): the preference contexts (one per member of the condition, their weights
    in the settings), then the contrast context for la and amulet (carrying the column's negative, if any);
    base decodes the conversation as given. cfg: the conversation as given, then the one carrying the
    negative prompt (the row's preference is not used). The sentences go where ``placement`` says."""
    spec = job.method
    settings = spec.engine_settings
    if spec.kind == CFG_METHOD:
        built = preference_contexts(messages, (), default_system, spec.negative, placement)
        return settings, [*built.prefs, built.contrast]
    condition = job.condition
    if condition.joined:
        settings = dataclasses.replace(settings, weights=condition.weights)
    two = settings.method.has_contrast
    built = preference_contexts(messages, condition.texts, default_system, spec.negative if two else None, placement)
    if settings.method is Method.BASE:
        return settings, [built.contrast]
    return settings, [*built.prefs, built.contrast] if two else list(built.prefs)


class LocalRunner:
    """Runs the jobs on an AsyncEngine in this process; beam16 jobs on the same model, one at a time."""

    serial_kinds = frozenset({BEAM_METHOD})

    def __init__(
        self, backend: LocalBackend, generation: GenerationConfig, loader: Callable[[ModelConfig], LoadedModel] = load_model
    ) -> None:
        self.backend = backend
        self.generation = generation
        threads = backend.cpu_threads or os.cpu_count() or 1
        self.model_config = ModelConfig(
            model=backend.model, device=backend.device, dtype=backend.dtype, cpu_threads=threads, model_cache=backend.model_cache
        )
        self._loader = loader
        self._engine: AsyncEngine | None = None

    async def resolve_model_name(self) -> str:
        return model_display_name(self.model_config)

    async def start(self) -> None:
        config = engine_config(self.backend, self.generation.concurrency, contexts_per_request(self.generation))
        engine = AsyncEngine(self.model_config, config, loader=self._loader).start()
        self._engine = engine
        while not engine.load_finished:  # not a thread waiting on the load: Ctrl-C ends this wait at once
            await asyncio.sleep(LOAD_POLL_S)
        engine.wait_ready(0)  # raises the load's error

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the runner is not started")
        return self._engine

    async def generate(self, job: Job) -> Generated:
        gen = self.generation
        engine = self.engine
        default_system = resolve_default_system_prompt(gen.default_system_prompt, engine.renderer.template_system_prompt())
        messages = conversation(gen.system_prompt, job.question.question)
        if job.method.kind == BEAM_METHOD:
            if job.condition.joined:
                raise GenerationError(f"{BEAM_METHOD} decodes one pref context; {job.preference!r} joins several.")
            llm = engine.engine
            pref = preference_contexts(messages, [job.preference], default_system, placement=gen.preference_placement).prefs[0]
            prompt = engine.renderer.encode_chat(pref)
            cancel = threading.Event()
            try:
                return await asyncio.to_thread(
                    beam_search, llm.runner.model, llm.tokenizer, prompt, gen.max_tokens, llm.eos_token_ids, cancel=cancel
                )
            finally:
                cancel.set()  # cancelled (Ctrl-C): the search thread ends at its next step instead of running on
        settings, contexts = job_contexts(job, messages, default_system, gen.preference_placement)
        ids = [engine.renderer.encode_chat(c) for c in contexts]
        contrast = ids.pop() if settings.method.has_contrast else None
        request = GenerationRequest(
            request_id=f"eval-{uuid.uuid4().hex}",
            prompt_ids=ids[0],
            sampling=SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, seed=gen.seed),
            method=settings,
            contrast_prompt_ids=contrast,
            extra_prompt_ids=tuple(ids[1:]),
        )
        pieces: list[str] = []
        async for out in engine.generate(request):
            pieces.append(out.text)
            if out.finished:
                if out.finish_reason not in ("stop", "length"):
                    raise GenerationError(f"The engine failed on {job.key}: {out.finish_reason} ({out.error}).")
                tokens = out.usage.completion_tokens if out.usage is not None else 0
                return Generated("".join(pieces), tokens, str(out.finish_reason))
        raise GenerationError(f"The engine ended {job.key} without a finish.")

    async def close(self) -> None:
        """Stop the engine: its open requests are aborted and its worker ends after the step under way. Stopped while
        the model still loads (Ctrl-C), the worker ends once the load does, and nothing waits for it."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if engine.load_finished:
            await asyncio.to_thread(engine.close)
        else:
            threading.Thread(target=engine.close, name="amulet-eval-engine-close", daemon=True).start()
