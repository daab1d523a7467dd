"""Engine configuration: a frozen dataclass, parsed in one place (the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from amulet_core.engine.memory import GPU_MEMORY_UTILIZATION, MIN_MODEL_LEN
from amulet_core.engine.paged_decode import ATTENTION_BACKENDS, AttentionBackend

KVCacheDtype = Literal["auto", "float32", "float16", "bfloat16"]
KV_CACHE_DTYPES: tuple[KVCacheDtype, ...] = ("auto", "float32", "float16", "bfloat16")
ContrastLogits = Literal["auto", "all", "plausible"]
CONTRAST_LOGITS: tuple[ContrastLogits, ...] = ("auto", "all", "plausible")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and knobs of the engine.

    * ``max_num_seqs``: sequences decoded together; an amulet or la request holds K + 1 (K preference
      contexts and the contrast one), a pref request K; a request of more is refused.
    * ``max_model_len``: longest context (prompt + generated tokens) of one sequence; None: the model's
      own context length, capped so that the KV cache holds one full-length two-context request (see
      :mod:`amulet_core.engine.memory`). A value above the model's context or the cache's fails at load.
    * ``max_queue``: requests that may wait for admission (those that arrived since the last
      step count as waiting); more get an overload error.
    * ``kv_cache_tokens``: KV budget in tokens (all sequences together); None sizes it from
      ``kv_cache_memory_gib``.
    * ``kv_cache_memory_gib``: KV budget in GiB; None sizes it from the memory left once the weights
      are loaded (a GPU: ``gpu_memory_utilization``; a CPU: a share of the available RAM, capped).
    * ``gpu_memory_utilization``: share of a GPU's total memory the engine may use (weights,
      activations and KV cache together) when it sizes the KV cache itself.
    * ``max_num_batched_tokens``: tokens per forward pass; longer prompts are prefilled in chunks.
      None picks it for the device (:meth:`batched_tokens`).
    * ``block_size``: tokens per KV block, the unit of paging and of the prefix cache.
    * ``cuda_graphs``: on a CUDA device, replay decode-only steps from CUDA graphs captured per
      (batch, context length) bucket (``--enforce-eager`` turns this off).
    * ``graph_capture_seconds``: the start-up time given to capturing those graphs, smallest buckets first;
      a bucket not captured by then is captured on its first use (0: every one on first use).
    * ``attention_backend``: how decode rows attend: ``sdpa`` gathers each row's context and calls SDPA,
      ``triton`` reads the KV blocks in place through the block tables with the paged decode kernel
      (:mod:`amulet_core.engine.paged_decode`; a CUDA device with Triton), ``auto`` the kernel where it runs,
      else SDPA. The batch-invariant attention (``deterministic``) replaces both: with ``auto``, on a CPU, through
      its compiled kernel where the machine's C compiler builds it (:mod:`amulet_core.engine.fixed_order_kernel`),
      else through torch operations; ``fixed-order`` requires the kernel, ``sdpa`` keeps the torch operations.
    * ``overlap_host``: read each step's tokens a step later, while the device runs the next step
      (:mod:`amulet_core.engine.overlap`); None: on for a CUDA device (where the device runs asynchronously), off
      elsewhere (on a CPU the host and the "device" are the same thread: nothing to overlap).
    * ``deterministic``: batch-invariant forward passes (:mod:`amulet_core.engine.invariant_attention`,
      :mod:`amulet_core.engine.invariant_ops`): a token's logits have the same bits whether its prompt was
      prefilled cold, after a prefix-cache hit or in chunks, and whatever else the step holds, so a greedy
      request always gets the same answer (measured alike at 1, 2 and 4 threads). On a CPU the linear weights
      are also kept packed for oneDNN (a copy, when a quarter of the available RAM holds it). None: on for a
      CPU, off elsewhere (on a GPU it is implemented but unmeasured).
    * ``kv_cache_dtype``: the dtype the KV cache holds: ``auto`` the model's; a float32 model's may be ``float16``
      or ``bfloat16`` (half the bytes a token: twice the tokens in the same memory, half the bytes a long context's
      attention reads; each key and value rounded once as it is written, then read as the float32 it is exactly).
    * ``contrast_logits``: which logits a contrast row (la's, amulet's) gets: ``all`` the whole vocabulary's;
      ``plausible`` only its request's plausible tokens' where the request has a plausibility mask
      (:mod:`amulet_core.engine.deferred_contrasts`: the output layer once a request instead of twice, the same
      distribution up to rounding); ``auto`` plausible on a CPU (where the output layer is a large part of a
      step), all elsewhere (a decode graph computes every row's logits).
    """

    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_queue: int = 256
    kv_cache_tokens: int | None = None
    kv_cache_memory_gib: float | None = None
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_cache: bool = True
    cuda_graphs: bool = True
    graph_capture_seconds: float = 60.0
    deterministic: bool | None = None
    attention_backend: AttentionBackend = "auto"
    overlap_host: bool | None = None
    kv_cache_dtype: KVCacheDtype = "auto"
    contrast_logits: ContrastLogits = "auto"

    def __post_init__(self) -> None:
        checks = {
            "max_num_seqs": self.max_num_seqs >= 2,
            "max_model_len": self.max_model_len is None or self.max_model_len >= MIN_MODEL_LEN,
            "max_queue": self.max_queue >= 0,
            "max_num_batched_tokens": self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 16,
            "block_size": self.block_size >= 1,
            "kv_cache_memory_gib": self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0,
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "graph_capture_seconds": self.graph_capture_seconds >= 0,
            "attention_backend": self.attention_backend in ATTENTION_BACKENDS,
            "kv_cache_dtype": self.kv_cache_dtype in KV_CACHE_DTYPES,
            "contrast_logits": self.contrast_logits in CONTRAST_LOGITS,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EngineConfig.{name} is out of range: {getattr(self, name)!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("EngineConfig.max_num_batched_tokens must be at least max_num_seqs.")
        if self.kv_cache_tokens is not None and self.max_model_len is not None and self.kv_cache_tokens < self.max_model_len:
            raise ValueError("EngineConfig.kv_cache_tokens must hold at least one full-length sequence (max_model_len).")

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model of ``model_dtype``: ``kv_cache_dtype``, or the model's for ``auto``; an
        error for a cache a model's attention does not read (a 16-bit cache other than the model's own holds a float32
        model's keys and values; a float32 cache a float32 model's)."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        wanted = getattr(torch, self.kv_cache_dtype)
        if wanted != model_dtype and model_dtype != torch.float32:
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype}: a {str(model_dtype).removeprefix('torch.')} model's cache "
                "holds its own dtype (auto); float16 and bfloat16 caches are for float32 models"
            )
        return wanted

    def overlap_on(self, device_type: str) -> bool:
        """``overlap_host``, or when None whether the device is a CUDA one."""
        return device_type == "cuda" if self.overlap_host is None else self.overlap_host

    def plausible_contrasts_on(self, device_type: str) -> bool:
        """Whether contrast rows get only their plausible tokens' logits (``contrast_logits``; ``auto``: on a CPU)."""
        return device_type == "cpu" if self.contrast_logits == "auto" else self.contrast_logits == "plausible"

    def deterministic_on(self, device_type: str) -> bool:
        """``deterministic``, or when None whether the device is a CPU."""
        return device_type == "cpu" if self.deterministic is None else self.deterministic

    def batched_tokens(self, device_type: str) -> int:
        """``max_num_batched_tokens``, or when None the device's default: 4096 on CUDA (64 concurrent
        streams on an H200 got their first token 4x sooner than with 512, at 2.5x the throughput), 512
        elsewhere (a CPU's prefill chunk stalls the running streams for longer); at least ``max_num_seqs``."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(self.max_num_seqs, 4096 if device_type == "cuda" else 512)
