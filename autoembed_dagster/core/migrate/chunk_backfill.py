"""Full re-embed of a chunked pipeline, shard by shard, and its model change (plain Python).

A shard (core.pipelines.shard_of: the same key slices as column pipelines) walks its documents in
key order and brings each one's chunk set up to date: read, planned and embedded
(core.targets.chunks.prepare), written by the drain's own write (core.targets.writes.ChunkWrite).
A document whose set is already the chunking of its current input under the model is skipped, and
chunk texts that already have a vector under the model (anywhere in the table written) are
reused, so a shard is idempotent and resumable.

Where it writes (`chunk_plan`): the live chunk table when it holds only this model at this size;
otherwise a shadow chunk table `<table>_chunks__next` (core.migrate.migration.make_shadow), which search
does not read. While the shadow exists the drain writes changed documents there too (see
`write_target`), and when every document's shadow chunk set is current the shadow is promoted in
one transaction (core.targets.chunks.promote: tables swapped, the registry follows), the old table kept
as `<table>_chunks__old` for rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import psycopg
from psycopg import sql

from ..targets import chunks
from ..targets.splitter import Splitter, splitter_for
from ..config import ConfigError
from ..targets.shapes import chunk_shadow_of as shadow_of, chunk_target_of
from ..targets.writes import ChunkWrite, Settled, write_page
from ..embed import make_embedder
from ..embed.base import Embedder
from .migration import MigrationError, PromoteResult, in_change_transaction, make_shadow, promoted, step
from ..targets.models import ModelSpec
from ..targets.shadow import Coverage
from ..pipelines import Pipeline
from ..targets.catalog import Target, TargetError, lookup_registered
from ..targets.shapes import ChunkSetChange, Made
from .shards import BackfillResult, ShardStats, run_shards, walk_pages

DEFAULT_PAGE_DOCUMENTS = 32


def registered_chunk_target(conn: psycopg.Connection, p: Pipeline) -> Target:
    """The registered chunk target of the pipeline's table (what its enrolment made)."""
    row = conn.execute(
        """select id from autoembed.target_catalog
           where schema_name = %s and table_name = %s and chunk_tokens is not null""",
        (p.schema, p.table)).fetchone()
    if row is None:
        raise TargetError(f"{p.qualified_table} is not enrolled as a chunk target: autoembed enroll "
                          f"{p.qualified_table} --content-function {p.content_function} --chunk-tokens {p.chunk_tokens}")
    return lookup_registered(conn, target_id=row[0])[0]


@dataclass(frozen=True)
class ChunkBackfillPlan:
    mode: str  # "in_place": the live chunk table; "shadow": the shadow of a model change; "skip": one is needed (not made)
    live: Target
    write_to: Target
    spec: ModelSpec
    reason: str

    @property
    def into_shadow(self) -> bool:
        return self.mode == "shadow"


def pipeline_embedder(conn: psycopg.Connection, p: Pipeline) -> tuple[Target, ModelSpec, Embedder, Splitter]:
    """The pipeline's live chunk target, its configured model (sized like the drain sizes it), the
    embedder and the splitter."""
    live = registered_chunk_target(conn, p)
    spec = p.spec(column_dimensions=live.dimensions)
    embedder = make_embedder(spec.settings(p.embedder_settings()), dimensions=spec.dimensions)
    if embedder.identity.key != spec.identity_key:
        raise ConfigError(f"{spec.key}: the embedder reports itself as {embedder.identity.key}")
    if p.chunk_tokens is not None and (p.chunk_tokens, p.chunk_overlap) != (live.chunk_tokens, live.chunk_overlap):
        # The drain splits as the registry says: a backfill splitting otherwise would fight it.
        raise ConfigError(
            f"pipeline {p.name} declares chunks of {p.chunk_tokens} tokens (overlap {p.chunk_overlap}) but "
            f"{p.qualified_table} is enrolled with {live.chunk_tokens} (overlap {live.chunk_overlap}): enrol it "
            f"again (autoembed enroll {p.qualified_table} --content-function {p.content_function} --chunk-tokens "
            f"{p.chunk_tokens} --chunk-overlap {p.chunk_overlap}), then backfill")
    return live, spec, embedder, splitter_for(embedder, live.chunk_tokens, live.chunk_overlap)


