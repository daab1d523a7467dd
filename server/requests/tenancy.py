"""Whose prefix cache a request may use: the salt the engine mixes into its first KV block's hash.

Two requests share cached blocks (and one's ``cached_tokens`` can reveal the other's prompt) only when their
salts are equal. A request's salt joins its caller's tenant (one per API key when the server has several;
none with one key or none, every caller then being the same one) and the ``cache_salt`` it sent. Each part is
tagged, so no tenant and salt pair can spell another pair's salt.
"""

from __future__ import annotations


def effective_cache_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The engine's ``GenerationRequest.cache_salt`` for a request of ``tenant`` (None: the only one) that sent
    ``cache_salt`` (None: none); None (the unsalted, shared cache) when neither is given."""
    if tenant is None and cache_salt is None:
        return None
    parts = []
    if tenant is not None:
        parts.append(f"tenant:{len(tenant)}:{tenant}")
    if cache_salt is not None:
        parts.append(f"salt:{len(cache_salt)}:{cache_salt}")
    return "\n".join(parts)
