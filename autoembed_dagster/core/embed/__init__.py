"""Embedding providers behind one interface; `make_embedder()` picks one from settings. Also the
provider rate limit shared by every worker (`ratelimit`) and the local model's files (`model_files/`).

May import: core.config, core.db."""

from __future__ import annotations

import hashlib
import os
import threading

from ..config import ConfigError, EmbedderSettings
from .base import KNOWN_DIMENSIONS, Embedder, EmbeddingError, EmbedOutcome, ModelIdentity, supports_dimensions

__all__ = [
    "ConfigError",
    "Embedder",
    "EmbedderSettings",
    "EmbeddingError",
    "EmbedOutcome",
    "ModelIdentity",
    "clear_embedder_cache",
    "make_embedder",
    "native_dimensions",
    "size_problem",
]

_lock = threading.Lock()
_cache: dict[tuple[EmbedderSettings, int | None, str | None], Embedder] = {}


def size_problem(provider: str, model: str, dimensions: int | None) -> str | None:
    """Why `model` cannot make `dimensions`-dimensional vectors, known without loading the model or
    calling the provider (what a declaration is checked with); None when it can, or when only the
    provider can tell (a compatible server's own model)."""
    if dimensions is None:
        return None
    if provider == "local":
        from .local import DIMENSIONS, MODEL

        if dimensions != DIMENSIONS:
            return f"the local model {MODEL} makes {DIMENSIONS}-dimensional vectors only, not {dimensions}"
        return None
    native = KNOWN_DIMENSIONS.get(model)
    if native is None:
        return None
    if not supports_dimensions(model) and dimensions != native:
        return f"{model} makes {native}-dimensional vectors only, not {dimensions}"
    if dimensions > native:
        return f"{model} makes at most {native} dimensions, not {dimensions}"
    return None


def _key_fingerprint() -> str | None:
    # A rotated OPENAI_API_KEY must build a new client; keep only a hash of it, never the key.
    key = os.environ.get("OPENAI_API_KEY")
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def make_embedder(settings: EmbedderSettings | None = None, dimensions: int | None = None) -> Embedder:
    """The embedder for `settings` (default: from the environment), for a column of `dimensions`.

    Cached per (settings, dimensions), so calling this per batch is cheap and the local model
    loads once per process. Raises ConfigError for an impossible combination.
    """
    settings = settings or EmbedderSettings.from_env()
    cache_key = (settings, dimensions, _key_fingerprint() if settings.provider == "openai" else None)
    with _lock:
        cached = _cache.get(cache_key)
    if cached is not None:
        return cached
    if settings.provider == "openai":
        from .openai_embedder import OpenAIEmbedder

        embedder: Embedder = OpenAIEmbedder(settings, dimensions)
    elif settings.provider == "local":
        from .local import LocalEmbedder

        embedder = LocalEmbedder(settings, dimensions)
    else:
        raise ConfigError(f"unknown embedding provider {settings.provider!r}")
    with _lock:
        return _cache.setdefault(cache_key, embedder)


def clear_embedder_cache() -> None:
    """Forget cached embedders (tests; after changing the environment)."""
    with _lock:
        _cache.clear()


def native_dimensions(provider: str, model: str) -> tuple[int | None, bool]:
    """(the model's output size without a `dimensions` request, whether it can make other sizes)."""
    if provider == "local":
        from .local import DIMENSIONS

        return DIMENSIONS, False
    return KNOWN_DIMENSIONS.get(model), supports_dimensions(model) or model not in KNOWN_DIMENSIONS
