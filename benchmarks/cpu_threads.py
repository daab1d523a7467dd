"""Torch thread counts on the CPU, single stream and loaded: ``python -m benchmarks.cpu_threads`` (prints a table,
writes JSON).

One ``amulet-server`` per thread count (``--threads``, default 1 and every core), each started as ``make serve``
starts it but for ``--cpu-threads`` and ``--port`` (``--server-args`` adds options), all loaded at once and asked in
turn, round after round (``--rounds`` after a warm-up round), so that a busy machine slows them alike; an idle
server takes no CPU. Per round and thread count:

* ``base_1``, ``amulet_1``: one stream of ``--new-tokens`` greedy tokens (end of text ruled out), without a
  preference and with ``"preference": "concise"``: the decode rate (prefill left out), as
  :mod:`benchmarks.llamacpp_compare` measures it;
* ``amulet_8``: ``--streams`` concurrent ``amulet`` streams of ``--new-tokens`` tokens, each its own question:
  their tokens over the wall time from the first request to the last token;
* ``ttft_long``: the time to first token of an ``amulet`` request whose system prompt is ``--long-words`` words
  (different each time: no prefix-cache hit);
* ``health_ms``: ``/health``'s latencies while the loaded phase runs (p50 and max): the event loop's share of the
  cores.

It prints the medians and each count's ratio to the first one's, and writes them with every run to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from benchmarks.llamacpp_compare import MESSAGES, machine, server_run
from benchmarks.load import server_process
from benchmarks.report import write_report

WORDS = ("river", "stone", "cloud", "lamp", "garden", "winter", "signal", "harbor", "paper", "violet", "meadow")
MEASURES = ("base_1", "amulet_1", "amulet_n", "ttft_long_s", "health_p50_ms", "health_max_ms")


async def stream_tokens(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[float]:
    """The arrival time of each content chunk of a streamed chat completion."""
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[len("data: ") :]).get("choices", ())
                if any(choice.get("delta", {}).get("content") for choice in choices):
                    stamps.append(time.perf_counter())
    return stamps


async def loaded(url: str, streams: int, new_tokens: int) -> tuple[float, list[float]]:
    """``streams`` concurrent amulet streams: their tokens a second, and /health's latencies meanwhile (ms)."""
    latencies: list[float] = []
    async with httpx.AsyncClient() as client:

        async def one(i: int) -> int:
            messages = [{"role": "user", "content": f"Question {i}: tell me about {WORDS[i % len(WORDS)]}s."}]
            body = {"messages": messages, "preference": "concise", "max_tokens": new_tokens, "temperature": 0}
            body |= {"ignore_eos": True, "stream": True}
            return len(await stream_tokens(client, url, body))

        async def health(done: asyncio.Event) -> None:
            while not done.is_set():
                started = time.perf_counter()
                (await client.get(f"{url}/health", timeout=60)).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.05)

        done = asyncio.Event()
        probe = asyncio.create_task(health(done))
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        elapsed = time.perf_counter() - started
        done.set()
        await probe
    return tokens / elapsed, latencies


def long_ttft(client: httpx.Client, url: str, words: int, rng: random.Random) -> float:
    """Time to first token of an amulet request with a fresh ``words``-word system prompt."""
    system = " ".join(rng.choice(WORDS) for _ in range(words))
    body = {"messages": [{"role": "system", "content": system}, MESSAGES[1]], "preference": "concise", "max_tokens": 1}
    started = time.perf_counter()
    client.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - started


def one_round(client: httpx.Client, url: str, pid: int, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    base, _ = server_run(client, url, pid, None, args.new_tokens)
    amulet, _ = server_run(client, url, pid, "concise", args.new_tokens)
    rate, health = asyncio.run(loaded(url, args.streams, args.new_tokens))
    return {
        "base_1": base.decode_tokens_per_s,
        "amulet_1": amulet.decode_tokens_per_s,
        "amulet_n": rate,
        "ttft_long_s": long_ttft(client, url, args.long_words, rng),
        "health_p50_ms": statistics.median(health) if health else 0.0,
        "health_max_ms": max(health, default=0.0),
    }


def table(medians: dict[int, dict[str, float]], streams: int) -> str:
    names = {
        "base_1": "base, 1 stream (tok/s)",
        "amulet_1": "amulet, 1 stream (tok/s)",
        "amulet_n": f"amulet, {streams} streams, aggregate (tok/s)",
        "ttft_long_s": "TTFT, long system prompt, cold (s)",
        "health_p50_ms": f"/health p50 during the {streams} streams (ms)",
        "health_max_ms": f"/health max during the {streams} streams (ms)",
    }
    counts = list(medians)
    lines = ["| measurement | " + " | ".join(f"{n} thread(s)" for n in counts) + " | ratio to the first |"]
    lines.append("|---" * (len(counts) + 2) + "|")
    for key in MEASURES:
        values = [medians[n][key] for n in counts]
        ratios = " / ".join(f"{v / values[0]:.2f}" if values[0] else "-" for v in values[1:])
        lines.append(f"| {names[key]} | " + " | ".join(f"{v:.3g}" for v in values) + f" | {ratios} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and every core)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-words", type=int, default=900)
    parser.add_argument("--server-args", default="", help="extra amulet-server options (e.g. '--dtype float32')")
    parser.add_argument("--out", default="benchmarks/results/cpu_threads.json")
    args = parser.parse_args(argv)
    info = machine()
    counts = args.threads or sorted({1, int(info["cores"] or 1)})
    print(f"{info['cpu']}, {info['cores']} cores, flags {info['flags']}", flush=True)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    rng = random.Random(0)
    with ExitStack() as stack:
        servers = {}
        for n in counts:
            log = Path(args.out).with_suffix(f".server{n}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            servers[n] = stack.enter_context(server_process(["--cpu-threads", str(n), *args.server_args.split()], log))
        client = stack.enter_context(httpx.Client())
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for n in counts:
                result = one_round(client, servers[n].url, servers[n].pid, args, rng)
                print(f"  round {round_} {n} thread(s): " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()), flush=True)
                if round_:
                    runs[n].append(result)
    medians = {n: {k: statistics.median(r[k] for r in runs[n]) for k in MEASURES} for n in counts}
    print(table(medians, args.streams))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": info, "rounds": args.rounds, "new_tokens": args.new_tokens}
    meta |= {"streams": args.streams, "long_words": args.long_words, "server_args": args.server_args}
    write_report(args.out, {"meta": meta, "medians": {str(n): m for n, m in medians.items()}, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
