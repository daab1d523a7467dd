"""What the int4 kernel gives and costs on the CPU: ``python -m benchmarks.int4_cost`` (prints a table, writes JSON).

The same engine work with ``EngineConfig(int4_weights=False)`` (the 4-bit weights multiplied in the model's dtype,
packed for oneDNN) and ``int4_weights=True`` (:mod:`amulet_core.engine.int4_weights`), both deterministic, on the
embedded SmolLM2-135M (Q4_1) in ``--dtype`` (auto: bfloat16 where the CPU has AVX512-BF16) with the serving thread
count (``--cpu-threads`` to change it): the prefill of a ``--prompt-tokens`` prompt, and the decode tokens per second
of 1 ``base``, 1 ``amulet``, 4 ``base`` and 16 ``amulet`` streams (32 rows a step). The two engines take turns step
by step (decode) or run by run (prefill), as in :mod:`benchmarks.determinism_cost`, whose helpers this reuses;
each figure is wall time and the stepping thread's CPU time, with the ratio int4 over not.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.method.settings import Method
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, serving_cpu_threads
from benchmarks.determinism_cost import request, row, timed_step
from benchmarks.report import run_meta, write_report

MODES = (False, True)


def engine(loaded: LoadedModel, int4: bool, tokens: int) -> LLMEngine:
    config = EngineConfig(
        max_model_len=2048, kv_cache_tokens=max(tokens, 4096), max_num_seqs=32, enable_prefix_cache=False, int4_weights=int4
    )
    return LLMEngine(loaded, config)


def prefill(loaded: LoadedModel, tokens: int, repeats: int) -> dict[bool, tuple[float, float]]:
    """Per mode, the median (wall, CPU) seconds of the prefill step of a fresh prompt, modes in turn."""
    engines = {mode: engine(loaded, mode, (repeats + 1) * (tokens + 16)) for mode in MODES}
    runs: dict[bool, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(repeats + 1):  # the first round warms up
        for mode, eng in engines.items():
            eng.add_request(request(f"p{r}", r, tokens, Method.BASE, 1))
            _, wall, cpu = timed_step(eng)
            while eng.has_work():
                eng.step()
            if r:
                runs[mode].append((wall, cpu))
    return {mode: (statistics.median(w for w, _ in runs[mode]), statistics.median(c for _, c in runs[mode])) for mode in MODES}


def decode(loaded: LoadedModel, streams: int, method: Method, context: int, new_tokens: int) -> dict[bool, tuple[float, float]]:
    """Per mode, (wall, CPU) tokens per second of the decode steps of ``streams`` streams, the engines in turn."""
    need = streams * (context + 3 * streams + new_tokens + 16) * 2
    engines = {mode: engine(loaded, mode, need) for mode in MODES}
    for eng in engines.values():
        for i in range(streams):
            eng.add_request(request(f"d{i}", 7 + 10 * i, context + 3 * i, method, new_tokens))
        started: set[str] = set()
        while len(started) < streams:  # prefill, not timed
            started.update(o.request_id for o in eng.step())
    totals = {mode: [0.0, 0.0, 0.0] for mode in MODES}
    while any(eng.has_work() for eng in engines.values()):
        for mode, eng in engines.items():
            if eng.has_work():
                produced, wall, cpu = timed_step(eng)
                totals[mode][0] += produced
                totals[mode][1] += wall
                totals[mode][2] += cpu
    return {mode: (t[0] / t[1], t[0] / t[2]) for mode, t in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short prompts, few tokens (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/int4_cost.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.context, args.new_tokens, args.repeats = 64, 32, 4, 1
    config = ModelConfig(dtype=args.dtype, cpu_threads=args.cpu_threads, model_cache=default_model_cache())
    loaded = load_model(config)
    torch.set_num_threads(serving_cpu_threads(config))
    medians = prefill(loaded, args.prompt_tokens, args.repeats)
    rows: list[dict[str, Any]] = [row(f"prefill {args.prompt_tokens} tokens", "s (median)", medians[False], medians[True])]
    for streams, method in ((1, Method.BASE), (1, Method.AMULET), (4, Method.BASE), (16, Method.AMULET)):
        rates = decode(loaded, streams, method, args.context, args.new_tokens)
        rows.append(row(f"decode {streams} x {method.value}", "tokens/s", rates[False], rates[True]))
    meta = run_meta(loaded.device, loaded.dtype, loaded.name, prompt_tokens=args.prompt_tokens, context=args.context)
    meta |= {"new_tokens": args.new_tokens, "off": "int4_weights=False", "on": "int4_weights=True"}
    write_report(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
