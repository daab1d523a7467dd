"""Where a CPU decode step goes, measured in place: ``python -m benchmarks.step_parts`` (prints a table, writes JSON).

The embedded SmolLM2 loaded as ``make serve`` loads it (``--dtype auto``, ``--quantization auto``, the family
forward), one engine per method decoding one greedy stream (``base``: one row a step; ``amulet``: two). Each
round times ``--steps`` steps of every variant in turn: the whole step, then the step with one part replaced by
zeros of its shape (the paged attention of every layer, with its cache writes; the int4 products; the output
layer), then with all three replaced. A part's cost is the whole step's wall time less the step without it (the
median over ``--rounds`` rounds); what is left with all three replaced is the rest: norms, rotations, residual
additions, activations, dtype conversions, the embedding, the method's combination, sampling and the engine's
own work. What the parts and the rest leave of the whole step is reported too: positive where they slow one
another (a product streams megabytes of weights through the caches the next small operations would read). A
profiler would charge its own overhead to the many small operations; this measures the step as it runs. The zeros
change the tokens, not the work: every operation keeps its shape. ``--conversation-tokens N`` decodes after a
multi-turn conversation of about N tokens instead of a short prompt (``benchmarks.context_cost``'s, ``amulet`` with
the ``end`` placement, so its two contexts share the conversation's KV blocks): where the attention's cost grows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from amulet_core.engine import packed_forward as packed_forward_module
from amulet_core.engine.config import CONTRAST_LOGITS, KV_CACHE_DTYPES, ContrastLogits, EngineConfig, KVCacheDtype
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.packed_forward import LlamaFamilyForward
from amulet_core.engine.paged_decode import ATTENTION_BACKENDS, AttentionBackend
from amulet_core.method.preference_prompts import Placement
from amulet_core.method.settings import Method
from amulet_core.model import q4_linear, quantization
from amulet_core.model.loading import LoadedModel
from benchmarks.context_cost import Config, conversation, request
from benchmarks.llamacpp_compare import machine
from benchmarks.packed_forward import METHODS, decoding_engine, served_model
from benchmarks.report import run_meta, write_report

PARTS = ("attention", "int4_products", "output_layer")
VARIANTS = ("whole", *(f"without_{part}" for part in PARTS), "without_all")


def _zero_attention(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The paged attention's output shape ``[1, N, heads, head_dim]``, zeros, nothing written to the cache."""
    return query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3]), None


