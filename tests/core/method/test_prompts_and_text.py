"""Preference prompt pairs and incremental detokenization, on SmolLM2's real tokenizer."""

from __future__ import annotations

import random

import pytest

from amulet_core.engine.detokenizer import IncrementalDetokenizer, rust_tokenizer
from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import PRESETS, preference_message_pair, preference_sentence
from amulet_core.model.chat_template import render_chat

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
