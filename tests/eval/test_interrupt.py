"""Ctrl-C (amulet_eval.interrupt): the first SIGINT cancels the running loop's work, whose cleanup runs, and ends as
KeyboardInterrupt; outside a loop it raises KeyboardInterrupt; a second SIGINT, or a stop still stuck after the grace
period, ends the process with 130; an ignored SIGINT stays ignored. The end to end check with a real server is
tests/eval/test_http.py::test_ctrl_c_keeps_every_finished_answer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from amulet_eval.aio import run
from amulet_eval.config import GenerationConfig, LocalBackend, method_specs
from amulet_eval.generate import GENERATIONS_FILE, Generated, Job, run_generation
from amulet_eval.interrupt import INTERRUPTED, CtrlC
from amulet_eval.questions import load_questions
from amulet_eval.report import replace_text
from amulet_eval.runner_local import LocalRunner
from tests.eval.ctrl_c import complete_rows, python_argv


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's default SIGINT handler during the test (what amulet-eval's main thread starts with)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_first_ctrl_c_cancels_the_loops_work_and_ends_as_keyboard_interrupt(default_sigint: None) -> None:
    ended: list[int] = []
    cleaned: list[int] = []

    async def call(i: int) -> None:
        try:
            await asyncio.Event().wait()  # an answer in flight
        finally:
            cleaned.append(i)  # where a client is closed or an engine request aborted

    async def main() -> None:
        calls = [asyncio.create_task(call(i)) for i in range(3)]
        await asyncio.sleep(0)
        try:
            signal.raise_signal(signal.SIGINT)
            await asyncio.gather(*calls)
        except BaseException as exc:
            seen.append(type(exc))
            raise

    seen: list[type[BaseException]] = []
    with CtrlC(grace_s=600, end=ended.append) as ctrl_c, pytest.raises(KeyboardInterrupt):
        run(main())
    assert seen == [asyncio.CancelledError]  # cancelled where it waits, not interrupted wherever it was
    assert sorted(cleaned) == [0, 1, 2]
    assert ctrl_c.signals == 1 and ended == []  # the deadline was not needed (and is disarmed)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_a_loop_the_first_ctrl_c_raises_keyboard_interrupt(default_sigint: None) -> None:
    ended: list[int] = []
    with CtrlC(grace_s=600, end=ended.append) as ctrl_c, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert ctrl_c.signals == 1 and ended == []


def test_a_second_ctrl_c_ends_the_process_at_once(default_sigint: None) -> None:
    ended: list[int] = []
    with CtrlC(grace_s=600, end=ended.append), pytest.raises(KeyboardInterrupt):
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            signal.raise_signal(signal.SIGINT)  # while the first one is being handled
    assert ended == [INTERRUPTED]


def test_an_ignored_sigint_stays_ignored_and_other_threads_change_nothing(default_sigint: None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with CtrlC():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seen: list[object] = []

    def elsewhere() -> None:
        with CtrlC():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


STUCK = """
import asyncio, sys
from amulet_eval.aio import run
from amulet_eval.config import GenerationConfig, LocalBackend, method_specs
from amulet_eval.generate import GENERATIONS_FILE, Generated, Job, run_generation
from amulet_eval.interrupt import CtrlC

async def stuck() -> None:  # a stop that never finishes, as a call ignoring its cancellation would
    print("ready", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancelled", flush=True)

with CtrlC(grace_s=float(sys.argv[1])):
    run(stuck())
print("returned", flush=True)
"""


def stuck_child(grace_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(python_argv(STUCK, str(grace_s)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_ctrl_c_ends_a_stuck_stop_with_130() -> None:
    proc = stuck_child(grace_s=600)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.stdout is not None and proc.stdout.readline() == "cancelled\n"  # the first one was handled
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # a hang guard: it ends at once
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED, err
    assert "interrupted again; stopping now" in err and "returned" not in out


def test_a_stop_still_stuck_after_the_grace_period_ends_with_130() -> None:
    proc = stuck_child(grace_s=0.2)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED, err
    assert "still stopping after 0.2 s; stopping now" in err and "returned" not in out


class CtrlCAfterFirstAnswer:
    """A runner that sends SIGINT from the event loop (as a terminal's Ctrl-C would arrive) once its first answer is
    made, and records every answer it made."""

    def __init__(self, runner: LocalRunner) -> None:
        self.runner = runner
        self.serial_kinds = runner.serial_kinds
        self.made: list[tuple[int, str, str]] = []

    async def resolve_model_name(self) -> str:
        return await self.runner.resolve_model_name()

    async def start(self) -> None:
        await self.runner.start()

    async def generate(self, job: Job) -> Generated:
        out = await self.runner.generate(job)
        self.made.append(job.key)
        if len(self.made) == 1:
            signal.raise_signal(signal.SIGINT)
        return out

    async def close(self) -> None:
        await self.runner.close()


def test_ctrl_c_stops_an_in_process_run_keeping_exactly_the_finished_answers(
    tiny_model, tmp_path: Path, default_sigint: None
) -> None:
    """Ctrl-C while the in-process engine decodes (16 answers, four at a time): the run ends as KeyboardInterrupt
    with its answers in flight aborted and the engine stopped, and the rows on disk are exactly the answers made."""
    loaded = tiny_model("llama")
    generation = GenerationConfig(method_specs(("base", "amulet")), ("concise",), max_tokens=24, concurrency=4)
    runner = CtrlCAfterFirstAnswer(LocalRunner(LocalBackend(max_model_len=1024), generation, loader=lambda _c: loaded))
    before = set(threading.enumerate())
    ended: list[int] = []
    with CtrlC(grace_s=600, end=ended.append) as ctrl_c, pytest.raises(KeyboardInterrupt):
        run_generation(tmp_path, load_questions(None, 8), generation, runner, progress=False)
    assert ctrl_c.signals == 1 and ended == []
    kept = complete_rows(tmp_path)
    assert sorted((r["index"], r["preference"], r["method"]) for r in kept) == sorted(runner.made)
    assert 1 <= len(kept) < 16
    assert (tmp_path / GENERATIONS_FILE).read_text().count("\n") == len(kept)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "amulet-engine" and t.is_alive()]


def test_a_report_file_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    replace_text(path, '{"run": 1}\n')
    assert path.read_text() == '{"run": 1}\n'

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)  # Ctrl-C while the new text is written
    with pytest.raises(KeyboardInterrupt):
        replace_text(path, '{"run": 2, "rows": [' + "0, " * 100_000 + "0]}\n")
    assert path.read_text() == '{"run": 1}\n'
