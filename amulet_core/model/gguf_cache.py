"""A converted copy of a ``.gguf`` model: a Hugging Face folder that loads in about a second.

transformers reads a GGUF file slowly (on the embedded SmolLM2-135M: about 12 s for metadata, tensor
names and de-quantisation, against about 1 s for the same weights from safetensors). The first load of a
GGUF file converts it once: the de-quantised float32 weights, the config, the generation config and the
tokenizer (with its chat template) are saved (safetensors, ``save_pretrained``) into ``<cache>/<stem>-<key>``, where
the key hashes the file's resolved path, size and modification time, the transformers version and this
module's format version, so a changed file or library gets a new folder. The folder is written under a
temporary name and renamed into place once complete, so a crash or a concurrent converter never leaves a
half-written folder that looks finished. Float32 keeps the weights exact: a later load in another dtype
casts them as the GGUF load itself would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_CACHE_ENV = "AMULET_MODEL_CACHE"
"""Environment variable naming the cache folder; ``none`` (or empty) turns the cache off."""
CACHE_FORMAT = 1
COMPLETE_MARKER = "amulet-conversion-complete"


def default_model_cache(environ: Mapping[str, str] | None = None) -> str | None:
    """The cache folder from ``$AMULET_MODEL_CACHE``, else ``$XDG_CACHE_HOME/amulet-serve/models``
    (``~/.cache/amulet-serve/models``); None when the variable says ``none`` or is empty."""
    env = os.environ if environ is None else environ
    if MODEL_CACHE_ENV in env:
        value = env[MODEL_CACHE_ENV].strip()
        return None if value.lower() in ("", "none", "off") else value
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "amulet-serve" / "models")


def converted_folder(gguf: Path, cache_dir: str) -> Path:
    """Where ``gguf``'s converted copy lives in ``cache_dir`` (whether or not it exists yet)."""
    import transformers

    resolved = gguf.resolve()
    stat = resolved.stat()
    identity = f"{CACHE_FORMAT}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{resolved.stem}-{key}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def save_converted(model: Any, tokenizer: Any, folder: Path) -> bool:
    """Save a float32 model and its tokenizer as ``folder``; False (logged, nothing left behind) when it cannot.

    The cache is an optimisation: a full disk or a read-only home never stops a load."""
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        _save_weights(model, temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / COMPLETE_MARKER).write_text("ok\n")
        try:
            temporary.rename(folder)
        except OSError:
            if not is_complete(folder):  # not another process's finished copy: a real failure
                raise
            shutil.rmtree(temporary, ignore_errors=True)
        logger.info("converted the GGUF model once into %s; later loads read that folder", folder)
        return True
    except (OSError, ValueError, RuntimeError) as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        logger.warning("could not keep a converted copy of the GGUF model in %s (%s); loading from the GGUF file", folder, exc)
        return False


def _save_weights(model: Any, folder: Path) -> None:
    """Config, generation config and safetensors weights of a GGUF-loaded model (``save_pretrained`` refuses
    models loaded through the GGUF quantizer, though their weights are plain de-quantised tensors)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
