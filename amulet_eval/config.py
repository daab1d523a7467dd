"""The evaluation's settings: frozen dataclasses, built in one place (the CLI) and validated there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amulet_core.methods import Method, MethodSettings, Mode
from amulet_core.prompts import PAPER_SYSTEM_PROMPT, TEMPLATE

BEAM_METHOD = "beam16"
"""The paper's beam-search baseline: beam search (16 beams) on the pref context, in-process only."""
BEAM_WIDTH = 16
ENGINE_METHODS: tuple[str, ...] = tuple(m.value for m in Method)
ALL_METHODS: tuple[str, ...] = (*ENGINE_METHODS, BEAM_METHOD)
BASELINE = Method.BASE.value


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
    """An engine method value (base, pref, la, amulet) or ``beam16``."""
    settings: MethodSettings | None = None

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
        out: dict[str, object] = {"kind": self.kind}
        if s.method.num_contexts == 2:
            out.update(mode=s.mode.value, coefficient=s.coefficient, plausibility=s.plausibility)
        if s.method is Method.LA and s.strength is None:
            out["ratio"] = s.ratio
        if s.method is Method.AMULET and s.strength is None:
            out.update(iterations=s.iterations, eta=s.eta, alpha=s.alpha, lam=s.lam)
        return out


def method_specs(
    methods: tuple[str, ...],
    plausibilities: tuple[float | None, ...] = (None,),
    strengths: tuple[float | None, ...] = (None,),
    mode: Mode = Mode.DEFAULT,
) -> tuple[MethodSpec, ...]:
    """The columns for the chosen methods, with the mode's defaults; amulet gets one column per
    plausibility and strength (A set directly; None: the game's A)."""
    specs: list[MethodSpec] = []
    for name in methods:
        if name == BEAM_METHOD:
            specs.append(MethodSpec(BEAM_METHOD, BEAM_METHOD))
        elif name == Method.AMULET.value:
            for strength in strengths:
                for beta in plausibilities:
                    fields = {"method": name, "strength": strength, "plausibility": beta}
                    settings = MethodSettings.from_fields(fields, mode)
                    specs.append(MethodSpec(amulet_label(settings), name, settings))
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
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    concurrency: int = 8

    def identity(self, model_name: str) -> dict[str, object]:
        """What every stored row must share with this run to be reused."""
        return {
            "model": model_name,
            "system_prompt": self.system_prompt,
            "default_system_prompt": self.default_system_prompt,
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
