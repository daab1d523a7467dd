"""Engine benchmark: ``python -m benchmarks.engine`` (prints a table, writes JSON).

In one run on one model (default: the embedded SmolLM2-135M), greedy, ``--new-tokens`` tokens
each (EOS ignored so every run decodes the same count):

* transformers ``generate``, plain greedy, in the engine's dtype;
* the paper-style loop: full recompute of both contexts every token (logits of every position,
  as ``model(input_ids).logits[:, -1]`` computes them), two separate passes, the iterative game
  on the full vocabulary (``amulet_core.method.reference``);
* the engine, one stream: ``amulet`` and ``base``;
* the engine, aggregate over 1, 4, 8 and 16 concurrent ``amulet`` streams;
* time to first token of an ``amulet`` request with a ~1,000-token system prompt, without and
  with a prefix-cache hit.

Timings on shared machines are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.host_heap import keep_freed_memory
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, preference_message_pair
from amulet_core.method.reference import reference_generate
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import render_chat
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, resolve_device, serving_cpu_threads
from amulet_core.sampling.params import SamplingParams
from benchmarks.report import embedded_tokenizer, run_meta, write_report

QUESTIONS = [
    "Write a story about a lighthouse keeper.",
    "Explain how vaccines train the immune system.",
    "Describe a walk through a busy market.",
    "What should I know before adopting a dog?",
    "How do airplanes stay in the air?",
    "Plan a three-day trip to the mountains.",
    "Why do leaves change color in autumn?",
    "Give advice to someone starting their first job.",
]
WORDS = [
    "river",
    "stone",
    "cloud",
    "lamp",
    "garden",
    "winter",
    "signal",
    "harbor",
    "paper",
    "violet",
    "engine",
    "meadow",
    "copper",
    "echo",
]


def contexts(tokenizer, question: str, system: str = PAPER_SYSTEM_PROMPT) -> tuple[tuple[int, ...], tuple[int, ...]]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    pair = preference_message_pair(messages, "concise")
    return tuple(render_chat(tokenizer, pair.pref)), tuple(render_chat(tokenizer, pair.contrast))


def bench_generate(loaded: LoadedModel, prompt: tuple[int, ...], new_tokens: int) -> float:
    ids = torch.tensor([prompt], device=loaded.device)
    kwargs = dict(do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    with torch.inference_mode():
        loaded.model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        start = time.perf_counter()
        out = loaded.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / elapsed


def bench_paper_loop(loaded: LoadedModel, pref: tuple[int, ...], base: tuple[int, ...], new_tokens: int) -> float:
    start = time.perf_counter()
    out = reference_generate(loaded.model, pref, base, MethodSettings(), new_tokens, all_logits=True)
    return len(out) / (time.perf_counter() - start)


def request(rid: str, method: Method, pref, base, new_tokens: int) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    if method is Method.BASE:
        return GenerationRequest(rid, base, sampling, MethodSettings(method=Method.BASE))
    return GenerationRequest(rid, pref, sampling, MethodSettings(method=method), base)


async def run_streams(engine: AsyncEngine, requests: list[GenerationRequest]) -> tuple[float, list[float]]:
    """Aggregate tok/s of the requests run together, and each one's time to first token."""

    async def one(req: GenerationRequest) -> tuple[int, float]:
        start = time.perf_counter()
        first = None
        tokens = 0
        async for out in engine.generate(req):
            if out.token_ids and first is None:
                first = time.perf_counter() - start
            tokens += len(out.token_ids)
        return tokens, first or 0.0

    start = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - start
    return sum(t for t, _ in results) / elapsed, [f for _, f in results]


async def bench_engine(engine: AsyncEngine, tokenizer, new_tokens: int, streams: list[int]) -> dict[str, float]:
    pref, base = contexts(tokenizer, QUESTIONS[0])
    results: dict[str, float] = {}
    await run_streams(engine, [request("warm", Method.AMULET, pref, base, 8)])
    results["engine_amulet_1"], _ = await run_streams(engine, [request("a1", Method.AMULET, pref, base, new_tokens)])
    results["engine_base_1"], _ = await run_streams(engine, [request("b1", Method.BASE, pref, base, new_tokens)])
    for n in streams:
        reqs = [request(f"c{n}-{i}", Method.AMULET, *contexts(tokenizer, QUESTIONS[i % 8]), new_tokens) for i in range(n)]
        results[f"engine_amulet_aggregate_{n}"], _ = await run_streams(engine, reqs)
    rng = random.Random(0)
    long_system = " ".join(rng.choice(WORDS) for _ in range(1000))
    cold = request("ttft-cold", Method.AMULET, *contexts(tokenizer, QUESTIONS[1], long_system), 1)
    hit = request("ttft-hit", Method.AMULET, *contexts(tokenizer, QUESTIONS[2], long_system), 1)
    results["long_prompt_tokens"] = len(cold.prompt_ids)
    _, (results["ttft_long_prompt_cold_s"],) = await run_streams(engine, [cold])
    _, (results["ttft_long_prompt_prefix_hit_s"],) = await run_streams(engine, [hit])
    return results


