"""``/health`` latency while the largest allowed bodies are being refused: ``python -m benchmarks.health_latency``.

Against a real server: by default an ``amulet-server`` subprocess on the embedded SmolLM2-135M started here on
a free 127.0.0.1 port (``--server-args`` adds options), or any running server with ``--base-url``. First
``/health`` is timed alone (``--quiet-s``); then ``--senders`` processes post hostile bodies of just under the
body limit (``--body-bytes``) in a loop for ``--duration-s``, each one of :data:`HOSTILE_KINDS` in turn (a
million invalid items in a list or object field, a million empty lists, a 4 MB message, JSON nested without
end, a schema string nested without end), while ``/health`` is asked every ``--interval-s``.

Prints, for the quiet phase and the loaded one, ``/health``'s p50 / p90 / p99 / max latency in milliseconds,
and the hostile answers' statuses and latencies per kind; writes it all as JSON (``--output``). Exits 1 when a
``/health`` is not a 200 or a hostile body is answered with a 5xx (or not at all).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import percentiles, server_process
from server.protocol_limits import MAX_JSON_CONTAINERS, MAX_JSON_SEPARATORS

DEFAULT_BODY_BYTES = 4 * 1024 * 1024 - 4096
"""Just under the server's default body limit (4 MiB)."""
USER = '{"role":"user","content":"Hi"}'


