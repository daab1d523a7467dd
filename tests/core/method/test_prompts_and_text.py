"""Preference prompt pairs and incremental detokenization, on SmolLM2's real tokenizer."""

from __future__ import annotations

import random

import pytest

from amulet_core.engine.detokenizer import IncrementalDetokenizer, rust_tokenizer
from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import (
    PRESETS,
    Placement,
    preference_contexts,
    preference_message_pair,
    preference_sentence,
)
from amulet_core.model.chat_template import ChatTemplateOptions, render_chat

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is tea?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Name a color."}],
]


def test_presets_expand_and_free_text_is_kept():
    assert len(PRESETS) == 8
    for name in PRESETS:
        assert preference_sentence(name) == f"Your answer should be {name} as much as possible."
    assert preference_sentence(" Concise ") == "Your answer should be concise as much as possible."
    assert preference_sentence("Answer like a pirate.") == "Answer like a pirate."
    for bad in ("", "   ", None, 3):
        with pytest.raises(InvalidParameterError):
            preference_sentence(bad)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("preference", ["concise", "Use words a child knows."])
def test_pair_differs_by_the_preference_text_alone(smollm_tokenizer, messages, preference):
    pair = preference_message_pair(messages, preference)
    sentence = preference_sentence(preference)
    pref_text = smollm_tokenizer.decode(render_chat(smollm_tokenizer, pair.pref))
    base_text = smollm_tokenizer.decode(render_chat(smollm_tokenizer, pair.contrast))
    assert pref_text != base_text
    system = pair.contrast[0]["content"]
    inserted = f" {sentence}" if system else sentence
    cut = pref_text.index(inserted)
    assert pref_text[:cut] + pref_text[cut + len(inserted) :] == base_text
    assert pref_text.endswith("<|im_start|>assistant\n") and base_text.endswith("<|im_start|>assistant\n")
    if messages[0]["role"] == "system":
        assert pair.contrast == messages  # the base context is the conversation as given
    assert messages == CONVERSATIONS[CONVERSATIONS.index(messages)]  # inputs not mutated


def test_pair_without_system_message_uses_the_default_system_prompt():
    pair = preference_message_pair([{"role": "user", "content": "Hi"}], "formal", default_system_prompt="Be kind.")
    assert pair.contrast[0] == {"role": "system", "content": "Be kind."}
    assert pair.pref[0] == {"role": "system", "content": "Be kind. Your answer should be formal as much as possible."}


CONCISE = "Your answer should be concise as much as possible."
FORMAL = "Your answer should be formal as much as possible."
TURNS = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "What is a tide?"},
    {"role": "assistant", "content": "The rise and fall of the sea."},
    {"role": "user", "content": "Why?"},
]


def test_end_placement_appends_to_the_last_user_message_after_a_blank_line():
    built = preference_contexts(TURNS, ["concise", "formal"], "Unused.", placement=Placement.END)
    assert [c[-1]["content"] for c in built.prefs] == [f"Why?\n\n{CONCISE}", f"Why?\n\n{FORMAL}"]
    assert built.contrast == TURNS  # the conversation as given
    for context in built.prefs:
        assert context[:-1] == TURNS[:-1]  # every earlier message, the system one too, is untouched
    assert (built.system_prompt, built.sentences, built.negative) == ("Be kind.", (CONCISE, FORMAL), None)
    by_name = preference_contexts(TURNS, ["concise"], placement="end")
    assert by_name == preference_contexts(TURNS, ["concise"], placement=Placement.END)
    assert TURNS[-1] == {"role": "user", "content": "Why?"}  # inputs not mutated


def test_end_placement_with_an_assistant_message_last_goes_to_the_user_message_before_it():
    continued = [*TURNS, {"role": "assistant", "content": "Because the moon"}]  # continue_final_message
    built = preference_contexts(continued, ["concise"], placement=Placement.END)
    assert built.prefs[0][-2]["content"] == f"Why?\n\n{CONCISE}"
    assert built.prefs[0][-1] == continued[-1] and built.prefs[0][:-2] == continued[:-2]


def test_end_placement_without_a_system_message_gives_every_context_the_same_default_one():
    built = preference_contexts(TURNS[1:], ["concise"], "Be brief.", negative="formal", placement=Placement.END)
    for context in (*built.prefs, built.contrast):
        assert context[0] == {"role": "system", "content": "Be brief."}
    assert built.prefs[0][-1]["content"] == f"Why?\n\n{CONCISE}"
    assert built.contrast[-1]["content"] == f"Why?\n\n{FORMAL}"  # the negative sentence goes where the placement says
    assert built.contrast[:-1] == built.prefs[0][:-1]


