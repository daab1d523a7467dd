"""The converted-model cache is checked before every use: a private folder, entries of this user's only, and
every file matching the entry's checksum manifest; an entry that fails is converted again, never loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amulet_core.model import gguf_cache, loading
from amulet_core.model.gguf_cache import COMPLETE_MARKER, PRIVATE_MODE, converted_folder, is_complete, save_converted
from amulet_core.model.loading import LoadedModel, ModelConfig

OTHER_UID = 65534  # nobody


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], LoadedModel]) -> Path:
    """One finished entry of the tiny model, copied by each test that changes it."""
    loaded = tiny_model("llama")
    folder = tmp_path_factory.mktemp("cache") / "tiny-0123"
    assert save_converted(loaded.model, loaded.tokenizer, folder)
    return folder


@pytest.fixture
def entry(saved: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(mode=PRIVATE_MODE)
    return Path(shutil.copytree(saved, cache / saved.name))


@pytest.fixture
def as_another_user(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Make a path someone else's: chown it to nobody where the tests run as root, else make this process look
    like another user to the cache (it compares owners with ``os.geteuid()``)."""

    def give_away(path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
        else:
            real = os.geteuid()
            monkeypatch.setattr(os, "geteuid", lambda: real + 1)

    yield give_away


def test_the_cache_folder_is_created_private_and_a_wider_one_of_ours_is_narrowed(
    tmp_path: Path, tiny_model: Callable[[str], LoadedModel]
) -> None:
    loaded = tiny_model("llama")
    cache = tmp_path / "new" / "models"
    assert save_converted(loaded.model, loaded.tokenizer, cache / "tiny-0123")
    assert stat.S_IMODE(cache.stat().st_mode) == PRIVATE_MODE
    assert stat.S_IMODE((cache / "tiny-0123").stat().st_mode) == PRIVATE_MODE
    cache.chmod(0o755)  # e.g. made by an older version
    assert is_complete(cache / "tiny-0123")
    assert stat.S_IMODE(cache.stat().st_mode) == PRIVATE_MODE


def test_the_manifest_holds_the_checksum_of_every_file(saved: Path) -> None:
    manifest = json.loads((saved / COMPLETE_MARKER).read_text())
    files = {p.name for p in saved.iterdir()} - {COMPLETE_MARKER}
    assert "model.safetensors" in files and "config.json" in files
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((saved / name).read_bytes()).hexdigest() == digest
    assert is_complete(saved)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER])
def test_a_changed_file_makes_the_entry_unfit(entry: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    data = bytearray((entry / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (entry / name).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        assert not is_complete(entry)
    assert "not loading the converted model" in caplog.text


def test_an_extra_file_a_link_or_a_missing_file_makes_the_entry_unfit(entry: Path, tmp_path: Path) -> None:
    (entry / "model.safetensors.index.json").write_text("{}")  # would change what from_pretrained reads
    assert not is_complete(entry)
    (entry / "model.safetensors.index.json").unlink()
    assert is_complete(entry)
    outside = tmp_path / "config.json"
    shutil.copy(entry / "config.json", outside)
    (entry / "config.json").unlink()
    assert not is_complete(entry)  # missing
    (entry / "config.json").symlink_to(outside)  # same bytes, but a link to anywhere
    assert not is_complete(entry)


def test_an_entry_or_a_file_of_another_user_is_refused(entry: Path, as_another_user: Callable[[Path], None]) -> None:
    as_another_user(entry / "config.json")
    assert not is_complete(entry)


def test_a_cache_folder_of_another_user_is_not_used(
    entry: Path, as_another_user: Callable[[Path], None], tiny_model: Callable[[str], LoadedModel]
) -> None:
    as_another_user(entry.parent)
    assert not is_complete(entry)
    loaded = tiny_model("llama")
    assert not save_converted(loaded.model, loaded.tokenizer, entry.parent / "tiny-4567")  # nothing written there
    assert not (entry.parent / "tiny-4567").exists()


def test_an_unfit_entry_is_rebuilt_by_the_next_conversion(entry: Path, tiny_model: Callable[[str], LoadedModel]) -> None:
    good = (entry / "model.safetensors").read_bytes()
    (entry / "model.safetensors").write_bytes(good[:-8] + b"tampered")
    assert not is_complete(entry)
    loaded = tiny_model("llama")
    assert save_converted(loaded.model, loaded.tokenizer, entry)
    assert is_complete(entry) and (entry / "model.safetensors").read_bytes() == good
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no stale or temporary folder left


def test_the_loader_converts_the_gguf_file_again_instead_of_loading_an_unfit_entry(entry: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: only its path, size and time key the entry")
    cache = str(entry.parent)
    folder = converted_folder(gguf, cache)
    shutil.copytree(entry, folder)
    config = ModelConfig(model=str(gguf), model_cache=cache)
    assert loading._cached_source(config) == (str(folder), {}, None)  # a fit entry is what loads
    (folder / "config.json").write_text('{"model_type": "llama", "tampered": true}')
    source, kwargs, convert_to = loading._cached_source(config)
    assert (source, kwargs, convert_to) == (str(tmp_path), {"gguf_file": gguf.name}, folder)
