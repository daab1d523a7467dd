"""What the engine keeps of one running request (:class:`RequestState`), and where a reasoning model's thinking
is (no contrast and no grammar inside it: ``GenerationRequest.thinking``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from amulet_core.engine.detokenizer import IncrementalDetokenizer
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.engine.scheduler import SequenceGroup
from amulet_core.grammar.compiler import GrammarMatcher
from amulet_core.grammar.masks import MaskFiller, WithTokenAllowed
from amulet_core.sampling.sampler import Generator


@dataclass(eq=False)
class RequestState:
    """A running request: its sequence group, sampling state, grammar matcher, output so far and timings."""

    request: GenerationRequest
    group: SequenceGroup
    coefficient: float | None
    generator: Generator
    """A seeded sampled request's draws (:class:`~amulet_core.sampling.seeded.SeededDraws`); None otherwise."""
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    max_tokens: int
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    scheduled_at: float | None = None
    prefill_s: float | None = None
    cached_prompt_tokens: int | None = None
    matcher: GrammarMatcher | None = None
    """The request's place in its grammar (``sampling.grammar``); dropped when the request finishes."""
    num_prefs: int = 1
    """K: the group's first K sequences are its preference contexts (1 for base)."""
    weights: tuple[float, ...] = (1.0,)
    """The K preference contexts' normalised weights."""
    thinking: bool = False
    """Inside the request's thinking (``request.thinking``): no contrast, no grammar."""

    @property
    def step_coefficient(self) -> float | None:
        """A of this step's closed form: 1 (the preference contexts alone) while thinking."""
        return 1.0 if self.thinking and self.coefficient is not None else self.coefficient

    def mask_filler(self) -> MaskFiller | None:
        """What constrains this step's token: the grammar (none while thinking), which before the first token also
        lets the model open its thinking."""
        if self.matcher is None or self.thinking:
            return None
        span = self.request.thinking
        if span is not None and span.start_token_id is not None and not self.output_ids:
            return WithTokenAllowed(self.matcher, span.start_token_id)
        return self.matcher

    def note_thinking(self, token: int) -> bool:
        """Follow the thinking with the sampled ``token``; whether the token belongs to the thinking (its start
        or end token included), so that the grammar does not see it."""
        span = self.request.thinking
        if span is None:
            return False
        if self.thinking:
            self.thinking = token != span.end_token_id
            return True
        if not self.output_ids and token == span.start_token_id:
            self.thinking = True
            return True
        return False
