"""The batch-invariant attention as one compiled call per layer on the CPU (``amulet_core/native/fixed_order_attention.c``).

:func:`~amulet_core.engine.invariant_attention.invariant_attention` gets its fixed order from torch operations of
fixed shapes: some twenty calls a layer, each a dispatch through torch, and products of a few rows whose
kernels are built for many. On the CPU that attention was a quarter of a decode step (``python -m
benchmarks.step_parts``). The C kernel computes every (token, query head) alone, in one order written down in its
source: a token's output depends on its query, its context's keys and values and nothing else, so it has the same
bits cold, after a prefix-cache hit, in a prefill chunk of any size and as a decode row beside any others —
prefill and decode run the same code. Its order differs from the torch path's, so a server uses one or the other
throughout (:class:`~amulet_core.engine.model_runner.ModelRunner` decides at start and logs which).

The source is compiled at start for the machine and kept (:mod:`amulet_core.native.build`); with no compiler,
or a build that fails, :func:`load_fixed_order_attention` says why and the torch path serves.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from amulet_core.native.build import SOURCES, Library, load_library

logger = logging.getLogger(__name__)

SOURCE = SOURCES / "fixed_order_attention.c"

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_ARGUMENTS = [_PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int, _PTR, _PTR, _PTR, _I64, _I64]
_ARGUMENTS += [ctypes.c_float, _I64, ctypes.c_float, ctypes.c_int, _PTR, _I64, _I64]
"""``fixed_order_attention``'s: q, k_cache, v_cache, kv_heads, slots_total, dim, format, slots, token_offset,
token_length, tokens, heads, scale, window, softcap, threads, out, q_head_stride, q_token_stride."""


def cache_format(cache: torch.dtype, query: torch.dtype) -> int:
    """The kernel's number for a cache of dtype ``cache`` read by queries of dtype ``query`` (the model's): 0 a
    float32 cache, 1 a bfloat16 model's bfloat16 cache (bfloat16 products, as transformers' eager attention), 2 a
    float16 and 3 a bfloat16 cache of a float32 model (each key and value read as the float32 it is exactly, then the
    float32 arithmetic: the bits of a float32 cache holding the same values)."""
    if cache == torch.float32:
        return 0
    if cache == torch.bfloat16 and query == torch.bfloat16:
        return 1
    if cache in (torch.float16, torch.bfloat16) and query == torch.float32:
        return 2 if cache == torch.float16 else 3
    raise ValueError(
        f"the fixed-order kernel reads a float32 model's float32, float16 or bfloat16 cache, or a bfloat16 "
        f"model's bfloat16 one, not a {cache} cache with {query} queries"
    )


@dataclass(frozen=True)
class KernelRows:
    """Where each packed token's keys are, for the kernel: a token ``t`` at context position ``p`` reads cache slot
    ``slots[offsets[t] + p]`` for ``p < lengths[t]`` (int64 CPU tensors; ``offsets`` and ``lengths`` ``[N]``)."""

    slots: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor

    @cached_property
    def addresses(self) -> tuple[int, int, int]:
        """The three tensors' data pointers (read once a step, not at every layer)."""
        return self.slots.data_ptr(), self.offsets.data_ptr(), self.lengths.data_ptr()


class FixedOrderAttention:
    """The loaded kernel: :meth:`__call__` attends a step's packed queries."""

    def __init__(self, library: Library) -> None:
        self.library = library
        self.attend = library.function("fixed_order_attention", ctypes.c_int, _ARGUMENTS)

    def __call__(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: KernelRows,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[1, heads, N, d]`` over the caches (``[kv_heads, slots, d]``, contiguous, this
        step's keys written; dtypes as :func:`cache_format` takes them): ``[1, N, heads, d]`` in the query's dtype."""
        heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
        if v_cache.dtype != k_cache.dtype:
            dtypes = f"{k_cache.dtype} and {v_cache.dtype}"
            raise ValueError(f"the fixed-order kernel reads keys and values of one dtype, not {dtypes}")
        form = cache_format(k_cache.dtype, query.dtype)
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the fixed-order kernel reads contiguous caches")
        q = query[0]  # [heads, N, d], read in place through its strides (the rotation's output, not copied)
        if q.dtype != torch.float32 or q.stride(-1) != 1:
            q = q.float().contiguous()
        out = torch.empty(1, tokens, heads, dim, dtype=torch.float32)
        slots, offsets, lengths = rows.addresses
        status = self.attend(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], k_cache.shape[1], dim, form,
            slots, offsets, lengths, tokens, heads, scale, window or 0, softcap or 0.0, torch.get_num_threads(),
            out.data_ptr(), q.stride(0), q.stride(1),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the fixed-order attention kernel could not allocate its scratch rows")
        return out if query.dtype == torch.float32 else out.to(query.dtype)


def load_fixed_order_attention(cache_dir: Path | None = None) -> tuple[FixedOrderAttention | None, str]:
    """The kernel, compiled for this machine unless ``cache_dir`` (else the kernel cache) holds it, and a sentence
    saying what was loaded; or None and why not."""
    library, why = load_library(SOURCE, cache_dir)
    if library is None:
        return None, f"{why}: no fixed-order attention kernel"
    return FixedOrderAttention(library), library.describe()


def attention_kernel_for(
    requested: str, deterministic: bool, device: torch.device, dtype: torch.dtype
) -> FixedOrderAttention | None:
    """The kernel an engine's batch-invariant attention runs through for ``--attention-backend requested``: on a
    CPU over a float32 or bfloat16 cache, with ``auto`` (None, with a warning, where it does not build) or
    ``fixed-order`` (an error where it does not, or where it cannot run); None otherwise."""
    if requested == "fixed-order" and not deterministic:
        raise ValueError("--attention-backend fixed-order is the batch-invariant attention's: it needs --deterministic.")
    if not deterministic or requested not in ("auto", "fixed-order"):
        return None
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        if requested == "fixed-order":
            raise ValueError(f"--attention-backend fixed-order runs on a CPU in float32 or bfloat16, not {device.type} {dtype}.")
        return None
    kernel, why = load_fixed_order_attention()
    if kernel is None:
        if requested == "fixed-order":
            raise ValueError(f"--attention-backend fixed-order: {why}")
        logger.warning("%s; the batch-invariant attention runs as torch operations", why)
    else:
        logger.info("fixed-order attention kernel: %s", why)
    return kernel
