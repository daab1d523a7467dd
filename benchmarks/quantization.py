"""Each ``--quantization`` choice on the embedded model: ``python -m benchmarks.quantization`` (a table, and JSON).

Per choice (``none``, ``int8``, ``int4``, ``int4-q16``; ``auto`` is ``int4-q16`` for the embedded Q4_1 GGUF) on
SmolLM2-135M in ``--dtype`` (auto: bfloat16 where the CPU has AVX512-BF16), with the serving thread count:

* the bytes of the decoder's linear weights, and the resident memory of a process that loaded the model and built
  an engine with a fixed KV cache (4,096 tokens), each choice in a fresh process;
* quality: the mean log-likelihood per token of a fixed text (:data:`TEXT`, teacher-forced) and its difference
  from ``none``'s (:func:`mean_log_likelihood`; ``tests/core/model/test_quantization_quality.py`` holds it to
  :data:`TOLERANCE`);
* speed, the engines taking turns step by step as in :mod:`benchmarks.determinism_cost`: the prefill of a
  ``--prompt-tokens`` prompt (seconds) and the decode tokens per second of 1 ``base``, 1 ``amulet``, 4 ``base``
  and 16 ``amulet`` streams, each as a ratio to ``none``'s (wall time and the stepping thread's CPU time).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.method.settings import Method
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, serving_cpu_threads
from amulet_core.model.quantization import quantize_model
from benchmarks.determinism_cost import request, timed_step
from benchmarks.report import run_meta, write_report

METHODS = ("none", "int8", "int4", "int4-q16")
TEXT = (
    "The capital of France is Paris, a city on the Seine known for its museums, its cafes and the Eiffel Tower. "
    "Water boils at one hundred degrees Celsius at sea level, and it freezes at zero. To make a cup of green tea, "
    "heat the water to about eighty degrees, pour it over the leaves and let them steep for two or three minutes. "
    "A good answer to a job interview question is short, concrete and honest: say what you did, how you did it "
    "and what came of it. The sky is blue because the air scatters the short blue wavelengths of sunlight more "
    "than the long red ones."
)
"""A fixed English text (about 130 tokens) whose likelihood each choice is measured on."""
TOLERANCE = {"int8": 0.05, "int4": 0.01, "int4-q16": 0.01}
"""Most difference, in nats a token, of a choice's mean log-likelihood of :data:`TEXT` from ``none``'s on the
embedded model in bfloat16 (int4 and int4-q16 recover the Q4_1 weights exactly: only roundings differ; int8 re-rounds
them)."""
KV_TOKENS = 4096


def quantized_copy(loaded: LoadedModel, method: str) -> LoadedModel:
    """A copy of ``loaded`` (quantization none) with ``method`` applied."""
    model = copy.deepcopy(loaded.model)
    report = quantize_model(model, method)
    return LoadedModel(model, loaded.tokenizer, loaded.name, loaded.device, loaded.dtype, loaded.eos_token_ids, report)


def mean_log_likelihood(loaded: LoadedModel, text: str = TEXT) -> float:
    """Mean log-probability per token (nats) of ``text``'s tokens after the first, teacher-forced."""
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]], device=loaded.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0, :-1].float()
    return float(logits.log_softmax(-1).gather(1, ids[0, 1:].unsqueeze(1)).mean())


