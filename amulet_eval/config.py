"""The evaluation's settings: frozen dataclasses, built in one place (the CLI) and validated there."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, PRESETS, TEMPLATE, Placement
from amulet_core.method.settings import Method, MethodSettings, Mode
from amulet_eval.conditions import parse_condition

BEAM_METHOD = "beam16"
"""The paper's beam-search baseline: beam search (16 beams) on the pref context, in-process only."""
BEAM_WIDTH = 16
CFG_METHOD = "cfg"
"""Classifier-free guidance (the server's ``guidance_scale`` + ``negative_prompt``): the conversation as given
against the conversation carrying the negative prompt; it ignores the row's preference."""
ENGINE_METHODS: tuple[str, ...] = tuple(m.value for m in Method)
ALL_METHODS: tuple[str, ...] = (*ENGINE_METHODS, CFG_METHOD, BEAM_METHOD)
BASELINE = Method.BASE.value
CONTRAST_METHODS = frozenset({Method.LA.value, Method.AMULET.value})
"""The methods with a contrast context, the one ``--negative`` fills."""


def negative_suffix(negative: str | None) -> str:
    """What a negative adds to an la/amulet label: ``-vs-concise`` for a preset, ``-vs-neg<6 hex>`` for free text
    (a digest of the text, so different texts never share a column), nothing for None."""
    if negative is None:
        return ""
    if negative in PRESETS:
        return f"-vs-{negative}"
    return f"-vs-neg{hashlib.sha256(negative.encode('utf-8')).hexdigest()[:6]}"


def cfg_settings(guidance_scale: float) -> MethodSettings:
    """The engine settings of classifier-free guidance, as the server builds them: la with A = g set directly,
    no plausibility mask, so the answer decodes from ``log_softmax(g * l_pos + (1 - g) * l_neg)``."""
    return MethodSettings.from_fields({"method": Method.LA.value, "strength": guidance_scale, "plausibility": 0.0})


def amulet_label(settings: MethodSettings) -> str:
    """Label of an amulet column: ``amulet`` with the mode's defaults, else e.g. ``amulet-A3-p0.1``."""
    defaults = MethodSettings.paper() if settings.mode is Mode.PAPER else MethodSettings()
    label = Method.AMULET.value
    if settings.strength is not None:
        label += f"-A{settings.strength:g}"
    if settings.plausibility != defaults.plausibility:
        label += f"-p{settings.plausibility:g}"
    return label


@dataclass(frozen=True)
class MethodSpec:
    """One column of the evaluation: its label, how it decodes, and its engine settings (None for beam16)."""

    label: str
    kind: str
    """An engine method value (base, pref, la, amulet), ``cfg`` or ``beam16``."""
    settings: MethodSettings | None = None
    negative: str | None = None
    """What the contrast context carries: for la and amulet the ``--negative`` preset or sentence (None: the
    conversation as given); for cfg the negative prompt."""

    @property
    def engine_settings(self) -> MethodSettings:
        if self.settings is None:
            raise ValueError(f"method {self.label!r} does not run on the engine")
        return self.settings

    def describe(self) -> dict[str, object]:
        """The settings that define this method's answers (stored with each row)."""
        if self.settings is None:
            return {"kind": self.kind, "num_beams": BEAM_WIDTH}
        s = self.settings
        if self.kind == CFG_METHOD:
            return {"kind": self.kind, "guidance_scale": s.strength, "negative_prompt": self.negative}
        out: dict[str, object] = {"kind": self.kind}
        if s.method.has_contrast:
            out.update(mode=s.mode.value, coefficient=s.effective_strength, plausibility=s.plausibility)
        if s.method is Method.LA and s.strength is None:
            out["ratio"] = s.ratio
        if s.method is Method.AMULET and s.strength is None:
            out.update(iterations=s.iterations, eta=s.eta, alpha=s.alpha, lam=s.lam)
        if self.negative is not None:
            out["negative"] = self.negative  # only when given: rows made before negatives existed stay reusable
        return out


