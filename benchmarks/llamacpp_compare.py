"""Our CPU decode against llama.cpp's: ``python -m benchmarks.llamacpp_compare`` (prints a table, writes JSON).

On the same GGUF file (default: the embedded SmolLM2-135M-Instruct), the same chat prompt (rendered once by the
model's chat template, so both get the same token ids), the same thread count, greedy, one stream of
``--new-tokens`` tokens (EOS ignored on both sides, so every run decodes the same count):

* llama.cpp through llama-cpp-python (``pip install '.[bench]'``; see the README for the source build), in this
  process, ``n_threads`` = ``n_threads_batch`` = the thread count;
* ``amulet-server`` started here as ``make serve`` starts it (every option its default but ``--cpu-threads``
  and ``--port``; ``--server-args`` adds more), asked through its HTTP API (streamed chat completions) without a
  preference (``base``) and with one (``amulet``, ``"preference": "concise"``).

The three take turns run by run (``--rounds`` rounds after one warm-up round), so that a busy machine slows them
alike; the medians are reported. A run's decode rate is (tokens - 1) / (time of the last token - time of the
first): the prefill is left out (its time to first token is reported apart). On a shared machine the wall clock
swings with the other jobs, so each run's tokens per second of CPU time are reported too (this process's for
llama.cpp, the server process's, every thread, for ours; the whole request). Without llama-cpp-python installed
it says so and exits 0 (nothing else depends on it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from amulet_core.model.chat_template import render_chat
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import ModelConfig, embedded_model_file, load_tokenizer, serving_cpu_threads
from benchmarks.load import server_process
from benchmarks.report import write_report

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a story about a lighthouse keeper who finds a message in a bottle."},
]
MODES = ("llama.cpp", "base", "amulet")
INSTALL_HINT = (
    "install llama-cpp-python with its dependencies: `pip install '.[bench]'` (built from source; on a CPU that advertises AMX "
    'but faults on it: CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")'
)


@dataclass(frozen=True)
class Run:
    """One stream: the tokens it produced, its time to first token, its decode rate, and its tokens per second of
    the CPU time its process took (the whole request; on a busy machine steadier than the wall-clock rate)."""

    tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    cpu_tokens_per_s: float


def decode_run(started: float, stamps: Sequence[float], tokens: int, cpu_s: float) -> Run:
    """A :class:`Run` from the request's start, the times its pieces arrived, its token count and CPU seconds."""
    if tokens < 2 or len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise RuntimeError(f"a run produced {tokens} tokens: too few to time its decoding")
    return Run(tokens, stamps[0] - started, (tokens - 1) / (stamps[-1] - stamps[0]), tokens / max(cpu_s, 1e-9))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def llama_run(llm: Any, prompt_ids: list[int], new_tokens: int, banned: Sequence[int]) -> Run:
    """llama.cpp, greedy, ``new_tokens`` tokens after ``prompt_ids`` (``banned`` ids, the end of text, never chosen)."""
    started, cpu = time.perf_counter(), time.process_time()
    stamps: list[float] = []
    stream = llm.create_completion(
        prompt=prompt_ids,
        max_tokens=new_tokens,
        temperature=0.0,
        stream=True,
        logit_bias={token: -1000.0 for token in banned},
    )
    for _ in stream:  # one chunk a token
        stamps.append(time.perf_counter())
    return decode_run(started, stamps, len(stamps), time.process_time() - cpu)


