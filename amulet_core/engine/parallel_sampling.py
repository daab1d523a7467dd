"""Several choices of one or more prompts (OpenAI's ``n``, a list of prompts) over any EngineClient.

Each choice is a request of its own to the engine, with its own sequences and generator: choice ``j``
of a prompt samples with ``sampling.for_choice(j)`` (a set seed becomes ``seed + j``, as in vLLM), so
every choice is reproducible on its own. The choices share the prompt's KV blocks through the prefix
cache: the first choice of each prompt starts alone, and the others start once it has produced its
first token, by which time the prompt's full blocks are computed and published; they then prefill
only the prompt's last, partial block.

Nothing is yielded before every choice has produced its first output, so a refusal (queue full,
model unloaded) of any of them is raised before the caller answers, and no half-started request is
left behind: closing the iterator, or any choice failing to start, closes every choice's stream
(which aborts it in the engine and frees its KV).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from amulet_core.engine.protocol import EngineClient, GenerationOutput, GenerationRequest


@dataclass(frozen=True)
class ChoiceOutput:
    """One output of one choice; ``index`` is ``prompt_index * n + j`` (OpenAI's numbering)."""

    index: int
    output: GenerationOutput


def choice_request(request: GenerationRequest, j: int, n: int) -> GenerationRequest:
    """The request of choice ``j`` of ``n``: its own id (``<id>-<j>`` when n > 1) and seed."""
    if n == 1:
        return request
    return dataclasses.replace(request, request_id=f"{request.request_id}-{j}", sampling=request.sampling.for_choice(j))


@dataclass(frozen=True)
class _Ended:
    """A choice's stream ended (``error`` set: it raised)."""

    error: BaseException | None = None


async def _pump(index: int, stream: AsyncIterator[GenerationOutput], sink: asyncio.Queue[tuple[int, object]]) -> None:
    try:
        async for out in stream:
            await sink.put((index, out))
        await sink.put((index, _Ended()))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # handed to the consumer, which raises it
        await sink.put((index, _Ended(exc)))
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def generate_choices(
    engine: EngineClient, prompts: Sequence[GenerationRequest], n: int = 1
) -> AsyncGenerator[ChoiceOutput, None]:
    """Every output of ``n`` choices of each request in ``prompts``, as they come (see the module docstring).

    Raises what a choice's stream raises; the other choices are closed first.
    """
    if n < 1 or not prompts:
        raise ValueError("generate_choices needs at least one prompt and n >= 1")
    if n == 1 and len(prompts) == 1:  # the common case: the engine's own stream, no tasks
        stream = engine.generate(prompts[0])
        try:
            async for out in stream:
                yield ChoiceOutput(0, out)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return

    sink: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    tasks: dict[int, asyncio.Task[None]] = {}

    def start(index: int) -> None:
        request = choice_request(prompts[index // n], index % n, n)
        tasks[index] = asyncio.ensure_future(_pump(index, engine.generate(request), sink))

    total = len(prompts) * n
    buffered: list[ChoiceOutput] = []
    started_all = False
    seen_first: set[int] = set()
    ended: set[int] = set()
    try:
        for p in range(len(prompts)):
            start(p * n)
        while len(ended) < total:
            index, item = await sink.get()
            if isinstance(item, _Ended):
                if item.error is not None:
                    raise item.error
                ended.add(index)
                seen_first.add(index)
            else:
                assert isinstance(item, GenerationOutput)
                seen_first.add(index)
                if item.finished:
                    ended.add(index)
                if started_all and len(seen_first) == total and not buffered:
                    yield ChoiceOutput(index, item)
                    continue
                buffered.append(ChoiceOutput(index, item))
            if not started_all and index % n == 0 and all(p * n in seen_first for p in range(len(prompts))):
                started_all = True
                for i in range(total):
                    if i % n:
                        start(i)
            if started_all and len(seen_first) == total and buffered:
                for choice in buffered:
                    yield choice
                buffered.clear()
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
