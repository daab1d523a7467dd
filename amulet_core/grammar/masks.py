"""Grammar masks over a step's log-probabilities: built for all constrained rows at once, applied in place.

:func:`grammar_masks` has each row's matcher fill its row of one CPU bitmask (llguidance's Rust; bit
``t % 32`` of int32 word ``t // 32`` set where token ``t`` is allowed), copies it to the device once, and
turns the bits into additive penalties there (0 where allowed, -inf where banned) with one table lookup
(a byte indexes a 256 x 8 table of its bits' penalties), a few rows at a time. ``GrammarMasks.apply_``
adds them to those rows and renormalises them, in place (an addition, not ``masked_fill_``: on a CPU
thread, filling through a bool mask of mixed bits is much slower than the lookup).
``amulet_core.method.rows`` folds the masks of two-context rows into their plausibility mask instead
(one renormalisation, not two).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class MaskFiller(Protocol):
    """What fills one row of a step's bitmask (a ``grammar.compiler.GrammarMatcher``)."""

    @property
    def mask_words(self) -> int:
        """int32 words per bitmask row."""
        ...

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of a CPU int32 ``[N, mask_words]`` bitmask. A filler whose
        own request's grammar fails here does not raise (that would fail every row of the step): it records the
        failure for its request and allows every token (see ``GrammarMatcher.failure``)."""
        ...


class WithTokenAllowed:
    """A :class:`MaskFiller` that allows one more token than its grammar does (a reasoning model's token that
    opens its thinking, before the grammar's answer begins)."""

    def __init__(self, filler: MaskFiller, token: int) -> None:
        self.filler = filler
        self.word, bit = divmod(token, 32)
        self.bit = (1 << bit) - (1 << 32) if bit == 31 else 1 << bit  # as a signed int32

    @property
    def mask_words(self) -> int:
        return self.filler.mask_words

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self.filler.fill_mask(bitmask, row)
        if self.word < bitmask.shape[1]:
            bitmask[row, self.word] |= self.bit


CPU_CHUNK_FLOATS = 1 << 18
"""On the CPU the masks are expanded a few rows at a time, at most this many floats (1 MiB) at once: a
``[rows, V]`` temporary more per step made glibc's heap grow and shrink every step, and the page faults
cost more than the masks themselves."""


def bit_penalty_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` float32: row b holds the penalties of byte b's eight bits, low bit first (0 set, -inf clear)."""
    set_bits = (torch.arange(256, dtype=torch.int32, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return torch.zeros(256, 8, device=device).masked_fill_(set_bits == 0, float("-inf"))


@dataclass(frozen=True)
class GrammarMasks:
    """The tokens some rows of a step may not take next: row ``rows[i]`` may take token ``t < vocab`` where
    bit ``t % 8`` of byte ``bits[i, t // 8]`` is set (the llguidance bitmask's bytes, on the device).

    Built by :func:`grammar_masks`; ``index`` is ``rows`` as a tensor on the device. The bits expand to
    additive penalties (0 allowed, -inf banned) only a few rows at a time (``CPU_CHUNK_FLOATS``).
    """

    rows: tuple[int, ...]
    index: torch.Tensor
    bits: torch.Tensor
    vocab: int

    def _table(self) -> torch.Tensor:
        return bit_penalty_table(self.bits.device)

    def penalty(self, start: int = 0, stop: int | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
        """``[k, vocab]`` float32 penalties of masks ``start:stop``: 0 for an allowed token, -inf for a banned one."""
        bits = self.bits[start:stop]
        table = self._table() if table is None else table
        expanded = table.index_select(0, bits.reshape(-1).int()).view(bits.shape[0], 8 * bits.shape[1])
        if expanded.shape[1] >= self.vocab:
            return expanded[:, : self.vocab]
        return torch.nn.functional.pad(expanded, (0, self.vocab - expanded.shape[1]), value=float("-inf"))

    @property
    def banned(self) -> torch.Tensor:
        """``[len(rows), vocab]`` bool: True where a token is banned."""
        return torch.isneginf(self.penalty())

    def _chunks(self) -> list[tuple[int, int]]:
        step = len(self.rows) if self.bits.device.type != "cpu" else max(1, CPU_CHUNK_FLOATS // max(1, self.vocab))
        return [(a, min(a + step, len(self.rows))) for a in range(0, len(self.rows), step)]

    def add_to_(self, scores: torch.Tensor, renormalise: bool = False) -> None:
        """Add the penalties to the rows of ``[R, vocab]`` float32 ``scores``, in place; with ``renormalise``,
        then take each such row's log-softmax (a row with no allowed token becomes all NaN)."""
        covers = self.covers(scores.shape[0])
        table = self._table()
        for a, b in self._chunks():
            if covers:
                chunk = scores[a:b].add_(self.penalty(a, b, table))
                if renormalise:
                    chunk.copy_(torch.log_softmax(chunk, dim=-1))
            else:
                index = self.index[a:b]
                chunk = scores.index_select(0, index).add_(self.penalty(a, b, table))
                scores.index_copy_(0, index, torch.log_softmax(chunk, dim=-1) if renormalise else chunk)

    def apply_(self, logprobs: torch.Tensor) -> None:
        """Mask the rows of ``[R, vocab]`` float32 log-probabilities in place: banned tokens become -inf and
        each row is renormalised (a log-softmax over its allowed tokens), so it stays the log-probabilities
        of a distribution. A row with no allowed token becomes all NaN (the sampler then reports that no
        token can be chosen). ``logprobs`` must not be an inference tensor unless inference mode is on."""
        self.add_to_(logprobs, renormalise=True)

    def covers(self, num_rows: int) -> bool:
        """Whether these are the masks of rows 0 .. ``num_rows - 1``, in order."""
        return self.rows == tuple(range(num_rows))

    def restrict(self, rows: Sequence[int]) -> GrammarMasks | None:
        """The masks of those of ``rows`` that have one, numbered by their positions in ``rows`` (None: none has)."""
        where = {row: j for j, row in enumerate(rows)}
        picked = [(where[row], k) for k, row in enumerate(self.rows) if row in where]
        return self._pick(picked) if picked else None

    def without(self, rows: Iterable[int]) -> GrammarMasks:
        """These masks less those of ``rows``, numbered as before."""
        drop = set(rows)
        return self._pick([(row, k) for k, row in enumerate(self.rows) if row not in drop])

    def _pick(self, picked: list[tuple[int, int]]) -> GrammarMasks:
        """The masks ``k`` of ``(new row number, k)`` pairs."""
        numbers = tuple(j for j, _ in picked)
        if numbers == self.rows:
            return self
        device = self.bits.device
        keep = torch.tensor([k for _, k in picked], dtype=torch.long, device=device)
        index = torch.tensor(numbers, dtype=torch.long, device=device)
        return GrammarMasks(numbers, index, self.bits.index_select(0, keep), self.vocab)


def grammar_masks(
    rows: Sequence[int], matchers: Sequence[MaskFiller], vocab: int, device: torch.device | str = "cpu"
) -> GrammarMasks:
    """The masks of ``matchers[i]`` for rows ``rows[i]`` of ``[R, vocab]`` log-probabilities on ``device``.

    Ids past the matchers' vocabulary are banned; mask bits past ``vocab`` are ignored. The matchers must
    share one compiler (one mask width).
    """
    if len(rows) != len(matchers):
        raise ValueError(f"{len(rows)} rows but {len(matchers)} matchers")
    device = torch.device(device)
    if not rows:
        nothing = torch.empty(0, dtype=torch.long, device=device)
        return GrammarMasks((), nothing, torch.empty(0, 0, dtype=torch.uint8, device=device), vocab)
    words = matchers[0].mask_words
    if any(m.mask_words != words for m in matchers):
        raise ValueError("the matchers' vocabularies differ")
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        matcher.fill_mask(bitmask, i)
    # The words' bytes, low byte first, whatever the machine's byte order (a few small operations).
    split = torch.stack([(bitmask >> (8 * k)) & 0xFF for k in range(4)], dim=-1).to(torch.uint8)
    bits = split.view(len(rows), 4 * words).to(device, non_blocking=True)
    return GrammarMasks(tuple(rows), torch.tensor(list(rows), dtype=torch.long, device=device), bits, vocab)


def apply_grammar_masks(logprobs: torch.Tensor, rows: Sequence[int], matchers: Sequence[MaskFiller]) -> None:
    """Constrain rows of ``[R, V]`` float32 log-probabilities to their grammars, in place: row ``rows[i]``
    gets ``matchers[i]``'s mask (:func:`grammar_masks`, then ``GrammarMasks.apply_``: the disallowed tokens
    become -inf and the row is renormalised over the allowed ones)."""
    grammar_masks(rows, matchers, logprobs.shape[1], logprobs.device).apply_(logprobs)
