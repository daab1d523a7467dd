"""The in-process runner on a tiny random-weight model: beam search under the engine's attention, beam16 on
the pref context, and the contexts of joined preferences, negatives and cfg."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import Counter
from pathlib import Path

import pytest

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.paged_attention import register_paged_attention
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import Placement, preference_contexts, preference_sentence
from amulet_core.model.chat_template import render_chat
from amulet_core.model.loading import LoadedModel
from amulet_eval import runner_local
from amulet_eval.cli import parse_args
from amulet_eval.config import GenerationConfig, LocalBackend, method_specs
from amulet_eval.generate import Generated, conversation, run_generation
from amulet_eval.questions import load_questions
from amulet_eval.runner_local import LocalRunner, beam_search, contexts_per_request, engine_config
from tests.eval.expected_requests import LABELS, MEMBERS, METHODS, NEG_PROMPT, NEGATIVES, PREFERENCES, expected_requests
from tests.eval.expected_requests import conversation as placed_conversation


def test_beam_search_under_the_engines_attention_equals_sdpa(tiny_model) -> None:
    """The engine leaves its paged attention on the model; a plain generate call must then equal SDPA."""
    loaded = tiny_model("llama")
    model, tok = loaded.model, loaded.tokenizer
    prompt = render_chat(tok, [{"role": "user", "content": "Name a fruit."}])
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
        want = beam_search(model, tok, prompt, 8, loaded.eos_token_ids)
        model.set_attn_implementation(register_paged_attention())
        got = beam_search(model, tok, prompt, 8, loaded.eos_token_ids)
    finally:
        model.set_attn_implementation(original)
    assert got == want and want.completion_tokens >= 1


def test_local_runner_runs_beam16_on_the_pref_context(tiny_model, tmp_path: Path) -> None:
    loaded = tiny_model("llama")
    generation = GenerationConfig(method_specs(("base", "beam16"), (0.0,)), ("concise",), max_tokens=6, concurrency=2)
    runner = LocalRunner(LocalBackend(max_model_len=1024), generation, loader=lambda _config: loaded)
    question = load_questions(None, 1)[0].question
    summary = run_generation(tmp_path, load_questions(None, 1), generation, runner, progress=False)
    beam = summary.rows[(0, "concise", "beam16")]
    assert beam["method_settings"] == {"kind": "beam16", "num_beams": 16}
    messages = conversation(generation.system_prompt, question)
    pref = preference_contexts(messages, ["concise"], placement=generation.preference_placement).prefs[0]
    direct = beam_search(loaded.model, loaded.tokenizer, render_chat(loaded.tokenizer, pref), 6, loaded.eos_token_ids)
    assert beam["response"] == direct.text and beam["completion_tokens"] == direct.completion_tokens >= 1


def test_a_cancelled_beam_search_stops_at_its_next_step(tiny_model) -> None:
    """beam16 runs on a worker thread, which a cancelled job cannot interrupt: its event ends the search instead."""
    loaded = tiny_model("llama")
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": "Name a fruit."}])
    eos = frozenset()  # no end of sequence: only the token limit or the event ends the search
    whole = beam_search(loaded.model, loaded.tokenizer, prompt, 12, eos, num_beams=4, cancel=threading.Event())
    cancel = threading.Event()
    cancel.set()
    cut = beam_search(loaded.model, loaded.tokenizer, prompt, 12, eos, num_beams=4, cancel=cancel)
    assert whole.completion_tokens == 12 and cut.completion_tokens == 1


def test_ctrl_c_while_the_model_loads_waits_for_nothing(tiny_model) -> None:
    """Cancelling the runner's start while the model loads (Ctrl-C) ends the wait, and closing it does not wait for
    the load either: the run ends while the loader still runs; the engine's worker ends once the load does."""
    loaded = tiny_model("llama")
    loading, release, loaded_now = threading.Event(), threading.Event(), threading.Event()

    def slow_loader(_config) -> LoadedModel:
        loading.set()
        release.wait(60)
        loaded_now.set()
        return loaded

    generation = GenerationConfig(method_specs(("base",)), ("concise",), max_tokens=2, concurrency=1)
    runner = LocalRunner(LocalBackend(max_model_len=1024), generation, loader=slow_loader)
    before = set(threading.enumerate())

    async def interrupted_start() -> None:
        start = asyncio.create_task(runner.start())
        while not loading.is_set():
            await asyncio.sleep(0.01)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await runner.close()

    try:
        asyncio.run(interrupted_start())
        assert not loaded_now.is_set()  # the run ended with the load still under way
        [worker] = [t for t in set(threading.enumerate()) - before if t.name == "amulet-engine"]
    finally:
        release.set()
    worker.join(timeout=60)
    assert not worker.is_alive()


