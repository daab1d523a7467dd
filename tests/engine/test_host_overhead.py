"""The host-overhead benchmark mode runs on a tiny model and reports every part (no timing is checked)."""

from __future__ import annotations

from benchmarks.host_overhead import PARTS, format_host_overhead, measure_host_overhead


def test_host_overhead_reports_each_part_of_a_decode_step(tiny_model):
    result = measure_host_overhead(tiny_model("llama"), num_requests=4, warmup_steps=1, steps=2)
    ms = result["ms_per_decode_step"]
    assert set(PARTS) <= set(ms)
    assert result["sequences"] == 8
    assert ms["step_total"] > 0 and ms["forward"] > 0
    assert "method combination" in format_host_overhead(result)
