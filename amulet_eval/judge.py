"""A pairwise LLM judge through any OpenAI-compatible endpoint.

For each question and preference the judge sees the question, the preference and two answers in a
random order (seeded per pair, so a rerun shows the same order) and replies [[A]], [[B]] or [[TIE]].
A reply that cannot be read as one of those counts as a tie and is reported as unparseable.
Verdicts are appended to ``judgments.jsonl`` as they come, so a rerun asks only what is missing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from tqdm import tqdm

from amulet_eval.aio import run, run_pool
from amulet_eval.conditions import condition_sentence
from amulet_eval.config import BASELINE, JudgeConfig
from amulet_eval.generate import Key
from amulet_eval.openai_http import ChatClient, HttpCallError
from amulet_eval.store import Row, append_rows, read_rows

JUDGMENTS_FILE = "judgments.jsonl"

JUDGE_SYSTEM = (
    "You are an impartial judge. You compare two answers to the same question and decide which one "
    "follows the user's stated preference better while still answering the question."
)

_BRACKETED = re.compile(r"\[\[\s*(A|B|TIE)\s*\]\]", re.IGNORECASE)
_PLAIN = re.compile(
    r"^(?:(?:final\s+)?(?:verdict|answer|winner|choice)\s*[:\-]?\s*)?(?:(?:answer|response|assistant)\s+)?(A|B|TIE)$",
    re.IGNORECASE,
)


class JudgeError(RuntimeError):
    """The judge endpoint failed (the run stops; verdicts already received are kept)."""


def judge_messages(question: str, preference: str, first: str, second: str) -> list[dict[str, str]]:
    user = (
        f"Question:\n{question}\n\n"
        f"Preference: {condition_sentence(preference)}\n\n"
        f"[Answer A]\n{first}\n[End of answer A]\n\n"
        f"[Answer B]\n{second}\n[End of answer B]\n\n"
        "Which answer follows the preference better? Reply with exactly one of [[A]], [[B]] or [[TIE]]."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> str | None:
    """ "A", "B" or "tie" from a judge's reply, or None when it cannot be read unambiguously."""
    found = {m.upper() for m in _BRACKETED.findall(reply)}
    if len(found) == 1:
        return _norm(found.pop())
    if found:
        return None
    first_line = next((line for line in reply.strip().splitlines() if line.strip()), "")
    cleaned = first_line.strip().strip("*_`\"'").strip().rstrip(".!").strip("[]()").strip()
    match = _PLAIN.match(cleaned)
    return _norm(match.group(1).upper()) if match else None


def _norm(verdict: str) -> str:
    return "tie" if verdict == "TIE" else verdict


@dataclass(frozen=True)
class Pair:
    index: int
    preference: str
    method_a: str
    method_b: str

    @property
    def key(self) -> tuple[int, str, str, str]:
        return (self.index, self.preference, self.method_a, self.method_b)

    def a_first(self, seed: int) -> bool:
        """Whether method_a's answer is shown first: a fair coin, seeded per pair."""
        rng = random.Random(f"{seed}|{self.index}|{self.preference}|{self.method_a}|{self.method_b}")
        return rng.random() < 0.5


def judge_pairs(rows: Mapping[Key, Row], methods: Sequence[str], all_pairs: bool) -> list[Pair]:
    """Pairs to judge: each method against base (or every pair), for each question and preference."""
    cells = sorted({(k[0], k[1]) for k in rows}, key=lambda c: (c[1], c[0]))
    if all_pairs:
        matchups = list(combinations(methods, 2))
    else:
        matchups = [(m, BASELINE) for m in methods if m != BASELINE] if BASELINE in methods else []
    return [Pair(i, p, a, b) for i, p in cells for a, b in matchups if (i, p, a) in rows and (i, p, b) in rows]


def _verdict_row(pair: Pair, a_first: bool, reply: str, judge_model: str) -> Row:
    shown = parse_verdict(reply)
    if shown is None or shown == "tie":
        winner = None
    else:
        first, second = (pair.method_a, pair.method_b) if a_first else (pair.method_b, pair.method_a)
        winner = first if shown == "A" else second
    return {
        "index": pair.index,
        "preference": pair.preference,
        "method_a": pair.method_a,
        "method_b": pair.method_b,
        "shown_first": pair.method_a if a_first else pair.method_b,
        "reply": reply,
        "parsed": shown is not None,
        "winner": winner,
        "judge_model": judge_model,
    }


async def _judge_all(config: JudgeConfig, rows: Mapping[Key, Row], pairs: list[Pair], path: Path, progress: bool) -> list[Row]:
    client = ChatClient(config.base_url, config.api_key, config.timeout_s)
    try:
        model = config.model or await client.model_name()
        existing, _ = read_rows(path)
        have = {
            (r["index"], r["preference"], r["method_a"], r["method_b"]): r
            for r in existing
            if r.get("judge_model") == model and {"index", "preference", "method_a", "method_b"} <= r.keys()
        }
        done = [have[p.key] for p in pairs if p.key in have]
        todo = [p for p in pairs if p.key not in have]
        made: list[Row] = []
        with (
            append_rows(path) as writer,
            tqdm(total=len(pairs), initial=len(done), desc="judging", unit="pair", disable=not progress) as bar,
        ):

            async def work(pair: Pair) -> None:
                a_first = pair.a_first(config.seed)
                answer_a = rows[(pair.index, pair.preference, pair.method_a)]
                answer_b = rows[(pair.index, pair.preference, pair.method_b)]
                first, second = (answer_a, answer_b) if a_first else (answer_b, answer_a)
                body = {
                    "model": model,
                    "messages": judge_messages(answer_a["question"], pair.preference, first["response"], second["response"]),
                    "temperature": 0,
                    "max_tokens": config.max_tokens,
                    "seed": config.seed,
                }
                choice = await client.complete(body)
                row = _verdict_row(pair, a_first, str(choice["message"]["content"] or ""), model)
                writer.write(row)
                made.append(row)
                bar.update(1)

            await run_pool(todo, config.concurrency, work)
        by_key = {(r["index"], r["preference"], r["method_a"], r["method_b"]): r for r in [*done, *made]}
        return [by_key[p.key] for p in pairs]
    except HttpCallError as exc:
        raise JudgeError(f"The judge at {config.base_url} failed: {exc}") from exc
    finally:
        await client.aclose()


def run_judge(
    config: JudgeConfig, rows: Mapping[Key, Row], methods: Sequence[str], out_dir: Path, progress: bool = True
) -> list[Row]:
    """Judge the pairs of this run (asking only for verdicts not yet in judgments.jsonl); returns all their verdicts."""
    pairs = judge_pairs(rows, methods, config.all_pairs)
    return run(_judge_all(config, rows, pairs, out_dir / JUDGMENTS_FILE, progress))
