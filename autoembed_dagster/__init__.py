"""autoembed-dagster: automatic embeddings for Postgres, run by Dagster.

`autoembed_dagster.EmbeddingPipeline` is the Dagster component type (imported on first use, so the
`autoembed` CLI starts without importing Dagster)."""

__version__ = "0.1.0"

_LAZY = {"EmbeddingPipeline": "autoembed_dagster.components.embedding_pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoembed_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
