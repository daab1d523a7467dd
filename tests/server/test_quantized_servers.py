"""A server started with each ``--quantization`` choice on the embedded model (issue 29, "Done when"): it answers
the README's question readably with a preference, and once loaded it is resident in less memory than the
unquantized server with the same KV cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from amulet_core.engine.invariant_ops import ONEDNN_LINEAR_DTYPES
from benchmarks.load import ServerProcess
from tests.support.http import API_KEY

pytestmark = pytest.mark.smollm

ARGS = ["--dtype", "bfloat16", "--kv-cache-memory-gib", "0.25", "--max-model-len", "512", "--max-num-seqs", "4",
        "--cpu-threads", "1", "--log-level", "info", "--drain-timeout", "2"]  # fmt: skip
QUESTION = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 24,
    "temperature": 0,
    "preference": "concise",
}


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def ask(server: ServerProcess) -> tuple[float, str]:
    """(resident MiB once ready, the greedy answer to the question)."""
    server.wait_ready()
    resident = resident_mib(server.pid)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=QUESTION, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    return resident, response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[float, str, str]]:
    """Per choice: (resident MiB once ready, the greedy answer, the server's log). Two servers at a time, one
    torch thread each (this machine's two cores)."""
    found: dict[str, tuple[float, str, str]] = {}
    for pair in (("none", "int8"), ("int4", "auto")):
        servers = {
            choice: ServerProcess(
                [*ARGS, "--quantization", choice],
                tmp_path_factory.mktemp(choice) / "server.log",
                env={"AMULET_API_KEY": API_KEY},
            )
            for choice in pair
        }
        try:
            with ThreadPoolExecutor(len(pair)) as pool:  # each server answers on its own core
                answers = dict(zip(pair, pool.map(ask, (servers[choice] for choice in pair)), strict=True))
        finally:
            for server in servers.values():
                server.stop()
        found |= {choice: (*answers[choice], servers[choice].log()) for choice in pair}
    return found


@pytest.mark.parametrize("choice", ["none", "int8", "int4", "auto"])
def test_the_server_answers_paris_with_a_preference(served, choice):
    _, answer, _ = served[choice]
    assert "Paris" in answer, answer


@pytest.mark.parametrize("choice", ["int8", "int4", "auto"])
def test_a_quantized_server_is_resident_in_less_memory(served, choice):
    """The dense bfloat16 decoder weights (203 MiB, and their copy packed for oneDNN where it has a bfloat16
    product) against int8's 102 MiB or int4's 63 MiB: at least 150 MiB less (60 MiB without the packed copy: an
    AVX2 CPU), far above the few MiB two starts differ by."""
    margin = 150 if torch.bfloat16 in ONEDNN_LINEAR_DTYPES else 60
    assert served[choice][0] < served["none"][0] - margin, {c: round(v[0]) for c, v in served.items()}


def test_each_choice_quantized_the_layers_it_says(served):
    """The embedded GGUF is Q4_1: in bfloat16 auto keeps its 210 decoder projections 4-bit, exactly."""
    assert "quantization int" not in served["none"][2]
    assert "quantization int8: 210 linear layers (0 already 4-bit)" in served["int8"][2]
    assert "quantization int4: 210 linear layers (210 already 4-bit)" in served["int4"][2]
    assert "quantization int4-q16: 210 linear layers (210 already 4-bit)" in served["auto"][2]  # the compiled kernel
    assert "quantization int4-q16: its kernel compiled by" in served["auto"][2]
