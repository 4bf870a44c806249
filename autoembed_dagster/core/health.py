"""Plain-SQL health metrics of an embedded table (what the Dagster checks report). No Dagster
imports: the CLI or a test can call these directly.

- coverage: rows whose stored vector is the embedding of their *current* input under the
  pipeline's *current* model, out of the rows that have something to embed;
- staleness: rows that carry a vector whose recorded content hash or model differs from what the
  row and the pipeline say now (or a vector with no record of what made it);
- dead letters of the table;
- the column's declared size against the model's output size.

The queue's metrics (what the queue sensor reports) are core.queue.pgmq.metrics().

May import: core.config, core.pipelines, core.db, core.embed, core.targets, core.queue, core.drain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from .targets.catalog import Target, TargetError, TargetKey, resolve
from .targets.shapes import Made, shape_of

if TYPE_CHECKING:
    from .embed.base import Embedder
    from .pipelines import Pipeline

# US$ per 1M input tokens (public list prices); the local model costs nothing per token.
# AUTOEMBED_PRICE_PER_MTOK overrides for every remote model (e.g. a negotiated or self-hosted price).
PRICE_PER_MILLION_TOKENS = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}


def price_per_million_tokens(provider: str, model: str) -> float | None:
    """US$ per 1M tokens for (provider, model); 0 for the local model; None when unknown."""
    if provider == "local":
        return 0.0
    override = os.environ.get("AUTOEMBED_PRICE_PER_MTOK")
    if override:
        try:
            return float(override)
        except ValueError:
            return None
    return PRICE_PER_MILLION_TOKENS.get(model)


def estimated_cost(tokens: int, provider: str, model: str) -> float | None:
    price = price_per_million_tokens(provider, model)
    return None if price is None else tokens * price / 1_000_000


# -- tables --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableHealth:
    """A target's health (rows of a vector column, or documents of a chunk set)."""

    table: str  # schema.table.column, or schema.table -> chunk table
    model: str  # the model key vectors must carry (provider:model:dimensions)
    rows: int
    embeddable: int  # rows whose input is not NULL/blank
    current: int  # rows with the vector of their current input under the current model
    missing: int  # embeddable rows without a vector (pending, or never enqueued)
    stale: int  # rows with a vector that is not the current input's under the current model
    dead_letters: int
    # Rows whose content function raises (not counted embeddable), and one of the errors.
    unreadable: int = 0
    unreadable_error: str | None = None

    @property
    def coverage(self) -> float:
        return self.current / self.embeddable if self.embeddable else 1.0


def target_health(conn: psycopg.Connection, target: Target, by: "Embedder | Made | str | None") -> TableHealth:
    """The health of any target from its shape's one scan (core.targets.shapes.Shape.counts). `by`:
    the embedder whose vectors are current (a chunk set's chunking needs its tokenizer; None: no
    model can be made), or what they are made by (`Made`, or for a vector column its model key)."""
    shape = shape_of(target)
    made = Made(by) if isinstance(by, str) else by if isinstance(by, Made) else shape.made_by(by)
    if made is None:
        raise TargetError(f"{shape.label}: which chunk sets are current needs the model's tokenizer")
    c = shape.counts(conn, made)
    return TableHealth(table=shape.label, model=made.model, rows=c.coverage.rows, embeddable=c.coverage.embeddable,
                       current=c.coverage.current, missing=c.missing, stale=c.stale,
                       dead_letters=dead_letter_count(conn, target.key), unreadable=c.coverage.unreadable,
                       unreadable_error=c.coverage.unreadable_error)