def server_run(client: httpx.Client, url: str, pid: int, preference: str | None, new_tokens: int) -> tuple[Run, int]:
    """Our server (process ``pid``), greedy, ``new_tokens`` tokens of a streamed chat completion; (the run, its
    prompt tokens)."""
    body: dict[str, Any] = {
        "messages": MESSAGES,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if preference is not None:
        body["preference"] = preference
    started, cpu = time.perf_counter(), process_cpu_s(pid)
    stamps: list[float] = []
    usage: dict[str, Any] = {}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", ())):
                stamps.append(time.perf_counter())
    run = decode_run(started, stamps, int(usage.get("completion_tokens", 0)), process_cpu_s(pid) - cpu)
    return run, int(usage.get("prompt_tokens", 0))


def machine() -> dict[str, Any]:
    """The CPU's model name, its bf16/AMX flags and its cores (lscpu, /proc/cpuinfo)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in wanted},
    }


def compare(threads: int, args: argparse.Namespace, gguf: Path, prompt_ids: list[int], banned: list[int]) -> dict[str, Any]:
    """The three modes at ``threads`` threads, in turns: per mode every run and the medians; the ratios."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048, seed=0, verbose=False)
    server_args = ["--cpu-threads", str(threads), *args.server_args.split()]
    if args.model is not None:
        server_args += ["--model", args.model]
    log_path = Path(args.out).with_suffix(f".server{threads}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    prompt_tokens = 0
    with server_process(server_args, log_path) as server, httpx.Client() as client:
        print(f"{threads} thread(s): server ready at {server.url} (log {log_path})", flush=True)
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for mode in MODES:
                if mode == "llama.cpp":
                    run = llama_run(llm, prompt_ids, args.new_tokens, banned)
                else:
                    preference = None if mode == "base" else "concise"
                    run, prompt_tokens = server_run(client, server.url, server.pid, preference, args.new_tokens)
                print(
                    f"  round {round_} {mode:9s} {run.decode_tokens_per_s:6.1f} tok/s, {run.cpu_tokens_per_s:6.1f} a CPU "
                    f"second (ttft {run.ttft_s:.2f} s)",
                    flush=True,
                )
                if round_:
                    runs[mode].append(run)
    median = {mode: statistics.median(r.decode_tokens_per_s for r in runs[mode]) for mode in MODES}
    cpu = {mode: statistics.median(r.cpu_tokens_per_s for r in runs[mode]) for mode in MODES}
    return {
        "threads": threads,
        "server_args": server_args,
        "prompt_tokens": {"llama.cpp": len(prompt_ids), "server_base": prompt_tokens},
        "decode_tokens_per_s": median,
        "ttft_s": {mode: statistics.median(r.ttft_s for r in runs[mode]) for mode in MODES},
        "base_over_llamacpp": median["base"] / median["llama.cpp"],
        "amulet_over_base": median["amulet"] / median["base"],
        "cpu_tokens_per_s": cpu,
        "cpu_base_over_llamacpp": cpu["base"] / cpu["llama.cpp"],
        "cpu_amulet_over_base": cpu["amulet"] / cpu["base"],
        "runs": {mode: [asdict(r) for r in runs[mode]] for mode in MODES},
    }


def table(results: Sequence[dict[str, Any]]) -> str:
    """Per thread count, the median rates and their ratios: wall-clock decode rates, then tokens a CPU second."""
    lines = [
        "| threads | rate | llama.cpp (tok/s) | base (tok/s) | amulet (tok/s) | base / llama.cpp | amulet / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for what, rate, prefix in (
            ("decode, wall", r["decode_tokens_per_s"], ""),
            ("a CPU second", r["cpu_tokens_per_s"], "cpu_"),
        ):
            lines.append(
                f"| {r['threads']} | {what} | {rate['llama.cpp']:.1f} | {rate['base']:.1f} | {rate['amulet']:.1f} | "
                f"{r[prefix + 'base_over_llamacpp']:.2f} | {r[prefix + 'amulet_over_base']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2's)")
    default_threads = serving_cpu_threads(ModelConfig())
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[default_threads], help="thread counts to compare at (default: the server's)"
    )
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-args", default="", help="extra amulet-server options (e.g. '--dtype float32')")
    parser.add_argument("--out", default="benchmarks/results/llamacpp_compare.json")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError as error:  # not installed, or installed without a dependency of its own
        print(f"skipped: llama_cpp cannot be imported ({error}); {INSTALL_HINT}")
        return 0
    gguf = Path(args.model) if args.model is not None else embedded_model_file()
    tokenizer = load_tokenizer(ModelConfig(model=args.model, model_cache=default_model_cache()))
    prompt_ids = render_chat(tokenizer, MESSAGES)
    banned = sorted({int(tokenizer.eos_token_id), *(int(t) for t in tokenizer.all_special_ids)})
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, flags {info['flags']}; {gguf.name}", flush=True)
    results = [compare(threads, args, gguf, prompt_ids, banned) for threads in args.threads]
    print(table(results))
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "model": gguf.name,
        "machine": info,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "messages": MESSAGES,
    }
    write_report(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
