"""The options of ``amulet-server`` that size and shape the engine (a part of :func:`server.options.build_parser`):
batch and context sizes, the KV cache's memory, CUDA graphs, the attention backend, the host's overlap,
deterministic decoding and quantization."""

from __future__ import annotations

import argparse

from amulet_core.engine.config import CONTRAST_LOGITS, KV_CACHE_DTYPES, EngineConfig
from amulet_core.engine.paged_decode import ATTENTION_BACKENDS
from amulet_core.model.quantization import QUANTIZATIONS


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--max-num-seqs``, ``--max-model-len``, ``--max-queue``, ``--max-num-batched-tokens``,
    ``--kv-cache-memory-gib``, ``--gpu-memory-utilization``, ``--enforce-eager``, ``--attention-backend``,
    ``--graph-capture-seconds``, ``--overlap-host``, ``--deterministic`` and ``--quantization``."""
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=EngineConfig.max_num_seqs,
        help="sequences decoded together; an amulet or la request holds two (default: %(default)s)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest context, prompt plus answer, in tokens (default: the model's own, capped so that the KV cache "
        "holds one amulet request of that length; the log says which)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=EngineConfig.max_queue,
        help="requests that may wait; more are refused with 429 (default: %(default)s)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens one forward pass may hold; longer prompts are prefilled in chunks (default: 4096 on a GPU, 512 on a CPU)",
    )
    p.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=None,
        help="memory for the paged KV cache, all sequences together, in GiB (default: what is left once the weights "
        "are loaded: on a GPU within --gpu-memory-utilization, on a CPU a quarter of the available RAM, at most 2 GiB)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default=EngineConfig.kv_cache_dtype,
        choices=KV_CACHE_DTYPES,
        help="the dtype the KV cache holds: auto, the model's; a float32 model's may be float16 or bfloat16: half "
        "the bytes a token, so twice the tokens in the same memory and half the bytes a long context's attention "
        "reads, each key and value rounded once as it is written (llama.cpp's default cache is float16) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--contrast-logits",
        default=EngineConfig.contrast_logits,
        choices=CONTRAST_LOGITS,
        help="which logits a contrast context (la's, amulet's) gets: all, the whole vocabulary's; plausible, only "
        "its request's plausible tokens' when the request has a plausibility mask (the output layer once a request "
        "instead of twice; the same distribution to rounding); auto, plausible on a CPU, all elsewhere "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=EngineConfig.gpu_memory_utilization,
        help="share of the GPU's memory the server uses, weights, activations and KV cache together, when it sizes "
        "the KV cache itself (default: %(default)s)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on a CUDA device, launch every decode step from Python instead of replaying CUDA graphs "
        "(captured per batch-size and context-length bucket at start-up, within --graph-capture-seconds)",
    )
    p.add_argument(
        "--attention-backend",
        default=EngineConfig.attention_backend,
        choices=ATTENTION_BACKENDS,
        help="decode attention: triton reads each row's KV blocks in place through its block table (a Triton "
        "kernel; a CUDA device), sdpa gathers the rows' contexts and calls PyTorch's SDPA; auto: triton on a CUDA "
        "device with Triton installed, else sdpa (default: %(default)s). --deterministic attends in a fixed order "
        "of its own: on a CPU with auto through a kernel compiled at start where a C compiler is found "
        "(fixed-order: that kernel or fail), else (or with sdpa) through torch operations",
    )
    p.add_argument(
        "--graph-capture-seconds",
        type=float,
        default=EngineConfig.graph_capture_seconds,
        help="on a CUDA device, the start-up time given to capturing the decode steps' CUDA graphs, smallest "
        "buckets first; the rest are captured on first use (0: all on first use; default %(default)s)",
    )
    p.add_argument(
        "--overlap-host",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each step's sampled tokens a step later, while the device runs the next step, so that scheduling, "
        "detokenising and answering overlap the GPU's work (default: on for a CUDA device, off for a CPU, where "
        "there is nothing to overlap; requests with a grammar, penalties or a thinking span are stepped without)",
    )
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch-invariant forward passes: a greedy request gets the same answer cold, on a prefix-cache hit and "
        "in any batch (default: on for a CPU, where it costs about 1.2x the prefill time and makes decode faster; "
        "off on a GPU)",
    )
    p.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="weight-only quantization of the linear layers once loaded, on the CPU (torch's int8/int4 kernels, "
        "or int4-q16: a compiled kernel of 4-bit weights and 16-bit integer inputs): int8 (per output) halves and "
        "int4 (groups of 32) quarters the bytes of bfloat16 weights, one stream decodes faster, a long prefill is "
        "slower; auto keeps a Q4_0/Q4_1/Q4_K GGUF model's 4-bit layers 4-bit (exact) with int4-q16 (int4 without "
        "a C compiler), else none (default: %(default)s)",
    )