def pipeline_target(conn: psycopg.Connection, p: "Pipeline") -> tuple[Target | None, str | None]:
    """(the target a pipeline keeps embedded, None), or (None, why it cannot be used): its vector
    column, or the registered chunk target of a chunked pipeline (with the sizes it was enrolled with)."""
    if not p.chunked:
        return resolve_target(conn, TargetKey(p.schema, p.table, p.content_function, p.embedding_column,
                                               p.key_column))
    for t in chunk_targets(conn):
        if (t.key.schema, t.key.table, t.chunk_table, t.key.key_column) == (p.schema, p.table, p.chunk_table,
                                                                           p.key_column):
            return t, None
    return None, (f"{p.qualified_table} is not enrolled for chunks into {p.schema}.{p.chunk_table}: "
                  f"autoembed enroll {p.qualified_table} --content-function {p.content_function} "
                  f"--chunk-tokens {p.chunk_tokens}"
                  + (f" --chunk-overlap {p.chunk_overlap}" if p.chunk_overlap else ""))


def vectors_label(target: Target) -> str:
    """Where a target's vectors are, for messages: `table.column`, or the chunk table's vectors."""
    return shape_of(target).vectors_label


def registered_targets(conn: psycopg.Connection, *, chunked: bool | None = None) -> list[Target]:
    """The registered targets that still resolve, both shapes (or only chunk sets: `chunked`, only
    vector columns: not `chunked`), by id. Left out: a broken one (autoembed.broken_targets names
    it), a model migration's shadow column (its migration's status counts it)."""
    from .targets.catalog import lookup_registered

    found = []
    for (target_id,) in conn.execute(
            """select id from autoembed.target_catalog
               where origin is distinct from 'migration'
                 and (%(chunked)s::boolean is null or (chunk_tokens is not null) = %(chunked)s)
               order by id""", {"chunked": chunked}).fetchall():
        try:
            found.append(lookup_registered(conn, target_id=target_id)[0])
        except TargetError:
            continue
    return found


def chunk_targets(conn: psycopg.Connection) -> list[Target]:
    """The registered chunk targets that still resolve (a broken one is left out)."""
    return registered_targets(conn, chunked=True)


def pipeline_columns(column: str) -> list[str]:
    """Every column a pipeline's jobs may name: the live one and a migration's shadow and old ones."""
    from .targets.shadow import OLD_SUFFIX, SHADOW_SUFFIX, suffixed

    return [column, suffixed(column, SHADOW_SUFFIX), suffixed(column, OLD_SUFFIX)]


def dead_letter_count(conn: psycopg.Connection, key: TargetKey) -> int:
    """Dead letters of the table's jobs for its column, a migration's shadow column included."""
    return conn.execute(
        """select count(*) from autoembed.dead_letters
           where message ->> 'schema' = %s and message ->> 'table' = %s and message ->> 'embeddingColumn' = any(%s)""",
        (key.schema, key.table, pipeline_columns(key.embedding_column)),
    ).fetchone()[0]


def held_models(conn: psycopg.Connection, key: TargetKey) -> list[tuple[str, int]]:
    """(model, rows) the column's stored vectors were made with, most common first."""
    from .targets.shadow import column_models

    return column_models(conn, key.schema, key.table, key.embedding_column)


@dataclass(frozen=True)
class VectorIndex:
    name: str
    method: str  # hnsw, ivfflat, ...
    size_bytes: int
    definition: str


def vector_indexes(conn: psycopg.Connection, target: Target) -> list[VectorIndex]:
    """Indexes over the target's vectors (the vector index asset)."""
    shape = shape_of(target)
    return indexes_on(conn, shape.vectors_relation, shape.vectors_column)


def indexes_on(conn: psycopg.Connection, relation: str, column: str) -> list[VectorIndex]:
    """Indexes of `relation` (regclass text) that cover `column`."""
    rows = conn.execute(
        """select i.indexrelid::regclass::text, am.amname, pg_relation_size(i.indexrelid),
                  pg_get_indexdef(i.indexrelid)
           from pg_index i
           join pg_class c on c.oid = i.indexrelid
           join pg_am am on am.oid = c.relam
           join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
           where i.indrelid = %s::regclass and a.attname = %s
           order by 1""",
        (relation, column),
    ).fetchall()
    return [VectorIndex(*r) for r in rows]


