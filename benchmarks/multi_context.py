"""Several preference contexts: ``python -m benchmarks.multi_context [--real]`` (prints a table, writes JSON).

Greedy decoding through the synchronous engine (``LLMEngine``), EOS ignored, on one torch thread:

* one stream: ``base`` (one context) and ``amulet`` with K = 1, 2 and 4 preference contexts plus the
  contrast context (K + 1 sequences), each the median of ``--repeats`` runs. The rate is the decode
  rate: tokens after the first one, over the time after the first one (prefill excluded);
* aggregate: ``--streams`` concurrent amulet requests with K = 2 (3 sequences each), tokens over wall
  time (prefill included), the median of the repeats.

``--real``: the embedded SmolLM2-135M in ``--dtype`` (auto: bfloat16 where the CPU has AVX512-BF16);
otherwise a tiny random Llama with SmolLM2's vocabulary (the host and vocabulary work, not the model).
Timings on shared machines are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, preference_message_pair
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import render_chat
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, embedded_model_file, load_model, resolve_device, resolve_dtype
from amulet_core.sampling.params import SamplingParams
from benchmarks.engine import QUESTIONS
from benchmarks.report import run_meta, write_report

PRESETS = ("concise", "formal", "creative", "pleasant")


def request(rid: str, tokenizer, question: str, k: int, new_tokens: int) -> GenerationRequest:
    """``k`` = 0: base on the conversation as given; else amulet with the first ``k`` presets (equal weights)
    as preference contexts and the conversation as given as the contrast context."""
    messages = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    pairs = [preference_message_pair(messages, name) for name in PRESETS[: max(k, 1)]]
    contrast = tuple(render_chat(tokenizer, pairs[0].contrast))
    if k == 0:
        return GenerationRequest(rid, contrast, sampling, MethodSettings(method=Method.BASE))
    prefs = [tuple(render_chat(tokenizer, p.pref)) for p in pairs]
    settings = MethodSettings(method=Method.AMULET, weights=(1.0,) * k if k > 1 else ())
    return GenerationRequest(rid, prefs[0], sampling, settings, contrast, tuple(prefs[1:]))


def decode_rate(engine: LLMEngine, req: GenerationRequest) -> float:
    """Tokens per second after the first token of one request alone."""
    engine.add_request(req)
    first: float | None = None
    tokens = 0
    while engine.has_work():
        for out in engine.step():
            tokens += len(out.token_ids)
            if first is None and out.token_ids:
                first = time.perf_counter()
    assert first is not None
    return (tokens - 1) / (time.perf_counter() - first)


def aggregate_rate(engine: LLMEngine, reqs: list[GenerationRequest]) -> float:
    """Tokens per second of all the requests together, prefill included."""
    start = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    tokens = 0
    while engine.has_work():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start)


def load(args: argparse.Namespace) -> LoadedModel:
    if args.real:
        return load_model(ModelConfig(device=args.device, dtype=args.dtype, cpu_threads=1, model_cache=default_model_cache()))
    from transformers import AutoTokenizer

    from benchmarks.host_overhead import random_model, tiny_llama_config

    device = resolve_device(args.device)
    dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else resolve_dtype(args.dtype, device)
    gguf = embedded_model_file()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return random_model(tiny_llama_config(len(tokenizer)), tokenizer, device, dtype, "tiny-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the embedded SmolLM2 (default: a tiny random Llama)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/multi_context.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load(args)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=1024, kv_cache_tokens=16384))
    tok = loaded.tokenizer
    with torch.inference_mode():
        decode_rate(engine, request("warm", tok, QUESTIONS[0], 2, 8))
        results: dict[str, float] = {}
        runs: dict[str, list[float]] = {}
        for k in (0, 1, 2, 4):
            name = "base" if k == 0 else f"amulet_k{k}"
            rates = [
                decode_rate(engine, request(f"{name}-{i}", tok, QUESTIONS[i + 1], k, args.new_tokens))
                for i in range(args.repeats)
            ]
            runs[name], results[name] = rates, statistics.median(rates)
        name = f"amulet_k2_aggregate_{args.streams}"
        rates = []
        for rep in range(args.repeats):
            reqs = [request(f"agg{rep}-{i}", tok, QUESTIONS[i % len(QUESTIONS)], 2, args.new_tokens) for i in range(args.streams)]
            rates.append(aggregate_rate(engine, reqs))
        runs[name], results[name] = rates, statistics.median(rates)
    meta = run_meta(loaded.device, loaded.dtype, loaded.name, new_tokens=args.new_tokens, repeats=args.repeats)
    lines = ["| measurement (tok/s, median) | value | / base |", "|---|---|---|"]
    lines += [f"| {n} | {v:.3g} | {v / results['base']:.2f} |" for n, v in results.items()]
    print(json.dumps(meta))
    print("\n".join(lines))
    print("goal: amulet_k2 / base >= 0.75")
    write_report(args.output, {"meta": meta, "results": results, "runs": runs})


if __name__ == "__main__":
    main()