def test_local_runner_decodes_joined_preferences_negatives_and_cfg(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """The engine is asked what the README's rules say (the same expectation as the HTTP runner's test), and two
    columns that must agree do: cfg at g = 1 is plain decoding (base), and amulet whose contrast carries its own
    preference is the pref context alone (pref)."""
    loaded = tiny_model("llama")
    seen: list[GenerationRequest] = []
    original = AsyncEngine.generate

    def recording(self: AsyncEngine, request: GenerationRequest):
        seen.append(request)
        return original(self, request)

    monkeypatch.setattr(AsyncEngine, "generate", recording)
    methods = method_specs(METHODS, negatives=NEGATIVES, guidance=(1.0, NEG_PROMPT))
    generation = GenerationConfig(methods, PREFERENCES, max_tokens=6, concurrency=1)  # room for 3 contexts at once
    runner = LocalRunner(LocalBackend(max_model_len=1024), generation, loader=lambda _config: loaded)
    questions = load_questions(None, 1)
    rows = run_generation(tmp_path, questions, generation, runner, progress=False).rows
    assert set(rows) == {(0, p, m) for p in MEMBERS for m in LABELS}

    def encode(messages) -> tuple[int, ...]:
        return tuple(render_chat(loaded.tokenizer, messages))

    got = Counter((r.prompt_ids, r.extra_prompt_ids, r.contrast_prompt_ids, r.method) for r in seen)
    assert got == expected_requests(questions[0].question, encode, 1.0, generation.preference_placement)
    for pref in MEMBERS:
        assert rows[(0, pref, "cfg")]["response"] == rows[(0, pref, "base")]["response"]
        assert rows[(0, pref, "cfg")]["completion_tokens"] >= 1
    assert rows[(0, "concise", "amulet-vs-concise")]["response"] == rows[(0, "concise", "pref")]["response"]


@pytest.mark.parametrize(
    ("argv", "placement"),
    [
        ([], Placement.END),
        (["--preference-placement", "end"], Placement.END),
        (["--preference-placement", "system"], Placement.SYSTEM),
        (["--paper"], Placement.SYSTEM),
        (["--paper", "--preference-placement", "system"], Placement.SYSTEM),
    ],
    ids=["default", "end", "system", "paper", "paper-system"],
)
def test_local_runner_places_the_sentences_as_preference_placement_says(
    tiny_model, tmp_path: Path, monkeypatch, argv: list[str], placement: Placement
) -> None:
    """--preference-placement decides where the in-process runner puts the preference and negative sentences, in
    the engine's contexts and beam16's prompt alike: the server's default (end) unless given, system with --paper."""
    loaded = tiny_model("llama")
    cfg = ["--methods", "pref", "la", "cfg", "beam16", "--guidance-scale", "1.5", "--negative-prompt", "formal"]
    config = parse_args([*argv, "--preferences", "concise", *cfg], environ={})
    assert config.generation.preference_placement is placement
    assert config.generation.identity("m")["preference_placement"] == placement.value
    generation = dataclasses.replace(config.generation, max_tokens=2, concurrency=1)
    seen: list[GenerationRequest] = []
    original = AsyncEngine.generate

    def recording(self: AsyncEngine, request: GenerationRequest):
        seen.append(request)
        return original(self, request)

    beams: list[tuple[int, ...]] = []

    def beam(_model, _tokenizer, prompt_ids, *_args, **_kwargs) -> Generated:
        beams.append(tuple(prompt_ids))
        return Generated("x", 1, "length")

    monkeypatch.setattr(AsyncEngine, "generate", recording)
    monkeypatch.setattr(runner_local, "beam_search", beam)
    runner = LocalRunner(LocalBackend(max_model_len=1024), generation, loader=lambda _config: loaded)
    question = load_questions(None, 1)[0].question
    run_generation(tmp_path, load_questions(None, 1), generation, runner, progress=False)

    def encode(sentence: str | None) -> tuple[int, ...]:
        return tuple(render_chat(loaded.tokenizer, placed_conversation(question, sentence, placement)))

    plain, pref, formal = encode(None), encode(preference_sentence("concise")), encode(preference_sentence("formal"))
    want = [(pref, None), (pref, plain), (plain, formal)]  # pref; la; cfg: as given against the negative prompt
    assert Counter((r.prompt_ids, r.contrast_prompt_ids) for r in seen) == Counter(want)
    assert beams == [pref]


def test_paper_takes_no_end_placement() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--paper", "--preference-placement", "end"], environ={})


def test_engine_room_grows_with_the_widest_condition() -> None:
    one = GenerationConfig(method_specs(("amulet",)), ("concise", "verbose"), concurrency=4)
    three = GenerationConfig(method_specs(("amulet",)), ("concise", "concise+formal+verbose"), concurrency=4)
    assert contexts_per_request(one) == 2 and contexts_per_request(three) == 4
    assert engine_config(LocalBackend(), 4, contexts_per_request(three)).max_num_seqs == 16
