"""Replicas of the server on a local Ray cluster: the embedded model (float32), one torch thread per replica,
2 CPUs; one Serve application for the whole module (about two minutes on the 2-core build machine).

The application starts with one replica, autoscaling up to two at 2 ongoing requests per replica:

* under load (streams from 4 clients) Ray scales it to two replicas, and the new one serves requests;
* the official ``openai`` SDK through Ray's proxy gets, streamed and not, the greedy answers of a single
  server (the real engine in this process, same model and dtype);
* 20 requests with two system prompts (each with its preference; two clients) land mostly on one replica per prompt,
  and the replicas' own ``amulet_prefix_cache_hits_total`` count more hits than for 20 like requests
  routed by Ray's power of two choices (the ``x-amulet-routing: pow2`` header) in the same run;
* a replica's process killed (SIGKILL) mid-stream: its streams end with a ``replica_failed`` error event and
  ``[DONE]``, the other replica's streams finish normally, new requests succeed, and Ray starts a new replica.

Nothing here asserts on timing; every wait has a generous deadline.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

import openai  # noqa: E402

from amulet_core.engine.config import EngineConfig  # noqa: E402
from amulet_core.model.loading import LoadedModel  # noqa: E402
from benchmarks.load import check_stream  # noqa: E402
from tests.ray.cluster import ServeApp, pid_listening_on, serve_application  # noqa: E402
from tests.support.live_server import engine_server  # noqa: E402

pytestmark = [
    pytest.mark.ray,
    pytest.mark.smollm,
    # A look-back window shorter than the deprecated metrics_interval_s: Ray warns, and scales up sooner.
    pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning"),
]

MODEL = "SmolLM2-135M-Instruct"
MAX_NUM_SEQS = 16
ARGV = [
    "--cpu-threads", "1", "--dtype", "float32", "--max-num-seqs", str(MAX_NUM_SEQS), "--drain-timeout", "5",
    "--ray-replicas", "1", "--ray-max-replicas", "2", "--ray-target-ongoing-requests", "2",
    "--ray-upscale-delay", "1", "--ray-downscale-delay", "3600",
]  # fmt: skip
POW2 = {"x-amulet-routing": "pow2"}
SCALE_DEADLINE_S = 420.0
RESTART_DEADLINE_S = 420.0
KILL_TOKENS = 96
"""The survivors' answers: short enough to finish soon after the kill."""
VICTIM_TOKENS = 1200
"""The first stream's answer (``min_tokens`` as well): so long that it cannot end before the kill, however busy."""


def system_prompt(role: str) -> str:
    """A long system message (about 250 tokens: 15 full KV blocks), different for every ``role``."""
    duties = ", ".join(f"{role} duty number {i}" for i in range(30))
    return f"You are {role}. Answer briefly and precisely. Your duties: {duties}."


def chat(system: str, user: str, max_tokens: int, stream: bool, preference: Any = "concise") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "preference": preference,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Streamed:
    """A stream as it comes: ``status`` and ``replica`` once the answer has started, ``lines`` as they arrive."""

    status: int = 0
    replica: str | None = None
    lines: list[str] = field(default_factory=list)


def stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None, into: Streamed | None = None) -> Streamed:
    result = into if into is not None else Streamed()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        result.status, result.replica = response.status_code, response.headers.get("x-amulet-replica")
        for line in response.iter_lines():
            if line:
                result.lines.append(line)
    return result


def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def app(smollm: LoadedModel) -> Iterator[ServeApp]:
    """The application, once the session's model is loaded: that load keeps the converted copy of the GGUF file
    in the session's model cache (``$AMULET_MODEL_CACHE``), which the replicas and the ingress then read."""
    with serve_application(ARGV, autoscaling={"look_back_period_s": 2.0}) as running:
        yield running


@dataclass(frozen=True)
class ScaleUp:
    replicas_before: int
    replicas_after: int
    served_by: Counter[str | None]
    problems: list[str]


@pytest.fixture(scope="module")
def scaled_up(app: ServeApp) -> ScaleUp:
    """Load from 4 streaming clients until Ray runs two replicas and the new one has served requests."""
    before = app.running_replicas()
    stop = threading.Event()
    served: Counter[str | None] = Counter()
    problems: list[str] = []

    def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            body = chat(system_prompt("a load generator"), f"Client {index}, question {n}: name a colour.", 24, True)
            result = stream(app.url, body, POW2)
            problem = check_stream(result.lines, 24)[0] if result.status == 200 else f"status {result.status}"
            served[result.replica] += 1
            if problem is not None:
                problems.append(problem)
            n += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        try:
            poll(lambda: app.running_replicas() == 2, SCALE_DEADLINE_S, "Ray to scale to two replicas")
            poll(lambda: len([r for r in list(served) if r]) >= 2, SCALE_DEADLINE_S, "a request served by the new replica")
        finally:
            stop.set()
            for future in futures:
                future.result(timeout=600)
    return ScaleUp(before, app.running_replicas(), served, problems)


def test_ray_scales_from_one_to_two_replicas_under_load(scaled_up: ScaleUp) -> None:
    assert scaled_up.replicas_before == 1 and scaled_up.replicas_after == 2
    assert len(scaled_up.served_by) == 2 and None not in scaled_up.served_by
    assert scaled_up.problems == []


SDK_REQUESTS: dict[str, dict[str, Any]] = {
    "amulet": {
        "messages": [
            {"role": "system", "content": "You are a botanist."},
            {"role": "user", "content": "How do I keep basil alive?"},
        ],
        "extra_body": {"preference": "concise"},
    },
    "plain": {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "extra_body": {}},
    "pref": {
        "messages": [{"role": "user", "content": "Describe a thunderstorm."}],
        "extra_body": {"preference": {"text": "formal", "method": "pref"}},
    },
}


