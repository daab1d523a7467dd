"""``python -m benchmarks.context_cost --quick`` runs (tiny random model: the engine's counts, no timing checked)."""

from __future__ import annotations

import json


def test_the_context_cost_benchmark_runs_and_the_end_placement_shares(tmp_path, capsys):
    from benchmarks.context_cost import main

    output = tmp_path / "context_cost.json"
    rows = main(["--quick", "--tiny", "--output", str(output)])
    out = capsys.readouterr().out
    assert "| end | amulet, 2 prefs |" in out and "target at" in out
    assert json.loads(output.read_text())["rows"] == rows
    assert {r["config"] for r in rows} == {"base", "system_k1", "system_k2", "end_k1", "end_k2"}
    for r in rows:
        if r["config"] == "base":
            assert r["prefill_tokens"] == r["conversation_tokens"]
        elif r["placement"] == "system":  # every context computes and holds its own copy of the conversation
            assert r["prefill_tokens_vs_base"] > 0.85 * (1 + r["preferences"])
        else:  # the conversation once, then each context's own tail
            assert r["prefill_tokens_vs_base"] < 1.25 and r["peak_kv_blocks_vs_base"] < 1.25
            assert r["common_prefix_tokens"] > 0.9 * r["conversation_tokens"]
