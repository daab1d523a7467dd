"""Host work per decode step of the engine, apart from the model's forward pass.

``python -m benchmarks.engine --host-overhead`` runs 64 concurrent two-context (``amulet``)
requests, 128 sequences, on a tiny random-weight Llama with SmolLM2's vocabulary (49,152), so the
forward pass is small and the host work shows. Only decode steps are timed. Each part is timed by
wrapping the engine's own functions (no instrumentation lives in the engine):

* ``scheduling``: ``Scheduler.schedule`` and ``Scheduler.complete_step``;
* ``input_building``: ``ModelRunner.run`` less the model's forward call (token, position, slot
  and index tensors);
* ``forward``: the model's forward call (on CUDA, the decode step's graph replay);
* ``method_combination``: the vocabulary-wide math of the method (``method_logprobs``);
* ``sampling``: choosing the tokens (the batched sampler, or the per-row ``choose_token``);
* ``detokenize_and_outputs``: the rest of the step (detokenising, stop checks, logprobs, outputs).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from amulet_core.engine import llm_engine as llm_engine_module
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.settings import MethodSettings
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.params import SamplingParams

SMOLLM2_VOCAB = 49_152
PARTS = ("scheduling", "input_building", "forward", "method_combination", "sampling", "detokenize_and_outputs")


TINY_MODEL_FIELDS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.5,
    eos_token_id=2,
    bos_token_id=1,
)
"""The two-layer shape with large random weights that the benchmarks and the tests' tiny models share."""


def tiny_llama_config(vocab_size: int = SMOLLM2_VOCAB, **overrides: Any) -> Any:
    """A two-layer Llama config with large random weights (TINY_MODEL_FIELDS)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_MODEL_FIELDS, "vocab_size": vocab_size, **overrides})


def random_model(config: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, name: str) -> LoadedModel:
    """A random-weight causal LM built from ``config`` (seeded), wrapped as the engine loads models."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, name, device, dtype, frozenset({int(config.eos_token_id)}))


class _Timers:
    def __init__(self, device: torch.device) -> None:
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.totals[part] += time.perf_counter() - start

        return timed


def _instrument(engine: LLMEngine, timers: _Timers) -> None:
    sched = engine.scheduler
    sched.schedule = timers.wrap("scheduling", sched.schedule)  # type: ignore[method-assign]
    sched.complete_step = timers.wrap("scheduling", sched.complete_step)  # type: ignore[method-assign]
    runner = engine.runner
    runner.run = timers.wrap("input_building", runner.run)  # type: ignore[method-assign]
    if runner.graphs is not None:  # decode steps replay CUDA graphs: the replay is the forward pass
        runner.graphs.launch = timers.wrap("forward", runner.graphs.launch)  # type: ignore[method-assign]
    else:
        runner.forward = timers.wrap("forward", runner.forward)  # forward time is subtracted from input building below
    for name, part in (("method_logprobs", "method_combination"), ("choose_token", "sampling"), ("sample_tokens", "sampling")):
        fn = getattr(llm_engine_module, name, None)
        if fn is not None:
            setattr(llm_engine_module, name, timers.wrap(part, fn))


def _restore(originals: dict[str, Any]) -> None:
    for name, fn in originals.items():
        setattr(llm_engine_module, name, fn)


def measure_host_overhead(
    loaded: LoadedModel,
    num_requests: int = 64,
    prompt_tokens: int = 32,
    warmup_steps: int = 3,
    steps: int = 20,
    seed: int = 0,
    cuda_graphs: bool = True,
) -> dict[str, Any]:
    """Milliseconds per decode step, per part, over ``steps`` decode steps of ``num_requests`` amulet requests."""
    rng = random.Random(seed)
    vocab = loaded.model.config.get_text_config().vocab_size
    total_new = warmup_steps + steps + 4
    max_model_len = prompt_tokens + 8 + total_new + 16
    config = EngineConfig(
        max_num_seqs=2 * num_requests,
        max_model_len=max_model_len,
        kv_cache_tokens=2 * num_requests * (max_model_len + 16),
        max_num_batched_tokens=max(512, 2 * num_requests * (prompt_tokens + 8)),
        cuda_graphs=cuda_graphs,
        overlap_host=False,  # the parts of a synchronous step (an overlapped one reads its tokens a step later)
    )
    engine = LLMEngine(loaded, config)
    sampling = SamplingParams(max_tokens=total_new, temperature=0, ignore_eos=True)
    for i in range(num_requests):
        head = [rng.randrange(10, vocab) for _ in range(prompt_tokens)]
        pref = tuple(head + [rng.randrange(10, vocab) for _ in range(8)])
        base = tuple(head + [rng.randrange(10, vocab) for _ in range(3)])
        engine.add_request(GenerationRequest(f"h{i}", pref, sampling, MethodSettings(), base))
    # Prefill, then warm-up decode steps, untimed.
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for g in engine.scheduler.running for s in g.seqs):
        engine.step()
    for _ in range(warmup_steps):
        engine.step()
    names = ("method_logprobs", "choose_token", "sample_tokens")
    originals = {n: getattr(llm_engine_module, n) for n in names if hasattr(llm_engine_module, n)}
    timers = _Timers(loaded.device)
    forward = engine.runner.forward
    _instrument(engine, timers)
    step_total = 0.0
    sequences = 0
    try:
        for _ in range(steps):
            timers.sync()
            start = time.perf_counter()
            engine.step()
            timers.sync()
            step_total += time.perf_counter() - start
            sequences = max(sequences, engine.last_step_sequences)
    finally:
        _restore(originals)
        engine.runner.forward = forward
        graphs = engine.runner.graphs
        if graphs is not None and "launch" in vars(graphs):
            delattr(graphs, "launch")  # the instance attribute set by _instrument; the class's method again
    t = timers.totals
    parts = {
        "scheduling": t["scheduling"],
        "input_building": t["input_building"] - t["forward"],
        "forward": t["forward"],
        "method_combination": t["method_combination"],
        "sampling": t["sampling"],
    }
    parts["detokenize_and_outputs"] = step_total - sum(parts.values())
    ms = {k: 1000 * v / steps for k, v in parts.items()}
    ms["step_total"] = 1000 * step_total / steps
    ms["host_python"] = ms["scheduling"] + ms["input_building"] + ms["detokenize_and_outputs"]
    ms["vocab_math"] = ms["method_combination"] + ms["sampling"]
    ms["outside_forward"] = ms["step_total"] - ms["forward"]
    return {"ms_per_decode_step": ms, "sequences": sequences, "requests": num_requests, "steps": steps}


def format_host_overhead(result: dict[str, Any]) -> str:
    ms = result["ms_per_decode_step"]
    rows = [
        ("scheduling", ms["scheduling"]),
        ("input building (tokens, positions, slots, index tensors)", ms["input_building"]),
        ("detokenising + output building", ms["detokenize_and_outputs"]),
        ("**Python host work (sum of the three above)**", ms["host_python"]),
        ("method combination (vocabulary-wide)", ms["method_combination"]),
        ("sampling", ms["sampling"]),
        ("**vocabulary-wide math (sum of the two above)**", ms["vocab_math"]),
        ("**outside the forward pass**", ms["outside_forward"]),
        ("model forward pass", ms["forward"]),
        ("whole decode step", ms["step_total"]),
    ]
    lines = [f"{result['requests']} amulet requests, {result['sequences']} sequences per step, {result['steps']} decode steps"]
    lines += ["| part | ms per decode step |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in rows]
    return "\n".join(lines)
