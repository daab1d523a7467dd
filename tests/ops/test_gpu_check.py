"""The prepared device check runs its steps end to end on the CPU (``--cpu-dry-run``); no timings are checked."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_runs_every_step(tmp_path, smollm_tokenizer):
    # SmolLM2's tokenizer saved, as for the device (`--save-tokenizer`, then `--tokenizer`): the session's copy
    # saves the script the 5 s of reading it from the GGUF file again.
    tokenizer = tmp_path / "tokenizer"
    smollm_tokenizer.save_pretrained(tokenizer)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python3"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--tokenizer", str(tokenizer)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    steps = report["steps"]
    names = {"env", "tests_float32", "tests_bfloat16", "kernel", "host_overhead", "llama_1b", "llama_8b", "server"}
    assert set(steps) == names
    assert all(step["ok"] for step in steps.values()), {k: v.get("error") for k, v in steps.items()}
    for dtype in ("float32", "bfloat16"):
        passed = steps[f"tests_{dtype}"]["result"]["passed"]
        assert any(name.startswith("test_the_kernel_equals_attention_written_out") for name in passed), passed
    kernel = steps["kernel"]["result"]
    assert len(kernel) == 8 and sum("_shared" in case for case in kernel) == 4, kernel
    for case, figures in kernel.items():
        assert figures["max_abs_err"] < (1e-4 if "float32" in case else 5e-2), (case, figures)
    for model in ("llama_1b", "llama_8b"):
        result = steps[model]["result"]
        for key in ("generate_tok_per_s", "bandwidth_bound_step_ms", "ttft_cold_s", "ttft_prefix_hit_s"):
            assert result[key] > 0
        assert result["engine_amulet_4"]["tokens"] == result["eager_amulet_4"]["tokens"] == 4 * 4
        assert result["sdpa_amulet_4"]["tokens"] == result["sync_amulet_4"]["tokens"] == 4 * 4
        assert result["engine_grammar_4"]["tokens"] == 4 * 4  # one of them constrained by a grammar
        assert result["attention"] == "gathered sdpa"  # a CPU
        assert result["host_overhead_4"]["sequences"] == 8
    parts = {"scheduling", "input_building", "forward", "method_combination", "sampling", "detokenize_and_outputs"}
    for mode in ("cuda_graphs", "eager"):
        assert set(steps["host_overhead"]["result"][mode]["ms_per_decode_step"]) >= parts
    server = steps["server"]["result"]["512"]
    assert server["repeatable"] and not server["errors"] and server["completion_tokens"] == 4 * 8
    assert server["requests_running_after"] == ['amulet_requests_running{model="served"} 0.0']


def test_steps_past_the_deadline_are_recorded_as_not_started(tmp_path, smollm_tokenizer):
    """On the device one call may run 600 s: a step that would start past ``--deadline-s`` is skipped and recorded
    (the JSON then says what to run again), and the check exits 1."""
    from benchmarks import gpu_check

    tokenizer = tmp_path / "tokenizer"
    smollm_tokenizer.save_pretrained(tokenizer)
    argv = ["--cpu-dry-run", "--tokenizer", str(tokenizer), "--out", str(tmp_path), "--deadline-s", "0"]
    assert gpu_check.main(argv) == 1
    steps = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())["steps"]
    assert len(steps) == 8 and all(not s["ok"] and "deadline" in s["error"] for s in steps.values())


def test_a_timed_out_test_run_keeps_the_outcomes_pytest_printed():
    from benchmarks.gpu_check import _verbose_cases

    output = "\n".join(
        [
            "tests/engine/test_engine.py::test_abort[llama] PASSED                       [  1%]",
            "tests/engine/test_decode_tail.py::test_the_tail_gives[layout0-params1] FAILED  [  2%]",
            "tests/engine/test_paged_decode.py::test_kernel SKIPPED (no CUDA)            [  3%]",
            "some other line PASSED",
        ]
    )
    assert _verbose_cases(output) == {
        "test_abort[llama]": "passed",
        "test_the_tail_gives[layout0-params1]": "failed",
        "test_kernel": "skipped",
    }
