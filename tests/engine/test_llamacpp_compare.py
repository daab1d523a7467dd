"""benchmarks/llamacpp_compare.py without llama-cpp-python: it says how to install it and exits 0, and its
arithmetic (decode rate, ratios, table) is what the README's table reports. Nothing here runs llama.cpp."""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks import llamacpp_compare
from benchmarks.llamacpp_compare import decode_run, machine, table


def test_without_llama_cpp_it_skips_with_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    assert llamacpp_compare.main(["--out", "/nonexistent/never-written.json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: llama_cpp cannot be imported (")
    assert "pip install '.[bench]'" in out and "-DGGML_AMX_TILE=OFF" in out


def test_the_decode_rate_leaves_the_prefill_out():
    run = decode_run(10.0, [10.5, 10.6, 10.7, 11.5], tokens=5, cpu_s=2.0)
    assert run.ttft_s == pytest.approx(0.5)
    assert run.decode_tokens_per_s == pytest.approx(4 / 1.0)
    assert run.cpu_tokens_per_s == pytest.approx(2.5)
    with pytest.raises(RuntimeError, match="too few"):
        decode_run(0.0, [1.0], tokens=1, cpu_s=1.0)


def test_the_table_gives_the_ratios():
    result = {
        "threads": 1,
        "decode_tokens_per_s": {"llama.cpp": 30.0, "base": 15.0, "amulet": 13.5},
        "base_over_llamacpp": 0.5,
        "amulet_over_base": 0.9,
        "cpu_tokens_per_s": {"llama.cpp": 40.0, "base": 10.0, "amulet": 9.0},
        "cpu_base_over_llamacpp": 0.25,
        "cpu_amulet_over_base": 0.9,
    }
    lines = table([result]).splitlines()
    assert lines[2] == "| 1 | decode, wall | 30.0 | 15.0 | 13.5 | 0.50 | 0.90 |"
    assert lines[3] == "| 1 | a CPU second | 40.0 | 10.0 | 9.0 | 0.25 | 0.90 |"


def test_a_process_cpu_time_is_read():
    assert llamacpp_compare.process_cpu_s(os.getpid()) > 0


def test_the_machine_is_described():
    info = machine()
    assert info["cores"] >= 1 and isinstance(info["cpu"], str)
    assert set(info["flags"]) >= {"avx512_bf16", "amx_tile", "amx_bf16"}
