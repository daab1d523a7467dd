"""The in-process runner: the engine (AsyncEngine) for base/pref/la/amulet, transformers beam search for beam16."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.loading import LoadedModel, ModelConfig, load_model, model_display_name
from amulet_core.methods import Method
from amulet_core.prompts import preference_message_pair, resolve_default_system_prompt
from amulet_core.sampling_params import SamplingParams
from amulet_eval.config import BEAM_METHOD, BEAM_WIDTH, GenerationConfig, LocalBackend
from amulet_eval.generate import Generated, GenerationError, Job, conversation


def engine_config(backend: LocalBackend, concurrency: int) -> EngineConfig:
    """Room for ``concurrency`` two-context requests at once."""
    seqs = max(2, 2 * concurrency)
    return EngineConfig(max_num_seqs=seqs, max_model_len=backend.max_model_len, max_num_batched_tokens=max(512, seqs))


@torch.inference_mode()
def beam_search(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: frozenset[int],
    num_beams: int = BEAM_WIDTH,
) -> Generated:
    """Beam search on one prompt with transformers ``generate`` (the paper's beam baseline).

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
    )
    new = out[0, ids.shape[1] :].tolist()
    stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
    if stop is not None:
        new = new[: stop + 1]
    text = tokenizer.decode([t for t in new if t not in eos_ids], skip_special_tokens=True)
    return Generated(text, len(new), "stop" if stop is not None else "length")


class LocalRunner:
    """Runs the jobs on an AsyncEngine in this process; beam16 jobs on the same model, one at a time."""

    serial_kinds = frozenset({BEAM_METHOD})

    def __init__(
        self, backend: LocalBackend, generation: GenerationConfig, loader: Callable[[ModelConfig], LoadedModel] = load_model
    ) -> None:
        self.backend = backend
        self.generation = generation
        threads = backend.cpu_threads or os.cpu_count() or 1
        self.model_config = ModelConfig(model=backend.model, device=backend.device, dtype=backend.dtype, cpu_threads=threads)
        self._loader = loader
        self._engine: AsyncEngine | None = None

    async def resolve_model_name(self) -> str:
        return model_display_name(self.model_config)

    async def start(self) -> None:
        config = engine_config(self.backend, self.generation.concurrency)
        engine = AsyncEngine(self.model_config, config, loader=self._loader).start()
        self._engine = engine
        await asyncio.to_thread(engine.wait_ready)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the runner is not started")
        return self._engine

    async def generate(self, job: Job) -> Generated:
        gen = self.generation
        engine = self.engine
        default_system = resolve_default_system_prompt(gen.default_system_prompt, engine.template_system_prompt())
        pair = preference_message_pair(conversation(gen.system_prompt, job.question.question), job.preference, default_system)
        if job.method.kind == BEAM_METHOD:
            llm = engine.engine
            prompt = engine.encode_chat(pair.pref)
            return await asyncio.to_thread(
                beam_search, llm.runner.model, llm.tokenizer, prompt, gen.max_tokens, llm.eos_token_ids
            )
        settings = job.method.engine_settings
        contexts = {Method.BASE: [pair.base], Method.PREF: [pair.pref]}.get(settings.method, [pair.pref, pair.base])
        ids = [engine.encode_chat(c) for c in contexts]
        request = GenerationRequest(
            request_id=f"eval-{uuid.uuid4().hex}",
            prompt_ids=ids[0],
            sampling=SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, seed=gen.seed),
            method=settings,
            base_prompt_ids=ids[1] if len(ids) == 2 else None,
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
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
            self._engine = None
