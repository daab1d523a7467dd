"""What the engine keeps of one running request (:class:`RequestState`): where a reasoning model's thinking is (no
contrast and no grammar inside it: ``GenerationRequest.thinking``), how a sampled token is taken (the grammar, the
stop rules, the text) and the request's last output."""

from __future__ import annotations

from dataclasses import dataclass, field

from amulet_core.engine.detokenizer import IncrementalDetokenizer
from amulet_core.engine.protocol import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestTimings,
    TokenLogprob,
    Usage,
)
from amulet_core.engine.scheduler import SequenceGroup
from amulet_core.errors import InvalidParameterError
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

    def accept(self, token: int, positions: tuple[int, ...] | None = None) -> tuple[FinishReason | None, str]:
        """Take the sampled ``token`` (appended to every context, or put at ``positions`` in place of its
        placeholders); returns why the request ends with it (None: it goes on) and the text it adds. Raises
        ValueError for a token its grammar does not allow."""
        in_thinking = self.note_thinking(token)
        if self.matcher is not None and not in_thinking and not self.matcher.accept(token):
            grammar = self.request.sampling.grammar
            param = grammar.param if grammar is not None else "grammar"
            raise ValueError(f"token {token} breaks the grammar of '{param}': {self.matcher.error}")
        self.output_ids.append(token)
        for i, seq in enumerate(self.group.seqs):
            if positions is None:
                seq.token_ids.append(token)
            else:
                seq.token_ids[positions[i]] = token
        if token in self.stop_ids and len(self.output_ids) > self.request.sampling.min_tokens:
            return "stop", ""  # (before min_tokens the sampler ruled the stop ids out)
        text = self.detokenizer.add(token)
        if self.detokenizer.stopped or (self.matcher is not None and self.matcher.is_finished):
            return "stop", text
        if len(self.output_ids) >= self.max_tokens:  # max_new_tokens keeps every context within max_model_len
            return "length", text
        return None, text

    def no_token_message(self, error: str) -> str:
        """The error of a step that chose no token for this request (``error``: the sampler's)."""
        grammar = self.request.sampling.grammar
        if grammar is None:
            return error
        return f"{error}; or no token that the grammar of '{grammar.param}' allows next can be chosen"

    def finish(
        self,
        reason: FinishReason,
        error: str | None = None,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | None = None,
        client_error: InvalidParameterError | None = None,
    ) -> GenerationOutput:
        """The request's last output (its usage and timings; a stop or length flushes the text held back), its
        grammar dropped."""
        self.matcher = None
        if reason in ("stop", "length"):
            text += self.detokenizer.flush()
        request = self.request
        contexts = request.contexts
        usage = Usage(
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(self.output_ids),
            base_prompt_tokens=sum(len(ids) for ids in contexts[1:]),
            cached_prompt_tokens=self.cached_prompt_tokens or 0,
            num_contexts=len(contexts),
        )
        timings = None
        if self.scheduled_at is not None:
            timings = RequestTimings(self.scheduled_at - self.arrival, self.prefill_s or 0.0)
        return GenerationOutput(request.request_id, text, token_ids, logprobs, reason, usage, error, timings, client_error)
