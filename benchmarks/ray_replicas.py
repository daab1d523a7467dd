"""Replicas on Ray Serve: ``python -m benchmarks.ray_replicas`` (prints a table, writes JSON).

Starts a local Ray (this machine's CPUs) and deploys ``amulet-server --ray`` on the embedded model, then
runs the same workload three times, each with system prompts of its own (so no run finds another's
prefixes cached):

* 2 replicas, prefix-affinity routing (the default);
* 2 replicas, Ray's power of two choices (every request sent with ``x-amulet-routing: pow2``);
* 1 replica (the application redeployed with ``--ray-replicas 1``; Ray replaces the replicas, draining them).

The workload: ``--prompts`` long system prompts (about 250 tokens each) with ``--requests-per-prompt``
different user questions each, the prompts interleaved, an amulet preference (two contexts a request),
``--max-tokens`` greedy tokens, from ``--concurrency`` clients. Reported per run: wall time, completed
requests per second, output tokens per second (aggregate), mean latency, the prefix-cache hit rate
(``amulet_prefix_cache_hits_total`` / ``..._queries_total`` summed over the replicas' own metrics:
the share of prompt contexts whose leading blocks came from the cache) and how concentrated each
prompt's requests were (the share served by the replica that served it most).

Every replica gets ``--cpu-threads`` torch threads (default 1) and reserves that many Ray CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import httpx

from benchmarks.report import write_report

APP = "amulet"


@dataclass(frozen=True)
class RunResult:
    name: str
    replicas: int
    routing: str
    requests: int
    failures: int
    wall_s: float
    output_tokens: int
    mean_latency_s: float
    prefix_cache_hit_rate: float | None
    concentration: float
    """Mean over prompts of the share of its requests served by the replica that served it most."""

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.failures) / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def free_port(size: int = 1) -> int:
    """The first of ``size`` consecutive ports on 127.0.0.1 that were free a moment ago."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def system_prompt(run: str, index: int) -> str:
    duties = ", ".join(f"duty {i} of assistant {index} in run {run}" for i in range(22))
    return f"You are assistant {index} of run {run}. Answer briefly. Your duties: {duties}."


def metric_totals(metrics_base: int, names: Sequence[str]) -> dict[str, float]:
    """Each counter in ``names`` summed over every replica answering on the metrics ports."""
    totals = dict.fromkeys(names, 0.0)
    for port in range(metrics_base, metrics_base + 16):
        with contextlib.suppress(httpx.TransportError):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for line in text.splitlines():
                for name in names:
                    if line.startswith(name + "{"):
                        totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


async def run_workload(
    url: str, run: str, args: argparse.Namespace, headers: dict[str, str]
) -> tuple[list[dict[str, Any]], float]:
    """Send the workload; every request's outcome (prompt, replica, tokens, latency, ok) and the wall time."""
    jobs: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for question in range(args.requests_per_prompt):
        for prompt in range(args.prompts):
            jobs.put_nowait((prompt, question))
    outcomes: list[dict[str, Any]] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not jobs.empty():
            prompt, question = jobs.get_nowait()
            body = {
                "messages": [
                    {"role": "system", "content": system_prompt(run, prompt)},
                    {"role": "user", "content": f"Question {question}: what should I do first today?"},
                ],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "preference": "concise",
            }
            start = time.monotonic()
            response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            ok = response.status_code == 200
            tokens = response.json()["usage"]["completion_tokens"] if ok else 0
            replica = response.headers.get("x-amulet-replica")
            outcomes.append(
                {"prompt": prompt, "replica": replica, "tokens": tokens, "latency_s": time.monotonic() - start, "ok": ok}
            )

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
    return outcomes, time.monotonic() - start


def measure(name: str, replicas: int, routing: str, url: str, metrics_base: int, args: argparse.Namespace) -> RunResult:
    names = ("amulet_prefix_cache_hits_total", "amulet_prefix_cache_queries_total")
    before = metric_totals(metrics_base, names)
    headers = {"x-amulet-routing": routing}
    outcomes, wall = asyncio.run(run_workload(url, name, args, headers))
    after = metric_totals(metrics_base, names)
    queries = after[names[1]] - before[names[1]]
    by_prompt: dict[int, Counter[str]] = {}
    for o in outcomes:
        by_prompt.setdefault(o["prompt"], Counter())[o["replica"]] += 1
    concentration = sum(c.most_common(1)[0][1] / sum(c.values()) for c in by_prompt.values()) / len(by_prompt)
    done = [o for o in outcomes if o["ok"]]
    return RunResult(
        name=name,
        replicas=replicas,
        routing=routing,
        requests=len(outcomes),
        failures=len(outcomes) - len(done),
        wall_s=wall,
        output_tokens=sum(o["tokens"] for o in done),
        mean_latency_s=sum(o["latency_s"] for o in done) / max(1, len(done)),
        prefix_cache_hit_rate=(after[names[0]] - before[names[0]]) / queries if queries else None,
        concentration=concentration,
    )


@contextlib.contextmanager
def ray_serve(args: argparse.Namespace, port: int) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def deploy(args: argparse.Namespace, replicas: int, metrics_base: int) -> None:
    from ray import serve

    from amulet_ray.application import build_application
    from amulet_ray.config import parse_args

    argv = ["--host", "127.0.0.1", "--cpu-threads", str(args.cpu_threads), "--ray-metrics-port", str(metrics_base)]
    configs = parse_args([*argv, "--ray-replicas", str(replicas), *args.server_args.split()])
    serve.run(build_application(configs), name=APP, route_prefix="/")


def wait_replicas(count: int, timeout_s: float = 600) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications[APP].deployments["AmuletReplica"].replica_states
        if states.get("RUNNING", 0) == count and sum(states.values()) == count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the application did not settle at {count} replica(s)")


def table(results: Sequence[RunResult]) -> str:
    rows = [
        "| run | requests (failed) | wall | req/s | output tok/s | mean latency | prefix-cache hits | per-prompt concentration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = "n/a" if r.prefix_cache_hit_rate is None else f"{r.prefix_cache_hit_rate:.0%}"
        rows.append(
            f"| {r.name} | {r.requests} ({r.failures}) | {r.wall_s:.1f} s | {r.requests_per_s:.2f} | "
            f"{r.output_tokens_per_s:.1f} | {r.mean_latency_s:.2f} s | {rate} | {r.concentration:.0%} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="system prompts per run")
    parser.add_argument("--requests-per-prompt", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads (and Ray CPUs) per replica")
    parser.add_argument("--server-args", default="", help="more amulet-server options for every replica")
    parser.add_argument("--output", default="benchmarks/results/ray_replicas.json")
    args = parser.parse_args(argv)
    port, metrics_base = free_port(), free_port(16)
    results: list[RunResult] = []
    started = time.monotonic()
    with ray_serve(args, port):
        url = f"http://127.0.0.1:{port}"
        deploy(args, 2, metrics_base)
        wait_replicas(2)
        print(f"2 replicas ready at {url} after {time.monotonic() - started:.0f} s", flush=True)
        results.append(measure("2 replicas, prefix affinity", 2, "prefix", url, metrics_base, args))
        results.append(measure("2 replicas, power of two choices", 2, "pow2", url, metrics_base, args))
        deploy(args, 1, metrics_base)  # a new version for Ray: it drains the old replicas and starts one
        wait_replicas(1)
        results.append(measure("1 replica", 1, "prefix", url, metrics_base, args))
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "total_wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(meta))
    print(table(results))
    write_report(args.output, {"meta": meta, "runs": [asdict(r) for r in results]})
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