def _filled(head: str, item: str, tail: str, size: int, separator: str = ",", most: int | None = None) -> bytes:
    """``head`` + ``item`` repeated (joined by ``separator``) + ``tail``, about ``size`` bytes in all (at most
    ``most`` items)."""
    count = max(1, (size - len(head) - len(tail)) // (len(item) + len(separator)))
    return (head + separator.join([item] * min(count, most or count)) + tail).encode()


def _numbered(head: str, template: str, tail: str, size: int, most: int | None = None) -> bytes:
    """Like :func:`_filled` with ``template.format(i)`` as the i-th item (distinct object keys)."""
    parts, total, i = [], len(head) + len(tail), 0
    while most is None or i < most:
        item = template.format(i)
        if total + len(item) + 1 > size:
            break
        parts.append(item)
        total += len(item) + 1
        i += 1
    return (head + ",".join(parts) + tail).encode()


HOSTILE_KINDS: dict[str, Callable[[int], bytes]] = {
    "stop: a million numbers": lambda n: _filled(f'{{"messages":[{USER}],"stop":[', "1", "]}", n),
    "messages: a million numbers": lambda n: _filled('{"messages":[', "1", "]}", n),
    "stop_token_ids: a million strings": lambda n: _filled(f'{{"messages":[{USER}],"stop_token_ids":[', '"a"', "]}", n),
    "stop: a million empty lists": lambda n: _filled(f'{{"messages":[{USER}],"stop":[', "[]", "]}", n),
    "logit_bias: invalid values": lambda n: _numbered(f'{{"messages":[{USER}],"logit_bias":{{', '"{}":"a"', "}}", n),
    "a 4 MB message": lambda n: _filled('{"messages":[{"role":"user","content":"', "x", '"}]}', n, separator=""),
    "JSON nested without end": lambda n: b"[" * (n // 2) + b"]" * (n // 2),
    "guided_json nested without end": lambda n: _filled(f'{{"messages":[{USER}],"guided_json":"', "[", '"}', n, separator=""),
    "stop_token_ids: strings, to the caps": lambda n: _filled(
        f'{{"messages":[{USER}],"stop_token_ids":[', '"a"', "]}", n, most=MAX_JSON_SEPARATORS - 64
    ),
    "stop: empty lists, to the caps": lambda n: _filled(
        f'{{"messages":[{USER}],"stop":[', "[]", "]}", n, most=MAX_JSON_CONTAINERS - 64
    ),
    "logit_bias: invalid values, to the caps": lambda n: _numbered(
        f'{{"messages":[{USER}],"logit_bias":{{', '"{}":"a"', "}}", n, most=MAX_JSON_SEPARATORS // 2 - 64
    ),
}
"""Bodies every server must refuse with a 4xx, whatever their size below the limit: the ones of the size limit,
and the ones that stay just under the JSON structure caps of ``server.protocol_limits`` (so that they are parsed
and validated, not refused by their shape first)."""


@dataclass
class HostileAnswer:
    kind: str
    status: int | None
    seconds: float


def send_hostile(base_url: str, body_bytes: int, duration_s: float, offset: int, results: Any) -> None:
    """One sender process: the kinds in turn (starting at ``offset``) until ``duration_s`` has passed."""
    bodies = [(kind, make(body_bytes)) for kind, make in HOSTILE_KINDS.items()]
    headers = {"content-type": "application/json"}
    answers = []
    deadline = time.monotonic() + duration_s
    i = offset
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < deadline:
            kind, body = bodies[i % len(bodies)]
            start = time.monotonic()
            try:
                status: int | None = client.post(f"{base_url}/v1/chat/completions", content=body, headers=headers).status_code
            except httpx.HTTPError:
                status = None
            answers.append(HostileAnswer(kind, status, time.monotonic() - start))
            i += 1
    results.put([asdict(a) for a in answers])


def time_health(base_url: str, duration_s: float, interval_s: float) -> tuple[list[float], list[int | None]]:
    """``/health`` every ``interval_s`` for ``duration_s`` (one keep-alive connection): latencies and statuses."""
    latencies, statuses = [], []
    deadline = time.monotonic() + duration_s
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                status: int | None = client.get(f"{base_url}/health").status_code
            except httpx.HTTPError:
                status = None
            latencies.append(time.monotonic() - start)
            statuses.append(status)
            time.sleep(max(0.0, interval_s - (time.monotonic() - start)))
    return latencies, statuses


def milliseconds(values: Sequence[float]) -> dict[str, float | None]:
    return {k: None if v is None else round(v * 1000, 1) for k, v in percentiles(values).items()}


def measure(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    quiet, quiet_statuses = time_health(base_url, args.quiet_s, args.interval_s)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    senders = [
        context.Process(target=send_hostile, args=(base_url, args.body_bytes, args.duration_s, i, results))
        for i in range(args.senders)
    ]
    for sender in senders:
        sender.start()
    time.sleep(args.warmup_s)  # the senders build their bodies and start sending
    loaded, loaded_statuses = time_health(base_url, args.duration_s - args.warmup_s, args.interval_s)
    answers = [a for _ in senders for a in results.get(timeout=args.duration_s + 300)]
    for sender in senders:
        sender.join()
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in HOSTILE_KINDS:
        mine = [a for a in answers if a["kind"] == kind]
        by_kind[kind] = {
            "count": len(mine),
            "statuses": sorted({str(a["status"]) for a in mine}),
            "latency_ms": milliseconds([a["seconds"] for a in mine]),
        }
    failures = [f"/health answered {s}" for s in set(quiet_statuses + loaded_statuses) if s != 200]
    failures += [f"{a['kind']}: {a['status']}" for a in answers if a["status"] is None or a["status"] >= 500]
    return {
        "health_quiet_ms": milliseconds(quiet) | {"count": len(quiet)},
        "health_loaded_ms": milliseconds(loaded) | {"count": len(loaded)},
        "hostile": by_kind,
        "hostile_answers": len(answers),
        "failures": sorted(set(failures)),
    }


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'/health':34} {'count':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    for phase in ("quiet", "loaded"):
        h = summary[f"health_{phase}_ms"]
        lines.append(f"{phase:34} {h['count']:>6} {h['p50']:>8} {h['p90']:>8} {h['p99']:>8} {h['max']:>8}")
    lines.append(f"{'hostile body (refused)':34} {'count':>6} {'p50 ms':>8} {'max ms':>8}  statuses")
    for kind, row in summary["hostile"].items():
        ms = row["latency_ms"]
        lines.append(f"{kind:34} {row['count']:>6} {ms['p50']!s:>8} {ms['max']!s:>8}  {','.join(row['statuses'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="a running server (default: start amulet-server here)")
    parser.add_argument("--server-args", default="", help="extra amulet-server options when the server is started here")
    parser.add_argument("--senders", type=int, default=2, help="processes posting hostile bodies")
    parser.add_argument("--body-bytes", type=int, default=DEFAULT_BODY_BYTES)
    parser.add_argument("--quiet-s", type=float, default=5.0, help="seconds /health is timed with no load")
    parser.add_argument("--duration-s", type=float, default=30.0, help="seconds the hostile bodies are sent")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds of the load before /health is timed")
    parser.add_argument("--interval-s", type=float, default=0.05, help="time between two /health requests")
    parser.add_argument("--output", default="benchmarks/results/health_latency.json")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    server_args = [] if args.base_url else args.server_args.split()
    if args.base_url:
        summary = measure(args.base_url.rstrip("/"), args)
    else:
        log_path = out.with_suffix(".server.log")
        with server_process(server_args, log_path) as server:
            print(f"server ready at {server.url} (pid {server.pid}, log {log_path})", flush=True)
            summary = measure(server.url, args)
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "server": args.base_url or "amulet-server started here " + " ".join(server_args),
        "senders": args.senders,
        "body_bytes": args.body_bytes,
        "duration_s": args.duration_s,
    }
    print(json.dumps(meta))
    print(table(summary))
    for failure in summary["failures"][:20]:
        print(f"FAIL: {failure}")
    out.write_text(json.dumps({"meta": meta, "summary": summary}, indent=2))
    print(f"wrote {out}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
