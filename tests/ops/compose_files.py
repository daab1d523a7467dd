"""Reading the shipped Compose files as Compose does, for the tests that check them without running Compose:
YAML with Compose's ``!reset`` tag, and the merge of an override file onto the base."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


class Reset:
    """Compose's ``!reset`` tag: the value it is set on is removed when the files are merged."""


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def parse_compose(text: str) -> dict[str, Any]:
    """A Compose file's text as a mapping (``!reset`` values as :class:`Reset`)."""
    return yaml.load(text, Loader=_ComposeLoader)  # a SafeLoader subclass


def load_compose(path: Path) -> dict[str, Any]:
    return parse_compose(path.read_text())


def merge_compose(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge for what the shipped overrides use: mappings merged key by key, ``!reset`` removing a key,
    scalars replaced. A list in an override is refused: Compose merges some lists and replaces others, which is
    not emulated here (an override uses ``!reset`` or a mapping instead)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_compose(merged[key], value)
        elif isinstance(value, list):
            raise NotImplementedError(f"list merge of {key!r} is not emulated; use !reset or a mapping")
        else:
            merged[key] = copy.deepcopy(value)
    return merged
