"""The device check's ``server`` step: the HTTP server on the device, under concurrent streamed requests.

A random-weight model (shaped like Llama-3.2-1B with SmolLM2's vocabulary and tokenizer; a tiny Llama
on the CPU dry run) is saved to a temporary folder and served by ``amulet-server`` in its own process on
127.0.0.1. Then, through HTTP only:

* the same greedy preference request twice, alone: the same text both times (``repeatable``);
* ``concurrency`` streamed chat completions at once, half with ``"preference": "concise"`` (amulet, two
  contexts), half without (base): every one must end with usage and ``[DONE]``; aggregate tokens/s and
  the time to first token are recorded;
* ``/metrics`` afterwards: nothing left running.

On a GPU this runs twice, with ``--max-num-batched-tokens`` 512 (the default, sized for CPUs) and 4096.

Needs the server's packages (fastapi, uvicorn, pydantic; ``benchmarks/gpu_check.sh`` installs the ones
carried in ``.whl/``) and httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save_model(config: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, folder: Path) -> None:
    from benchmarks.host_overhead import random_model

    loaded = random_model(config, tokenizer, device, dtype, "served")
    loaded.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()


async def _wait_ready(client: Any, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("the server was not ready in time")


def _body(i: int, preference: bool, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "served",
        "messages": [{"role": "user", "content": f"Tell me about the sea, number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if preference:
        body["preference"] = "concise"
    return body


async def _stream(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    usage = None
    done = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread())[:300]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    if not done or usage is None:
        return {"error": "the stream ended without usage and [DONE]"}
    return {"ttft_s": first or 0.0, "tokens": usage["completion_tokens"], "seconds": time.perf_counter() - start}


async def _exercise(port: int, proc: subprocess.Popen[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        await _wait_ready(client, proc, timeout=300)
        texts = []
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=_body(0, True, max_tokens, stream=False))
            response.raise_for_status()
            texts.append(response.json()["choices"][0]["message"]["content"])
        start = time.perf_counter()
        bodies = [_body(i, i % 2 == 0, max_tokens, stream=True) for i in range(concurrency)]
        results = await asyncio.gather(*(_stream(client, b) for b in bodies))
        wall = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft_s"] for r in ok)
    running = [line for line in metrics.splitlines() if line.startswith("amulet_requests_running")]
    return {
        "repeatable": texts[0] == texts[1],
        "concurrency": concurrency,
        "errors": [r["error"] for r in results if "error" in r],
        "completion_tokens": sum(r["tokens"] for r in ok),
        "aggregate_tok_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_max_s": ttfts[-1] if ttfts else None,
        "requests_running_after": running,
    }


def step_server(config: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, dry: bool) -> dict[str, Any]:
    """Serve a random-weight model of ``config`` over HTTP on ``device`` and exercise it (see the module),
    once per ``--max-num-batched-tokens`` budget (the default 512, and 4096 on a GPU); keyed by budget."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _save_model(config, tokenizer, device, dtype, folder)
        return {str(budget): _serve(folder, device, dtype, dry, budget) for budget in ((512,) if dry else (512, 4096))}


def _serve(folder: Path, device: torch.device, dtype: torch.dtype, dry: bool, batched_tokens: int) -> dict[str, Any]:
    concurrency, max_tokens = (4, 8) if dry else (64, 64)
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "--model", str(folder), "--served-model-name", "served"]
    cmd += ["--device", device.type, "--dtype", str(dtype).removeprefix("torch."), "--port", str(port)]
    cmd += ["--max-num-seqs", str(2 * concurrency), "--max-model-len", "1024", "--no-playground"]
    cmd += ["--max-num-batched-tokens", str(batched_tokens)]
    cmd += ["--kv-cache-memory-gib", "0.1" if dry else "8", "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    log = folder.parent / f"server-{batched_tokens}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            result = asyncio.run(_exercise(port, proc, concurrency, max_tokens))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["exit_status"] = proc.returncode
    result["server_log_tail"] = log.read_text()[-2000:]
    return result
