"""Load test: ``python -m benchmarks.load`` (prints a table, writes JSON; exit status 1 when a check fails).

Many concurrent streaming clients against one server, by default a real ``amulet-server``
subprocess on the embedded SmolLM2-135M started here on a free 127.0.0.1 port (or any running
server with ``--base-url``). Requests mix the methods (``base`` without a preference, ``pref``,
``la``, ``amulet``), three prompt lengths and several ``max_tokens``; a quarter of the clients
walk away from their streams at random points (before the answer starts, or after some events).

The run passes when:

* no answer is a 5xx other than the intended 429/503 (queue full, not ready, shutting down);
* every stream read to its end is well formed: a role chunk, content chunks, one finish chunk
  (``stop`` or ``length``), a usage chunk with consistent counts, then ``data: [DONE]``;
* afterwards ``/metrics`` shows no running request and no KV block in use
  (``amulet_requests_running``, ``amulet_kv_cache_usage_ratio``; blocks kept only for the prefix
  cache are free);
* the server's RSS grows by less than ``--max-rss-growth`` (10%) between the request number
  ``--rss-baseline-after`` (100) and the last one (needs the server's pid: known when the
  script starts the server, else ``--server-pid``).

Traffic goes only to the given base URL (127.0.0.1 by default); counts and times are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
METHODS: tuple[str, ...] = ("base", "pref", "la", "amulet")
HARMLESS_STATUSES = (429, 503)
"""Refusals the server is meant to give under load or at shutdown; every other non-200 is a failure."""

TOPICS = (
    "keeping basil alive on a windowsill",
    "how tides work",
    "learning to play the guitar as an adult",
    "why the sky is blue",
    "planning a weekend hike",
    "the history of the printing press",
    "making bread without a mixer",
    "how vaccines train the immune system",
)
FILLER = (
    "I have read a few articles about it already, but they disagreed with each other, "
    "and I would like a clear and practical explanation that I can act on today. "
)
LENGTHS = {"short": 0, "medium": 2, "long": 8}
"""Prompt length classes: how many filler sentences follow the question."""


# ---------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Spec:
    """One request of the workload."""

    index: int
    method: str
    length: str
    max_tokens: int
    body: dict[str, Any]


def make_spec(index: int, rng: random.Random, max_tokens_choices: Sequence[int]) -> Spec:
    method = METHODS[index % len(METHODS)]
    length = rng.choice(tuple(LENGTHS))
    max_tokens = rng.choice(tuple(max_tokens_choices))
    question = f"Tell me about {rng.choice(TOPICS)}. " + FILLER * LENGTHS[length]
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": question.strip()}],
        "max_tokens": max_tokens,
        "temperature": rng.choice((0.0, 0.7, 1.0)),
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if method == "pref":
        body["preference"] = {"text": "Answer like a friendly pirate.", "method": "pref"}
    elif method == "la":
        body["preference"] = {"text": "concise", "method": "la", "ratio": 1.5}
    elif method == "amulet":
        body["preference"] = rng.choice(("concise", "verbose", "formal", "uplifting"))
    return Spec(index, method, length, max_tokens, body)


# ---------------------------------------------------------------- one request


@dataclass
class Outcome:
    """What happened to one request, seen from the client."""

    index: int
    method: str
    length: str
    max_tokens: int
    client: int
    status: int | None = None
    completed: bool = False
    disconnected: bool = False
    problem: str | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None


def check_stream(lines: Sequence[str], max_tokens: int) -> tuple[str | None, str | None, int]:
    """(problem or None, finish_reason, completion_tokens) of a stream read to its end."""
    if any(not line.startswith("data: ") for line in lines):
        return "a line that is not a 'data: ' event", None, 0
    data = [line[len("data: ") :] for line in lines]
    if not data or data[-1] != "[DONE]":
        return "no final [DONE]", None, 0
    try:
        chunks = [json.loads(d) for d in data[:-1]]
    except json.JSONDecodeError:
        return "an event that is not JSON", None, 0
    if any("error" in c for c in chunks):
        return f"an error event: {next(c for c in chunks if 'error' in c)['error']}", None, 0
    if len({c.get("id") for c in chunks}) != 1 or any(c.get("object") != "chat.completion.chunk" for c in chunks):
        return "chunks with mixed ids or a wrong object type", None, 0
    with_choices = [c for c in chunks if c.get("choices")]
    if not with_choices or with_choices[0]["choices"][0]["delta"].get("role") != "assistant":
        return "no leading role chunk", None, 0
    reasons = [c["choices"][0].get("finish_reason") for c in with_choices]
    finish = reasons[-1]
    if finish not in ("stop", "length") or any(r is not None for r in reasons[:-1]):
        return f"finish reasons {reasons[-3:]!r}: not exactly one stop/length at the end", None, 0
    usage = chunks[-1].get("usage")
    if chunks[-1].get("choices") != [] or not isinstance(usage, dict):
        return "no usage chunk before [DONE]", finish, 0
    prompt, completion, total = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    if not (isinstance(prompt, int) and isinstance(completion, int) and prompt > 0 and total == prompt + completion):
        return f"inconsistent usage {usage!r}", finish, 0
    if not 1 <= completion <= max_tokens or (finish == "length" and completion != max_tokens):
        return f"completion_tokens {completion} with finish {finish} and max_tokens {max_tokens}", finish, completion
    return None, finish, completion


async def run_one(client: httpx.AsyncClient, url: str, spec: Spec, client_id: int, leave: tuple[str, float] | None) -> Outcome:
    """Send one streaming request; ``leave`` = ("before", seconds) or ("after", events) walks away."""
    outcome = Outcome(spec.index, spec.method, spec.length, spec.max_tokens, client_id)
    start = time.monotonic()
    lines: list[str] = []

    async def read() -> None:
        async with client.stream("POST", url, json=spec.body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if outcome.ttft_s is None and '"content":"' in line and '"content":""' not in line:
                    outcome.ttft_s = time.monotonic() - start
                if leave is not None and leave[0] == "after" and len(lines) >= leave[1] and line != "data: [DONE]":
                    outcome.disconnected = True
                    return  # leaving the block closes the connection mid-stream

    try:
        if leave is not None and leave[0] == "before":
            await asyncio.wait_for(read(), timeout=leave[1])
        else:
            await read()
    except TimeoutError:
        outcome.disconnected = True
    except httpx.HTTPError as exc:
        outcome.problem = f"transport error: {type(exc).__name__}: {exc}"
        return outcome
    outcome.e2e_s = time.monotonic() - start
    if outcome.disconnected or outcome.status != 200:
        return outcome
    outcome.problem, outcome.finish_reason, outcome.completion_tokens = check_stream(lines, spec.max_tokens)
    outcome.completed = outcome.problem is None
    return outcome


# ---------------------------------------------------------------- the server


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux /proc), or None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m server.cli`` on a free 127.0.0.1 port, logging to ``log_path``; stopped with SIGTERM."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Until ``/ready`` answers 200, asked over one client (a new client a check cost the machine about 40 ms of
        CPU, which a starting server on two cores felt)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return
                time.sleep(0.2)
        raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain), then SIGKILL if it is still there after ``timeout_s``; the exit status."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        finally:
            self._log.close()


@contextlib.contextmanager
def server_process(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def engine_gauges(base_url: str) -> dict[str, float]:
    """``amulet_requests_running`` and ``amulet_kv_cache_usage_ratio`` from /metrics (summed over labels)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values = {"amulet_requests_running": 0.0, "amulet_kv_cache_usage_ratio": 0.0}
    seen: set[str] = set()
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
            seen.add(name)
    missing = set(values) - seen
    if missing:
        raise RuntimeError(f"/metrics lacks {sorted(missing)}")
    return values


