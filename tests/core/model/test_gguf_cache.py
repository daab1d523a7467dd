"""The converted copy of a GGUF model: exactly the GGUF load, keyed to the file, written atomically, optional."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from amulet_core.model import gguf_cache
from amulet_core.model.chat_template import render_chat
from amulet_core.model.gguf_cache import COMPLETE_MARKER, converted_folder, default_model_cache, is_complete, save_converted
from amulet_core.model.loading import LoadedModel, ModelConfig, embedded_model_file, load_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café ☕ and <|im_end|> in text?"}]


@pytest.mark.smollm
def test_the_converted_copy_loads_exactly_what_the_gguf_file_does(smollm: LoadedModel) -> None:
    """The session's cache (tests/conftest.py) holds the embedded model converted by its first load.

    That first load read the GGUF file: when it was the session's ``smollm`` (as in a whole run, where this is its
    first user), it is the direct load compared with; otherwise the GGUF file is loaded again (about 15 s)."""
    cache = default_model_cache()
    assert cache is not None
    folder = converted_folder(embedded_model_file(), cache)
    assert is_complete(folder)
    from_gguf = Path(smollm.model.name_or_path) != folder and smollm.dtype == torch.float32
    direct = smollm if from_gguf else load_model(ModelConfig(dtype="float32", model_cache=None))
    assert Path(direct.model.name_or_path) == embedded_model_file().parent  # read from the GGUF file
    cached = load_model(ModelConfig(dtype="float32", model_cache=cache))
    assert Path(cached.model.name_or_path) == folder  # read from the folder, not the GGUF file
    want, got = direct.model.state_dict(), cached.model.state_dict()
    assert want.keys() == got.keys()
    assert all(got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]) for name in want)
    assert cached.model.lm_head.weight.data_ptr() == cached.model.model.embed_tokens.weight.data_ptr()  # still tied
    assert (cached.name, cached.eos_token_ids, cached.dtype) == (direct.name, direct.eos_token_ids, direct.dtype)
    assert cached.tokenizer.chat_template == direct.tokenizer.chat_template
    assert render_chat(cached.tokenizer, CHAT) == render_chat(direct.tokenizer, CHAT)
    assert cached.tokenizer.get_vocab() == direct.tokenizer.get_vocab()
    assert cached.model.generation_config.to_dict() == direct.model.generation_config.to_dict()
    ids = list(range(0, len(direct.tokenizer), 11))
    assert cached.tokenizer.decode(ids) == direct.tokenizer.decode(ids)
    # another dtype casts the exact float32 weights, as the GGUF load casts its de-quantised ones (unquantized: in
    # bfloat16 ``--quantization auto`` keeps the Q4_1 file's linear layers 4-bit, another test's subject)
    half = load_model(ModelConfig(dtype="bfloat16", model_cache=cache, quantization="none")).model.state_dict()
    assert all(torch.equal(half[name], want[name].to(torch.bfloat16)) for name in want)


def test_the_folder_is_keyed_to_the_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF one")
    first = converted_folder(gguf, str(tmp_path / "cache"))
    assert first.parent == tmp_path / "cache" and first.name.startswith("model.Q4-")
    assert converted_folder(gguf, str(tmp_path / "cache")) == first
    gguf.write_bytes(b"GGUF two, longer")
    assert converted_folder(gguf, str(tmp_path / "cache")) != first
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert converted_folder(gguf, str(tmp_path / "cache")) != first


def test_the_default_folder_and_turning_it_off() -> None:
    assert default_model_cache({"AMULET_MODEL_CACHE": "/c"}) == "/c"
    assert default_model_cache({"AMULET_MODEL_CACHE": "none"}) is None
    assert default_model_cache({"AMULET_MODEL_CACHE": ""}) is None
    assert default_model_cache({"XDG_CACHE_HOME": "/x"}) == "/x/amulet-serve/models"
    assert default_model_cache({}) == str(Path.home() / ".cache" / "amulet-serve" / "models")


def test_a_saved_copy_is_complete_and_loads_as_a_model_folder(tmp_path: Path, tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("llama")
    folder = tmp_path / "cache" / "tiny-0123"
    assert save_converted(loaded.model, loaded.tokenizer, folder)
    assert is_complete(folder) and not list(folder.parent.glob(".*.tmp"))
    again = load_model(ModelConfig(model=str(folder), device="cpu", dtype="float32"))
    want, got = loaded.model.state_dict(), again.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
    assert render_chat(again.tokenizer, CHAT) == render_chat(loaded.tokenizer, CHAT)


def test_a_half_written_folder_is_not_complete_and_is_replaced(tmp_path: Path, tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("llama")
    folder = tmp_path / "tiny-0123"
    folder.mkdir()
    (folder / "config.json").write_text("{")  # a crash mid-write (by an older layout): no marker
    assert not is_complete(folder)
    # the half-written one is not taken for a finished copy: it is replaced by a verified one
    assert save_converted(loaded.model, loaded.tokenizer, folder)
    assert is_complete(folder) and not list(tmp_path.glob(".*.tmp"))


def test_another_process_finishing_first_is_fine(
    tmp_path: Path, tiny_model: Callable[[str], LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = tiny_model("llama")
    folder = tmp_path / "tiny-0123"
    assert save_converted(loaded.model, loaded.tokenizer, folder)
    marker_before = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    assert save_converted(loaded.model, loaded.tokenizer, folder)  # lost the race to itself: keeps the first
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == marker_before
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unwritable_cache_never_stops_a_load(
    tmp_path: Path, tiny_model: Callable[[str], LoadedModel], caplog: pytest.LogCaptureFixture
) -> None:
    loaded = tiny_model("llama")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        assert not save_converted(loaded.model, loaded.tokenizer, blocker / "tiny-0123")
    assert "could not keep a converted copy" in caplog.text
    assert blocker.read_text().startswith("a file")
