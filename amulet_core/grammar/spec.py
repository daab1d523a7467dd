"""What a request asks its output to match: a grammar's kind and source text, with no grammar engine.

Sampling parameters and the HTTP layer name grammars with these types; only
:mod:`amulet_core.grammar.compiler` turns them into llguidance grammars.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from amulet_core.errors import InvalidParameterError

MAX_GRAMMAR_CHARS = 100_000
"""Characters of a grammar's source as a request gives it (a JSON schema, a regex, a Lark grammar, the JSON
list of a choice); a server caps the text it takes from clients with it (grammars it writes itself, such as
a forced tool call's, are bounded by what they are written from)."""
MAX_CHOICES = 1024
"""Strings of a choice grammar: llguidance refuses a grammar row of more than 2,000 items while generating,
and a few thousand choices take seconds to compile."""


class GrammarKind(StrEnum):
    """What a :class:`GrammarSpec`'s ``source`` is."""

    JSON_OBJECT = "json_object"
    """Any JSON object; ``source`` is ignored."""
    JSON_SCHEMA = "json_schema"
    """``source``: the JSON schema, as JSON text (an object)."""
    REGEX = "regex"
    """``source``: the regular expression (Rust regex syntax) the whole output matches."""
    CHOICE = "choice"
    """``source``: JSON text of a non-empty list of strings; the output is exactly one of them."""
    LARK = "lark"
    """``source``: an llguidance Lark grammar."""


@dataclass(frozen=True)
class GrammarSpec:
    """A request's output constraint: a grammar ``kind`` and its ``source`` text.

    ``param`` is the request field it came from (e.g. ``response_format``, or the server's name for a
    forced tool call): every error about the spec is an ``InvalidParameterError`` naming it. Construction
    checks only the types (``kind`` may be given as its string value); ``grammar.compiler.grammar_text`` checks
    the source's shape, and ``GrammarCompiler.check`` whether llguidance can compile it.
    """

    kind: GrammarKind
    source: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise ValueError(f"GrammarSpec.param must be a non-empty string, got {self.param!r}")
        try:
            object.__setattr__(self, "kind", GrammarKind(self.kind))
        except ValueError:
            kinds = ", ".join(k.value for k in GrammarKind)
            raise InvalidParameterError(self.param, f"Unknown grammar kind {self.kind!r}: use one of {kinds}.") from None
        if not isinstance(self.source, str):
            raise InvalidParameterError(self.param, f"The {self.kind.value} grammar must be given as text.")


def check_grammar_size(kind: GrammarKind | str, source: str, param: str) -> None:
    """InvalidParameterError naming ``param`` when a client's grammar ``source`` is longer than
    :data:`MAX_GRAMMAR_CHARS` (``kind``: what it is, for the message)."""
    if len(source) > MAX_GRAMMAR_CHARS:
        what = GrammarKind(kind).value.replace("_", " ")
        raise InvalidParameterError(
            param, f"The {what} grammar in '{param}' is {len(source)} characters long, more than the {MAX_GRAMMAR_CHARS} allowed."
        )