async def wait_engine_idle(base_url: str, timeout_s: float) -> dict[str, float]:
    """Poll /metrics until nothing runs and no KV block is used (aborts land asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = await asyncio.to_thread(engine_gauges, base_url)
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.25)


# ---------------------------------------------------------------- the run


@dataclass
class LoadConfig:
    clients: int = 64
    requests: int = 320
    max_tokens: tuple[int, ...] = (8, 16, 32)
    leaver_fraction: float = 0.25
    rss_baseline_after: int = 100
    max_rss_growth: float = 0.10
    seed: int = 0
    request_timeout_s: float = 600.0
    idle_timeout_s: float = 30.0


@dataclass
class LoadResult:
    config: LoadConfig
    outcomes: list[Outcome]
    wall_s: float
    gauges_after: dict[str, float]
    rss_baseline: int | None
    rss_last: int | None
    failures: list[str] = field(default_factory=list)

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.completed]

    @property
    def rss_growth(self) -> float | None:
        if self.rss_baseline is None or self.rss_last is None:
            return None
        return self.rss_last / self.rss_baseline - 1.0

    def summary(self) -> dict[str, Any]:
        done = self.completed
        tokens = sum(o.completion_tokens for o in done)
        statuses: dict[str, int] = {}
        for o in self.outcomes:
            key = str(o.status) if o.status is not None else "left before headers" if o.disconnected else "transport error"
            statuses[key] = statuses.get(key, 0) + 1
        return {
            "requests": len(self.outcomes),
            "completed": len(done),
            "disconnected": sum(o.disconnected for o in self.outcomes),
            "refused_429_503": sum(o.status in HARMLESS_STATUSES for o in self.outcomes),
            "statuses": statuses,
            "wall_s": self.wall_s,
            "completed_per_s": len(done) / self.wall_s if self.wall_s else 0.0,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "output_tokens": tokens,
            "ttft_s": percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
            "e2e_s": percentiles([o.e2e_s for o in done if o.e2e_s is not None]),
            "e2e_s_by_method": {
                m: percentiles([o.e2e_s for o in done if o.method == m and o.e2e_s is not None]) for m in METHODS
            },
            "gauges_after": self.gauges_after,
            "rss_baseline_mib": None if self.rss_baseline is None else self.rss_baseline / 2**20,
            "rss_last_mib": None if self.rss_last is None else self.rss_last / 2**20,
            "rss_growth": self.rss_growth,
            "failures": self.failures,
        }


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 (nearest rank) and the maximum."""
    ordered = sorted(values)

    def rank(q: float) -> float | None:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1] if ordered else None}


