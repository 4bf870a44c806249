"""A target's shape: what differs between a vector column and a chunk set for everything that reads
a target whole, behind one interface (`Shape`), one implementation per shape, picked by
`shape_of(target)`:

- `counts`: the one coverage / staleness / bad-row count of a target (core.health's status and
  checks, core.migrate's backfill progress and promotion);
- `nearest`: its nearest neighbours to a query vector (core.search);
- `check_searchable`: whether vectors of a model can be compared with what it holds;
- where its vectors are (`vectors_relation`, `vectors_column`, `vectors_label`).

And a model change of a target (`ModelChange`: `ColumnChange`, a shadow column recorded in
autoembed.model_migrations; `ChunkSetChange`, a shadow chunk table): where it stands (`state`:
its shadow and retired copy), how complete its shadow is, and the steps that make, promote, roll
back and drop that shadow. The flow over them (which action each state allows, the locked
transaction, the coverage check, the messages) is written once in core.migrate.migration.

Callers are written once against `Shape` / `ModelChange`; a third shape (a multi-column input, a
second vector per row) is a third implementation here, not a branch in each caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import psycopg
from psycopg import sql

from . import chunks
from . import shadow as sh
from .badrows import input_lateral, scan_isolating
from .catalog import Target, TargetError, TargetKey, check_dimensions, resolve
from .models import MIGRATION_SELECT, Migration, migration_from_row
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


# -- a model change: a target's shadow, promoted, rolled back, dropped ------------------------------
@dataclass(frozen=True)
class ShadowState:
    """Where a target's model change stands: its shadow (while backfilling: where the new model is
    written) and its retired copy (once promoted: the previous vectors, kept for rollback)."""

    shadow: str | None
    old: str | None
    old_exists: bool = True  # the retired copy is still there (a column dropped by hand is not)

    @property
    def status(self) -> str:
        return "backfilling" if self.shadow else "promoted" if self.old else "none"


@dataclass
class Swapped:
    """What a promotion did besides the swap."""

    old: str  # the retired copy, kept for rollback
    indexes: list[str] = field(default_factory=list)  # vector indexes now serving the live vectors
    triggers: list[str] = field(default_factory=list)  # triggers re-pointed at a new content function
    purged_jobs: int = 0  # queued jobs of the shadow dropped


class ModelChange(Protocol):
    """A target's model change, per shape: the steps core.migrate.migration's one flow runs (each
    inside its locked transaction, after it checked that `state` allows them)."""

    label: str  # the target, for messages
    unit: str  # what coverage counts: "rows" or "documents"
    noun: str  # what the shadow is: "column" or "chunk table"
    pipeline: str | None  # the pipeline's name, for the commands messages name
    shadow_name: str  # the shadow's name (whether or not it exists)
    model: str  # the model (identity key) the shadow's vectors must be of

    def state(self, conn: psycopg.Connection, *, lock: bool = False) -> ShadowState:
        """Where it stands now (`lock`: and hold it until the transaction ends)."""

    def coverage(self, conn: psycopg.Connection, state: ShadowState) -> Coverage:
        """How much of the shadow (while backfilling; else of the live vectors) is current."""

    def prepare(self, conn: psycopg.Connection) -> list[str]:
        """Before a promotion's transaction (no lock held): what can be built meanwhile; notes."""

    def lock_writers(self, conn: psycopg.Connection) -> None:
        """Make writers wait (readers not) until the promotion's transaction ends."""

    def promote(self, conn: psycopg.Connection) -> Swapped:
        """Swap the shadow in; the live vectors become the retired copy."""

    def rollback(self, conn: psycopg.Connection) -> None:
        """Swap the retired copy back in; the promoted vectors become the shadow again, and what
        changed meanwhile is queued again."""

    def drop_old(self, conn: psycopg.Connection) -> None:
        """Drop the retired copy: the change is finished."""

    def drop_shadow(self, conn: psycopg.Connection) -> None:
        """Drop the shadow of a change given up, and queue what only it holds current."""