def method_specs(
    methods: tuple[str, ...],
    plausibilities: tuple[float | None, ...] = (None,),
    strengths: tuple[float | None, ...] = (None,),
    mode: Mode = Mode.DEFAULT,
    negatives: tuple[str | None, ...] = (None,),
    guidance: tuple[float, str] | None = None,
) -> tuple[MethodSpec, ...]:
    """The columns for the chosen methods, with the mode's defaults; amulet gets one column per
    plausibility and strength (A set directly; None: the game's A); la and amulet one per negative
    (None: the plain contrast context), labelled with :func:`negative_suffix`. ``cfg`` needs
    ``guidance``: (guidance scale, negative prompt)."""
    specs: list[MethodSpec] = []
    for name in methods:
        if name == BEAM_METHOD:
            specs.append(MethodSpec(BEAM_METHOD, BEAM_METHOD))
        elif name == CFG_METHOD:
            if guidance is None:
                raise ValueError("the cfg column needs a guidance scale and a negative prompt")
            scale, negative_prompt = guidance
            specs.append(MethodSpec(CFG_METHOD, CFG_METHOD, cfg_settings(scale), negative_prompt))
        elif name == Method.AMULET.value:
            for negative in negatives:
                for strength in strengths:
                    for beta in plausibilities:
                        fields = {"method": name, "strength": strength, "plausibility": beta}
                        settings = MethodSettings.from_fields(fields, mode)
                        specs.append(MethodSpec(amulet_label(settings) + negative_suffix(negative), name, settings, negative))
        elif name == Method.LA.value:
            settings = MethodSettings.from_fields({"method": name}, mode)
            specs += [MethodSpec(name + negative_suffix(n), name, settings, n) for n in negatives]
        else:
            specs.append(MethodSpec(name, name, MethodSettings.from_fields({"method": name}, mode)))
    return tuple(specs)


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are generated (the paper's defaults: its system prompt, 128 new tokens, greedy)."""

    methods: tuple[MethodSpec, ...]
    preferences: tuple[str, ...]
    system_prompt: str = PAPER_SYSTEM_PROMPT
    default_system_prompt: str = TEMPLATE
    """For conversations without a system message (``system_prompt`` empty): as the server's
    ``--default-system-prompt`` (template, paper, none or a text)."""
    preference_placement: Placement = Placement.END
    """Where the preference sentences (and a negative one) go in their contexts, as the server's
    ``--preference-placement`` (its default: end; the paper's: system)."""
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    concurrency: int = 8

    def __post_init__(self) -> None:
        # Each entry as its condition's canonical label (amulet_eval.conditions), once: two spellings of one
        # condition ("Concise + Formal", "concise+formal") are one row and one key in generations.jsonl.
        labels = tuple(dict.fromkeys(parse_condition(p).label for p in self.preferences))
        object.__setattr__(self, "preferences", labels)

    def identity(self, model_name: str) -> dict[str, object]:
        """What every stored row must share with this run to be reused."""
        return {
            "model": model_name,
            "system_prompt": self.system_prompt,
            "default_system_prompt": self.default_system_prompt,
            "preference_placement": self.preference_placement.value,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class LocalBackend:
    """The engine in this process."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 2048
    cpu_threads: int | None = None
    """Torch threads on the CPU; None = every core (unlike the server, there is no event loop to keep a core for)."""
    model_cache: str | None = None
    """Converted copies of .gguf models (``ModelConfig.model_cache``; ``$AMULET_MODEL_CACHE``)."""


@dataclass(frozen=True)
class HttpBackend:
    """A running server's OpenAI API (``base_url`` ends in ``/v1``)."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0


@dataclass(frozen=True)
class FluencyConfig:
    """The plain model that scores fluency, loaded in this process (see amulet_eval.quality).

    ``model`` None is the embedded SmolLM2-135M-Instruct. float32 by default, so the scores do not
    depend on whether the CPU has native bfloat16."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    model_cache: str | None = None


@dataclass(frozen=True)
class RewardConfig:
    """A Hugging Face sequence-classification reward model from a local folder."""

    path: Path
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_length: int = 4096


@dataclass(frozen=True)
class JudgeConfig:
    """A pairwise LLM judge behind an OpenAI-compatible endpoint."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    seed: int = 0
    all_pairs: bool = False
    """False: every method against base; True: every pair of methods (more Bradley-Terry data)."""
    max_tokens: int = 16
    concurrency: int = 4
    timeout_s: float = 600.0


@dataclass(frozen=True)
class EvalConfig:
    """One ``amulet-eval`` run."""

    questions_path: Path | None
    """None: the demo set shipped with the package."""
    limit: int | None
    out_dir: Path
    generation: GenerationConfig
    backend: LocalBackend | HttpBackend
    fluency: FluencyConfig | None = None
    """None: fluency is not measured (degeneration then goes by the text rules alone)."""
    reward: RewardConfig | None = None
    judge: JudgeConfig | None = None
    bt_regularization: float = 0.01
    charts: bool = True
    progress: bool = True
    command: str = ""
    log_level: str = "warning"
