"""What preference contexts cost as a conversation grows: ``python -m benchmarks.context_cost`` (prints a table, writes JSON).

For fresh multi-turn conversations of about 1,000, 4,000 and 7,600 tokens (``--sizes``; the embedded model's
context is 8,192 tokens, and the longest context, the conversation with a preference sentence and the
generated tokens, must fit in it), built deterministically from the questions and answers in this file,
and for each placement of the preference sentence (``system``: appended to the system message, the paper's;
``end``: appended to the last user message, so that the contexts share the conversation's KV): the time to
first token, the prompt tokens computed (not served from the prefix cache or shared with another context)
and the peak KV blocks in use of ``amulet`` with 1 and 2 preferences, against ``base`` (the conversation
alone), with their ratios to base.

Each request runs alone through the synchronous engine (``LLMEngine``), greedy, EOS ignored, ``--new-tokens``
tokens, in a fresh engine (an empty prefix cache), the model loaded once and warmed up; the time to first
token is the median of ``--repeats`` runs (the token and block counts are the same every run). Default: the
embedded SmolLM2-135M in ``--dtype`` (auto: bfloat16 where the CPU has AVX512-BF16), ``--model`` for
another; ``--tiny``: a tiny random Llama with SmolLM2's vocabulary (the engine's bookkeeping, not the model).
``--quick``: conversations of about 300 and 600 tokens, 4 new tokens, one run (what the test runs).
Timings on shared machines are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.deferred_contrasts import DeferredContrasts
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.overlap import PendingTokens
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.sequence import Sequence as EngineSequence
from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, Placement, preference_contexts
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import render_chat
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model, resolve_device, resolve_dtype
from amulet_core.sampling.params import SamplingParams
from benchmarks.report import embedded_tokenizer, run_meta, write_report

PREFERENCES = ("concise", "formal")

QUESTIONS = (
    "How do I keep basil alive on a windowsill?",
    "Why does bread go stale faster in the fridge?",
    "What is a good way to start learning the guitar as an adult?",
    "How do noise-cancelling headphones work?",
    "Can you suggest a weekly routine for keeping a small flat tidy?",
    "What should I check before buying a second-hand bicycle?",
    "Why do cats knead blankets?",
    "How can I make my morning coffee taste less bitter?",
    "What is the difference between weather and climate?",
    "How do I prepare for a long hike in the rain?",
    "Why is the sky blue in the day and red at sunset?",
    "How should I store batteries I am not using?",
)
ANSWERS = (
    "Give it as much direct light as the window allows, ideally six hours a day, and turn the pot every few "
    "days so it grows evenly. Water when the top centimetre of soil feels dry, and let the pot drain fully: "
    "basil hates standing in water. Pinch off the tips above a pair of leaves once it has a few sets, and "
    "remove flower buds as soon as they appear, because flowering makes the leaves bitter and the plant tired.",
    "Staling is mostly the starch in the crumb recrystallising as it cools, and that happens fastest at "
    "fridge temperatures, just above freezing. The bread is not drying out so much as its starch is "
    "hardening. Keep it at room temperature in a bread bin or a paper bag for a day or two, and freeze "
    "slices you will not eat soon; a few minutes in a toaster or a hot oven reverses much of the staling.",
    "Pick an instrument that is comfortable to hold, tune it every time you play, and practise for fifteen "
    "minutes a day rather than for two hours once a week. Learn four open chords first and switch between "
    "them slowly with a metronome. Play songs you like as early as you can, even simplified ones, because "
    "that keeps you coming back, and record yourself now and then to hear how far you have come.",
    "Small microphones on the ear cups listen to the sound around you, and a chip produces the same sound "
    "wave turned upside down. When the two waves meet in your ear they largely cancel. This works best on "
    "steady, low sounds such as engines and air conditioning, and less well on sudden or high sounds, which "
    "the padding of the ear cups has to block instead.",
    "Spend ten minutes each evening putting things back where they live and clearing the kitchen counters. "
    "Give each weekday one larger job: the bathroom on Monday, floors on Tuesday, laundry on Wednesday, "
    "dusting on Thursday and the fridge on Friday. Keep a small basket for things that belong in other "
    "rooms, and empty it once a day, so that clutter never has time to settle into piles.",
    "Check that the frame is straight and has no cracks, especially near the joints, and that the wheels "
    "spin true without rubbing the brakes. Squeeze both brakes hard and push the bike forward: it should "
    "not roll. Look at the chain and the teeth of the sprockets for wear, shift through every gear, and ask "
    "for the history of the bike; a receipt or a service record is a good sign it was not stolen.",
    "Kneading is a behaviour kittens use to get milk flowing while they nurse, and many cats keep it as "
    "adults when they feel safe and content. It also leaves their scent on the blanket through glands in "
    "their paws, marking it as theirs. If the claws bother you, put a thick throw on your lap rather than "
    "pushing the cat away, since it is a sign of trust.",
    "Use water just off the boil rather than boiling, grind the beans a little coarser, and shorten the "
    "brewing time: over-extraction is the usual cause of bitterness. Fresh beans roasted within the last "
    "few weeks help, as does a clean machine. A pinch of salt in the grounds softens bitterness too, and a "
    "medium roast is gentler than a very dark one.",
    "Weather is what the atmosphere is doing now or over the next few days: rain, wind, temperature. "
    "Climate is the pattern of weather over decades in a place, the averages and the range of what is "
    "normal. A cold week says little about the climate, while thirty years of records say a lot. A simple "
    "way to remember it is that climate is what you expect and weather is what you get.",
    "Wear layers that dry quickly, with a waterproof jacket that breathes, and avoid cotton next to the "
    "skin. Pack spare socks in a dry bag and waterproof your map or charge your phone fully. Choose a route "
    "with safe crossings, since streams rise fast in heavy rain, tell someone your plan and when you expect "
    "to be back, and turn around if the path becomes dangerous.",
    "Sunlight is scattered by the molecules of the air, and blue light is scattered much more than red "
    "because its wavelength is shorter, so blue comes at you from every part of the sky. At sunset the light "
    "crosses far more air to reach you, most of the blue is scattered away before it arrives, and the "
    "remaining reds and oranges colour the sky and the clouds.",
    "Keep them in their original packaging or a plastic case in a cool, dry place, away from metal objects "
    "such as keys and coins that could connect the terminals. Do not mix old and new batteries in a device. "
    "Lithium batteries keep best partly charged, around half full. Tape the terminals of used ones and take "
    "them to a collection point rather than putting them in household rubbish.",
)


def conversation(target_tokens: int, tokenizer: Any, seed: int = 0) -> list[dict[str, str]]:
    """A system message and user/assistant turns, ending with a user question, of about ``target_tokens``
    tokens through the chat template (the nearest a whole turn allows: a turn is about 190 tokens). Deterministic."""
    rng = random.Random(seed)
    messages: list[dict[str, str]] = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}]
    fitting: list[dict[str, str]] = []
    for turn in range(10_000):
        q = turn % len(QUESTIONS)
        question = QUESTIONS[q] if turn < len(QUESTIONS) else f"Going back to an earlier topic: {QUESTIONS[q].lower()}"
        candidate = [*messages, {"role": "user", "content": question}]
        size = len(render_chat(tokenizer, candidate))
        if fitting and size > target_tokens:
            return candidate if size - target_tokens < target_tokens - len(render_chat(tokenizer, fitting)) else fitting
        fitting = candidate
        answer = f"{ANSWERS[q]} {ANSWERS[rng.randrange(len(ANSWERS))]}"
        messages = [*candidate, {"role": "assistant", "content": answer}]
    return fitting


@dataclass(frozen=True)
class Config:
    name: str
    placement: Placement | None
    """None: base, the conversation alone."""
    k: int

    @property
    def label(self) -> str:
        return "base" if self.placement is None else f"amulet, {self.k} pref{'s' if self.k > 1 else ''}"


CONFIGS = (
    Config("base", None, 0),
    *(Config(f"{p.value}_k{k}", p, k) for p in (Placement.SYSTEM, Placement.END) for k in (1, 2)),
)


def request(rid: str, tokenizer: Any, messages: Sequence[dict[str, str]], config: Config, new_tokens: int) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    built = preference_contexts(messages, PREFERENCES[: max(config.k, 1)], placement=config.placement or Placement.END)
    contrast = tuple(render_chat(tokenizer, built.contrast))
    if config.placement is None:
        return GenerationRequest(rid, contrast, sampling, MethodSettings(method=Method.BASE))
    prefs = [tuple(render_chat(tokenizer, p)) for p in built.prefs]
    settings = MethodSettings(method=Method.AMULET, weights=(1.0,) * config.k if config.k > 1 else ())
    return GenerationRequest(rid, prefs[0], sampling, settings, contrast, tuple(prefs[1:]))


def common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    p = 0
    while all(len(c) > p for c in contexts) and len({c[p] for c in contexts}) == 1:
        p += 1
    return p


def measure(loaded: LoadedModel, engine_config: EngineConfig, req: GenerationRequest) -> dict[str, float]:
    """One request alone in a fresh engine: time to first token, prompt tokens computed, peak KV blocks."""
    gc.collect()  # the previous engine's KV cache (its spy makes a reference cycle)
    engine = LLMEngine(loaded, engine_config)
    computed = 0
    peak = 0
    run = engine.runner.run_deferring  # every eager forward pass of the engine

    def counting(
        chunks: list[ScheduledChunk], logits_for: list[EngineSequence], deferred: list[int], pending: PendingTokens | None
    ) -> tuple[torch.Tensor, DeferredContrasts | None]:
        nonlocal computed, peak
        computed += sum(max(0, min(c.start + c.num_tokens, c.seq.num_prompt_tokens) - c.start) for c in chunks)
        peak = max(peak, engine.blocks.num_used)
        return run(chunks, logits_for, deferred, pending)

    engine.runner.run_deferring = counting  # type: ignore[method-assign]
    start = time.perf_counter()
    engine.add_request(req)
    first = None
    tokens = 0
    while engine.has_work():
        for out in engine.step():
            if out.token_ids and first is None:
                first = time.perf_counter() - start
            tokens += len(out.token_ids)
    assert first is not None and tokens == req.sampling.max_tokens
    return {"ttft_s": first, "prefill_tokens": computed, "peak_kv_blocks": peak}


def run(loaded: LoadedModel, sizes: Sequence[int], new_tokens: int, repeats: int, max_model_len: int) -> list[dict[str, Any]]:
    tok = loaded.tokenizer
    engine_config = EngineConfig(
        max_model_len=max_model_len, kv_cache_tokens=(len(PREFERENCES) + 1) * (max_model_len + 64), max_num_seqs=4
    )
    warm = request("warm", tok, conversation(200, tok, seed=99), Config("warm", Placement.END, 2), 2)
    measure(loaded, engine_config, warm)
    rows = []
    for size in sizes:
        messages = conversation(size, tok, seed=size)
        reqs = {c.name: request(f"{c.name}-{size}", tok, messages, c, new_tokens) for c in CONFIGS}
        runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in CONFIGS}
        for i in range(repeats):  # the configurations in turn, so that a slow spell hits all of them
            for c in CONFIGS:
                runs[c.name].append(measure(loaded, engine_config, reqs[c.name]))
            print(f"{len(reqs['base'].prompt_ids)} tokens: run {i + 1} of {repeats} done", file=sys.stderr, flush=True)
        base_tokens = len(reqs["base"].prompt_ids)
        for c in CONFIGS:
            r = reqs[c.name]
            first = runs[c.name][0]
            rows.append(
                {
                    "conversation_tokens": base_tokens,
                    "turns": sum(1 for m in messages if m["role"] == "user"),
                    "config": c.name,
                    "placement": c.placement.value if c.placement else None,
                    "preferences": c.k,
                    "context_tokens": [len(ids) for ids in r.contexts],
                    "common_prefix_tokens": common_prefix(r.contexts),
                    "ttft_s": statistics.median(m["ttft_s"] for m in runs[c.name]),
                    "ttft_runs_s": [m["ttft_s"] for m in runs[c.name]],
                    "prefill_tokens": first["prefill_tokens"],
                    "peak_kv_blocks": first["peak_kv_blocks"],
                }
            )
        base = rows[-len(CONFIGS)]
        for row in rows[-len(CONFIGS) :]:
            for key in ("ttft_s", "prefill_tokens", "peak_kv_blocks"):
                row[f"{key}_vs_base"] = row[key] / base[key]
    return rows


TARGETS = {1: (1.15, 1.1), 2: (1.3, 1.2)}
"""Issue 26's targets on a ~4,000-token conversation, end placement: (TTFT / base, peak KV / base) at K = 1, 2."""


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| conversation | placement | config | prompt tokens computed (/ base) | peak KV blocks (/ base) | TTFT s (/ base) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = next(c.label for c in CONFIGS if c.name == r["config"])
        lines.append(
            f"| {r['conversation_tokens']:,} tokens, {r['turns']} turns | {r['placement'] or '-'} | {label} "
            f"| {r['prefill_tokens']:,} ({r['prefill_tokens_vs_base']:.2f}) "
            f"| {r['peak_kv_blocks']:,} ({r['peak_kv_blocks_vs_base']:.2f}) "
            f"| {r['ttft_s']:.3g} ({r['ttft_s_vs_base']:.2f}) |"
        )
    return "\n".join(lines)


