"""benchmarks/cpu_threads.py's table: each measurement's medians per thread count and its ratio to the first count's,
as the README's table reports them. (The benchmark itself starts real servers: run by hand.)"""

from __future__ import annotations

from benchmarks.cpu_threads import MEASURES, table


def test_the_table_gives_each_count_and_its_ratio_to_the_first() -> None:
    one = dict.fromkeys(MEASURES, 10.0) | {"base_1": 40.0, "health_max_ms": 0.0}
    two = dict.fromkeys(MEASURES, 15.0) | {"base_1": 46.0, "ttft_long_s": 5.0, "health_max_ms": 3.0}
    lines = table({1: one, 2: two}, streams=8).splitlines()
    assert lines[0] == "| measurement | 1 thread(s) | 2 thread(s) | ratio to the first |"
    assert lines[2] == "| base, 1 stream (tok/s) | 40 | 46 | 1.15 |"
    assert "| amulet, 8 streams, aggregate (tok/s) | 10 | 15 | 1.50 |" in lines
    assert "| TTFT, long system prompt, cold (s) | 10 | 5 | 0.50 |" in lines
    assert lines[-1] == "| /health max during the 8 streams (ms) | 0 | 3 | - |"  # no ratio to a zero
    assert len(lines) == 2 + len(MEASURES)
