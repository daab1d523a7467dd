"""The prepared device check: ``benchmarks/gpu_check.sh`` runs ``python -m benchmarks.gpu_check``.

Steps, each timed and recorded (a failing step is recorded and the next one runs), JSON written to
``--out`` (``$OUT``) after every step:

1. ``env``: torch, transformers, the device.
2. ``tests_float32``, ``tests_bfloat16``: tests/engine/test_engine.py, test_decode_graphs.py,
   test_paged_decode.py and test_decode_tail.py on the device in that dtype (greedy engine output equals the
   unbatched reference on tiny Llama / Qwen2 / Mistral, every method, prefix-cache hit, preemption, abort frees KV;
   decode steps replayed from CUDA graphs give the same tokens; the compiled paged decode kernel against attention
   written out in float64 and against the gathered SDPA path, in float32 and bfloat16, and the engine's answers with
   it; the method and the choice of tokens captured in the graphs give the host's tokens and log-probabilities), run without
   tests/conftest.py (``tests.engine.gpu_plugin``) so that the server's packages need not be installed, and without
   each engine's start-up capture (graphs captured on first use), ``TESTS_TIMEOUT_S`` each (on a timeout the outcomes
   pytest printed are kept).
   ``kernel``: the paged decode kernel alone against the gathered SDPA path on the two shapes' attention, error
   and time (``benchmarks.paged_decode_check``).
3. ``host_overhead``: ``benchmarks.host_overhead`` on the device (64 amulet requests, tiny Llama), with
   CUDA graphs and without.
4. ``llama_1b``, ``llama_8b``: random-weight models shaped like Llama-3.2-1B and Llama-3.1-8B (bfloat16):
   transformers ``generate`` single stream, engine ``base`` and ``amulet`` single stream, ``amulet``
   aggregate at 16 and 64 streams (and at 64 with one request in 8 constrained by a grammar, ``engine_grammar_*``,
   with the share of its steps overlapped), TTFT of a 2,000-token prompt cold and on a prefix hit, and the
   memory-bandwidth bound (weight bytes / measured device copy rate), with the engine's default decode attention
   (``attention``: the paged decode kernel where it runs); then ``base`` single stream and ``amulet`` at the
   most streams and the long prompt's TTFT again with the gathered SDPA attention (``sdpa_*``), with the host not
   overlapped with the device (``sync_*``), with the method and the choice of tokens on the host after each replay
   (``hostchoice_*``: the decode tail off), and without CUDA graphs (``eager_*``),
   and the host-overhead breakdown of a decode step at the most streams (``host_overhead_*``).

5. ``server``: ``amulet-server`` on the device with a random-weight Llama-3.2-1B-shaped model, 64
   concurrent streamed requests over HTTP (``benchmarks.gpu_serve_check``).

On the device a step that would start later than ``--deadline-s`` (``DEADLINE_S``) is recorded as not started, so
that one call of 600 s ends with the JSON saying what to run again (``--skip`` what finished).

``--cpu-dry-run`` runs the same steps on the CPU with tiny models and few tokens (a test runs it).
``--save-tokenizer DIR`` (on a machine with the embedded model) saves SmolLM2's tokenizer for the trip.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.params import SamplingParams
from benchmarks.gpu_serve_check import step_server
from benchmarks.host_overhead import format_host_overhead, measure_host_overhead, random_model, tiny_llama_config
from benchmarks.paged_decode_check import step_kernel

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 560.0
"""On the device, the steps that would start later than this are skipped (one call may run 600 s): the JSON then says
which, instead of the call being cut off in the middle of one."""
TESTS_TIMEOUT_S = 180.0
"""Each dtype's engine tests (their start-up captures left out: ``tests.engine.gpu_plugin``)."""
GRAPH_CAPTURE_SECONDS = 30.0
"""The engines' start-up capture of decode graphs (the check's minutes are few; the rest are captured on use)."""
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "llama_1b": dict(  # Llama-3.2-1B
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama_8b": dict(  # Llama-3.1-8B
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def load_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from amulet_core.model.loading import embedded_model_file

    gguf = embedded_model_file()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- steps


def step_env(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def step_tests(device: torch.device, dtype: str, tokenizer_dir: str, select: str | None, timeout: float) -> dict[str, Any]:
    env = dict(
        os.environ,
        AMULET_TEST_DEVICE=device.type,
        AMULET_TEST_DTYPE=dtype,
        AMULET_TEST_TOKENIZER=tokenizer_dir,
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        # The engine tests need no installed pytest plugin (tests.engine.gpu_plugin is named with -p): not loading
        # hypothesis, schemathesis, langsmith ... saves 3 to 5 s a run, and the device's own plugins cannot interfere.
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
        # The compiled kernel on a GPU, Triton's interpreter on the CPU dry run.
        TRITON_INTERPRET="0" if device.type == "cuda" else "1",
    )
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest"]
        cmd += ["-p", "tests.engine.gpu_plugin", f"--junitxml={junit}"]
        cmd += ["tests/engine/test_engine.py", "tests/engine/test_decode_graphs.py", "tests/engine/test_paged_decode.py"]
        cmd += ["tests/engine/test_decode_tail.py"]
        if select:
            cmd += ["-k", select]
        cmd += ["-v"]  # a line per test: what ran before a timeout is known
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:  # the cases that finished, from the lines pytest printed
            output = _text(exc.stdout) + _text(exc.stderr)
            cases = _verbose_cases(output)
            return {
                "returncode": f"timed out after {timeout:.0f} s",
                "passed": sorted(k for k, v in cases.items() if v == "passed"),
                "failed": {k: v for k, v in cases.items() if v != "passed"},
                "output_tail": output[-3000:],
            }
        cases = _junit_cases(junit) if junit.exists() else {}
    return {
        "returncode": proc.returncode,
        "passed": sorted(k for k, v in cases.items() if v == "passed"),
        "failed": {k: v for k, v in cases.items() if v != "passed"},
        "output_tail": (proc.stdout + proc.stderr)[-3000:],
    }


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _verbose_cases(output: str) -> dict[str, str]:
    """``pytest -v``'s outcome lines (``path::test[id] PASSED  [ 5%]``) as the junit cases are named."""
    cases = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            outcome = parts[1].lower()
            cases[parts[0].rsplit("::", 1)[1]] = "passed" if outcome == "passed" else outcome
    return cases


def _junit_cases(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = f"{child.tag}: {(child.get('message') or '')[:300]}"
            elif child.tag == "skipped":
                outcome = "skipped"
        cases[case.get("name", "?")] = outcome
    return cases


def step_host_overhead(device: torch.device, tokenizer: Any, requests: int, steps: int) -> dict[str, Any]:
    """The host-overhead breakdown with decode steps replayed from CUDA graphs, and without."""
    loaded = random_model(tiny_llama_config(len(tokenizer)), tokenizer, device, torch.float32, "tiny-llama")
    results = {}
    for name, graphs in (("cuda_graphs", True), ("eager", False)):
        results[name] = measure_host_overhead(loaded, num_requests=requests, steps=steps, cuda_graphs=graphs)
        print(name, format_host_overhead(results[name]), sep="\n", flush=True)
    return results


def copy_rate(device: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    repeats = 5
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def _request(rid: str, method: Method, prompt: list[int], base: list[int], new_tokens: int) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    if method is Method.BASE:
        return GenerationRequest(rid, tuple(base), sampling, MethodSettings(method=Method.BASE))
    return GenerationRequest(rid, tuple(prompt), sampling, MethodSettings(method=method), tuple(base))


def _prompt_pair(rng: random.Random, vocab: int, shared: int) -> tuple[list[int], list[int]]:
    """Pref and base prompts with ``shared`` common leading tokens (the pref one 8 tokens longer)."""
    head = [rng.randrange(10, vocab) for _ in range(shared)]
    pref = head + [rng.randrange(10, vocab) for _ in range(12)]
    return pref, head + [rng.randrange(10, vocab) for _ in range(4)]


def _amulet_streams(prefix: str, n: int, rng: random.Random, vocab: int, opts: argparse.Namespace) -> list[GenerationRequest]:
    """``n`` amulet requests of ``opts.stream_tokens`` new tokens, each with its own random prompt pair."""
    pairs = [_prompt_pair(rng, vocab, opts.prompt_tokens) for _ in range(n)]
    return [_request(f"{prefix}-{i}", Method.AMULET, p, b, opts.stream_tokens) for i, (p, b) in enumerate(pairs)]


GRAMMAR_SHARE = 8
"""One request in this many of :func:`_grammar_streams` has a grammar."""
FREE_TEXT = GrammarSpec(GrammarKind.REGEX, "[a-z0-9 ,.]{0,100000}")
"""A grammar that allows most of what a random model writes: its masks cost what any grammar's do."""


def _grammar_streams(prefix: str, n: int, rng: random.Random, vocab: int, opts: argparse.Namespace) -> list[GenerationRequest]:
    """:func:`_amulet_streams` with one request in :data:`GRAMMAR_SHARE` constrained (structured outputs, tool calls)."""
    requests = _amulet_streams(prefix, n, rng, vocab, opts)
    for i in range(0, n, GRAMMAR_SHARE):
        r = requests[i]
        requests[i] = dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, grammar=FREE_TEXT))
    return requests


def _run(engine: LLMEngine, device: torch.device, requests: list[GenerationRequest]) -> dict[str, float]:
    """Run the requests together; tokens/s overall, and the decode steps' median time once all decode."""
    for r in requests:
        engine.add_request(r)
    sync(device)
    start = time.perf_counter()
    first: dict[str, float] = {}
    tokens = 0
    decode_steps: list[float] = []
    while engine.has_work():
        t0 = time.perf_counter()
        outs = engine.step()
        sync(device)
        t1 = time.perf_counter()
        if len(first) == len(requests):
            decode_steps.append(t1 - t0)
        for out in outs:
            if out.token_ids:
                first.setdefault(out.request_id, t1 - start)
                tokens += len(out.token_ids)
    elapsed = time.perf_counter() - start
    return {
        "tokens": tokens,
        "tok_per_s": tokens / elapsed,
        "ttft_s": max(first.values(), default=0.0),
        "decode_step_ms": 1000 * statistics.median(decode_steps) if decode_steps else 0.0,
        "decode_tok_per_s": len(requests) / statistics.median(decode_steps) if decode_steps else 0.0,
    }


def step_model(
    name: str, config: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, opts: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(0)
    loaded: LoadedModel = random_model(config, tokenizer, device, dtype, name)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    rate = copy_rate(device, opts.copy_bytes)
    result: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "weight_bytes": weight_bytes,
        "device_copy_bytes_per_s": rate,
        "bandwidth_bound_step_ms": 1000 * weight_bytes / rate,
        "bandwidth_bound_single_stream_tok_per_s": rate / weight_bytes,
    }
    vocab = min(len(tokenizer), config.vocab_size)
    pref, base = _prompt_pair(rng, vocab, opts.prompt_tokens)
    ids = torch.tensor([base], device=device)
    with torch.inference_mode():  # transformers generate, plain greedy, before the engine takes the model
        kwargs: dict[str, Any] = dict(do_sample=False, pad_token_id=0)
        loaded.model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        sync(device)
        start = time.perf_counter()
        out = loaded.model.generate(ids, max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, **kwargs)
        sync(device)
        result["generate_tok_per_s"] = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)
    engine_config = EngineConfig(
        max_num_seqs=max(2 * max(opts.streams), 2),
        max_model_len=opts.long_prompt + 64,
        kv_cache_memory_gib=opts.kv_gib,
        max_num_batched_tokens=opts.batched_tokens,
        graph_capture_seconds=GRAPH_CAPTURE_SECONDS,
    )
    started = time.perf_counter()
    engine = LLMEngine(loaded, engine_config)
    result["engine_start_s"] = time.perf_counter() - started
    result["attention"] = "paged kernel" if engine.runner.paged_kernel else "gathered sdpa"
    _run(engine, device, [_request("warm", Method.AMULET, pref, base, 4)])
    result["engine_base_1"] = _run(engine, device, [_request("b1", Method.BASE, pref, base, opts.new_tokens)])
    result["engine_amulet_1"] = _run(engine, device, [_request("a1", Method.AMULET, pref, base, opts.new_tokens)])
    for n in opts.streams:
        result[f"engine_amulet_{n}"] = _run(engine, device, _amulet_streams(f"s{n}", n, rng, vocab, opts))
    n = max(opts.streams)
    overlapped, steps = engine.overlapped_steps, engine.steps
    result[f"engine_grammar_{n}"] = _run(engine, device, _grammar_streams(f"g{n}", n, rng, vocab, opts))
    result[f"engine_grammar_{n}"]["overlapped_share"] = (engine.overlapped_steps - overlapped) / (engine.steps - steps)
    graphs = engine.runner.graphs
    result["cuda_graphs"] = (
        {
            "graphs": len(graphs.graphs),
            "captured_at_start": graphs.captured_at_start,
            "buckets": len(graphs.batch_sizes) * len(graphs.context_lens),
            "capture_s": graphs.capture_seconds,
            "decode_steps": graphs.steps,
            "tail_steps": graphs.tail_steps,
            "tail_graphs": len(graphs.tail_graphs),
            "tail_alone_graphs": len(graphs.tail_alone),
            "tail_enabled": graphs.tail_enabled,
        }
        if graphs
        else None
    )
    head = [rng.randrange(10, vocab) for _ in range(opts.long_prompt)]
    cold = _request("cold", Method.AMULET, head + [11, 12, 13], head + [14], 1)
    hit = _request("hit", Method.AMULET, head + [21, 22, 23], head + [24], 1)
    result["ttft_long_prompt_tokens"] = len(cold.prompt_ids)
    result["ttft_cold_s"] = _run(engine, device, [cold])["ttft_s"]
    result["ttft_prefix_hit_s"] = _run(engine, device, [hit])["ttft_s"]
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The same runs with the gathered SDPA decode attention (CUDA graphs on), then without CUDA graphs (every decode
    # step launched from Python), in the same process.
    # Their graphs are captured on first use (the median decode step leaves that step out): device minutes are few.
    sdpa = LLMEngine(loaded, dataclasses.replace(engine_config, attention_backend="sdpa", graph_capture_seconds=0))
    _run(sdpa, device, [_request("warm", Method.AMULET, pref, base, 4)])
    result["sdpa_base_1"] = _run(sdpa, device, [_request("sb1", Method.BASE, pref, base, opts.new_tokens)])
    result[f"sdpa_amulet_{n}"] = _run(sdpa, device, _amulet_streams(f"q{n}", n, rng, vocab, opts))
    result["sdpa_ttft_cold_s"] = _run(sdpa, device, [_request("sdpa-cold", Method.AMULET, head + [31], head + [32], 1)])["ttft_s"]
    del sdpa
    if device.type == "cuda":
        torch.cuda.empty_cache()
    synchronous = LLMEngine(loaded, dataclasses.replace(engine_config, overlap_host=False, graph_capture_seconds=0))
    _run(synchronous, device, [_request("warm", Method.AMULET, pref, base, 4)])
    result["sync_base_1"] = _run(synchronous, device, [_request("yb1", Method.BASE, pref, base, opts.new_tokens)])
    result[f"sync_amulet_{n}"] = _run(synchronous, device, _amulet_streams(f"y{n}", n, rng, vocab, opts))
    del synchronous
    # The tokens chosen on the host after each replay (the graphs without the method and the sampler): the tail's share.
    host_choice = LLMEngine(loaded, dataclasses.replace(engine_config, graph_capture_seconds=0))
    if host_choice.runner.graphs is not None:
        host_choice.runner.graphs.tail_enabled = False
    _run(host_choice, device, [_request("warm", Method.AMULET, pref, base, 4)])
    result["hostchoice_base_1"] = _run(host_choice, device, [_request("hb1", Method.BASE, pref, base, opts.new_tokens)])
    result[f"hostchoice_amulet_{n}"] = _run(host_choice, device, _amulet_streams(f"h{n}", n, rng, vocab, opts))
    del host_choice
    eager = LLMEngine(loaded, dataclasses.replace(engine_config, cuda_graphs=False))
    _run(eager, device, [_request("warm", Method.AMULET, pref, base, 4)])
    result["eager_base_1"] = _run(eager, device, [_request("eb1", Method.BASE, pref, base, opts.new_tokens)])
    result[f"eager_amulet_{n}"] = _run(eager, device, _amulet_streams(f"e{n}", n, rng, vocab, opts))
    del eager
    # Where a decode step's time goes at the most streams (CUDA graphs on): forward pass, vocabulary math, host.
    result[f"host_overhead_{n}"] = measure_host_overhead(loaded, num_requests=n, steps=opts.stream_tokens // 2)
    single, base1 = result["engine_amulet_1"]["decode_tok_per_s"], result["engine_base_1"]["decode_tok_per_s"]
    top = result[f"engine_amulet_{n}"]
    result["ratios"] = {
        "amulet_1 / base_1 (goal >= 0.9)": single / base1 if base1 else None,
        "base_1 / generate (goal >= 1.5)": base1 / result["generate_tok_per_s"],
        "aggregate at the most streams / amulet_1 (goal >= 20)": top["decode_tok_per_s"] / single if single else None,
        "decode step at the most streams / bandwidth bound (goal <= 2)": top["decode_step_ms"]
        / result["bandwidth_bound_step_ms"],
        "base_1 decode step, eager / cuda graphs": result["eager_base_1"]["decode_step_ms"]
        / result["engine_base_1"]["decode_step_ms"],
        "decode step at the most streams, eager / cuda graphs": result[f"eager_amulet_{n}"]["decode_step_ms"]
        / top["decode_step_ms"],
        "base_1 decode step, gathered sdpa / default attention": result["sdpa_base_1"]["decode_step_ms"]
        / result["engine_base_1"]["decode_step_ms"],
        "decode step at the most streams, host not overlapped / overlapped": result[f"sync_amulet_{n}"]["decode_step_ms"]
        / top["decode_step_ms"],
        f"decode step at the most streams, 1 in {GRAMMAR_SHARE} with a grammar / none (goal <= 1.1)": result[
            f"engine_grammar_{n}"
        ]["decode_step_ms"]
        / top["decode_step_ms"],
        "decode step at the most streams, gathered sdpa / default attention": result[f"sdpa_amulet_{n}"]["decode_step_ms"]
        / top["decode_step_ms"],
        "base_1 decode step, tokens chosen on the host / in the graph": result["hostchoice_base_1"]["decode_step_ms"]
        / result["engine_base_1"]["decode_step_ms"],
        "decode step at the most streams, tokens chosen on the host / in the graph": result[f"hostchoice_amulet_{n}"][
            "decode_step_ms"
        ]
        / top["decode_step_ms"],
    }
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.json")
    parser.add_argument("--tokenizer", default=None, help="saved tokenizer folder (default: the embedded SmolLM2's)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU with tiny models, quickly")
    parser.add_argument("--save-tokenizer", default=None, help="save SmolLM2's tokenizer to this folder and exit")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help=f"skip the steps that would start later than this many seconds after the start (default: {DEADLINE_S:.0f} "
        "on the device, where one call may run 600 s; none on the dry run)",
    )
    args = parser.parse_args(argv)
    if args.save_tokenizer:
        load_tokenizer(None).save_pretrained(args.save_tokenizer)
        print(f"saved the tokenizer to {args.save_tokenizer}")
        return 0
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = args.tokenizer or tmp
        if not args.tokenizer:
            tokenizer.save_pretrained(tmp)
        return _run_steps(args, device, tokenizer, tokenizer_dir)


def _run_steps(args: argparse.Namespace, device: torch.device, tokenizer: Any, tokenizer_dir: str) -> int:
    dry = args.cpu_dry_run
    opts = argparse.Namespace(
        new_tokens=8 if dry else 64,
        stream_tokens=4 if dry else 32,
        streams=[2, 4] if dry else [16, 64],
        prompt_tokens=24 if dry else 64,
        long_prompt=200 if dry else 2000,
        copy_bytes=(16 << 20) if dry else (1 << 30),
        kv_gib=0.05 if dry else 12.0,
        batched_tokens=512 if dry else 4096,
    )
    skip = {s for s in args.skip.split(",") if s}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / ("gpu_check_dry_run.json" if dry else "gpu_check.json")
    report: dict[str, Any] = {"dry_run": dry, "steps": {}}
    tests_timeout = 600.0 if dry else TESTS_TIMEOUT_S  # (a busy CI machine runs the dry run: no tight limit there)
    test_select = "abort or (mha and float32)" if dry else None  # the dry run: one engine test, the kernels on one shape
    shapes = {name: (tiny_llama_config(len(tokenizer)) if dry else _llama_config(shape)) for name, shape in LLAMA_SHAPES.items()}
    model_dtype = torch.float32 if dry else torch.bfloat16
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("env", lambda: step_env(device)),
        ("tests_float32", lambda: step_tests(device, "float32", tokenizer_dir, test_select, tests_timeout)),
        ("tests_bfloat16", lambda: step_tests(device, "bfloat16", tokenizer_dir, test_select, tests_timeout)),
        ("kernel", lambda: step_kernel(device, dry)),
        ("host_overhead", lambda: step_host_overhead(device, tokenizer, 8 if dry else 64, 3 if dry else 20)),
    ]
    for name, config in shapes.items():
        steps.append((name, functools.partial(step_model, name, config, tokenizer, device, model_dtype, opts)))
    one_b = {**LLAMA_SHAPES["llama_1b"], "vocab_size": len(tokenizer)}  # served with SmolLM2's tokenizer
    served = tiny_llama_config(len(tokenizer)) if dry else _llama_config(one_b)
    steps.append(("server", lambda: step_server(served, tokenizer, device, model_dtype, dry)))
    failures = 0
    deadline = args.deadline_s if args.deadline_s is not None else (None if dry else DEADLINE_S)
    began = time.perf_counter()
    for name, fn in steps:
        if name in skip:
            continue
        start = time.perf_counter()
        if deadline is not None and start - began >= deadline:  # recorded: the next run can --skip what did finish
            report["steps"][name] = {"ok": False, "error": f"not started: past the deadline of {deadline:.0f} s"}
            failures += 1
            out_file.write_text(json.dumps(report, indent=2, default=str))
            continue
        print(f"== {name}", flush=True)
        try:
            entry = {"ok": True, "result": fn()}
            if name.startswith("tests_") and entry["result"]["returncode"] != 0:  # (or timed out)
                entry["ok"] = False
            if name == "server" and any(r["errors"] or not r["repeatable"] for r in entry["result"].values()):
                entry["ok"] = False
        except Exception as exc:
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        failures += not entry["ok"]
        report["steps"][name] = entry
        out_file.write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps({name: {k: v for k, v in entry.items() if k != "traceback"}}, default=str)[:2000], flush=True)
    print(f"wrote {out_file}")
    return 1 if failures else 0


def _llama_config(shape: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=8192, eos_token_id=2, bos_token_id=1)


if __name__ == "__main__":
    sys.exit(main())
