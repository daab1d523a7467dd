"""The in-process runner on a tiny random-weight model: beam search under the engine's attention, and beam16 on
the pref context."""

from __future__ import annotations

from pathlib import Path

from amulet_core.engine.paged_attention import register_paged_attention
from amulet_core.prompts import preference_message_pair, render_chat
from amulet_eval.config import GenerationConfig, LocalBackend, method_specs
from amulet_eval.generate import conversation, run_generation
from amulet_eval.questions import load_questions
from amulet_eval.runner_local import LocalRunner, beam_search


def test_beam_search_under_the_engines_attention_equals_sdpa(tiny_model) -> None:
    """The engine leaves its paged attention on the model; a plain generate call must then equal SDPA."""
    loaded = tiny_model("llama")
    model, tok = loaded.model, loaded.tokenizer
    prompt = render_chat(tok, [{"role": "user", "content": "Name a fruit."}])
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
        want = beam_search(model, tok, prompt, 8, loaded.eos_token_ids)
        model.set_attn_implementation(register_paged_attention())
        got = beam_search(model, tok, prompt, 8, loaded.eos_token_ids)
    finally:
        model.set_attn_implementation(original)
    assert got == want and want.completion_tokens >= 1


def test_local_runner_runs_beam16_on_the_pref_context(tiny_model, tmp_path: Path) -> None:
    loaded = tiny_model("llama")
    generation = GenerationConfig(method_specs(("base", "beam16"), (0.0,)), ("concise",), max_tokens=6, concurrency=2)
    runner = LocalRunner(LocalBackend(max_model_len=1024), generation, loader=lambda _config: loaded)
    question = load_questions(None, 1)[0].question
    summary = run_generation(tmp_path, load_questions(None, 1), generation, runner, progress=False)
    beam = summary.rows[(0, "concise", "beam16")]
    assert beam["method_settings"] == {"kind": "beam16", "num_beams": 16}
    pref = preference_message_pair(conversation(generation.system_prompt, question), "concise").pref
    direct = beam_search(loaded.model, loaded.tokenizer, render_chat(loaded.tokenizer, pref), 6, loaded.eos_token_ids)
    assert beam["response"] == direct.text and beam["completion_tokens"] == direct.completion_tokens >= 1