def target_check(rows: list[dict[str, Any]]) -> list[str]:
    """The targets against the end-placement rows of the conversation nearest 4,000 tokens."""
    size = min({r["conversation_tokens"] for r in rows}, key=lambda n: abs(n - 4000))
    lines = []
    for r in rows:
        if r["conversation_tokens"] == size and r["placement"] == Placement.END.value:
            ttft, kv = TARGETS[r["preferences"]]
            met = r["ttft_s_vs_base"] <= ttft and r["peak_kv_blocks_vs_base"] <= kv
            lines.append(
                f"target at {size:,} tokens, end placement, {r['preferences']} pref: TTFT {r['ttft_s_vs_base']:.2f} <= {ttft}, "
                f"peak KV {r['peak_kv_blocks_vs_base']:.2f} <= {kv}: {'met' if met else 'MISSED'}"
            )
    return lines


def load(args: argparse.Namespace) -> LoadedModel:
    if not args.tiny:
        config = ModelConfig(model=args.model, device=args.device, dtype=args.dtype, model_cache=default_model_cache())
        return load_model(config)
    from benchmarks.host_overhead import random_model, tiny_llama_config

    device = resolve_device(args.device)
    dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else resolve_dtype(args.dtype, device)
    tokenizer = embedded_tokenizer()
    return random_model(tiny_llama_config(len(tokenizer), max_position_embeddings=8192), tokenizer, device, dtype, "tiny-llama")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder, cached id or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama with SmolLM2's vocabulary instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    parser.add_argument("--sizes", default="1000,4000,7600", help="conversation sizes in tokens, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="about 300 and 600 tokens, 4 new tokens, one run")
    parser.add_argument("--output", default="benchmarks/results/context_cost.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.new_tokens, args.repeats, args.max_model_len = "300,600", 4, 1, 1024
    sizes = [int(s) for s in args.sizes.split(",")]
    if resolve_device(args.device).type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    loaded = load(args)
    with torch.inference_mode():
        rows = run(loaded, sizes, args.new_tokens, args.repeats, args.max_model_len)
    meta = run_meta(
        loaded.device,
        loaded.dtype,
        loaded.name,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        block_size=EngineConfig().block_size,
        max_num_batched_tokens=EngineConfig().batched_tokens(loaded.device.type),
    )
    print(json.dumps(meta))
    print(table(rows))
    for line in target_check(rows):
        print(line)
    write_report(args.output, {"meta": meta, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