def table(r: dict[str, float], streams: list[int]) -> str:
    rows = [
        ("transformers generate, plain greedy (tok/s)", r["generate"]),
        ("paper-style loop, amulet (tok/s)", r["paper_loop"]),
        ("engine amulet, 1 stream (tok/s)", r["engine_amulet_1"]),
        ("engine base, 1 stream (tok/s)", r["engine_base_1"]),
    ]
    rows += [(f"engine amulet, {n} streams, aggregate (tok/s)", r[f"engine_amulet_aggregate_{n}"]) for n in streams]
    rows += [
        (f"TTFT, {int(r['long_prompt_tokens'])}-token prompt, cold (s)", r["ttft_long_prompt_cold_s"]),
        ("TTFT, same system prompt, prefix-cache hit (s)", r["ttft_long_prompt_prefix_hit_s"]),
    ]
    ratios = [
        ("engine amulet / engine base (target >= 0.85)", r["engine_amulet_1"] / r["engine_base_1"]),
        ("engine base / transformers generate (target >= 1.0)", r["engine_base_1"] / r["generate"]),
        ("engine amulet / paper-style loop (target >= 10)", r["engine_amulet_1"] / r["paper_loop"]),
        ("aggregate at 8 streams / 1 stream (target >= 3)", r["engine_amulet_aggregate_8"] / r["engine_amulet_aggregate_1"]),
        ("TTFT prefix hit / cold (target <= 0.5)", r["ttft_long_prompt_prefix_hit_s"] / r["ttft_long_prompt_cold_s"]),
    ]
    lines = ["| measurement | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3g} |" for name, value in rows]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in ratios]
    return "\n".join(lines)


def host_overhead_main(args: argparse.Namespace) -> None:

    from amulet_core.model.loading import resolve_dtype
    from benchmarks.host_overhead import format_host_overhead, measure_host_overhead, random_model, tiny_llama_config

    device = resolve_device(args.device)
    if device.type == "cpu":  # as the server's engine worker sets them
        torch.set_num_threads(args.cpu_threads or 1)
        keep_freed_memory()
    dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else resolve_dtype(args.dtype, device)
    tokenizer = embedded_tokenizer()
    loaded = random_model(tiny_llama_config(len(tokenizer)), tokenizer, device, dtype, "tiny-llama")
    result = measure_host_overhead(loaded, num_requests=args.host_requests, steps=args.host_steps)
    result["meta"] = run_meta(device, dtype)
    print(format_host_overhead(result))
    write_report(
        args.output if args.output != "benchmarks/results/engine.json" else "benchmarks/results/host_overhead.json", result
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder, cached id or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--cpu-threads", type=int, default=None, help="torch threads on the CPU, for every measurement (default: the server's)"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--paper-tokens", type=int, default=None, help="tokens for the slow paper loop (default: --new-tokens)")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--output", default="benchmarks/results/engine.json")
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="only the host work per decode step: 64 amulet requests on a tiny Llama with SmolLM2's vocabulary",
    )
    parser.add_argument("--host-requests", type=int, default=64, help="concurrent requests for --host-overhead")
    parser.add_argument("--host-steps", type=int, default=20, help="timed decode steps for --host-overhead")
    args = parser.parse_args()
    if args.host_overhead:
        host_overhead_main(args)
        return
    streams = [int(s) for s in args.streams.split(",")]
    model_config = ModelConfig(
        model=args.model, device=args.device, dtype=args.dtype, cpu_threads=args.cpu_threads, model_cache=default_model_cache()
    )
    if resolve_device(args.device).type == "cpu":  # the same threads and heap for the baselines as for the engine
        torch.set_num_threads(serving_cpu_threads(model_config))
        keep_freed_memory()
    loaded = load_model(model_config)
    pref, base = contexts(loaded.tokenizer, QUESTIONS[0])
    results: dict[str, float] = {"generate": bench_generate(loaded, base, args.new_tokens)}
    results["paper_loop"] = bench_paper_loop(loaded, pref, base, args.paper_tokens or args.new_tokens)
    engine = AsyncEngine(model_config, EngineConfig(max_model_len=2048), loader=lambda _: loaded).start()
    engine.wait_ready()
    try:
        results.update(asyncio.run(bench_engine(engine, loaded.tokenizer, args.new_tokens, streams)))
    finally:
        engine.close()
    meta = run_meta(
        loaded.device,
        loaded.dtype,
        loaded.name,
        gpu=torch.cuda.get_device_name() if loaded.device.type == "cuda" else None,
        new_tokens=args.new_tokens,
        paper_tokens=args.paper_tokens or args.new_tokens,
    )
    print(json.dumps(meta))
    print(table(results, streams))
    write_report(args.output, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
