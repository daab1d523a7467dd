"""How many of an answer's tokens a reasoning model's thinking took (``--reasoning-parser``,
:mod:`server.reasoning_parsers`), for a response's ``usage.output_tokens_details.reasoning_tokens``.

The thinking's tokens are counted as the engine's outputs come (:class:`ThinkingTokens`): every token of the
outputs up to the one that closes the thinking (``</think>`` included; all of them when the answer was cut off
inside it), none when the answer has no thinking. The count is exact as long as the engine sends an output a token,
as it does; an output of several tokens that closes the thinking counts whole.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from amulet_core.engine.parallel_sampling import ChoiceOutput
from server.reasoning_parsers import ReasoningParser


class ThinkingTokens:
    """Counts the tokens of one answer's thinking as its outputs come (see the module docstring)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self._text = ""
        self._tokens = 0
        self._closed_at: int | None = None
        """The tokens up to the output that closed the thinking (None: not closed yet)."""

    def feed(self, text: str, tokens: int) -> None:
        """One output of the engine: its text and how many tokens it holds."""
        if self._closed_at is not None:
            return
        look_from = max(0, len(self._text) - len(self.parser.end) + 1)
        self._text += text
        self._tokens += tokens
        if self.parser.end in self._text[look_from:]:
            self._closed_at = self._tokens

    @property
    def count(self) -> int:
        if self.parser.split(self._text).reasoning is None:  # no thinking (or a '</think>' in a plain answer)
            return 0
        return self._closed_at if self._closed_at is not None else self._tokens


async def counting(outputs: AsyncGenerator[ChoiceOutput, None], thinking: ThinkingTokens) -> AsyncGenerator[ChoiceOutput, None]:
    """``outputs`` as they are, each fed to ``thinking`` on its way (closing this closes ``outputs``)."""
    async with aclosing(outputs):
        async for choice in outputs:
            thinking.feed(choice.output.text, len(choice.output.token_ids))
            yield choice
