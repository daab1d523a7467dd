"""Compile the paged attention kernels for a GPU without one: ``python tests/engine/compile_kernels.py SM``.

Triton compiles a kernel ahead of time for a target it is told (Triton IR, its GPU IR, LLVM IR, PTX, then ptxas's
cubin) with no device or driver. Run in a process of its own, without ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` gives interpreted functions, which do not compile). The argument types mirror
:func:`~amulet_core.engine.paged_decode.paged_decode_attention`'s and ``paged_prefill_attention``'s launches; prints
one line per variant and exits 1 if any fails.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from amulet_core.engine import paged_decode_triton as kernels  # noqa: E402


def partition_signature(dtype: str) -> dict[str, str]:
    pointers = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr")}
    pointers |= {"tables_ptr": "*i64", "lengths_ptr": "*i64", "followers_ptr": "*i64", "skip_ptr": "*i64"}
    pointers |= {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    strides = ["qb", "qh", "kh", "ks", "tb", "fb", "ob", "oh", "op", "lb", "lh"]
    numbers = {f"stride_{s}": "i32" for s in strides} | {"shared_slot": "i32", "scale": "fp32", "softcap": "fp32"}
    return pointers | numbers | {name: "i32" for name in ("window", "block_size", "head_dim", "group_size")}


def combine_signature(dtype: str) -> dict[str, str]:
    strides = {f"stride_{s}": "i32" for s in ["ob", "oh", "op", "lb", "lh", "yb", "yh"]}
    pointers = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}", "skip_ptr": "*i64"}
    return pointers | strides | {"parts": "i32", "head_dim": "i32"}


def prefill_signature(dtype: str) -> dict[str, str]:
    pointers = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr")}
    pointers |= {name: "*i64" for name in ("tables_ptr", "starts_ptr", "counts_ptr", "contexts_ptr")} | {"out_ptr": f"*{dtype}"}
    strides = {f"stride_{s}": "i32" for s in ["qt", "qh", "kh", "ks", "tb", "ot", "oh"]}
    numbers = {"scale": "fp32", "softcap": "fp32"} | {n: "i32" for n in ("window", "block_size", "head_dim", "group_size")}
    return pointers | strides | numbers


def variants() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(name, kernel, signature, constexprs) of the launches the engine makes: both products (bfloat16 on the tensor
    cores, float32 exact), with followers or without, a window, a soft cap."""
    found: list[tuple[str, object, dict[str, str], dict[str, object]]] = []
    for dtype, exact in (("bf16", False), ("fp32", True)):  # (the float32 kernels: their products, with followers)
        layouts = ((1, False, False), (4, False, False), (1, True, True)) if dtype == "bf16" else ((4, False, True),)
        for members, window, softcap in layouts:
            constants = dict(GROUP=4, MEMBERS=members, ROWS=16, BLOCK_D=128, BLOCK_N=32, PARTITION=256)
            constants |= dict(USE_SOFTCAP=softcap, USE_WINDOW=window, EXACT=exact)
            name = f"partition_{dtype}_members{members}{'_window' if window else ''}{'_softcap' if softcap else ''}"
            found.append((name, kernels.partition_kernel, partition_signature(dtype), constants))
        for cascade in (False, True) if dtype == "bf16" else (True,):
            constants = dict(BLOCK_P=8, BLOCK_D=128, CASCADE=cascade)
            found.append((f"combine_{dtype}_cascade{int(cascade)}", kernels.combine_kernel, combine_signature(dtype), constants))
        constants = dict(GROUP=4, BLOCK_Q=16, BLOCK_D=128, BLOCK_N=32, USE_SOFTCAP=False, USE_WINDOW=True, EXACT=exact)
        found.append((f"prefill_{dtype}", kernels.prefill_kernel, prefill_signature(dtype), constants))
    return found


def main(sm: int) -> int:
    target = GPUTarget("cuda", sm, 32)
    failed = 0
    for name, kernel, signature, constants in variants():
        names = getattr(kernel, "arg_names", None)
        if names is not None and [*signature, *constants] != list(names):  # a launch's arguments, in order
            failed += 1
            print(f"{name}: FAILED the signature is not the kernel's: {[*signature, *constants]} != {names}", flush=True)
            continue
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target)
            print(f"{name}: ok ({len(compiled.asm['cubin'])} bytes of cubin)", flush=True)
        except Exception as exc:  # what the device's compiler would say
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
