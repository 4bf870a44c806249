"""Semantic search over a target, with the same model that filled it: one entry point
(`search_target`) over the target's shape (core.targets.shapes: a vector column's nearest rows, a
chunk set's rows ranked by their best chunk). `search` and `search_chunks` only name the target."""

from __future__ import annotations

import psycopg

from .drain import EmbedderResolver, default_resolver, resolve_embedder
from .embed.base import Embedder, EmbeddingError
from .targets.catalog import TargetKey, resolve
from .targets.shapes import ChunkSetShape, ColumnShape, Hit, Shape

ChunkHit = Hit  # a chunk set's hit: Hit.chunk / Hit.chunk_index name the best chunk

__all__ = ["ChunkHit", "Hit", "search", "search_chunks", "search_target"]


def check_request(query: str, k: int) -> None:
    """A bad k or an empty query is refused before anything is read or embedded."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not query.strip():
        raise ValueError("the search text is empty")


def search_target(conn: psycopg.Connection, query: str, shape: Shape, embedder: Embedder, k: int = 5) -> list[Hit]:
    """The `k` rows of the target nearest to `query` by cosine distance, embedded by `embedder`
    (refused when its vectors cannot be compared with the target's); rows without vectors, or
    with vectors of older input (chunk sets), are not searched."""
    check_request(query, k)
    shape.check_searchable(conn, embedder)
    outcome = embedder.embed([query])
    if outcome.vectors[0] is None:
        raise EmbeddingError(f"could not embed the query: {outcome.errors[0]}")
    return shape.nearest(conn, outcome.vectors[0], k)


def search(
    conn: psycopg.Connection,
    query: str,
    *,
    table: str,
    schema: str = "public",
    content_function: str = "embedding_input",
    embedding_column: str = "embedding",
    key_column: str = "id",
    k: int = 5,
    resolver: EmbedderResolver | None = None,
) -> list[Hit]:
    """The `k` rows of a vector column nearest to `query`, with the model `resolver` gives it."""
    check_request(query, k)
    target = resolve(conn, TargetKey(schema, table, content_function, embedding_column, key_column))
    embedder = resolve_embedder(resolver or default_resolver(), target, conn)
    return search_target(conn, query, ColumnShape(target), embedder, k)


def search_chunks(
    conn: psycopg.Connection,
    query: str,
    embedder: Embedder,
    *,
    table: str,
    schema: str = "public",
    content_function: str = "embedding_input",
    key_column: str = "id",
    chunk_table: str | None = None,
    k: int = 5,
) -> list[Hit]:
    """The `k` parent rows whose best chunk is nearest to `query`, with that chunk; only chunk sets
    of the rows' current input, made by `embedder`'s model, are searched."""
    from .targets.chunks import resolve_chunk_target

    check_request(query, k)
    target = resolve_chunk_target(conn, schema, table, content_function, key_column=key_column, chunk_table=chunk_table)
    return search_target(conn, query, ChunkSetShape(target), embedder, k)
