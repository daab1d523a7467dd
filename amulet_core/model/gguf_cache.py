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

The cache is trusted only as far as it is checked before every use (:func:`is_complete`): the cache folder is
created private to its user (0700; one of the user's own that others can read is tightened), and one owned by
someone else is not used at all; an entry must be a real folder owned by the user whose files (no links, no
extra files) match its checksum manifest (``COMPLETE_MARKER``: the SHA-256 of every file, written last). An
entry that fails the check is not loaded: the load converts the GGUF file again and replaces it. Checking the
embedded model's copy (542 MB) reads it once more: 0.73 s on the 2-core build machine (the cached load 1.9 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_CACHE_ENV = "AMULET_MODEL_CACHE"
"""Environment variable naming the cache folder; ``none`` (or empty) turns the cache off."""
CACHE_FORMAT = 2
COMPLETE_MARKER = "amulet-conversion-complete"
"""The checksum manifest of a finished entry (JSON: the format and every other file's SHA-256), written last."""
PRIVATE_MODE = 0o700
_HASH_CHUNK = 1 << 20


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
    info = resolved.stat()
    identity = f"{CACHE_FORMAT}|{resolved}|{info.st_size}|{info.st_mtime_ns}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{resolved.stem}-{key}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished entry that may be loaded: in a private cache folder of this user, owned
    by this user, every file matching its checksum manifest (see the module docstring). A present entry that
    fails is logged (it is then converted again)."""
    if not folder.exists():
        return False
    try:
        _private_folder(folder.parent, create=False)
    except OSError as exc:
        logger.warning("not using the model cache: %s", exc)
        return False
    problem = _entry_problem(folder)
    if problem is not None:
        logger.warning("not loading the converted model in %s: %s; converting the GGUF file again", folder, problem)
    return problem is None


def _owned(info: os.stat_result) -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is None or info.st_uid == geteuid()


def _private_folder(cache_dir: Path, create: bool) -> None:
    """Make sure ``cache_dir`` is a folder of this user's that only it can use (created 0700 when ``create``; one
    of its own with wider permissions is narrowed). Raises OSError for one owned by someone else."""
    if create:
        cache_dir.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    info = cache_dir.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{cache_dir} is not a folder")
    if not _owned(info):
        raise PermissionError(f"the cache folder {cache_dir} belongs to another user (uid {info.st_uid})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        cache_dir.chmod(PRIVATE_MODE)


def _entry_problem(folder: Path) -> str | None:
    """What makes ``folder`` unfit to load (None: fit): not a real folder of this user's, or a file that is not in
    its manifest, a link, someone else's, or not the manifest's checksum."""
    try:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or not _owned(info):
            return "it is not a folder of this user's"
        files = {entry.name: entry for entry in os.scandir(folder)}
        if COMPLETE_MARKER not in files:
            return "it has no checksum manifest (a conversion that did not finish)"
        manifest = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
        expected = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT else None
        if not isinstance(expected, dict) or set(files) != {*expected, COMPLETE_MARKER}:
            return "its files are not those of its checksum manifest"
        for name, entry in files.items():
            if not entry.is_file(follow_symlinks=False) or not _owned(entry.stat(follow_symlinks=False)):
                return f"{name} is not a file of this user's"
            if name != COMPLETE_MARKER and _sha256(folder / name) != expected[name]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError) as exc:
        return f"it cannot be checked ({type(exc).__name__})"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {entry.name: _sha256(Path(entry.path)) for entry in os.scandir(folder) if entry.name != COMPLETE_MARKER}
    manifest = {"format": CACHE_FORMAT, "files": dict(sorted(files.items()))}
    (folder / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _replace(folder: Path, temporary: Path) -> None:
    """Move ``temporary`` into place as ``folder``, over an entry there that is unfit (another process's
    finished, fit copy is kept instead)."""
    try:
        temporary.rename(folder)
        return
    except OSError:
        if is_complete(folder):  # another process finished first
            shutil.rmtree(temporary, ignore_errors=True)
            return
    stale = folder.with_name(f".{folder.name}.{os.getpid()}.stale")
    folder.rename(stale)
    shutil.rmtree(stale, ignore_errors=True)
    temporary.rename(folder)


def save_converted(model: Any, tokenizer: Any, folder: Path) -> bool:
    """Save a float32 model and its tokenizer as ``folder``; False (logged, nothing left behind) when it cannot.

    The cache is an optimisation: a full disk or a read-only home never stops a load."""
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        _private_folder(folder.parent, create=True)
        shutil.rmtree(temporary, ignore_errors=True)  # a leftover of a crashed conversion by this pid
        temporary.mkdir(mode=PRIVATE_MODE)
        _save_weights(model, temporary)
        tokenizer.save_pretrained(temporary)
        _write_manifest(temporary)
        _replace(folder, temporary)
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
