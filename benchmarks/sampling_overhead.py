"""What the OpenAI/vLLM logits processors cost in decode throughput: ``python -m benchmarks.sampling_overhead``.

16 concurrent ``amulet`` streams (``--streams``) decode ``--new-tokens`` tokens each (EOS ignored), sampled
at temperature 1 with a seed, twice per repetition: plain, then with ``presence_penalty=0.5``,
``frequency_penalty=0.5``, ``repetition_penalty=1.1``, a ``logit_bias`` of 10 tokens and ``min_p=0.05`` on
every stream. Only decode steps are timed (prefill and a few warm-up steps are not), on the synchronous
engine; the sampler's own time (``sample_tokens``) is timed too. The model is a tiny random-weight Llama
with SmolLM2's vocabulary (49,152), so the forward pass is small and the vocabulary-wide work shows
(``--real``: the embedded SmolLM2-135M instead). The target: the processors cost under 5% of decode
throughput. Prints per-repetition figures and the median ratio; writes JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from amulet_core.engine import llm_engine as llm_engine_module
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.settings import MethodSettings
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.params import SamplingParams
from benchmarks.engine import QUESTIONS, contexts
from benchmarks.report import embedded_tokenizer, run_meta, write_report

PROCESSORS: dict[str, Any] = dict(
    presence_penalty=0.5,
    frequency_penalty=0.5,
    repetition_penalty=1.1,
    logit_bias=tuple((1000 + 37 * i, -5.0 + i) for i in range(10)),
    min_p=0.05,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rate(
    loaded: LoadedModel, streams: int, new_tokens: int, processors: dict[str, Any], warmup: int = 4
) -> dict[str, float]:
    """Decode tokens per second of ``streams`` amulet requests, and the sampler's milliseconds per step."""
    prompts = [contexts(loaded.tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(streams)]
    longest = max(max(len(p), len(b)) for p, b in prompts)
    max_model_len = longest + new_tokens + warmup + 16
    config = EngineConfig(
        max_num_seqs=2 * streams,
        max_model_len=max_model_len,
        kv_cache_tokens=2 * streams * (max_model_len + 16),
        max_num_batched_tokens=max(512, 2 * streams * longest),
    )
    engine = LLMEngine(loaded, config)
    for i, (pref, base) in enumerate(prompts):
        sampling = SamplingParams(max_tokens=new_tokens + warmup + 2, temperature=1.0, seed=i, ignore_eos=True, **processors)
        engine.add_request(GenerationRequest(f"s{i}", pref, sampling, MethodSettings(), base))
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for g in engine.scheduler.running for s in g.seqs):
        engine.step()  # prefill, untimed
    for _ in range(warmup):
        engine.step()
    sampler = llm_engine_module.sample_tokens
    sampling_s = [0.0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        _sync(loaded.device)
        start = time.perf_counter()
        try:
            return sampler(*args, **kwargs)
        finally:
            _sync(loaded.device)
            sampling_s[0] += time.perf_counter() - start

    llm_engine_module.sample_tokens = timed  # type: ignore[assignment]
    tokens = 0
    try:
        _sync(loaded.device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens += sum(len(o.token_ids) for o in engine.step())
        _sync(loaded.device)
        elapsed = time.perf_counter() - start
    finally:
        llm_engine_module.sample_tokens = sampler
    return {"tok_per_s": tokens / elapsed, "sampling_ms_per_step": 1000 * sampling_s[0] / new_tokens}


def measure(loaded: LoadedModel, streams: int, new_tokens: int, repetitions: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Plain and processed runs, alternated ``repetitions`` times; the median of the per-repetition ratios."""
    runs = []
    for rep in range(repetitions):
        plain = decode_rate(loaded, streams, new_tokens, {})
        processed = decode_rate(loaded, streams, new_tokens, PROCESSORS)
        ratio = processed["tok_per_s"] / plain["tok_per_s"]
        runs.append({"plain": plain, "processed": processed, "ratio": ratio})
        log(
            f"rep {rep}: plain {plain['tok_per_s']:.1f} tok/s (sampling {plain['sampling_ms_per_step']:.2f} ms/step), "
            f"processed {processed['tok_per_s']:.1f} tok/s (sampling {processed['sampling_ms_per_step']:.2f} ms/step), "
            f"ratio {ratio:.3f}"
        )
    median = statistics.median(r["ratio"] for r in runs)
    return {"runs": runs, "median_ratio": median, "median_overhead_percent": 100 * (1 - median)}


def load(args: argparse.Namespace) -> LoadedModel:
    from amulet_core.model.loading import ModelConfig, load_model, resolve_device

    device = resolve_device(args.device)
    if args.real:
        return load_model(
            ModelConfig(device=args.device, dtype=args.dtype, cpu_threads=args.cpu_threads, model_cache=default_model_cache())
        )

    from benchmarks.host_overhead import random_model, tiny_llama_config

    tokenizer = embedded_tokenizer()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return random_model(tiny_llama_config(len(tokenizer)), tokenizer, device, dtype, "tiny-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the embedded SmolLM2-135M instead of the tiny random Llama")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="with --real")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per run")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.cpu_threads)
    loaded = load(args)
    torch.set_num_threads(args.cpu_threads)  # loading may set the serving thread count
    result = measure(loaded, args.streams, args.new_tokens, args.repetitions, print)
    processors = {k: (list(v) if isinstance(v, tuple) else v) for k, v in PROCESSORS.items()}
    result["meta"] = run_meta(
        loaded.device, loaded.dtype, loaded.name, streams=args.streams, new_tokens=args.new_tokens, processors=processors
    )
    ratio, overhead = result["median_ratio"], result["median_overhead_percent"]
    print(f"median processed/plain decode throughput: {ratio:.3f} ({overhead:.1f}% overhead)")
    if args.output:
        write_report(args.output, result)


if __name__ == "__main__":
    main()
