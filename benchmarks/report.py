"""What the benchmarks write alike: the run's description (date, model, device, dtype, machine) and the JSON file."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path
from typing import Any

import torch

from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import ModelConfig, load_tokenizer


def run_meta(device: torch.device | str, dtype: torch.dtype, model: str | None = None, **extra: Any) -> dict[str, Any]:
    """Today's date, the model, device, dtype and machine (architecture, torch threads), then ``extra``."""
    meta: dict[str, Any] = {"date": date.today().isoformat()}
    if model is not None:
        meta["model"] = model
    meta |= {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    return meta | extra


def write_report(path: str | Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON at ``path`` (folders made as needed); says where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return out


def embedded_tokenizer() -> Any:
    """The embedded SmolLM2's tokenizer (for random-weight models with its vocabulary), through the model cache."""
    return load_tokenizer(ModelConfig(model_cache=default_model_cache()))