def sdk_answers(client: openai.OpenAI, streamed: bool) -> dict[str, str]:
    """The requests sent at once (batched, each answer the same bits as alone: the CPU engine is batch-invariant)."""

    def one(request: dict[str, Any]) -> str:
        kwargs = {"model": MODEL, "max_tokens": 12, "temperature": 0, **request}
        if streamed:
            chunks = client.chat.completions.create(stream=True, **kwargs)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content or ""

    with ThreadPoolExecutor(len(SDK_REQUESTS)) as pool:
        return dict(zip(SDK_REQUESTS, pool.map(one, SDK_REQUESTS.values()), strict=True))


@pytest.fixture(scope="module")
def single_server_answers(smollm: LoadedModel) -> dict[str, str]:
    with (
        engine_server(smollm, EngineConfig(max_num_seqs=MAX_NUM_SEQS, kv_cache_tokens=8192)) as running,
        openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300) as client,
    ):
        return sdk_answers(client, streamed=False)


def test_the_openai_sdk_gets_a_single_servers_greedy_answers_through_ray(
    app: ServeApp, scaled_up: ScaleUp, single_server_answers: dict[str, str]
) -> None:
    with openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        whole, streamed = sdk_answers(client, streamed=False), sdk_answers(client, streamed=True)
    assert all(single_server_answers.values())
    assert whole == single_server_answers
    assert streamed == single_server_answers


def send_round(app: ServeApp, roles: tuple[str, str], headers: dict[str, str] | None) -> dict[str, Counter[str | None]]:
    """20 requests, 10 per system prompt, from two clients that each alternate the prompts (one request at a
    time each; a client bound to one prompt would let power of two choices keep each prompt on one replica
    by chance of timing); role -> the replicas that served it."""

    def client(first: int) -> list[tuple[str, str | None]]:
        served = []
        for i in range(10):
            role = roles[(first + i) % 2]
            body = chat(system_prompt(role), f"Question {first}-{i}: what matters most today?", 2, False)
            response = httpx.post(f"{app.url}/v1/chat/completions", json=body, headers=headers, timeout=600)
            assert response.status_code == 200, response.text[:500]
            served.append((role, response.headers.get("x-amulet-replica")))
        return served

    counts: dict[str, Counter[str | None]] = {role: Counter() for role in roles}
    with ThreadPoolExecutor(2) as pool:
        for served in pool.map(client, (0, 1)):
            for role, replica in served:
                counts[role][replica] += 1
    return counts


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_prefix_cache(app: ServeApp, scaled_up: ScaleUp) -> None:
    hits = "amulet_prefix_cache_hits_total"
    start = app.counter(hits)
    assert len(start) == 2  # both replicas' metrics ports answer, each with its own replica label
    affine = send_round(app, ("a gardener", "a sailor"), None)
    middle = app.counter(hits)
    balanced = send_round(app, ("a baker", "a pilot"), POW2)
    end = app.counter(hits)
    for role, replicas in affine.items():
        assert replicas.most_common(1)[0][1] >= 8, f"{role}: {replicas}"
    assert any(len(replicas) == 2 for replicas in balanced.values()), balanced  # the baseline really spreads
    affine_hits = sum(middle.values()) - sum(start.values())
    balanced_hits = sum(end.values()) - sum(middle.values())
    assert affine_hits > balanced_hits > 0
    assert set(end) == {r for replicas in (*affine.values(), *balanced.values()) for r in replicas}


def test_a_killed_replica_fails_its_streams_cleanly_and_ray_replaces_it(app: ServeApp, scaled_up: ScaleUp) -> None:
    ports = app.replica_ports()
    assert len(ports) == 2
    live = [Streamed() for _ in range(4)]
    bodies = [
        chat(system_prompt(f"storyteller {i}"), "Tell me a long story about a lighthouse.", KILL_TOKENS, True) for i in range(4)
    ]
    bodies[0] |= {"max_tokens": VICTIM_TOKENS, "min_tokens": VICTIM_TOKENS}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, app.url, body, POW2, into) for body, into in zip(bodies, live, strict=True)]
        poll(lambda: all(len(s.lines) >= 3 for s in live) or futures[0].done(), 600, "every stream to start")
        assert not futures[0].done(), futures[0].result().lines[-2:]
        victim = live[0].replica
        assert victim in ports, (victim, ports)
        os.kill(pid_listening_on(ports[victim]), signal.SIGKILL)
        results = [f.result(timeout=600) for f in futures]
    for index, result in enumerate(results):
        assert result.status == 200 and result.replica in ports
        failed = result.replica == victim and '"code":"replica_failed"' in result.lines[-2]
        if index == 0:  # it was running when its replica died
            assert result.lines[-1] == "data: [DONE]" and failed, result.lines[-3:]
        elif failed:  # another stream on the victim, cut the same way
            assert result.lines[-1] == "data: [DONE]", result.lines[-3:]
        else:  # on the survivor, or one that ended on the victim before the kill (a busy machine): whole
            assert check_stream(result.lines, KILL_TOKENS)[0] is None, result.lines[-3:]
    for i in range(4):  # right away: the survivor serves them (Ray retries a request sent to the dead one)
        body = chat(system_prompt("a survivor"), f"Question {i}: hello?", 4, False)
        response = httpx.post(f"{app.url}/v1/chat/completions", json=body, timeout=600)
        assert response.status_code == 200, response.text[:500]
    replaced = lambda: app.running_replicas() == 2 and len(set(app.replica_ports()) - {victim}) == 2  # noqa: E731
    poll(replaced, RESTART_DEADLINE_S, "Ray to start a new replica in place of the killed one")