def chunk_plan(conn: psycopg.Connection, p: Pipeline, live: Target, spec: ModelSpec, *,
               start: bool = True) -> ChunkBackfillPlan:
    """Where the vectors of `spec` go (see module doc); makes the shadow when needed (and `start`;
    else the plan is "skip", saying why, as the column's `backfill.plan(start=False)`).

    Read and made in one transaction under the advisory lock of the chunk set's model changes
    (migration.in_change_transaction, as start_migration makes a column's shadow): two shard runs
    planning at once take turns, the second finds the first's shadow."""

    def decide() -> ChunkBackfillPlan:
        shadow = shadow_of(conn, live)
        if shadow is not None:
            if shadow.dimensions != spec.dimensions:
                raise TargetError(f"{shadow.regclass} -> {shadow.chunk_table} is {shadow.vector_type}({shadow.dimensions}) "
                                  f"but {spec.key} makes {spec.dimensions}: drop it (an abandoned model change) and run again")
            return ChunkBackfillPlan("shadow", live, shadow, spec, f"model change in progress: new chunk sets go to "
                                                                   f"{shadow.chunk_table} until promotion")
        others = [m for (m,) in conn.execute(
            sql.SQL("select distinct model from {} where model <> %s limit 3").format(chunk_target_of(live).chunks_sql),
            (spec.identity_key,)).fetchall()]
        if live.dimensions == spec.dimensions and not others:
            return ChunkBackfillPlan("in_place", live, live, spec, f"{live.chunk_table} holds {spec.identity_key}")
        held = ", ".join(others) or f"{live.vector_type}({live.dimensions}) vectors"
        if not start:
            return ChunkBackfillPlan("skip", live, live, spec, f"{live.chunk_table} holds {held}: {spec.key} needs a "
                                                               f"model change of {p.qualified_table}'s chunk sets")
        # The one make step of every shape's model change (refused while a retired table is kept: its
        # promotion would fail at the end, after the whole backfill).
        change = ChunkSetChange(live, Made(spec.identity_key), p.name, dimensions=spec.dimensions)
        try:
            make_shadow(conn, change, change.state(conn))
        except MigrationError as exc:
            raise MigrationError(f"{exc}, then backfill {spec.key}") from None
        shadow = change.shadow(conn)
        assert shadow is not None, change.shadow_name
        return ChunkBackfillPlan("shadow", live, shadow, spec,
                                 f"{live.chunk_table} holds {held}: new chunk sets of {spec.identity_key} go to "
                                 f"{shadow.chunk_table} until promotion")

    if not start:
        return decide()  # (reads only)
    return in_change_transaction(conn, f"{live.regclass}.{live.chunk_table}", decide)


def _shard_keys(conn: psycopg.Connection, ct: chunks.ChunkTarget, shard: int, shards: int, after: str | None,
                limit: int) -> list[str]:
    return [k for (k,) in conn.execute(sql.SQL(
        """select t.{key}::text from {parent} t
           where autoembed.shard_of(t.{key}::text, %(shards)s) = %(shard)s
             and (%(after)s::text is null or t.{key} > %(after)s::text::{kt})
           order by t.{key} limit %(limit)s""").format(key=ct.key_sql, parent=ct.parent_sql, kt=ct.key_type_sql),
        {"shard": shard, "shards": shards, "after": after, "limit": limit}, prepare=False).fetchall()]