def test_end_placement_of_guidance_and_an_empty_user_message():
    built = preference_contexts(TURNS, [], negative="Answer rudely.", placement=Placement.END)
    assert built.prefs == (TURNS,) and built.contrast[-1]["content"] == "Why?\n\nAnswer rudely."
    empty = preference_contexts([{"role": "user", "content": ""}], ["concise"], placement=Placement.END)
    assert empty.prefs[0][-1]["content"] == CONCISE


def test_system_placement_is_the_default_and_the_pair():
    built = preference_contexts(TURNS, ["concise"])
    assert built == preference_contexts(TURNS, ["concise"], placement=Placement.SYSTEM)
    assert built.prefs[0] == preference_message_pair(TURNS, "concise").pref
    assert built.prefs[0][0]["content"] == f"Be kind. {CONCISE}" and built.prefs[0][1:] == TURNS[1:]


def test_end_placement_without_a_user_message_names_the_placement():
    with pytest.raises(InvalidParameterError) as caught:
        preference_contexts([{"role": "system", "content": "Be kind."}], ["concise"], placement=Placement.END)
    assert caught.value.param == "preference.placement"
    with pytest.raises(ValueError):
        preference_contexts(TURNS, ["concise"], placement="middle")


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("messages", [TURNS, TURNS[1:]])
def test_end_placement_shares_the_conversation_before_the_last_user_message_in_token_ids(smollm_tokenizer, messages):
    built = preference_contexts(messages, ["concise", "formal"], "Be brief.", placement=Placement.END)
    contexts = [render_chat(smollm_tokenizer, c) for c in (*built.prefs, built.contrast)]
    before = render_chat(smollm_tokenizer, built.contrast[:-1], ChatTemplateOptions(add_generation_prompt=False))
    assert contexts[-1][: len(before)] == before
    for ids in contexts[:-1]:
        assert _common_prefix(ids, contexts[-1]) >= len(before)
    system = preference_contexts(messages, ["concise"], "Be brief.")  # the paper's placement differs in the system message
    system_ids = [render_chat(smollm_tokenizer, c) for c in (system.prefs[0], system.contrast)]
    assert _common_prefix(*system_ids) < len(before)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", ["Héllo wörld — naïve café 😀🎉 日本語のテキスト", "plain ascii, with  spaces\nand lines"])
def test_detokenizer_emits_whole_characters(smollm_tokenizer, text):
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    pieces = _stream(IncrementalDetokenizer(smollm_tokenizer), ids)
    assert "".join(pieces) == smollm_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    if "😀" in text:  # some emoji take several byte-level tokens: the partial ones yield nothing
        assert "" in pieces[:-1]


def test_detokenizer_stops_before_the_stop_string_and_never_leaks_it(smollm_tokenizer):
    ids = smollm_tokenizer.encode("one two three STOP four five", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm_tokenizer, stop=("STOP", "never"))
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    assert detok.stopped
    assert "".join(pieces) == "one two three "
    assert not any("ST" in p for p in pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_the_rust_stream_and_the_python_window_give_the_same_pieces(smollm_tokenizer, skip_special_tokens):
    assert rust_tokenizer(smollm_tokenizer) is not None  # SmolLM2's fast tokenizer takes the Rust path
    rng = random.Random(7)
    specials = sorted(smollm_tokenizer.all_special_ids)
    text = "Héllo wörld — naïve café 😀🎉 日本語のテキスト"
    streams = [smollm_tokenizer.encode(text, add_special_tokens=False)]
    # random ids: byte-level pieces of split characters, special tokens in between
    streams += [[rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(smollm_tokenizer)) for _ in range(40)]]
    streams += [[rng.randrange(len(smollm_tokenizer)) for _ in range(rng.randrange(1, 30))] for _ in range(100)]
    for ids in streams:
        fast = _stream(IncrementalDetokenizer(smollm_tokenizer, skip_special_tokens=skip_special_tokens), ids)
        windowed = _stream(IncrementalDetokenizer(smollm_tokenizer, skip_special_tokens=skip_special_tokens, fast=False), ids)
        assert fast == windowed, ids


def test_a_failing_rust_stream_hands_over_to_the_python_window_without_losing_text(smollm_tokenizer):
    ids = smollm_tokenizer.encode("Déjà vu 😀 again and 日本語 again", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm_tokenizer)
    emoji_start = next(i for i in range(len(ids)) if "😀" in smollm_tokenizer.decode(ids[: i + 1]))
    pieces = [detok.add(i) for i in ids[:emoji_start]]  # the emoji's first bytes are pending in the stream
    detok._backend = object()  # not a Tokenizer: the stream's next step raises
    pieces += [detok.add(i) for i in ids[emoji_start:]]
    pieces.append(detok.flush())
    assert "".join(pieces) == smollm_tokenizer.decode(ids)


def test_the_detokenizer_benchmark_runs(capsys):
    from benchmarks.detokenizer import main

    main(["--chars", "300", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "DecodeStream" in out and "two decode calls" in out and "us a token" in out
