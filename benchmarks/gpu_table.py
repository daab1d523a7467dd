"""The README's GPU table from device-check JSON files, old and new side by side: ``python -m benchmarks.gpu_table
docs/gpu_check_h200_2026-11-27.json docs/gpu_check_<device>_<date>.json`` prints Markdown (rows a file lacks are
left empty).

For each shape (``llama_1b``, ``llama_8b``): the bandwidth bound of a decode step, each engine row's decode step
(and its multiple of the bound) and rate, the time to first token, and the issue's targets (8B at 64 streams within
1.6x the bound, 1B within 3x, 8B ``base`` single stream within 1.3x, ``amulet`` / ``base`` at least 0.95), met or
missed, per file. A file is ``benchmarks/gpu_check.sh``'s JSON (``steps``), or the 2026-11-27 one (its
``engine_run``).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHAPES = {"llama_1b": "Llama-3.2-1B shape", "llama_8b": "Llama-3.1-8B shape"}
ROWS = (
    ("engine_base_1", "engine `base`, 1 stream"),
    ("engine_amulet_1", "engine `amulet`, 1 stream"),
    ("engine_amulet_16", "engine `amulet`, 16 streams"),
    ("engine_amulet_64", "engine `amulet`, 64 streams"),
    ("sdpa_base_1", "gathered SDPA attention: `base`, 1 stream"),
    ("sdpa_amulet_64", "gathered SDPA attention: `amulet`, 64 streams"),
    ("sync_base_1", "host not overlapped: `base`, 1 stream"),
    ("sync_amulet_64", "host not overlapped: `amulet`, 64 streams"),
    ("hostchoice_base_1", "tokens chosen on the host: `base`, 1 stream"),
    ("hostchoice_amulet_64", "tokens chosen on the host: `amulet`, 64 streams"),
    ("eager_base_1", "`--enforce-eager`: `base`, 1 stream"),
    ("eager_amulet_64", "`--enforce-eager`: `amulet`, 64 streams"),
)
Target = tuple[str, str, Callable[[dict[str, Any]], float | None], Callable[[float], bool]]


def shape_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each shape's ``result`` in a device-check JSON (either layout); a shape whose step failed is left out."""
    steps = report.get("steps") or report.get("engine_run", {}).get("steps", {})
    return {name: steps[name]["result"] for name in SHAPES if steps.get(name, {}).get("ok") and "result" in steps[name]}


def _step(result: dict[str, Any], row: str) -> float | None:
    entry = result.get(row)
    return entry.get("decode_step_ms") if isinstance(entry, dict) else None


def _times_bound(result: dict[str, Any], row: str) -> float | None:
    step = _step(result, row)
    return None if step is None else step / result["bandwidth_bound_step_ms"]


def _amulet_over_base(result: dict[str, Any]) -> float | None:
    amulet, base = _step(result, "engine_amulet_1"), _step(result, "engine_base_1")
    return None if amulet is None or base is None else base / amulet  # throughput: step times inverted


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


TARGETS: tuple[Target, ...] = (
    ("llama_8b", "8B `amulet`, 64 streams: step / bound <= 1.6", lambda r: _times_bound(r, "engine_amulet_64"), _at_most(1.6)),
    ("llama_1b", "1B `amulet`, 64 streams: step / bound <= 3", lambda r: _times_bound(r, "engine_amulet_64"), _at_most(3)),
    ("llama_8b", "8B `base`, 1 stream: step / bound <= 1.3", lambda r: _times_bound(r, "engine_base_1"), _at_most(1.3)),
    ("llama_1b", "1B `amulet` / `base`, 1 stream >= 0.95", _amulet_over_base, lambda v: v >= 0.95),
    ("llama_8b", "8B `amulet` / `base`, 1 stream >= 0.95", _amulet_over_base, lambda v: v >= 0.95),
)


def table(reports: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: one column per (file, shape), then the targets per file."""
    results = [(label, shape_results(report)) for label, report in reports]
    header = [f"{label}: {SHAPES[shape]}" for label, _ in results for shape in SHAPES]
    lines = ["| random weights, bfloat16 | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]

    def row(title: str, cell: Callable[[dict[str, Any]], str]) -> None:
        cells = [cell(shapes[shape]) if shape in shapes else "" for _, shapes in results for shape in SHAPES]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    row("bandwidth bound per decode step", lambda r: f"{r['bandwidth_bound_step_ms']:.2f} ms")
    for key, title in ROWS:
        row(f"{title}: decode step (x bound), tok/s", functools.partial(_step_cell, key=key))
    row("TTFT, long prompt: cold / prefix-cache hit", lambda r: f"{r['ttft_cold_s']:.3f} s / {r['ttft_prefix_hit_s']:.3f} s")
    row("decode steps chosen in the graph (tail) / all", _tail_cell)
    lines += ["", "| target | " + " | ".join(label for label, _ in results) + " |", "|---" * (len(results) + 1) + "|"]
    for shape, title, value, met in TARGETS:
        cells = []
        for _, shapes in results:
            v = value(shapes[shape]) if shape in shapes else None
            cells.append("" if v is None else f"{v:.2f} ({'met' if met(v) else 'missed'})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step_cell(result: dict[str, Any], *, key: str) -> str:
    entry = result.get(key)
    if not isinstance(entry, dict) or entry.get("decode_step_ms") is None:
        return ""
    step = entry["decode_step_ms"]
    return f"{step:.2f} ms ({step / result['bandwidth_bound_step_ms']:.1f}x), {entry['decode_tok_per_s']:,.0f}"


def _tail_cell(result: dict[str, Any]) -> str:
    graphs = result.get("cuda_graphs") or {}
    return "" if "tail_steps" not in graphs else f"{graphs['tail_steps']} / {graphs['decode_steps']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="device-check JSON files, oldest first")
    args = parser.parse_args(argv)
    reports = [(Path(f).stem.removeprefix("gpu_check_"), json.loads(Path(f).read_text())) for f in args.files]
    print(table(reports))


if __name__ == "__main__":
    main()
