"""A CPU-serving process keeps freed memory for the next step (``amulet_core.engine.host_heap``): a block of
megabytes comes from the heap, and stays there once freed, instead of a fresh mapping each time (glibc's
``mallinfo2`` says where a block lives; each case in a fresh interpreter, so no earlier block has moved glibc's
thresholds)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import ctypes, ctypes.util, json, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = None
if sys.argv[1] == "tuned":
    from amulet_core.engine.host_heap import keep_freed_memory
    applied = keep_freed_memory()
size = 20 << 20
before = libc.mallinfo2()
block = libc.malloc(size)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mapped": during.hblkhd - before.hblkhd, "kept_free": after.fordblks}))
"""


def probe(case: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, case], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_blocks_of_megabytes_stay_in_the_heap():
    plain, tuned = probe("plain"), probe("tuned")
    assert plain["mapped"] >= 20 << 20  # by default such a block is a mapping of its own, unmapped when freed
    assert tuned["applied"] is True
    assert tuned["mapped"] == 0 and tuned["kept_free"] >= 20 << 20  # from the heap, and kept there once freed