def backfill_chunk_shard(conn: psycopg.Connection, write_to: Target, embedder: Embedder, splitter: Splitter,
                         shard: int, shards: int, *, page_documents: int = DEFAULT_PAGE_DOCUMENTS,
                         pipeline: str | None = None, max_rows: int | None = None,
                         on_page: Callable[[ShardStats, int], None] | None = None) -> ShardStats:
    """Bring every document of one shard up to date in `write_to`'s chunk table (see module doc).

    With `pipeline`, its pause and time window (core.migrate.backfill_control) are checked before every
    page, as column shards do: a stopped shard has lost nothing (the next run skips what is current).
    `max_rows`: stop after about this many documents written (a time-boxed run; the next one resumes)."""
    if not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} is not in 0..{shards - 1}")
    stats = ShardStats(shard, shards, "documents")
    ct = chunk_target_of(write_to)
    after: str | None = None

    def read(c: psycopg.Connection) -> list[str] | None:
        nonlocal after
        # (a time-boxed run reads no more documents than it may still write)
        room = page_documents if max_rows is None else max(1, min(page_documents, max_rows - stats.written))
        keys = _shard_keys(c, ct, shard, shards, after, room)
        if not keys:
            return None
        after = keys[-1]
        return keys

    def write(keys: list[str]) -> int:
        page = chunks.prepare(conn, ct, keys, splitter, embedder)
        # A document with a failed chunk is never written in part (as the drain leaves it out).
        failed = {**page.unreadable, **page.failed_documents()}
        documents = {k: d for k, d in page.plan.documents.items() if k not in failed}
        # The drain's write of a chunk set (core.targets.writes), with no message attached.
        w = write_page(conn, ChunkWrite(write_to, ct, replace(page.plan, documents=documents), page.vectors)) \
            if documents else Settled()
        stats.documents += len(keys)
        stats.current += len(page.plan.unchanged)
        stats.written += w.written
        stats.busy += len(w.busy)
        stats.stale += w.stale
        stats.failed += len(failed) + len(w.dead)
        stats.chunks_embedded += w.chunks_embedded
        stats.chunks_reused += w.chunks_reused
        stats.tokens += page.tokens
        for error in ([f"{ct.label} key {k}: {why}" for k, why in failed.items()][:3] + list(w.dead.values())[:3]
                      + list(page.errors.values())[:3]):
            stats.note_error(error)
        return len(keys)

    walk_pages(conn, pipeline, stats, read, write, max_written=max_rows, on_page=on_page)
    return stats


class ChunkSetBackfill:
    """A chunk set's backfill of the pipeline's configured model (core.migrate.shards.ShapeBackfill):
    into the live chunk table, or a shadow chunk table (made by `plan`), promoted when complete."""

    unit = "documents"

    def __init__(self, p: Pipeline, *, page_documents: int = DEFAULT_PAGE_DOCUMENTS,
                 on_page: Callable[[ShardStats, int], None] | None = None) -> None:
        self.p, self.page_documents, self.on_page = p, page_documents, on_page

    def plan(self, conn: psycopg.Connection) -> ChunkBackfillPlan:
        live, spec, self.embedder, self.splitter = pipeline_embedder(conn, self.p)
        return chunk_plan(conn, self.p, live, spec)

    def coverage(self, conn: psycopg.Connection, bp: ChunkBackfillPlan) -> Coverage:
        return chunks.coverage(conn, chunk_target_of(bp.write_to), self.embedder.identity.key, self.splitter.key)

    def fill(self, conn: psycopg.Connection, bp: ChunkBackfillPlan, shard: int, shards: int) -> ShardStats:
        return backfill_chunk_shard(conn, bp.write_to, self.embedder, self.splitter, shard, shards,
                                    page_documents=self.page_documents, pipeline=self.p.name, on_page=self.on_page)

    def promote(self, conn: psycopg.Connection, bp: ChunkBackfillPlan) -> PromoteResult:
        """Its `old`: the previous live table, kept for rollback (`already` when promoted meanwhile
        by another run; core.migrate.migration.step: the one promotion of every shape)."""
        made = Made(self.embedder.identity.key, self.splitter.key)
        return promoted(step(conn, ChunkSetChange(bp.live, made, self.p.name), "promote"), bp.live.chunk_table or "",
                        f"{bp.spec.identity_key} of {bp.spec.content_function}", kept="chunk sets")


def run_chunk_backfill(conn: psycopg.Connection, p: Pipeline, *, only: list[int] | None = None,
                       shards: int | None = None, promote_when_complete: bool = True,
                       page_documents: int = DEFAULT_PAGE_DOCUMENTS,
                       on_plan: Callable[[ChunkBackfillPlan, Coverage], None] | None = None,
                       on_page: Callable[[ShardStats, int], None] | None = None) -> BackfillResult[ChunkBackfillPlan]:
    """Every shard (or `only` these) of the chunk set, then promote a complete shadow (its
    `promotion`: the old live table) (core.migrate.shards.run_shards: refused while held, no
    shadow table made; stopped by a pause or the window's end)."""
    return run_shards(conn, p, ChunkSetBackfill(p, page_documents=page_documents, on_page=on_page), only=only,
                      shards=shards, promote_when_complete=promote_when_complete, on_plan=on_plan)
