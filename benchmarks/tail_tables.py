"""The host's work of setting a decode step's penalties table for the graph's tail: ``python -m benchmarks.tail_tables``.

``TailProcessors.set`` builds each step the table of the token ids the penalties count (every penalised request's
output ids and, with a repetition penalty, its prompt ids) and copies it to the device; the time grows with the
requests and their histories, and on a GPU it is host time between two steps. Requests with random histories (a
repetition, frequency and presence penalty each), host milliseconds per step (median of ``--repeats``), on the CPU.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from amulet_core.engine.tail_processors import TailProcessors
from amulet_core.engine.tail_rows import TailHistory, TailRow
from benchmarks.report import run_meta, write_report

VOCAB = 49152
"""SmolLM2's vocabulary."""
CASES = ((1, 100, 300), (8, 500, 1500), (64, 500, 1500))
"""(requests, output ids, prompt ids)."""


def penalised_rows(requests: int, outputs: int, prompt: int, rng: random.Random) -> list[TailRow]:
    return [
        TailRow(
            i,
            None,
            1.0,
            0.0,
            penalties=(1.1, 0.2, 0.1),
            history=TailHistory(
                output_ids=[rng.randrange(VOCAB) for _ in range(outputs)],
                prompt_ids=tuple(rng.randrange(VOCAB) for _ in range(prompt)),
                pending=True,
            ),
        )
        for i in range(requests)
    ]


def measure(cases: tuple[tuple[int, int, int], ...], repeats: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    results = []
    for requests, outputs, prompt in cases:
        processors = TailProcessors(requests, VOCAB, outputs + prompt + 1, torch.device("cpu"))
        rows = penalised_rows(requests, outputs, prompt, rng)
        processors.set(rows)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            processors.set(rows)
            times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        results.append({"requests": requests, "output_ids": outputs, "prompt_ids": prompt, "ms_per_step": ms})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results/tail_tables.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = measure(CASES, args.repeats)
    print("| requests | output ids | prompt ids | host ms a step |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['requests']} | {r['output_ids']} | {r['prompt_ids']} | {r['ms_per_step']:.2f} |")
    write_report(args.out, {"meta": run_meta("cpu", torch.int32), "results": results})


if __name__ == "__main__":
    main()