class ColumnChange:
    """A vector column's model migration (core.migrate.migration): the shadow column `<col>__next`
    beside the live one, recorded in autoembed.model_migrations (which the drain's resolvers and
    the guard trigger on embedding_state read); a promotion renames the columns and moves their
    targets, indexes and triggers; the live column becomes `<col>__old`."""

    unit = "rows"
    noun = "column"

    def __init__(self, m: Migration, pipeline: str | None = None) -> None:
        self.m, self.pipeline = m, pipeline
        self.label, self.shadow_name, self.model = m.label, m.shadow_column, m.model_key

    def _reload(self, conn: psycopg.Connection, lock: bool = False) -> Migration:
        q = MIGRATION_SELECT + sql.SQL(" where id = %s") + (sql.SQL(" for update") if lock else sql.SQL(""))
        fresh = migration_from_row(conn.execute(q, (self.m.id,)).fetchone())
        if fresh is None:
            raise TargetError(f"migration {self.m.id} of {self.label} no longer exists")
        self.m = fresh
        return fresh

    def _set_status(self, conn: psycopg.Connection, status: str, stamp: sql.Composable) -> None:
        conn.execute(sql.SQL("update autoembed.model_migrations set status = %s, {} where id = %s").format(stamp),
                     (status, self.m.id))
        self._reload(conn)

    def state(self, conn: psycopg.Connection, *, lock: bool = False) -> ShadowState:
        m = self._reload(conn, lock)
        if m.status == "backfilling":
            return ShadowState(m.shadow_column, None)
        if m.status == "promoted":
            return ShadowState(None, m.old_column, sh.has_column(conn, m, m.old_column))
        return ShadowState(None, None)  # finished or aborted

    def coverage(self, conn: psycopg.Connection, state: ShadowState) -> Coverage:
        key = self.m.shadow_key if state.status == "backfilling" else self.m.live_key
        return shape_of(resolve(conn, key)).counts(conn, Made(self.model)).coverage

    def make(self, conn: psycopg.Connection) -> None:
        """The shadow column (the new size), its registered target, the trigger queueing its jobs on
        every changed row (the ordinary drain embeds them) and the guard of the records."""
        m = self.m
        conn.execute(sql.SQL("alter table {} add column {} {}").format(
            sh.table_sql(m), sql.Identifier(m.shadow_column), sql.SQL(f"{m.vector_type}({int(m.dimensions)})")))
        sh.register_shadow(conn, m)
        sh.install_shadow_trigger(conn, m)
        conn.execute("select autoembed.install_migration_guard(%s)", (m.id,))

    def prepare(self, conn: psycopg.Connection) -> list[str]:
        return sh.prepare_indexes(conn, self.m)[1]

    def lock_writers(self, conn: psycopg.Connection) -> None:
        conn.execute(sql.SQL("lock table {} in share row exclusive mode").format(sh.table_sql(self.m)))

    def promote(self, conn: psycopg.Connection) -> Swapped:
        m = self.m
        sh.drop_shadow_trigger(conn, m)
        purged = sh.purge_jobs(conn, m, m.shadow_column)
        sh.rename_column(conn, m, m.embedding_column, m.old_column)
        sh.rename_column(conn, m, m.shadow_column, m.embedding_column)
        sh.swap_targets(conn, m, m.embedding_column, m.old_column, m.content_function)
        indexes = sh.swap_index_names(conn, m, promoting=True)
        triggers = sh.retarget_triggers(conn, m, m.old_content_function, m.content_function)
        self._set_status(conn, "promoted", sql.SQL("promoted_at = now()"))
        return Swapped(m.old_column, indexes, triggers, purged)

    def rollback(self, conn: psycopg.Connection) -> None:
        """Old vectors whose row changed since the promotion are cleared and queued again, so
        search never returns a vector of old content."""
        m = self.m
        conn.execute(sql.SQL("lock table {} in access exclusive mode").format(sh.table_sql(m)))
        sh.rename_column(conn, m, m.embedding_column, m.shadow_column)
        sh.rename_column(conn, m, m.old_column, m.embedding_column)
        sh.swap_targets(conn, m, m.embedding_column, m.shadow_column, m.old_content_function)
        sh.swap_index_names(conn, m, promoting=False)
        sh.retarget_triggers(conn, m, m.content_function, m.old_content_function)
        self._set_status(conn, "backfilling", sql.SQL("promoted_at = null"))
        m = self.m
        sh.install_shadow_trigger(conn, m)
        sh.purge_jobs(conn, m, m.shadow_column)
        # Both columns: clear vectors whose record does not match the row's current input, then
        # queue every row left without one.
        for column, fn in ((m.embedding_column, m.old_content_function), (m.shadow_column, m.content_function)):
            target = resolve(conn, TargetKey(m.schema_name, m.table_name, fn, column, m.key_column))
            sh.clear_vectors(conn, target, sql.SQL(
                """t.{col} is not null and not exists (
                       select 1 from autoembed.embedding_state s
                       where s.target_id = (select autoembed.state_target(%s, %s, %s))
                         and s.row_id = t.{key}::text and s.content_hash = autoembed.content_hash({fn}(t)::text))"""
            ).format(col=target.column_sql, key=target.key_sql, fn=target.function_sql),
                (m.schema_name, m.table_name, column))
            sh.enqueue(conn, m, column, sql.SQL("t.{col} is null and nullif(btrim({fn}(t)::text), '') is not null")
                       .format(col=target.column_sql, fn=target.function_sql))

    def drop_old(self, conn: psycopg.Connection) -> None:
        m = self.m
        sh.unregister(conn, m, m.old_column)
        sh.drop_column(conn, m, m.old_column)
        sh.drop_guard_trigger(conn, m)
        self._set_status(conn, "finished", sql.SQL("finished_at = now()"))

    def drop_shadow(self, conn: psycopg.Connection) -> None:
        m = self.m
        sh.drop_shadow_trigger(conn, m)
        sh.unregister(conn, m, m.shadow_column)
        sh.drop_column(conn, m, m.shadow_column)
        sh.purge_jobs(conn, m, m.shadow_column)
        sh.drop_guard_trigger(conn, m)
        self._set_status(conn, "aborted", sql.SQL("finished_at = now()"))


