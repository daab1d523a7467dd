"""The detokenizer's ``min_tokens`` (stop strings count only once enough tokens are out) and ``skip_special_tokens``."""

from __future__ import annotations

from amulet_core.engine.detokenizer import IncrementalDetokenizer

SPECIAL = 0


class CharTokenizer:
    """Token id = one character (``chr``); id 0 is a special token that decodes to ``<s>``."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(("" if skip_special_tokens else "<s>") if i == SPECIAL else chr(i) for i in ids)


def run(text_or_ids, **kw) -> tuple[str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(CharTokenizer(), **kw)
    ids = [ord(c) for c in text_or_ids] if isinstance(text_or_ids, str) else text_or_ids
    out = []
    for i in ids:
        out.append(detok.add(i))
        if detok.stopped:
            break
    out.append(detok.flush())
    return "".join(out), detok


def test_a_stop_string_before_min_tokens_does_not_stop():
    assert run("abXYcdXYef", stop=("XY",))[0] == "ab"
    text, detok = run("abXYcdXYef", stop=("XY",), min_tokens=4)  # the first XY ends at token 4
    assert text == "abXYcd" and detok.stopped
    text, detok = run("abXYcdef", stop=("XY",), min_tokens=4)
    assert text == "abXYcdef" and not detok.stopped


def test_a_stop_string_that_ends_after_min_tokens_stops_and_is_never_emitted():
    # "XYZ" starts inside the first min_tokens tokens and ends after them (vLLM: it counts)
    pieces = []
    detok = IncrementalDetokenizer(CharTokenizer(), stop=("XYZ",), min_tokens=3)
    for c in "abXYZcd":
        pieces.append(detok.add(ord(c)))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    assert "".join(pieces) == "ab" and detok.stopped
    assert not any("X" in p for p in pieces)


def test_skip_special_tokens():
    ids = [ord("a"), SPECIAL, ord("b")]
    assert run(ids)[0] == "ab"
    assert run(ids, skip_special_tokens=False)[0] == "a<s>b"
