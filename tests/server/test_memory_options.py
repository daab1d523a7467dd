"""The KV cache and context options: sized from the machine unless set (see :mod:`amulet_core.engine.memory`)."""

from __future__ import annotations

import pytest

from server.options import parse_args


def test_the_cache_and_the_context_are_sized_unless_set() -> None:
    engine = parse_args([], environ={}).engine
    assert (engine.max_model_len, engine.kv_cache_memory_gib, engine.gpu_memory_utilization) == (None, None, 0.9)
    args = ["--max-model-len", "4096", "--kv-cache-memory-gib", "1.5", "--gpu-memory-utilization", "0.5"]
    engine = parse_args(args, environ={}).engine
    assert (engine.max_model_len, engine.kv_cache_memory_gib, engine.gpu_memory_utilization) == (4096, 1.5, 0.5)


@pytest.mark.parametrize(
    "args", [["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "1.2"], ["--kv-cache-memory-gib", "0"]]
)
def test_out_of_range_values_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(args, environ={})
    assert exited.value.code == 2 and "out of range" in capsys.readouterr().err