async def run_load(base_url: str, config: LoadConfig, server_pid: int | None = None) -> LoadResult:
    """Run the workload against ``base_url`` and check the pass criteria (``LoadResult.failures``)."""
    url = f"{base_url}/v1/chat/completions"
    rng = random.Random(config.seed)
    specs = [make_spec(i, rng, config.max_tokens) for i in range(config.requests)]
    next_spec = iter(specs)
    leavers = max(1, round(config.clients * config.leaver_fraction)) if config.leaver_fraction > 0 else 0
    outcomes: list[Outcome] = []
    rss: dict[str, int | None] = {"baseline": None}

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if len(outcomes) == config.rss_baseline_after and server_pid is not None:
            rss["baseline"] = rss_bytes(server_pid)

    async def client_loop(client_id: int, client: httpx.AsyncClient) -> None:
        crng = random.Random(config.seed * 1_000_003 + client_id)
        leaver = client_id < leavers
        for spec in next_spec:
            leave: tuple[str, float] | None = None
            if leaver:
                # Walk away before the answer starts (queued or in prefill) or after some events.
                if crng.random() < 0.3:
                    leave = ("before", crng.uniform(0.05, 2.0))
                else:
                    leave = ("after", float(crng.randint(1, spec.max_tokens + 2)))
            record(await run_one(client, url, spec, client_id, leave))

    limits = httpx.Limits(max_connections=config.clients + 8, max_keepalive_connections=config.clients + 8)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    start = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(config.clients)))
    wall = time.monotonic() - start
    rss_last = rss_bytes(server_pid) if server_pid is not None else None
    gauges = await wait_engine_idle(base_url, config.idle_timeout_s)
    result = LoadResult(config, sorted(outcomes, key=lambda o: o.index), wall, gauges, rss["baseline"], rss_last)
    result.failures = judge(result, server_pid is not None)
    return result


