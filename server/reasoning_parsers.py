"""Reasoning models' thinking, apart from the answer (``--reasoning-parser``).

A reasoning model (DeepSeek-R1, Qwen3, QwQ and their kin) writes its thinking between ``<think>`` and
``</think>``, then the answer. The parser splits a choice's text into ``reasoning_content`` and ``content``,
whole (:meth:`ReasoningParser.split`) or as it streams (:class:`ReasoningStream`), so that clients show the
thinking apart and tool calls and JSON are read from the answer alone.

Where the thinking starts is read from the rendered prompt, not guessed from the parser's name: DeepSeek-R1's
template (and Qwen3's "thinking" variants) end the generation prompt with ``<think>``, so the answer begins
inside the thinking; Qwen3 with ``enable_thinking: false`` renders an empty ``<think></think>`` block,
so it begins in the answer; a model that opens the block itself does so with its first token. The names are
vLLM's (``deepseek_r1``, ``qwen3``); both read ``<think>`` blocks this way.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")
"""The names ``--reasoning-parser`` accepts (vLLM's), each reading ``<think>`` blocks."""


@dataclass(frozen=True)
class ReasoningSplit:
    """A text's thinking (None when it has none) and its answer (None when it has none yet)."""

    reasoning: str | None
    content: str | None


@dataclass(frozen=True)
class ReasoningParser:
    """Splits one choice's text into thinking and answer; ``starts_in_reasoning``: the prompt left a
    ``<think>`` block open (:meth:`for_prompt`)."""

    starts_in_reasoning: bool = False
    start: str = THINK_START
    end: str = THINK_END

    @classmethod
    def for_prompt(cls, prompt_text: str) -> ReasoningParser:
        """The parser for answers to ``prompt_text`` (the decoded context as rendered): in the thinking when the
        prompt ends with ``<think>`` (and white space), as the generation prompts of thinking templates do (a
        ``<think>`` elsewhere, say in a user's message, opens nothing)."""
        return cls(starts_in_reasoning=prompt_text.rstrip().endswith(THINK_START))

    def split(self, text: str) -> ReasoningSplit:
        """The whole text's thinking and answer. A text that begins in the thinking and never closes it is all
        thinking (the answer was cut off by ``max_tokens``); one that never opens it is all answer."""
        body = text
        if not self.starts_in_reasoning:
            stripped = text.lstrip()
            if not stripped.startswith(self.start):
                return ReasoningSplit(None, text)
            body = stripped[len(self.start) :]
        reasoning, closed, answer = body.partition(self.end)
        if not closed:
            return ReasoningSplit(reasoning, None)
        return ReasoningSplit(reasoning, answer.lstrip("\n") or None)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """A choice's text as it comes, split into thinking and answer deltas. A piece that could be the start of a
    tag is held back until the next text shows whether it is one (:meth:`finish` gives what is held)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self._state = "reasoning" if parser.starts_in_reasoning else "opening"
        self._held = ""
        self._answer_started = False

    def feed(self, text: str) -> ReasoningSplit:
        """The thinking and answer in ``text`` (with what was held before it)."""
        pending, self._held = self._held + text, ""
        reasoning: list[str] = []
        answer: list[str] = []
        while pending:
            if self._state == "opening":  # before the first non-space character: does it open a block?
                stripped = pending.lstrip()
                if not stripped:
                    self._held = pending
                    break
                if stripped.startswith(self.parser.start):
                    pending, self._state = stripped[len(self.parser.start) :], "reasoning"
                elif self.parser.start.startswith(stripped):
                    self._held = pending
                    break
                else:
                    self._state = "answer"
            elif self._state == "reasoning":
                before, closed, after = pending.partition(self.parser.end)
                if closed:
                    reasoning.append(before)
                    pending, self._state = after, "answer"
                    continue
                keep = _partial_tag(pending, self.parser.end)
                reasoning.append(pending[: len(pending) - keep])
                self._held = pending[len(pending) - keep :]
                break
            else:
                if not self._answer_started:  # the newlines a model writes after </think> are not the answer
                    pending = pending.lstrip("\n")
                    if not pending:
                        break
                    self._answer_started = True
                answer.append(pending)
                break
        return ReasoningSplit("".join(reasoning) or None, "".join(answer) or None)

    def finish(self) -> ReasoningSplit:
        """What was held back at the end: thinking if the block is still open, else answer."""
        held, self._held = self._held, ""
        if not held:
            return ReasoningSplit(None, None)
        if self._state == "reasoning":
            return ReasoningSplit(held, None)
        return ReasoningSplit(None, held if held.strip() or self._state == "answer" else None)


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` are the start of ``tag`` (0 when none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