def chunk_shadow_of(conn: psycopg.Connection, target: Target) -> Target | None:
    """A chunk target's shadow chunk table (a model change in progress), or None. Its name is
    derived from the registered chunk table, and it must hang on the same parent key: never a name
    a message gave."""
    name = chunks.shadow_name(chunk_target_of(target))
    row = conn.execute(
        """select v.type_name, v.dimensions, (p.parent = %s::regclass and p.key_column = %s)
           from (select to_regclass(format('%%I.%%I', %s::text, %s::text)) as oid) c
           cross join lateral autoembed.chunk_parent(c.oid) p
           cross join lateral autoembed.vector_column(c.oid, %s) v
           where c.oid is not null""",
        (target.regclass, target.key.key_column, target.key.schema, name, chunks.VECTOR_COLUMN)).fetchone()
    if row is None or not row[2] or row[1] is None:
        return None
    return replace(target, chunk_table=name, vector_type=row[0], dimensions=int(row[1]))


class ChunkSetChange:
    """A chunk set's model change (core.migrate.chunk_migration): its state is its tables, the
    shadow `<table>_chunks__next` (the backfill and the drain write the new model there) and, once
    promoted, the previous live table `<table>_chunks__old`; a promotion swaps the tables and the
    registry follows (sql/012). `live`: the registered chunk target; `made`: the model and chunking
    current sets are made with."""

    unit = "documents"
    noun = "chunk table"

    def __init__(self, live: Target, made: Made, pipeline: str | None = None) -> None:
        self.live, self.made, self.pipeline = live, made, pipeline
        self.ct = chunk_target_of(live)
        self.label, self.shadow_name, self.model = self.ct.label, chunks.shadow_name(self.ct), made.model

    def shadow(self, conn: psycopg.Connection) -> Target | None:
        return chunk_shadow_of(conn, self.live)

    def state(self, conn: psycopg.Connection, *, lock: bool = False) -> ShadowState:
        # (the tables are the state: the swaps below lock them)
        shadow = self.shadow(conn)
        return ShadowState(shadow.chunk_table if shadow else None, chunks.old_table(conn, self.ct))

    def coverage(self, conn: psycopg.Connection, state: ShadowState) -> Coverage:
        counted = self.ct.with_chunk_table(state.shadow) if state.shadow else self.ct
        return ChunkSetShape(counted).counts(conn, self.made).coverage

    def prepare(self, conn: psycopg.Connection) -> list[str]:
        return []  # the shadow was made with the live table's vector indexes (chunks.create_shadow)

    def lock_writers(self, conn: psycopg.Connection) -> None:
        pass  # the swap renames the tables: it takes their locks itself, for an instant

    def promote(self, conn: psycopg.Connection) -> Swapped:
        old = chunks.promote(conn, self.ct, self.ct.with_chunk_table(self.shadow_name), self.made.model,
                             self.made.splitter or "", force=True)  # (the flow checked the coverage)
        return Swapped(old)

    def rollback(self, conn: psycopg.Connection) -> None:
        conn.execute("select autoembed.rollback_chunk_target(%s::regclass, %s)",
                     (chunks.regclass_of(self.ct), self.shadow_name))

    def drop_old(self, conn: psycopg.Connection) -> None:
        self._drop(conn, chunks.old_table(conn, self.ct))

    def drop_shadow(self, conn: psycopg.Connection) -> None:
        """Documents whose live chunk set went stale meanwhile (the drain wrote only the shadow) are
        queued again."""
        self._drop(conn, self.shadow_name)
        ct = self.ct
        conn.execute(sql.SQL(
            """select autoembed.enqueue_chunk_keys(%s, array(
                   select t.{key} from {parent} t
                   where coalesce(btrim({fn}(t)::text), '') <> ''
                     and not exists (select 1 from {chunks} c where c.{key} = t.{key}
                                     and c.source_hash = autoembed.content_hash({fn}(t)::text))))""").format(
            key=ct.key_sql, parent=ct.parent_sql, fn=ct.function_sql, chunks=ct.chunks_sql),
            (self.live.registered,))

    def _drop(self, conn: psycopg.Connection, name: str | None) -> None:
        """Drop a retired or shadow chunk table of the parent (never the registered one)."""
        ct = self.ct
        if name is None or name == ct.chunk_table:
            raise TargetError(f"{ct.label}: {name or 'no table'} is not a retired or shadow chunk table: not dropped")
        table = sql.Identifier(ct.schema, name)
        if not conn.execute("select (select parent from autoembed.chunk_parent(%s::regclass)) = %s::regclass",
                            (table.as_string(conn), ct.parent_sql.as_string(conn))).fetchone()[0]:
            raise TargetError(f"{ct.schema}.{name} is not a chunk table of {ct.schema}.{ct.table}: not dropped")
        conn.execute(sql.SQL("drop table {}").format(table))
