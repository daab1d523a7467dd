"""``python -m benchmarks.gpu_table``: the README's GPU table from device-check JSON, old and new side by side."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from benchmarks.gpu_table import main, shape_results, table

ROOT = Path(__file__).resolve().parents[2]
OLD = ROOT / "docs" / "gpu_check_h200_2026-11-27.json"


def newer(old: dict) -> dict:
    """A device-check JSON in today's layout (``steps``), every decode step halved, the tail's counts added, the 1B
    shape's step failed."""
    steps = copy.deepcopy(old["engine_run"]["steps"])
    result = steps["llama_8b"]["result"]
    for entry in result.values():
        if isinstance(entry, dict) and "decode_step_ms" in entry:
            entry["decode_step_ms"] /= 2
    result["cuda_graphs"] = {**result["cuda_graphs"], "tail_steps": 180, "decode_steps": 191}
    steps["llama_1b"] = {"ok": False, "error": "RuntimeError: out of memory"}
    return {"dry_run": False, "steps": steps}


def test_the_table_puts_old_and_new_side_by_side_with_the_targets(tmp_path, capsys):
    old = json.loads(OLD.read_text())
    assert set(shape_results(old)) == {"llama_1b", "llama_8b"}
    new_file = tmp_path / "gpu_check_h200_2026-12-24.json"
    new_file.write_text(json.dumps(newer(old)))
    main([str(OLD), str(new_file)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "h200_2026-11-27: Llama-3.2-1B shape" in lines[0] and "h200_2026-12-24: Llama-3.1-8B shape" in lines[0]
    row = next(line for line in lines if line.startswith("| engine `amulet`, 64 streams"))
    assert "6.98 ms (11.9x), 9,173" in row and "16.47 ms (4.2x)" in row and "8.23 ms (2.1x)" in row
    assert row.count("|  |") == 1  # the new 1B column: its step failed
    assert "| decode steps chosen in the graph (tail) / all |  |  |  | 180 / 191 |" in out
    target = next(line for line in lines if line.startswith("| 8B `amulet`, 64 streams"))
    assert "4.24 (missed)" in target and "2.12 (missed)" in target
    assert "| 8B `amulet` / `base`, 1 stream >= 0.95 | 0.95 (met) | 0.95 (met) |" in out


def test_a_report_without_shapes_gives_empty_cells():
    text = table([("empty", {"steps": {}})])
    assert "| bandwidth bound per decode step |  |  |" in text