def judge(result: LoadResult, rss_expected: bool) -> list[str]:
    failures = []
    for o in result.outcomes:
        if o.status is not None and o.status >= 500 and o.status not in HARMLESS_STATUSES:
            failures.append(f"request {o.index} ({o.method}): HTTP {o.status}")
        elif o.status is not None and o.status != 200 and o.status not in HARMLESS_STATUSES:
            failures.append(f"request {o.index} ({o.method}): unexpected HTTP {o.status}")
        if o.problem is not None:
            failures.append(f"request {o.index} ({o.method}): {o.problem}")
    if not result.completed:
        failures.append("no stream completed")
    if any(v != 0 for v in result.gauges_after.values()):
        failures.append(f"the engine did not return to idle: {result.gauges_after}")
    growth = result.rss_growth
    if growth is not None and growth >= result.config.max_rss_growth:
        failures.append(
            f"server RSS grew {growth:.1%} between request {result.config.rss_baseline_after} and the last "
            f"(limit {result.config.max_rss_growth:.0%})"
        )
    elif growth is None and rss_expected:
        failures.append("the server's RSS could not be read")
    return failures


def table(summary: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = [
        "| measure | value |",
        "|---|---|",
        f"| requests (completed / walked away / 429+503) | {summary['requests']} "
        f"({summary['completed']} / {summary['disconnected']} / {summary['refused_429_503']}) |",
        f"| wall time | {summary['wall_s']:.1f} s |",
        f"| completed requests/s | {summary['completed_per_s']:.2f} |",
        f"| output tokens/s (completed streams) | {summary['output_tokens_per_s']:.1f} |",
    ]
    for name in ("ttft_s", "e2e_s"):
        p = summary[name]
        lines.append(
            f"| {name[:-2]} p50 / p90 / p99 / max (ms) | {ms(p['p50'])} / {ms(p['p90'])} / {ms(p['p99'])} / {ms(p['max'])} |"
        )
    for method, p in summary["e2e_s_by_method"].items():
        lines.append(f"| e2e {method} p50 / p90 (ms) | {ms(p['p50'])} / {ms(p['p90'])} |")
    if summary["rss_growth"] is not None:
        lines.append(
            f"| server RSS at request {summary['rss_baseline_request']} -> last | {summary['rss_baseline_mib']:.0f} MiB -> "
            f"{summary['rss_last_mib']:.0f} MiB ({summary['rss_growth']:+.1%}) |"
        )
    g = summary["gauges_after"]
    lines.append(
        f"| after the run: running / KV usage | {g['amulet_requests_running']:.0f} / {g['amulet_kv_cache_usage_ratio']:.3f} |"
    )
    lines.append(f"| result | {'PASS' if not summary['failures'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="a running server (default: start amulet-server here)")
    parser.add_argument("--server-pid", type=int, default=None, help="pid of the --base-url server, to read its RSS")
    parser.add_argument("--server-args", default="", help="extra amulet-server options when the server is started here")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--max-tokens", default="8,16,32", help="comma-separated max_tokens choices")
    parser.add_argument("--leavers", type=float, default=0.25, help="fraction of clients that walk away mid-request")
    parser.add_argument("--rss-baseline-after", type=int, default=100)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/load.json")
    args = parser.parse_args(argv)
    config = LoadConfig(
        clients=args.clients,
        requests=args.requests,
        max_tokens=tuple(int(t) for t in args.max_tokens.split(",")),
        leaver_fraction=args.leavers,
        rss_baseline_after=args.rss_baseline_after,
        max_rss_growth=args.max_rss_growth,
        seed=args.seed,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.base_url:
        result = asyncio.run(run_load(args.base_url.rstrip("/"), config, args.server_pid))
        server_args: list[str] = []
    else:
        server_args = args.server_args.split()
        log_path = out.with_suffix(".server.log")
        with server_process(server_args, log_path) as server:
            print(f"server ready at {server.url} (pid {server.pid}, log {log_path})", flush=True)
            result = asyncio.run(run_load(server.url, config, server.pid))
    summary = result.summary()
    summary["rss_baseline_request"] = config.rss_baseline_after
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "base_url": args.base_url or "started here",
        "server_args": server_args,
        "config": asdict(config),
    }
    print(json.dumps(meta))
    print(table(summary))
    for failure in result.failures[:20]:
        print(f"FAIL: {failure}")
    out.write_text(json.dumps({"meta": meta, "summary": summary, "outcomes": [asdict(o) for o in result.outcomes]}, indent=2))
    print(f"wrote {out}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
