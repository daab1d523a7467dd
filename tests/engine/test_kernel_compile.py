"""The paged attention kernels compile for the GPU the device check runs on (an H200: sm_90), here, without one.

The other kernel tests run them in Triton's interpreter, which accepts code the GPU compiler rejects (a type that
changes between branches, a shape that is not a power of two); a device session is rare and short, so the
compiler's verdict is checked on every machine: ``tests/engine/compile_kernels.py`` in a process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_the_paged_attention_kernels_compile_for_the_h200(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine" / "compile_kernels.py"), "90"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(lines) == 9 and all(": ok (" in line for line in lines), lines