def resident_mib(dtype: str, method: str) -> dict[str, Any]:
    """In a fresh process: the model loaded with ``method`` and an engine built; its resident MiB and report."""
    command = [sys.executable, "-m", "benchmarks.quantization", "--resident-of", method, "--dtype", dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def resident_of(dtype: str, method: str) -> None:
    loaded = load_model(ModelConfig(dtype=dtype, quantization=method, model_cache=default_model_cache()))
    LLMEngine(loaded, EngineConfig(max_model_len=2048, kv_cache_tokens=KV_TOKENS))
    rss = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    report = loaded.quantization
    print(json.dumps({"rss_mib": int(rss.split()[1]) / 1024, "layers": report.layers, "weights": report.quantized_bytes}))


def engine(loaded: LoadedModel, tokens: int) -> LLMEngine:
    config = EngineConfig(max_model_len=2048, kv_cache_tokens=max(tokens, KV_TOKENS), max_num_seqs=32, enable_prefix_cache=False)
    return LLMEngine(loaded, config)


def prefill(models: dict[str, LoadedModel], tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per choice, the median (wall, CPU) seconds of a fresh prompt's prefill step, the choices in turn."""
    engines = {m: engine(loaded, (repeats + 1) * (tokens + 16)) for m, loaded in models.items()}
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in models}
    for r in range(repeats + 1):  # the first round warms up
        for m, eng in engines.items():
            eng.add_request(request(f"p{r}", r, tokens, Method.BASE, 1))
            _, wall, cpu = timed_step(eng)
            while eng.has_work():
                eng.step()
            if r:
                runs[m].append((wall, cpu))
    return {m: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for m, v in runs.items()}


def decode(
    models: dict[str, LoadedModel], streams: int, method: Method, context: int, new: int
) -> dict[str, tuple[float, float]]:
    """Per choice, (wall, CPU) tokens per second of ``streams`` streams' decode steps, the engines in turn."""
    engines = {m: engine(loaded, streams * (context + 3 * streams + new + 16) * 2) for m, loaded in models.items()}
    for eng in engines.values():
        for i in range(streams):
            eng.add_request(request(f"d{i}", 7 + 10 * i, context + 3 * i, method, new))
        started: set[str] = set()
        while len(started) < streams:  # prefill, not timed
            started.update(o.request_id for o in eng.step())
    totals = {m: [0.0, 0.0, 0.0] for m in models}
    while any(eng.has_work() for eng in engines.values()):
        for m, eng in engines.items():
            if eng.has_work():
                produced, wall, cpu = timed_step(eng)
                totals[m] = [totals[m][0] + produced, totals[m][1] + wall, totals[m][2] + cpu]
    return {m: (t[0] / t[1], t[0] / t[2]) for m, t in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short prompts, few tokens (a smoke run)")
    parser.add_argument("--resident-of", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/quantization.json")
    args = parser.parse_args(argv)
    if args.resident_of:
        resident_of(args.dtype, args.resident_of)
        return
    if args.quick:
        args.prompt_tokens, args.context, args.new_tokens, args.repeats = 64, 32, 4, 1
    config = ModelConfig(dtype=args.dtype, cpu_threads=args.cpu_threads, model_cache=default_model_cache(), quantization="none")
    base = load_model(config)
    torch.set_num_threads(serving_cpu_threads(config))
    models = {m: base if m == "none" else quantized_copy(base, m) for m in METHODS}
    rows: list[dict[str, Any]] = []
    reference = mean_log_likelihood(base)
    for m, loaded in models.items():
        resident = resident_mib(args.dtype, m)
        likelihood = mean_log_likelihood(loaded)
        weights = loaded.quantization.quantized_bytes or sum(
            mod.weight.numel() * mod.weight.element_size()
            for name, mod in loaded.model.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in name
        )
        rows.append({"what": m, "decoder_weights_mib": weights / (1 << 20), "resident_mib": resident["rss_mib"],
                     "log_likelihood": likelihood, "log_likelihood_delta": likelihood - reference})  # fmt: skip
        print(f"{m:<5} decoder weights {weights / (1 << 20):6.1f} MiB  resident {resident['rss_mib']:6.0f} MiB  "
              f"log-likelihood {likelihood:.4f} (delta {likelihood - reference:+.4f})", flush=True)  # fmt: skip
    speed: dict[str, dict[str, tuple[float, float]]] = {
        f"prefill {args.prompt_tokens} tokens (s)": prefill(models, args.prompt_tokens, args.repeats)
    }
    for streams, method in ((1, Method.BASE), (1, Method.AMULET), (4, Method.BASE), (16, Method.AMULET)):
        speed[f"decode {streams} x {method.value} (tokens/s)"] = decode(models, streams, method, args.context, args.new_tokens)
    for what, figures in speed.items():
        line = "  ".join(
            f"{m} {w:8.3f} ({w / figures['none'][0]:.2f}, CPU {c / figures['none'][1]:.2f})" for m, (w, c) in figures.items()
        )
        print(f"{what:<30} {line}", flush=True)
    meta = run_meta(base.device, base.dtype, base.name, prompt_tokens=args.prompt_tokens, context=args.context)
    meta |= {"new_tokens": args.new_tokens, "kv_cache_tokens": KV_TOKENS}
    speeds = {what: {m: {"wall": w, "cpu": c} for m, (w, c) in figures.items()} for what, figures in speed.items()}
    write_report(args.out, {"meta": meta, "rows": rows, "speed": speeds})


if __name__ == "__main__":
    main()