def resolve_target(conn: psycopg.Connection, key: TargetKey) -> tuple[Target | None, str | None]:
    """(target, None), or (None, why the table/column/function cannot be used)."""
    try:
        return resolve(conn, key), None
    except TargetError as exc:
        return None, str(exc)


# -- targets the schema broke, and what the project repaired by itself (sql/015) ------------------
@dataclass(frozen=True)
class BrokenTarget:
    target: int
    schema: str
    table: str
    vectors: str  # the embedding column, or the chunk table
    problem: str  # 'content function dropped', 'key not unique', 'triggers missing', 'queue dropped'
    detail: str  # what happened and what to do

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table} -> {self.vectors}"


def broken_targets(conn: psycopg.Connection, schema: str | None = None, table: str | None = None) -> list[BrokenTarget]:
    """Registered targets (of one table, or all) that cannot be kept current as they stand: never
    reported clean by status or the checks."""
    rows = conn.execute(
        """select target_id, schema_name, table_name, vectors, problem, detail from autoembed.broken_targets
           where (%(s)s::text is null or schema_name = %(s)s) and (%(t)s::text is null or table_name = %(t)s)
           order by target_id, problem""", {"s": schema, "t": table}).fetchall()
    return [BrokenTarget(*r) for r in rows]


@dataclass(frozen=True)
class Repair:
    at: object  # datetime
    target: int | None
    what: str


def repairs(conn: psycopg.Connection, limit: int = 10) -> list[Repair]:
    """The latest repairs the project made by itself (a queue re-created, a function re-bound), oldest first."""
    rows = conn.execute("select repaired_at, target_id, what from autoembed.repairs order by id desc limit %s",
                        (limit,)).fetchall()
    return [Repair(*r) for r in reversed(rows)]


# -- dead letters that cannot apply any more -------------------------------------------------------
@dataclass(frozen=True)
class OrphanedDeadLetter:
    msg_id: int
    target: str  # schema.table.column as the message names it
    why: str


def orphaned_dead_letters(conn: psycopg.Connection, queue: str, ids: list[int] | None = None) -> list[OrphanedDeadLetter]:
    """Dead letters of `queue` whose table or column no longer exists (e.g. the shadow column of an
    aborted migration, a dropped table): retrying them can never succeed."""
    rows = conn.execute(
        """select d.msg_id,
                  concat_ws('.', d.message ->> 'schema', d.message ->> 'table', d.message ->> 'embeddingColumn'),
                  case when d.message ->> 'table' is null then 'the message names no table'
                       when r.t is null then 'the table no longer exists'
                       else 'the column no longer exists' end
           from autoembed.dead_letters d
           cross join lateral (select case when d.message ->> 'schema' is not null and d.message ->> 'table' is not null
                                      then to_regclass(format('%%I.%%I', d.message ->> 'schema', d.message ->> 'table'))
                                      end as t) r
           where d.queue_name = %s and (%s::bigint[] is null or d.msg_id = any(%s))
             and (r.t is null or not exists (
                   select 1 from pg_attribute a where a.attrelid = r.t and a.attnum > 0 and not a.attisdropped
                     and a.attname = d.message ->> 'embeddingColumn'))
             -- a chunk target's job names its chunk table instead of a column
             and not (r.t is not null and d.message ->> 'chunkTable' is not null
                      and to_regclass(format('%%I.%%I', d.message ->> 'schema', d.message ->> 'chunkTable')) is not null)
           order by d.msg_id""",
        (queue, ids, ids)).fetchall()
    return [OrphanedDeadLetter(*r) for r in rows]


def purge_dead_letters(conn: psycopg.Connection, queue: str, ids: list[int]) -> int:
    """Delete these dead letters (their archived pgmq messages stay, as history)."""
    return conn.execute("delete from autoembed.dead_letters where queue_name = %s and msg_id = any(%s)",
                        (queue, ids)).rowcount
