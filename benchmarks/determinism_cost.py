"""What the deterministic (batch-invariant) forward costs: ``python -m benchmarks.determinism_cost`` (prints a
table, writes JSON).

The same engine work with ``EngineConfig(deterministic=False)`` (SDPA, MKL) and ``deterministic=True``
(:mod:`amulet_core.engine.invariant_attention`, :mod:`amulet_core.engine.invariant_ops`), on the embedded
SmolLM2-135M in ``--dtype`` (auto: bfloat16 where the CPU has AVX512-BF16) with the serving thread count:

* prefill: seconds of the step that prefills one ``base`` prompt of ``--prompt-tokens`` random tokens;
* decode: tokens per second of the decode steps of 1 and 8 concurrent ``base`` streams and of 1 ``amulet``
  stream (two contexts), ``--new-tokens`` each after prompts of about ``--context`` tokens, greedy, EOS ignored;
  with ``--long``, also 8 ``base`` streams after prompts of about 1,000 tokens.

The two modes run side by side in one process, taking turns step by step (decode) or run by run (prefill), so
that a busy machine slows both alike; every figure is given as wall time and as the CPU time of the stepping
thread (what the work itself took when torch runs on one thread, as it does on a 2-core machine), with the ratio
deterministic over not. No prefix cache: every prompt is computed. ``--quick``: short prompts, few tokens.
``--model`` and ``--device`` measure another model or a GPU (where the deterministic forward is asked for).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, serving_cpu_threads
from amulet_core.sampling.params import SamplingParams
from benchmarks.report import run_meta, write_report

MODES = (False, True)


def prompt(seed: int, length: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(100, 40_000) for _ in range(length))


def request(rid: str, seed: int, length: int, method: Method, new_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    main = prompt(seed, length)
    if method is Method.BASE:
        return GenerationRequest(rid, main, params, MethodSettings(method=Method.BASE))
    contrast = main[: length - 8] + prompt(seed + 1, 3)
    return GenerationRequest(rid, main, params, MethodSettings(method=Method.AMULET), contrast)


def engine(loaded: LoadedModel, deterministic: bool, tokens: int) -> LLMEngine:
    """An engine whose KV cache holds ``tokens`` (no more: a fresh cache's pages are touched during the steps)."""
    config = EngineConfig(
        max_model_len=2048,
        kv_cache_tokens=max(tokens, 4096),
        max_num_seqs=16,
        enable_prefix_cache=False,
        deterministic=deterministic,
    )
    return LLMEngine(loaded, config)


def timed_step(eng: LLMEngine) -> tuple[int, float, float]:
    """(tokens produced, wall seconds, thread CPU seconds) of one step."""
    wall, cpu = time.perf_counter(), time.thread_time()
    produced = sum(len(o.token_ids) for o in eng.step())
    return produced, time.perf_counter() - wall, time.thread_time() - cpu


def prefill(loaded: LoadedModel, tokens: int, repeats: int) -> dict[bool, list[tuple[float, float]]]:
    """Per mode, (wall, CPU) seconds of the prefill step of a fresh prompt, ``repeats`` times, modes in turn."""
    runs: dict[bool, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(repeats + 1):  # the first round warms up
        for mode in MODES:
            eng = engine(loaded, mode, tokens + 16)
            eng.add_request(request("p", r, tokens, Method.BASE, 1))
            _, wall, cpu = timed_step(eng)
            if r:
                runs[mode].append((wall, cpu))
    return runs


def decode(
    loaded: LoadedModel, streams: int, method: Method, context: int, new_tokens: int, seed: int
) -> dict[bool, tuple[int, float, float]]:
    """Per mode, (tokens, wall s, CPU s) of the decode steps of ``streams`` streams, the two engines stepping in turn."""
    need = streams * (context + 3 * streams + new_tokens + 16) * (2 if method is Method.AMULET else 1)
    engines = {mode: engine(loaded, mode, need) for mode in MODES}
    for eng in engines.values():
        for i in range(streams):
            eng.add_request(request(f"d{i}", seed + 10 * i, context + 3 * i, method, new_tokens))
        started: set[str] = set()
        while len(started) < streams:  # prefill, not timed: until every stream has its first token
            started.update(o.request_id for o in eng.step())
    totals = {mode: [0, 0.0, 0.0] for mode in MODES}
    while any(eng.has_work() for eng in engines.values()):
        for mode, eng in engines.items():
            if eng.has_work():
                produced, wall, cpu = timed_step(eng)
                totals[mode][0] += produced
                totals[mode][1] += wall
                totals[mode][2] += cpu
    return {mode: (int(t[0]), t[1], t[2]) for mode, t in totals.items()}


def row(name: str, unit: str, off: tuple[float, float], on: tuple[float, float]) -> dict[str, Any]:
    """A result line: (wall, CPU) figures per mode and their ratios (on / off)."""
    ratios = (on[0] / off[0], on[1] / off[1])
    print(
        f"{name:<30} wall off {off[0]:8.3f} on {on[0]:8.3f} ({ratios[0]:.2f})   "
        f"CPU off {off[1]:8.3f} on {on[1]:8.3f} ({ratios[1]:.2f})  {unit}",
        flush=True,
    )
    return {
        "what": name,
        "unit": unit,
        "off": {"wall": off[0], "cpu": off[1]},
        "on": {"wall": on[0], "cpu": on[1]},
        "ratio_on_over_off": {"wall": ratios[0], "cpu": ratios[1]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", action="store_true", help="also 8 streams after ~1,000-token prompts")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/determinism_cost.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.context, args.new_tokens, args.repeats = 64, 32, 4, 1
    config = ModelConfig(model=args.model, device=args.device, dtype=args.dtype, model_cache=default_model_cache())
    loaded = load_model(config)
    if loaded.device.type == "cpu":
        torch.set_num_threads(serving_cpu_threads(config))
    runs = prefill(loaded, args.prompt_tokens, args.repeats)
    medians = {mode: (statistics.median(w for w, _ in runs[mode]), statistics.median(c for _, c in runs[mode])) for mode in MODES}
    rows = [row(f"prefill {args.prompt_tokens} tokens", "s (median)", medians[False], medians[True])]
    cases = [(1, Method.BASE, args.context), (8, Method.BASE, args.context), (1, Method.AMULET, args.context)]
    if args.long:
        cases.append((8, Method.BASE, 1000))
    for streams, method, context in cases:
        result = decode(loaded, streams, method, context, args.new_tokens, seed=7)
        rates = {mode: (n / wall, n / cpu) for mode, (n, wall, cpu) in result.items()}
        rows.append(row(f"decode {streams} x {method.value} @{context}", "tokens/s", rates[False], rates[True]))
    meta = run_meta(loaded.device, loaded.dtype, loaded.name, prompt_tokens=args.prompt_tokens, context=args.context)
    write_report(args.out, {"meta": meta | {"new_tokens": args.new_tokens, "repeats": args.repeats}, "rows": rows})


if __name__ == "__main__":
    main()
