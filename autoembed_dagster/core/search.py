"""Semantic search over an embedded table, with the same model that filled it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from .drain import EmbedderResolver, default_resolver, resolve_embedder
from .embedders.base import EmbeddingError
from .targets import Target, TargetKey, check_dimensions, resolve


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
