"""Detokeniser cost per token: the tokenizers library's ``DecodeStream`` against two ``tokenizer.decode``
calls a token (``IncrementalDetokenizer(fast=False)``), on the embedded SmolLM2 tokenizer.

``python -m benchmarks.detokenizer`` feeds the tokens of the first 20,000 characters of README.md one at a
time through each and prints the median of five passes in microseconds a token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from amulet_core.engine.detokenizer import IncrementalDetokenizer, rust_tokenizer
from benchmarks.report import embedded_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def per_token_us(tokenizer: object, ids: list[int], fast: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        detok = IncrementalDetokenizer(tokenizer, fast=fast)
        start = time.perf_counter()
        for token_id in ids:
            detok.add(token_id)
        times.append((time.perf_counter() - start) / len(ids) * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=20_000, help="characters of README.md to decode")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tokenizer = embedded_tokenizer()
    if rust_tokenizer(tokenizer) is None:
        raise SystemExit("the embedded tokenizer is not a fast one: nothing to compare")
    ids = tokenizer.encode((ROOT / "README.md").read_text()[: args.chars], add_special_tokens=False)
    stream = per_token_us(tokenizer, ids, True, args.repeats)
    window = per_token_us(tokenizer, ids, False, args.repeats)
    print(f"{len(ids)} tokens: DecodeStream {stream:.2f} us a token, two decode calls {window:.2f} us a token")


if __name__ == "__main__":
    main()
