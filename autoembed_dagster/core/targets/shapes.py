"""A target's shape: what differs between a vector column and a chunk set for everything that reads
a target whole, behind one interface (`Shape`), one implementation per shape, picked by
`shape_of(target)`:

- `counts`: the one coverage / staleness / bad-row count of a target (core.health's status and
  checks, core.migrate's backfill progress and promotion);
- `nearest`: its nearest neighbours to a query vector (core.search);
- `check_searchable`: whether vectors of a model can be compared with what it holds;
- where its vectors are (`vectors_relation`, `vectors_column`, `vectors_label`).

Callers are written once against `Shape`; a third shape (a multi-column input, a second vector per
row) is a third implementation here, not a branch in each caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import psycopg
from psycopg import sql

from . import chunks
from .badrows import input_lateral, scan_isolating
from .catalog import Target, TargetError, check_dimensions
from .shadow import Coverage

if TYPE_CHECKING:
    from ..embed.base import Embedder

MISCONFIGURED_MODEL = "(misconfigured model)"  # the model key counted against when none can be made


@dataclass(frozen=True)
class Made:
    """What current vectors are made by: the model's key, and for a chunk set the splitter's key."""

    model: str
    splitter: str | None = None


@dataclass(frozen=True)
class Counts:
    """One scan of a target: rows (documents of a chunk set) that hold the vectors of their current
    input under `Made`, out of those with input, the rows whose content function raises, and:"""

    coverage: Coverage
    missing: int  # with input and no vectors at all (pending, or never queued)
    stale: int  # vectors not made from the current input by the current model (and chunking)


@dataclass(frozen=True)
class Hit:
    """A search result: the row's key, the distance and the text matched (the row's input, or the
    text of its best chunk with `chunk_index`)."""

    id: str
    distance: float
    input: str
    chunk_index: int | None = None

    @property
    def chunk(self) -> str:
        return self.input


class Shape(Protocol):
    unit: str  # what a count counts: "rows" or "documents"
    label: str  # for messages: schema.table.column, or schema.table -> chunk table
    vectors_relation: str  # the relation holding the vectors (regclass text)
    vectors_column: str

    @property
    def vectors_label(self) -> str:
        """Where the vectors are, for messages."""

    def made_by(self, embedder: "Embedder | None") -> Made | None:
        """What the target's vectors are current under with `embedder`; None when that cannot be
        said without one (the chunking needs the model's tokenizer)."""

    def counts(self, conn: psycopg.Connection, made: Made, shard: int | None = None,
               shards: int | None = None) -> Counts:
        """Coverage, missing and stale (of one shard, or all), from one scan of the table."""

    def check_searchable(self, conn: psycopg.Connection, embedder: "Embedder") -> None:
        """Raise TargetError when the query vectors of `embedder` cannot be compared with the target's."""

    def nearest(self, conn: psycopg.Connection, vector: np.ndarray, k: int) -> list[Hit]:
        """The `k` rows nearest to `vector` by cosine distance."""


def shape_of(target: Target) -> Shape:
    """The shape of a resolved or registered target."""
    if target.chunked:
        return ChunkSetShape(chunk_target_of(target), target.chunk_tokens, target.chunk_overlap)
    return ColumnShape(target)


def chunk_target_of(target: Target) -> chunks.ChunkTarget:
    """The chunk table side of a registered chunk target."""
    assert target.chunk_table is not None, target
    return chunks.ChunkTarget(target.key.schema, target.key.table, target.key.key_column, target.key_type,
                              target.function, target.chunk_table, target.vector_type, target.dimensions)


# -- a vector column -------------------------------------------------------------------------------
class ColumnShape:
    unit = "rows"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.label = target.key.label
        self.vectors_relation = target.regclass
        self.vectors_column = target.key.embedding_column

    @property
    def vectors_label(self) -> str:
        return f"{self.vectors_relation}.{self.vectors_column}"

    def made_by(self, embedder: "Embedder | None") -> Made | None:
        # Without a model every vector counts as another model's: coverage and staleness say so.
        return Made(embedder.identity.key if embedder is not None else MISCONFIGURED_MODEL)

    def counts(self, conn: psycopg.Connection, made: Made, shard: int | None = None,
               shards: int | None = None) -> Counts:
        """One scan of the table (its content function and hash per row) against embedding_state.
        Rows whose content function raises are counted apart (targets.badrows.scan_isolating)."""
        target = self.target

        def query(safe: bool) -> sql.Composable:
            return sql.SQL(
                """
                select count(*), count(*) filter (where x.embeddable),
                       count(*) filter (where x.embeddable and x.has_vector and s.model = %(model)s
                                        and s.content_hash = x.h),
                       count(*) filter (where x.embeddable and not x.has_vector),
                       count(*) filter (where x.has_vector
                                        and (s.row_id is null or s.content_hash is distinct from x.h
                                             or s.model is distinct from %(model)s)),
                       count(*) filter (where x.error is not null),
                       min('key ' || x.k || ': ' || x.error)
                from (select r.k, r.has_vector, autoembed.content_hash(r.input) as h, r.error,
                             r.input is not null and btrim(r.input) <> '' as embeddable
                      from (select t.{key}::text as k, i.input, i.error, t.{col} is not null as has_vector
                            from {table} t {lateral}
                            where %(shards)s::integer is null
                               or autoembed.shard_of(t.{key}::text, %(shards)s) = %(shard)s) r) x
                -- A primary-key probe per row: with stale statistics on embedding_state (it grows fast
                -- during a backfill) a plain join became a nested loop over every state row.
                left join lateral (
                    select s.row_id, s.model, s.content_hash from autoembed.embedding_state s
                    where s.target_id = (select autoembed.state_target(%(schema)s, %(table)s, %(column)s))
                      and s.row_id = x.k
                    limit 1) s on true
                """
            ).format(key=target.key_sql, col=target.column_sql, table=target.table_sql,
                     lateral=input_lateral(conn, target.function_sql, "t", safe))

        rows, embeddable, current, missing, stale, unreadable, error = scan_isolating(conn, query, {
            "model": made.model, "shards": shards, "shard": shard, "schema": target.key.schema,
            "table": target.key.table, "column": target.key.embedding_column,
        })
        return Counts(Coverage(rows, embeddable, current, unreadable, error), missing, stale)

    def check_searchable(self, conn: psycopg.Connection, embedder: "Embedder") -> None:
        check_dimensions(self.target, embedder.identity.dimensions, embedder.identity.model)

    def nearest(self, conn: psycopg.Connection, vector: np.ndarray, k: int) -> list[Hit]:
        """The `k` rows nearest to `vector`; a hit whose content function raises is skipped (its
        input cannot be shown), the others are found (targets.badrows.input_lateral)."""
        from .badrows import input_lateral, row_error

        target = self.target
        vector = np.asarray(vector, dtype=np.float32)

        def query(safe: bool) -> sql.Composable:
            return sql.SQL(
                """select h.key, h.d, i.input from
                     (select t as r, t.{key}::text as key, t.{col} <=> %s::vector::{vtype} as d from {table} t
                      where t.{col} is not null order by t.{col} <=> %s::vector::{vtype} limit %s) h
                   {lateral} where i.error is null order by h.d"""
            ).format(key=target.key_sql, col=target.column_sql, vtype=target.vector_type_sql,
                     table=target.table_sql, lateral=input_lateral(conn, target.function_sql, "r", safe))

        params = (vector, vector, k)
        try:
            with conn.transaction():
                rows = conn.execute(query(False), params).fetchall()
        except Exception as exc:
            if not row_error(exc):
                raise
            rows = conn.execute(query(True), params).fetchall()
        return [Hit(r[0], float(r[1]), r[2]) for r in rows]


# -- a chunk set -----------------------------------------------------------------------------------
class ChunkSetShape:
    """A parent table's documents, each embedded as the chunk set of its input. `chunk_tokens` /
    `chunk_overlap`: the chunking current sets are made with (a registered target's, or the
    pipeline's declared sizes); without them only search works."""

    unit = "documents"

    def __init__(self, target: chunks.ChunkTarget, chunk_tokens: int | None = None, chunk_overlap: int = 0) -> None:
        self.target = target
        self.chunk_tokens, self.chunk_overlap = chunk_tokens, chunk_overlap
        self.label = target.label
        self.vectors_relation = sql.Identifier(target.schema, target.chunk_table).as_string(None)
        self.vectors_column = chunks.VECTOR_COLUMN

    @property
    def vectors_label(self) -> str:
        return f"{self.vectors_relation}.{self.vectors_column}"

    def made_by(self, embedder: "Embedder | None") -> Made | None:
        from .splitter import splitter_for

        if embedder is None:
            return None
        if self.chunk_tokens is None:
            raise TargetError(f"{self.label}: no chunk sizes known (enrol it with --chunk-tokens)")
        return Made(embedder.identity.key, splitter_for(embedder, self.chunk_tokens, self.chunk_overlap).key)

    def counts(self, conn: psycopg.Connection, made: Made, shard: int | None = None,
               shards: int | None = None) -> Counts:
        """A document is current when its whole chunk set is the chunking of its current input
        under the model and the splitter (core.targets.chunks.document_counts)."""
        assert made.splitter is not None, made
        c = chunks.document_counts(conn, self.target, made.model, made.splitter, shard, shards)
        return Counts(c.coverage, c.without_chunks, c.stale)

    def check_searchable(self, conn: psycopg.Connection, embedder: "Embedder") -> None:
        target, identity = self.target, embedder.identity
        if identity.dimensions != target.dimensions:
            raise TargetError(f"{target.chunk_table} holds {target.dimensions}-dim vectors but model "
                              f"{identity.model} makes {identity.dimensions}")
        others = [m for (m,) in conn.execute(
            sql.SQL("select distinct model from {} where model <> %s limit 3").format(target.chunks_sql),
            (identity.key,)).fetchall()]
        if others:
            raise TargetError(f"{target.chunk_table} holds vectors of {', '.join(others)}, not only of "
                              f"{identity.key}: search with that model, or finish the backfill")

    def nearest(self, conn: psycopg.Connection, vector: np.ndarray, k: int) -> list[Hit]:
        """The `k` parents whose best chunk is nearest, each with that chunk (sql/011 search_chunks:
        only chunk sets of the parents' current input count)."""
        target = self.target
        rows = conn.execute(
            "select parent_key, distance, chunk_index, chunk from autoembed.search_chunks(%s::regclass, %s::vector,"
            " %s, %s::regproc::oid::regprocedure)",
            (sql.Identifier(target.schema, target.chunk_table).as_string(conn), np.asarray(vector, dtype=np.float32),
             k, target.function),
        ).fetchall()
        return [Hit(r[0], float(r[1]), r[3], r[2]) for r in rows]
