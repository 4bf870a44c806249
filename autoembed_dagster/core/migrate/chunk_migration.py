"""The model migration of a chunked pipeline: status, promote, rollback, drop_old, abort.

A chunked pipeline's model change lives in its tables, not in autoembed.model_migrations:

    backfilling   the shadow `<table>_chunks__next` exists (core.migrate.chunk_backfill writes the new model
                  into it; the drain writes changed documents there too)
    promoted      `<table>_chunks__old` exists: the previous live table, kept for rollback
    none          neither

promote swaps the shadow in (at 100% coverage, or forced); rollback swaps `__old` back and makes the
promoted table the shadow again (back to backfilling: promote again later, or abort); drop_old
drops `__old` (the migration is finished); abort drops the shadow and queues the documents whose
live chunk set went stale meanwhile (the drain wrote only the shadow). The swaps and drops run like
the column migrations' (core.migrate.migration.in_locked_transaction: short lock waits, retried).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..targets import chunks
from .backfill import MIGRATION_ACTIONS
from .chunk_backfill import pipeline_embedder
from ..drain.chunked import chunk_target_of, shadow_of
from .migration import MigrationError, in_locked_transaction
from ..targets.shadow import Coverage
from ..pipelines import Pipeline
from ..targets.catalog import Target


@dataclass(frozen=True)
class ChunkMigration:
    pipeline: str
    status: str  # "backfilling", "promoted" or "none" (see module doc)
    live: Target
    shadow: Target | None  # <table>_chunks__next, while backfilling
    old_table: str | None  # <table>_chunks__old, kept for rollback
    model: str  # the configured model (identity key) whose chunk sets count as current
    coverage: Coverage  # of the shadow while backfilling, else of the live table

    def as_dict(self) -> dict:
        return {"pipeline": self.pipeline, "status": self.status, "model": self.model,
                "chunk_table": self.live.chunk_table, "shadow_table": self.shadow.chunk_table if self.shadow else None,
                "old_table": self.old_table, "coverage": round(self.coverage.ratio, 6),
                "documents_current": self.coverage.current, "documents_with_input": self.coverage.embeddable}

    def summary(self) -> str:
        where = self.shadow.chunk_table if self.shadow else self.live.chunk_table
        kept = f"; old chunk sets kept in {self.old_table}" if self.old_table else ""
        state = "no model migration in flight" if self.status == "none" else f"model migration {self.status}"
        return (f"{self.pipeline}: {state}; {self.coverage.current}/{self.coverage.embeddable} "
                f"documents ({self.coverage.ratio:.1%}) hold their {self.model} chunk set in {where}{kept}")


def chunk_migration(conn: psycopg.Connection, p: Pipeline) -> ChunkMigration:
    """Where the pipeline's model change stands (see module doc)."""
    live, spec, embedder, splitter = pipeline_embedder(conn, p)
    shadow = shadow_of(conn, live)
    old = chunks.old_table(conn, chunk_target_of(live))
    status = "backfilling" if shadow is not None else "promoted" if old is not None else "none"
    cov = chunks.coverage(conn, chunk_target_of(shadow or live), embedder.identity.key, splitter.key)
    return ChunkMigration(p.name, status, live, shadow, old, embedder.identity.key, cov)


def chunk_migration_action(conn: psycopg.Connection, p: Pipeline, action: str, *, force: bool = False,
                           lock_timeout: float = 5.0, attempts: int = 5) -> ChunkMigration:
    """Apply `action` (status, promote, rollback, drop_old, abort) to the pipeline's model change;
    returns where it stands after. Raises MigrationError when the state does not allow it."""
    m = chunk_migration(conn, p)
    if action == "status":
        return m
    live = chunk_target_of(m.live)
    if action == "promote":
        if m.shadow is None:
            raise MigrationError(f"{p.name}: no shadow chunk table {chunks.shadow_name(live)} to promote "
                                 f"(run `autoembed backfill {p.name}` after a model change)")
        if m.old_table is not None:
            raise MigrationError(f"{p.name}: {m.old_table} holds the chunk sets of the previous model change: "
                                 f"`autoembed migrate {p.name} drop-old` first")
        if not m.coverage.complete and not force:
            raise MigrationError(f"{p.name}: {m.coverage.missing} of {m.coverage.embeddable} documents have no current "
                                 f"{m.model} chunk set in {m.shadow.chunk_table}: finish the backfill or pass --force")
        _, _, embedder, splitter = pipeline_embedder(conn, p)
        in_locked_transaction(conn, lambda: chunks.promote(conn, live, chunk_target_of(m.shadow), embedder.identity.key,
                                                           splitter.key, force=force),
                              lock_timeout=lock_timeout, attempts=attempts)
    elif action == "rollback":
        if m.old_table is None:
            raise MigrationError(f"{p.name}: no old chunk table to roll back to (never promoted, or dropped)")
        if m.shadow is not None:
            raise MigrationError(f"{p.name}: {m.shadow.chunk_table} exists (another model change in progress): "
                                 f"`autoembed migrate {p.name} abort` it first")
        in_locked_transaction(conn, lambda: conn.execute(
            "select autoembed.rollback_chunk_target(%s::regclass, %s)", (chunks.regclass_of(live),
                                                                          chunks.shadow_name(live))),
            lock_timeout=lock_timeout, attempts=attempts)
    elif action == "drop_old":
        if m.old_table is None:
            raise MigrationError(f"{p.name}: no old chunk table to drop")
        _drop(conn, live, m.old_table, lock_timeout, attempts)
    elif action == "abort":
        if m.shadow is None:
            raise MigrationError(f"{p.name}: no model change in progress to abort (no {chunks.shadow_name(live)})")
        _drop(conn, live, m.shadow.chunk_table, lock_timeout, attempts)
        requeue_stale_documents(conn, m.live)
    else:
        raise MigrationError(f"migration action {action!r} is not one of {', '.join(MIGRATION_ACTIONS)}")
    return chunk_migration(conn, p)


def _drop(conn: psycopg.Connection, live: chunks.ChunkTarget, name: str, lock_timeout: float, attempts: int) -> None:
    """Drop a retired or shadow chunk table of `live`'s parent (never the registered one)."""
    if name == live.chunk_table:
        raise MigrationError(f"{live.label} is the live chunk table: it is not dropped")

    def body() -> None:
        table = sql.Identifier(live.schema, name)
        if not conn.execute("select (select parent from autoembed.chunk_parent(%s::regclass)) = %s::regclass",
                            (table.as_string(conn), live.parent_sql.as_string(conn))).fetchone()[0]:
            raise MigrationError(f"{live.schema}.{name} is not a chunk table of {live.schema}.{live.table}: not dropped")
        conn.execute(sql.SQL("drop table {}").format(table))

    in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)


def requeue_stale_documents(conn: psycopg.Connection, live: Target) -> int:
    """Queue every document with input whose live chunk set is missing or not of its current input
    (the drain wrote only the shadow while it existed). Returns the documents queued."""
    ct = chunk_target_of(live)
    return conn.execute(sql.SQL(
        """select autoembed.enqueue_chunk_keys(%s, array(
               select t.{key} from {parent} t
               where coalesce(btrim({fn}(t)::text), '') <> ''
                 and not exists (select 1 from {chunks} c where c.{key} = t.{key}
                                 and c.source_hash = autoembed.content_hash({fn}(t)::text))))""").format(
        key=ct.key_sql, parent=ct.parent_sql, fn=ct.function_sql, chunks=ct.chunks_sql),
        (live.registered,)).fetchone()[0]
