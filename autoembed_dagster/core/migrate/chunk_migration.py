"""The model change of a chunked pipeline: where it stands and its actions (status, promote,
rollback, drop_old, abort), through the one flow of every shape's model change
(core.migrate.migration.step) over a chunk set's steps (core.targets.shapes.ChunkSetChange).

A chunked pipeline's model change lives in its tables, not in autoembed.model_migrations:

    backfilling   the shadow `<table>_chunks__next` exists (core.migrate.chunk_backfill writes the new model
                  into it; the drain writes changed documents there too)
    promoted      `<table>_chunks__old` exists: the previous live table, kept for rollback
    none          neither

promote swaps the shadow in (at 100% coverage, or forced); rollback swaps `__old` back and makes the
promoted table the shadow again (back to backfilling: promote again later, or abort); drop_old
drops `__old` (the migration is finished); abort drops the shadow and queues the documents whose
live chunk set went stale meanwhile (the drain wrote only the shadow).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from ..pipelines import Pipeline
from ..targets.catalog import Target
from ..targets.shadow import Coverage
from ..targets.shapes import ChunkSetChange, Made
from .chunk_backfill import pipeline_embedder
from .migration import step


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


def chunk_change(conn: psycopg.Connection, p: Pipeline) -> ChunkSetChange:
    """The pipeline's model change: its registered chunk target, under its configured model and chunking."""
    live, _, embedder, splitter = pipeline_embedder(conn, p)
    return ChunkSetChange(live, Made(embedder.identity.key, splitter.key), p.name)


def chunk_migration(conn: psycopg.Connection, p: Pipeline) -> ChunkMigration:
    """Where the pipeline's model change stands (see module doc)."""
    change = chunk_change(conn, p)
    state = change.state(conn)
    return ChunkMigration(p.name, state.status, change.live, change.shadow(conn), state.old, change.model,
                          change.coverage(conn, state))


def chunk_migration_action(conn: psycopg.Connection, p: Pipeline, action: str, *, force: bool = False,
                           lock_timeout: float = 5.0, attempts: int = 5) -> ChunkMigration:
    """Apply `action` (status, promote, rollback, drop_old, abort) to the pipeline's model change;
    returns where it stands after. Raises MigrationError when the state does not allow it."""
    step(conn, chunk_change(conn, p), action, force=force, lock_timeout=lock_timeout, attempts=attempts)
    return chunk_migration(conn, p)
