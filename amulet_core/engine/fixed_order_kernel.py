"""The batch-invariant attention as one compiled call per layer on the CPU (``fixed_order_attention.c``).

:func:`~amulet_core.engine.invariant_attention.invariant_attention` gets its fixed order from torch operations of
fixed shapes: some twenty calls a layer, each a dispatch through torch, and products of a few rows whose
kernels are built for many. On the CPU that attention was a quarter of a decode step (``python -m
benchmarks.step_parts``). The C kernel here computes every (token, query head) alone, in one order written down
in its source: a token's output depends on its query, its context's keys and values and nothing else, so it has
the same bits cold, after a prefix-cache hit, in a prefill chunk of any size and as a decode row beside any
others — prefill and decode run the same code. Its order differs from the torch path's, so a server uses one or
the other throughout (:class:`~amulet_core.engine.model_runner.ModelRunner` decides at start and logs which).

The source ships with the package and is compiled at start with the machine's C compiler (``$CC``, else
``cc``/``gcc``/``clang``) for the CPU it runs on, without FMA contraction and without fast-math (a vector unit of any
width then gives the same bits), with OpenMP when the compiler has it: the shared object declares
``libgomp.so.1``, which torch has already loaded, so the kernel's threads are torch's. The library is kept
in ``$AMULET_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/amulet-serve/kernels`` (else ``~/.cache``, else the temporary
directory), named by a hash of the
source, the flags, the compiler's version and the CPU's flags, so a second start loads it at once. With no
compiler, or a build that fails, :func:`load_fixed_order_attention` says why and the torch path serves.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fixed_order_attention.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
"""Compiler flags: no contraction of a product and a sum into one rounding, no reassociation."""
COMPILERS = ("cc", "gcc", "clang")
KERNEL_CACHE_ENV = "AMULET_KERNEL_CACHE"
"""Names the folder the compiled kernels are kept in."""

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@dataclass(frozen=True)
class KernelRows:
    """Where each packed token's keys are, for the kernel: a token ``t`` at context position ``p`` reads cache slot
    ``slots[offsets[t] + p]`` for ``p < lengths[t]`` (int64 CPU tensors; ``offsets`` and ``lengths`` ``[N]``)."""

    slots: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor


class FixedOrderAttention:
    """The loaded kernel: :meth:`__call__` attends a step's packed queries."""

    def __init__(self, library: ctypes.CDLL, path: Path, threaded: bool) -> None:
        self.path = path
        self.threaded = threaded
        self._call = library.fixed_order_attention
        self._call.restype = ctypes.c_int
        self._call.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int, _PTR, _PTR, _PTR, _I64, _I64]
        self._call.argtypes += [ctypes.c_float, _I64, ctypes.c_float, ctypes.c_int, _PTR]

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
        """Attention of ``query`` ``[1, heads, N, d]`` over the caches (``[kv_heads, slots, d]``, float32 or
        bfloat16, contiguous, this step's keys written): ``[1, N, heads, d]`` in the query's dtype."""
        heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
        if k_cache.dtype not in (torch.float32, torch.bfloat16) or v_cache.dtype != k_cache.dtype:
            raise ValueError(f"the fixed-order kernel reads float32 or bfloat16 caches, not {k_cache.dtype}")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the fixed-order kernel reads contiguous caches")
        q = query[0].transpose(0, 1).float().contiguous()
        out = torch.empty(tokens, heads, dim, dtype=torch.float32)
        status = self._call(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], k_cache.shape[1], dim,
            int(k_cache.dtype == torch.bfloat16), rows.slots.data_ptr(), rows.offsets.data_ptr(),
            rows.lengths.data_ptr(), tokens, heads, scale, window or 0, softcap or 0.0, torch.get_num_threads(),
            out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the fixed-order attention kernel could not allocate its scratch rows")
        return out.unsqueeze(0) if query.dtype == torch.float32 else out.to(query.dtype).unsqueeze(0)


def load_fixed_order_attention(cache_dir: Path | None = None) -> tuple[FixedOrderAttention | None, str]:
    """The kernel, compiled for this machine if it is not in ``cache_dir`` yet (see the module's docstring), and
    a sentence saying what was loaded; or None and why not."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler ($CC, cc, gcc or clang) to build the fixed-order kernel"
    version = _run([compiler, "--version"]).split("\n", 1)[0]
    failures = []
    for threaded in (True, False):
        flags = (*FLAGS, "-fopenmp") if threaded else FLAGS
        source = SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_flags()])).hexdigest()
        directory = cache_dir or _cache_dir()
        path = directory / f"fixed_order_attention-{key[:20]}.so"
        if not path.exists():
            error = _build(compiler, flags, path)
            if error:
                failures.append(error)
                continue
        try:
            library = ctypes.CDLL(str(path))
        except OSError as exc:
            failures.append(str(exc))
            continue
        threads = "OpenMP threads shared with torch" if threaded else "one thread (the compiler has no OpenMP)"
        return FixedOrderAttention(library, path, threaded), f"compiled by {version} ({threads}), {path}"
    return None, "the fixed-order kernel did not build: " + " | ".join(failures)


def _compiler() -> str | None:
    named = os.environ.get("CC")
    for name in ([named] if named else []) + list(COMPILERS):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return done.stdout or done.stderr


def _build(compiler: str, flags: tuple[str, ...], path: Path) -> str | None:
    """Compiles the source into ``path`` (written under another name, then renamed: a concurrent start sees
    the whole file or none); the compiler's complaint, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".so.partial")
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-400:] or f"{compiler} exited {done.returncode}"
        os.replace(partial, path)
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _cache_dir() -> Path:
    """``$AMULET_KERNEL_CACHE``, else the first writable of ``$XDG_CACHE_HOME`` (else ``~/.cache``) and the
    temporary directory."""
    named = os.environ.get(KERNEL_CACHE_ENV)
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (Path(base), Path(tempfile.gettempdir())):
        directory = root / "amulet-serve" / "kernels"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    return Path(tempfile.mkdtemp(prefix="amulet-kernels-"))


def _cpu_flags() -> bytes:
    """The CPU's model and flags (``-march=native`` compiles for them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return b""
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(lines).encode()
