"""Semantic search over an embedded table, with the same model that filled it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import sql

from .drain import EmbedderResolver, default_resolver, resolve_embedder
from .embed.base import Embedder, EmbeddingError
from .targets.catalog import Target, TargetError, TargetKey, check_dimensions, resolve

if TYPE_CHECKING:
    from .targets.chunks import ChunkTarget


@dataclass(frozen=True)
class Hit:
    id: str
    distance: float
    input: str


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
    """The `k` rows nearest to `query` by cosine distance (rows without a vector are not searched)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not query.strip():
        raise ValueError("the search text is empty")
    target = resolve(conn, TargetKey(schema, table, content_function, embedding_column, key_column))
    embedder = resolve_embedder(resolver or default_resolver(), target, conn)
    check_dimensions(target, embedder.identity.dimensions, embedder.identity.model)
    outcome = embedder.embed([query])
    if outcome.vectors[0] is None:
        raise EmbeddingError(f"could not embed the query: {outcome.errors[0]}")
    return nearest(conn, target, outcome.vectors[0], k)


def nearest(conn: psycopg.Connection, target: Target, vector: np.ndarray, k: int) -> list[Hit]:
    rows = conn.execute(
        sql.SQL(
            """select t.{key}::text, t.{col} <=> %s::vector::{vtype}, {fn}(t)::text from {table} t
               where t.{col} is not null order by t.{col} <=> %s::vector::{vtype} limit %s"""
        ).format(key=target.key_sql, col=target.column_sql, vtype=target.vector_type_sql,
                 fn=target.function_sql, table=target.table_sql),
        (np.asarray(vector, dtype=np.float32), np.asarray(vector, dtype=np.float32), k),
    ).fetchall()
    return [Hit(r[0], float(r[1]), r[2]) for r in rows]


@dataclass(frozen=True)
class ChunkHit:
    id: str  # the parent row's key
    distance: float  # of its best chunk
    chunk_index: int
    chunk: str  # the best chunk's text


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
) -> list[ChunkHit]:
    """The `k` parent rows whose best chunk is nearest to `query`, with that chunk; only chunk sets
    of the rows' current input, made by `embedder`'s model, are searched."""
    from .targets.chunks import resolve_chunk_target

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not query.strip():
        raise ValueError("the search text is empty")
    target = resolve_chunk_target(conn, schema, table, content_function, key_column=key_column, chunk_table=chunk_table)
    if embedder.identity.dimensions != target.dimensions:
        raise TargetError(f"{target.chunk_table} holds {target.dimensions}-dim vectors but model "
                          f"{embedder.identity.model} makes {embedder.identity.dimensions}")
    others = [m for (m,) in conn.execute(
        sql.SQL("select distinct model from {} where model <> %s limit 3").format(target.chunks_sql),
        (embedder.identity.key,)).fetchall()]
    if others:
        raise TargetError(f"{target.chunk_table} holds vectors of {', '.join(others)}, not only of "
                          f"{embedder.identity.key}: search with that model, or finish the backfill")
    outcome = embedder.embed([query])
    if outcome.vectors[0] is None:
        raise EmbeddingError(f"could not embed the query: {outcome.errors[0]}")
    return nearest_chunks(conn, target, outcome.vectors[0], k)


def nearest_chunks(conn: psycopg.Connection, target: "ChunkTarget", vector: np.ndarray, k: int) -> list[ChunkHit]:
    rows = conn.execute(
        "select parent_key, distance, chunk_index, chunk from autoembed.search_chunks(%s::regclass, %s::vector, %s,"
        " %s::regproc::oid::regprocedure)",
        (sql.Identifier(target.schema, target.chunk_table).as_string(conn), np.asarray(vector, dtype=np.float32),
         k, target.function),
    ).fetchall()
    return [ChunkHit(r[0], float(r[1]), r[2], r[3]) for r in rows]