def _zero_int4(rows: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's output shape ``[rows, outputs]``, zeros."""
    return rows.new_zeros(rows.shape[0], scales_and_zeros.shape[1])


def _zero_q4(layer: q4_linear.Q4Linear, rows: torch.Tensor) -> torch.Tensor:
    """The int4-q16 kernel's output shape ``[..., outputs]``, zeros."""
    return rows.new_zeros(*rows.shape[:-1], layer.out_features)


class _ZeroHead:
    """The output layer's logits shape, zeros."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.vocab)


@contextmanager
def without(engine: LLMEngine, parts: tuple[str, ...]) -> Iterator[None]:
    """``engine``'s steps with ``parts`` (of :data:`PARTS`) replaced by zeros; everything restored after."""
    forward = engine.runner.forward
    if not isinstance(forward, LlamaFamilyForward):
        raise RuntimeError("the model does not run the family forward")
    attention, int4, head = packed_forward_module.paged_attention_forward, quantization._INT4_MATMUL, forward.head
    q4 = q4_linear.q4_product
    if "attention" in parts:
        packed_forward_module.paged_attention_forward = _zero_attention
    if "int4_products" in parts:
        quantization._INT4_MATMUL = _zero_int4  # type: ignore[assignment]
        q4_linear.q4_product = _zero_q4
    if "output_layer" in parts:
        forward.head = _ZeroHead(int(head.out_features))
    try:
        yield
    finally:
        packed_forward_module.paged_attention_forward = attention
        quantization._INT4_MATMUL = int4
        q4_linear.q4_product = q4
        forward.head = head


def _removed(variant: str) -> tuple[str, ...]:
    if variant == "whole":
        return ()
    return PARTS if variant == "without_all" else (variant.removeprefix("without_"),)


def measure(engine: LLMEngine, rounds: int, steps: int) -> dict[str, float]:
    """Median wall milliseconds per step of each variant (:data:`VARIANTS`), the variants in turn each round."""
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            with without(engine, _removed(variant)):
                engine.step()  # the variant's first step (a switch) is not timed
                started = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                times[variant].append(1000 * (time.perf_counter() - started) / steps)
    return {variant: statistics.median(ms) for variant, ms in times.items()}


def parts_of(ms: dict[str, float]) -> dict[str, float]:
    """The whole step, each part's milliseconds (the whole step less the step without it), the rest (the step
    without all three) and what none of them accounts for: the whole step less the parts and the rest (positive
    where the parts slow one another or the rest, as a product that evicts the caches the next operations read)."""
    costs = {part: ms["whole"] - ms[f"without_{part}"] for part in PARTS}
    unattributed = ms["whole"] - sum(costs.values()) - ms["without_all"]
    return {"step": ms["whole"], **costs, "rest": ms["without_all"], "unattributed": unattributed}


def conversation_engine(
    loaded: LoadedModel,
    method: Method,
    tokens: int,
    new_tokens: int,
    attention: AttentionBackend,
    kv_cache_dtype: KVCacheDtype = "auto",
    contrast_logits: ContrastLogits = "auto",
) -> LLMEngine:
    """An engine decoding one greedy stream of ``method`` after a conversation of about ``tokens`` tokens
    (``amulet``: one preference, the ``end`` placement), its prompt prefilled."""
    messages = conversation(tokens, loaded.tokenizer)
    config = Config("base", None, 0) if method == Method.BASE else Config("end_k1", Placement.END, 1)
    req = request(f"{method.value}-{tokens}", loaded.tokenizer, messages, config, new_tokens)
    length = len(req.prompt_ids) + new_tokens + 64
    engine = LLMEngine(
        loaded,
        EngineConfig(
            max_model_len=length,
            kv_cache_tokens=3 * length,
            attention_backend=attention,
            kv_cache_dtype=kv_cache_dtype,
            contrast_logits=contrast_logits,
        ),
    )
    engine.add_request(req)
    state = engine.requests[req.request_id]
    while not state.output_ids:  # the prefill, to its first token
        engine.step()
    engine.step()
    return engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-threads", type=int, default=None, help="default: the server's (every CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto", help="as the server's")
    parser.add_argument("--conversation-tokens", type=int, default=0, help="decode after a conversation of about so many tokens")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help="as the server's")
    parser.add_argument("--contrast-logits", choices=CONTRAST_LOGITS, default="auto", help="as the server's")
    parser.add_argument("--out", default="benchmarks/results/step_parts.json")
    args = parser.parse_args(argv)
    loaded = served_model(args.cpu_threads)
    threads = torch.get_num_threads()
    new_tokens = args.rounds * len(VARIANTS) * (args.steps + 1) + 8
    result: dict[str, Any] = {}
    for method in METHODS:
        if args.conversation_tokens > 0:
            engine = conversation_engine(
                loaded, method, args.conversation_tokens, new_tokens, args.attention_backend, args.kv_cache_dtype,
                args.contrast_logits,
            )  # fmt: skip
        else:
            engine = decoding_engine(
                loaded, method, "family", new_tokens, args.attention_backend, args.kv_cache_dtype, args.contrast_logits
            )
        ms = measure(engine, args.rounds, args.steps)
        result[method.value] = {"variants_ms": ms, "parts_ms": parts_of(ms)}
    after = f"after a {args.conversation_tokens}-token conversation" if args.conversation_tokens else "after a short prompt"
    print(f"{threads} thread(s), {loaded.name} in {loaded.dtype}, wall ms per decode step {after} (median of {args.rounds})")
    print("| method | step | attention | int4 products | output layer | the rest | unattributed |")
    print("|---|---|---|---|---|---|---|")
    for method in (Method.BASE, Method.AMULET):
        p = result[method.value]["parts_ms"]
        print(f"| {method.value} | {p['step']:.1f} | {p['attention']:.1f} | {p['int4_products']:.1f} | "
              f"{p['output_layer']:.1f} | {p['rest']:.1f} | {p['unattributed']:.1f} |")  # fmt: skip
    attention = "fixed-order kernel" if engine.runner.attention_kernel is not None else "torch operations"
    cache = str(engine.runner.cache_dtype).removeprefix("torch.")
    contrasts = "its plausible tokens'" if engine.runner.plausible_contrasts else "the whole vocabulary's"
    print(f"(the batch-invariant attention through {attention}, a {cache} KV cache; a contrast row's logits: {contrasts})")
    meta = run_meta(
        loaded.device, loaded.dtype, loaded.name, rounds=args.rounds, steps=args.steps, cpu=machine(), attention=attention,
        conversation_tokens=args.conversation_tokens, kv_cache_dtype=cache, contrast_logits=args.contrast_logits,
        plausible_contrasts=engine.runner.plausible_contrasts,
    )  # fmt: skip
    write_report(args.out, {"meta": meta, **result})


if __name__ == "__main__":
    main()
