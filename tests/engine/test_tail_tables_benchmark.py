"""``python -m benchmarks.tail_tables`` runs its cases and reports each one (no timing is checked)."""

from __future__ import annotations

from benchmarks.tail_tables import measure


def test_the_penalties_table_benchmark_reports_each_case():
    results = measure(((2, 5, 7), (3, 0, 4)), repeats=1)
    assert [(r["requests"], r["output_ids"], r["prompt_ids"]) for r in results] == [(2, 5, 7), (3, 0, 4)]
    assert all(r["ms_per_step"] > 0 for r in results)
