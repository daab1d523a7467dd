"""What structured outputs cost: ``python -m benchmarks.structured_overhead``.

1. Decode throughput: 16 concurrent ``amulet`` streams (``--streams``) decode ``--new-tokens`` tokens each,
   sampled at temperature 1 with a seed, twice per repetition: unconstrained, then constrained by a JSON
   schema (``SCHEMA``: an array of at least 100 small objects, so that no stream can finish inside the
   timed window). Only decode steps are timed (the forward pass included; prefill and warm-up steps are
   not), on the synchronous engine, as in ``benchmarks.sampling_overhead``; the masks' own time
   (``grammar_masks``: the per-row bitmask filling and the unpacking) is timed too. Target: the grammar
   costs under 10% of decode throughput.
2. Grammar compile time: the first ``GrammarCompiler.check`` of the schema (and of a larger one, ``--fields``
   enum properties), against a second check of the same spec (a cache hit) and a fresh matcher from the cache.

The model is a tiny random-weight Llama with SmolLM2's vocabulary (``--real``: the embedded SmolLM2-135M).
Prints per-repetition figures and the median ratio; writes JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from amulet_core.engine import llm_engine as llm_engine_module
from amulet_core.grammar.compiler import GrammarCompiler
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.model.loading import LoadedModel
from benchmarks.report import run_meta, write_report
from benchmarks.sampling_overhead import decode_rate, load

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 100}},
    "required": ["people"],
    "additionalProperties": False,
}


def large_schema(fields: int) -> dict[str, Any]:
    """An object of ``fields`` required enum properties of 20 values each (a slow schema to compile)."""
    props = {f"field_{i}": {"enum": [f"value_{i}_{j}" for j in range(20)]} for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def constrained_rate(loaded: LoadedModel, streams: int, new_tokens: int, spec: GrammarSpec | None) -> dict[str, float]:
    """``decode_rate`` with (or without) the grammar on every stream, and the masks' milliseconds per step."""
    masks = llm_engine_module.grammar_masks
    spent = [0.0, 0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return masks(*args, **kwargs)
        finally:
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - start
            spent[1] += 1

    llm_engine_module.grammar_masks = timed  # type: ignore[assignment]
    try:
        result = decode_rate(loaded, streams, new_tokens, {} if spec is None else {"grammar": spec})
    finally:
        llm_engine_module.grammar_masks = masks
    result["mask_ms_per_step"] = 1000 * spent[0] / spent[1] if spent[1] else 0.0
    return result


def compile_times(loaded: LoadedModel, vocab_size: int, schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Milliseconds to build the compiler, then per schema: first check, second check (cached), a fresh matcher."""
    start = time.perf_counter()
    compiler = GrammarCompiler(loaded.tokenizer, vocab_size, eos_token_ids=loaded.eos_token_ids)
    out: dict[str, Any] = {"compiler_build_ms": 1000 * (time.perf_counter() - start)}
    for name, schema in schemas.items():
        spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema))
        times = []
        for step in (compiler.check, compiler.check, compiler.matcher):
            start = time.perf_counter()
            step(spec)
            times.append(1000 * (time.perf_counter() - start))
        out[name] = {"schema_chars": len(spec.source), "first_ms": times[0], "cached_ms": times[1], "matcher_ms": times[2]}
    out["compiles"] = compiler.compiles
    return out


def measure(loaded: LoadedModel, streams: int, new_tokens: int, repetitions: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Unconstrained and constrained runs, alternated ``repetitions`` times; the median of the per-repetition ratios."""
    spec = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    runs = []
    for rep in range(repetitions):
        plain = constrained_rate(loaded, streams, new_tokens, None)
        constrained = constrained_rate(loaded, streams, new_tokens, spec)
        ratio = constrained["tok_per_s"] / plain["tok_per_s"]
        runs.append({"plain": plain, "constrained": constrained, "ratio": ratio})
        log(
            f"rep {rep}: plain {plain['tok_per_s']:.1f} tok/s, constrained {constrained['tok_per_s']:.1f} tok/s "
            f"(masks {constrained['mask_ms_per_step']:.2f} ms/step, sampler {constrained['sampling_ms_per_step']:.2f} "
            f"vs {plain['sampling_ms_per_step']:.2f} ms/step), ratio {ratio:.3f}"
        )
    median = statistics.median(r["ratio"] for r in runs)
    return {"runs": runs, "median_ratio": median, "median_overhead_percent": 100 * (1 - median)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the embedded SmolLM2-135M instead of the tiny random Llama")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="with --real")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per run")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--fields", type=int, default=300, help="enum properties of the large schema compiled")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.cpu_threads)
    loaded = load(args)
    torch.set_num_threads(args.cpu_threads)  # loading may set the serving thread count
    vocab_size = llm_engine_module.logits_width(loaded.model)
    compiled = compile_times(loaded, vocab_size, {"benchmark_schema": SCHEMA, "large_schema": large_schema(args.fields)})
    for name in ("benchmark_schema", "large_schema"):
        c = compiled[name]
        print(
            f"{name} ({c['schema_chars']} chars): first check {c['first_ms']:.2f} ms, second (cached) "
            f"{c['cached_ms']:.3f} ms, fresh matcher {c['matcher_ms']:.3f} ms"
        )
    print(f"compiler build (llguidance tokenizer): {compiled['compiler_build_ms']:.0f} ms")
    result = measure(loaded, args.streams, args.new_tokens, args.repetitions, print)
    result["compile"] = compiled
    result["meta"] = run_meta(
        loaded.device, loaded.dtype, loaded.name, streams=args.streams, new_tokens=args.new_tokens, schema=SCHEMA
    )
    ratio, overhead = result["median_ratio"], result["median_overhead_percent"]
    print(f"median constrained/plain decode throughput: {ratio:.3f} ({overhead:.1f}% overhead)")
    if args.output:
        write_report(args.output, result)


if __name__ == "__main__":
    main()
