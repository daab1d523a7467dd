"""transformers' forward against the Llama family's own (``amulet_core/engine/packed_forward.py``) on one decode stream:
``python -m benchmarks.packed_forward`` (prints a table, writes JSON).

The embedded SmolLM2 loaded as ``make serve`` loads it (``--dtype auto``, ``--quantization auto``), one engine per
(method, forward), each decoding one greedy stream (``base``: one row a step; ``amulet``: two). The engines take
turns, ``--steps`` decode steps each per round, ``--rounds`` rounds after the prefill; the figure is CPU time per
generated token (steadier than the wall clock on a shared machine), and ``amulet`` / ``base`` within each forward.
``--profile`` adds where a step of the family forward goes: torch.profiler's operators by CPU time (``base``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from amulet_core.engine.config import ContrastLogits, EngineConfig, KVCacheDtype
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.packed_forward import LlamaFamilyForward, TransformersForward
from amulet_core.engine.paged_decode import AttentionBackend
from amulet_core.method.settings import Method
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, serving_cpu_threads
from benchmarks.determinism_cost import request, timed_step
from benchmarks.report import run_meta, write_report

FORWARDS = ("transformers", "family")
METHODS = (Method.BASE, Method.AMULET)


def decoding_engine(
    loaded: LoadedModel,
    method: Method,
    forward: str,
    new_tokens: int,
    attention: AttentionBackend = "auto",
    kv_cache_dtype: KVCacheDtype = "auto",
    contrast_logits: ContrastLogits = "auto",
) -> LLMEngine:
    """An engine decoding one stream of ``method`` with ``forward``, ``--attention-backend attention`` and
    ``--kv-cache-dtype kv_cache_dtype`` and ``--contrast-logits contrast_logits``, its prompt prefilled."""
    config = EngineConfig(
        max_model_len=2048,
        kv_cache_tokens=8192,
        enable_prefix_cache=False,
        attention_backend=attention,
        kv_cache_dtype=kv_cache_dtype,
        contrast_logits=contrast_logits,
    )
    engine = LLMEngine(loaded, config)
    if forward == "transformers":
        engine.runner.forward = TransformersForward(loaded.model)
    elif not isinstance(engine.runner.forward, LlamaFamilyForward):
        raise RuntimeError("the model does not run the family forward")
    engine.add_request(request(f"{method.value}-{forward}", 7, 60, method, new_tokens))
    for _ in range(3):  # the prefill, then a first decode step
        engine.step()
    return engine


def measure(loaded: LoadedModel, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """CPU milliseconds per token of each (forward, method), the engines in turn."""
    engines = {(f, m): decoding_engine(loaded, m, f, rounds * steps + 8) for f in FORWARDS for m in METHODS}
    cpu = {key: 0.0 for key in engines}
    tokens = {key: 0 for key in engines}
    for _ in range(rounds):
        for key, engine in engines.items():
            for _ in range(steps):
                produced, _, seconds = timed_step(engine)
                tokens[key] += produced
                cpu[key] += seconds
    return {f: {m.value: 1000 * cpu[f, m] / tokens[f, m] for m in METHODS} for f in FORWARDS}


def profile_step(loaded: LoadedModel, steps: int) -> list[dict[str, Any]]:
    """torch.profiler's operators over ``steps`` family-forward ``base`` decode steps: per step, calls and CPU ms."""
    from torch.profiler import ProfilerActivity, profile

    engine = decoding_engine(loaded, Method.BASE, "family", steps + 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    rows = [{"op": e.key, "calls": e.count / steps, "ms": e.self_cpu_time_total / 1000 / steps} for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r["ms"])


def served_model(cpu_threads: int | None) -> LoadedModel:
    """The embedded SmolLM2 as ``make serve`` loads it (``--dtype auto``, ``--quantization auto``), torch set to the
    server's thread count for ``cpu_threads`` (None: every CPU)."""
    config = ModelConfig(dtype="auto", quantization="auto", cpu_threads=cpu_threads, model_cache=default_model_cache())
    torch.set_num_threads(serving_cpu_threads(config))
    return load_model(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-threads", type=int, default=None, help="default: the server's (every CPU)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/packed_forward.json")
    args = parser.parse_args(argv)
    loaded = served_model(args.cpu_threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    result: dict[str, Any] = {"ms_per_token": measure(loaded, args.rounds, args.steps)}
    ms = result["ms_per_token"]
    print(f"{threads} thread(s), {loaded.name} in {loaded.dtype}, CPU ms per token ({args.rounds} rounds of {args.steps})")
    print("| forward | base | amulet | amulet / base (throughput) |\n|---|---|---|---|")
    for forward in FORWARDS:
        print(f"| {forward} | {ms[forward]['base']:.1f} | {ms[forward]['amulet']:.1f} | "
              f"{ms[forward]['base'] / ms[forward]['amulet']:.2f} |")  # fmt: skip
    if args.profile:
        rows = profile_step(loaded, args.steps)
        result["profile_base_family"] = rows  # every operator, by CPU time
        print(f"family forward, base, per step (torch.profiler, self CPU, total {sum(r['ms'] for r in rows):.1f} ms):")
        for row in rows[:12]:
            print(f"  {row['op']:<40} {row['calls']:7.1f} calls {row['ms']:7.2f} ms")
    result["seconds"] = time.perf_counter() - started
    meta = run_meta(loaded.device, loaded.dtype, loaded.name, rounds=args.rounds, steps=args.steps)
    write_report(args.out, {"meta": meta, **result})


if __name__ == "__main__":
    main()
