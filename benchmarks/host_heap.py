"""CPU decoding with and without the C heap kept (``amulet_core.engine.host_heap``): ``python -m benchmarks.host_heap``.

The embedded SmolLM2 loaded as ``make serve`` loads it, ``--streams`` greedy ``amulet`` requests decoding together
on one thread, each case in a fresh interpreter (glibc's thresholds move as a process frees blocks, so a case never
follows another in the same process): ``plain`` as glibc starts, ``kept`` after
:func:`~amulet_core.engine.host_heap.keep_freed_memory`, as the server's engine worker calls it. The cases take
turns, ``--rounds`` times; the figure is generated tokens per CPU second (user and system time: the page faults
count) over ``--steps`` decode steps once every stream decodes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

CASES = ("plain", "kept")


def child(case: str, streams: int, steps: int) -> float:
    """Tokens per CPU second of ``streams`` amulet streams in this process (``case``: whether the heap is kept)."""
    import torch

    from amulet_core.engine.config import EngineConfig
    from amulet_core.engine.host_heap import keep_freed_memory
    from amulet_core.engine.llm_engine import LLMEngine
    from amulet_core.method.settings import Method
    from amulet_core.model.gguf_cache import default_model_cache
    from amulet_core.model.loading import ModelConfig, load_model
    from benchmarks.determinism_cost import request

    torch.set_num_threads(1)
    if case == "kept" and not keep_freed_memory():
        raise RuntimeError("this C library keeps no freed memory on request (not glibc)")
    loaded = load_model(ModelConfig(dtype="auto", quantization="auto", cpu_threads=1, model_cache=default_model_cache()))
    engine = LLMEngine(loaded, EngineConfig(max_model_len=2048, kv_cache_tokens=65536, max_num_seqs=2 * streams))
    for i in range(streams):
        engine.add_request(request(f"r{i}", 3 + i, 60, Method.AMULET, steps + 8))
    while any(not state.output_ids for state in engine.requests.values()):
        engine.step()
    start, tokens = time.process_time(), 0
    for _ in range(steps):
        tokens += sum(1 for output in engine.step() if output.token_ids)
    return tokens / (time.process_time() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/host_heap.json")
    parser.add_argument("--child", choices=CASES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"tok_per_cpu_s": child(args.child, args.streams, args.steps)}))
        return
    from benchmarks.report import write_report

    results: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            cmd = [sys.executable, "-m", "benchmarks.host_heap", "--child", case]
            cmd += ["--streams", str(args.streams), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[case].append(json.loads(out.splitlines()[-1])["tok_per_cpu_s"])
    print(f"{args.streams} amulet streams, SmolLM2, 1 thread: tokens per CPU second, {args.rounds} rounds in turn")
    for case in CASES:
        print(f"  {case:<6} " + " / ".join(f"{v:.1f}" for v in results[case]))
    report: dict[str, Any] = {"streams": args.streams, "steps": args.steps, "tok_per_cpu_s": results}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
