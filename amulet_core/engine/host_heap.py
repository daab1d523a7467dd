"""The C heap of a process that decodes on the CPU: freed buffers kept for the next step instead of given back.

Every CPU decode step allocates and frees the same large temporaries: the logits and the method's and sampler's
``[rows, vocabulary]`` float32 tensors (12.6 MB each for 64 ``amulet`` streams of SmolLM2's 49,152 tokens). glibc's
malloc serves a block above its mmap threshold (128 KiB at first, raised toward 32 MiB as such blocks are freed)
with a fresh mapping, and gives the heap's free top back to the OS past its trim threshold; either way the next
step's temporaries are new pages, and their page faults (each page zeroed by the kernel) cost more than the
arithmetic. :func:`keep_freed_memory` fixes both thresholds with ``mallopt``, as a server process wants (tcmalloc and
jemalloc, which vLLM's and Intel's CPU guides preload, keep freed memory too): the memory of a step's temporaries
stays the process's, reused step after step. Measured with ``python -m benchmarks.engine --host-overhead
--cpu-threads 1`` (64 ``amulet`` streams, a 2-layer model with SmolLM2's vocabulary, 2-core build machine,
2026-12-05, in turn): the method's vocabulary-wide work 34.1 and 30.0 ms a step before, 15.1 and 15.5 after; the
Python host work 4.4-5.8 ms before, 1.9 after. ``python -m benchmarks.host_heap`` (the embedded SmolLM2, 64 ``amulet``
streams, one thread, each case in a fresh interpreter, two rounds in turn): 122.8 and 120.2 tokens a CPU second
before, 125.0 and 128.3 after. A single stream's temporaries are small enough that glibc's own adjustment of the
thresholds keeps them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters (malloc.h)."""
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest mmap threshold on 64-bit machines)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top is given back to the OS only past this."""


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for the process (idempotent); False where the C library has no
    ``mallopt`` or refuses them (not glibc: nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if applied:
        logger.info("CPU decoding: freed memory up to %d MiB blocks kept for reuse (mallopt)", MMAP_THRESHOLD >> 20)
    return applied
