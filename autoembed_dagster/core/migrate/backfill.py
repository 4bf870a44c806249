"""Full re-embed of a pipeline's table, shard by shard (plain Python, no Dagster).

A shard is a stable slice of the key space: `autoembed.shard_of(key::text, n)` = the first 32 bits
of SHA-256 of the key's text, modulo n (see sql/007; core.pipelines.shard_of is the same in Python). A
shard walks its rows in key order, skips every row that already holds the vector of its current
input under the model (embedding_state: content hash + model), embeds the rest in batches and
writes them with the drain's own write (core.targets.writes.ColumnWrite: row lock, content-hash
guard, the owner's write function, embedding_state upsert, in one transaction per batch). So a shard is idempotent and resumable: a
killed shard re-run starts where the committed batches end, and a row changed meanwhile is left
to the incremental path (its trigger queued a job) instead of being overwritten with old content.

Where a shard writes (`plan`): into the live column when the model is the one it already holds;
otherwise into the shadow column of a model migration (core.migrate.migration), started on demand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import psycopg
from psycopg import sql

from ..config import ConfigError, EmbedderSettings
from ..drain import ProviderConfigError
from ..targets.badrows import check_vectors, row_error
from ..drain.loop import pin_session
from ..embed import make_embedder, native_dimensions
from ..embed.base import EmbedOutcome, Embedder, EmbeddingError
from ..health import estimated_cost
from ..pipelines import Pipeline
from ..targets.catalog import Target, TargetKey, check_dimensions, resolve
from ..targets.models import Migration, ModelSpec, get_migration
from ..targets.shadow import Coverage
from ..targets.vectors import encode_vectors
from ..targets.writes import ColumnWrite, Slicer, write_page
from .migration import PromoteResult, coverage, promote, start_migration, trigger_content_functions
from .shards import BackfillResult, ShardStats, run_shards, walk_pages

DEFAULT_BATCH_ROWS = 256


def resolve_spec(conn: psycopg.Connection, p: Pipeline, *, provider: str | None = None, model: str | None = None,
                 dimensions: int | None = None, content_function: str | None = None,
                 base: EmbedderSettings | None = None) -> ModelSpec:
    """The pipeline's configured model with any part overridden (the `backfill` job's config)."""
    column = resolve(conn, p.live_key).dimensions
    configured = p.spec(column_dimensions=column, base=base)
    if not any((provider, model, dimensions, content_function)):
        return configured
    provider = provider or configured.provider
    if model is None:
        model = configured.model if provider == configured.provider else (
            "text-embedding-3-small" if provider == "openai" else "all-MiniLM-L6-v2")
    if dimensions is None:
        native, flexible = native_dimensions(provider, model)
        dimensions = (configured.dimensions if flexible else None) or native or column
    return ModelSpec(provider, model, dimensions, content_function or configured.content_function)


# -- where a shard writes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPlan:
    mode: str  # "in_place": the live column; "migration": the shadow column; "skip": nothing to do
    spec: ModelSpec
    column: str | None
    content_function: str
    migration: Migration | None
    reason: str

    @property
    def into_shadow(self) -> bool:
        return self.mode == "migration" and self.migration is not None

    def target_key(self, p: Pipeline) -> TargetKey:
        assert self.column is not None
        return TargetKey(p.schema, p.table, self.content_function, self.column, p.key_column)


def plan(conn: psycopg.Connection, p: Pipeline, spec: ModelSpec, *, start: bool = True,
         allow_unconfigured: bool = False, base: EmbedderSettings | None = None) -> ShardPlan:
    """Decide where vectors of `spec` go. Starts a migration when the configured model differs
    from what the live column holds (and `start`). A model that is neither configured nor being
    migrated to is skipped (its partitions stay as they are, stale, until they are retired),
    unless `allow_unconfigured`: an explicit migration ahead of the configuration change."""
    live = resolve(conn, p.live_key)
    m = get_migration(conn, p.schema, p.table, p.embedding_column)
    if m is not None and m.status == "backfilling":
        if m.spec == spec:
            return ShardPlan("migration", spec, m.shadow_column, spec.content_function, m,
                             f"migration {m.id}: new vectors go to {m.shadow_column} until promotion")
        if m.old_spec == spec:
            return ShardPlan("in_place", spec, p.embedding_column, m.old_content_function, m,
                             f"{spec.identity_key} is the live model during migration {m.id}")
        return ShardPlan("skip", spec, None, spec.content_function, m,
                         f"migration {m.id} of {m.label} to {m.spec.key} is in progress")
    if m is not None:  # promoted: the live column holds the migration's model
        if m.spec == spec:
            return ShardPlan("in_place", spec, p.embedding_column, spec.content_function, m,
                             f"{spec.identity_key} is live since migration {m.id}")
        return ShardPlan("skip", spec, None, spec.content_function, m,
                         f"{m.label} holds {m.spec.key} (migration {m.id} promoted; drop its old vectors first)")
    configured = p.spec(column_dimensions=live.dimensions, base=base)
    if spec != configured and not allow_unconfigured:
        return ShardPlan("skip", spec, None, spec.content_function, None,
                         f"{spec.key} is not the configured model ({configured.key}) and no migration to it "
                         "is in progress (launch the `backfill` job with it to start one)")
    # The input the live vectors are made of is what the table's triggers pass (the configuration
    # may already name another content function: that is a migration too).
    live_fn = next(iter(trigger_content_functions(conn, p.schema, p.table, p.embedding_column)), p.content_function)
    other_model = conn.execute(
        """select 1 from autoembed.embedding_state where target_id = (select autoembed.state_target(%s, %s, %s)) and model <> %s limit 1""",
        (p.schema, p.table, p.embedding_column, spec.identity_key)).fetchone()
    if spec == configured and spec.dimensions == live.dimensions and spec.content_function == live_fn and not other_model:
        return ShardPlan("in_place", spec, p.embedding_column, live_fn, None,
                         f"{p.qualified_table}.{p.embedding_column} already holds {spec.identity_key}")
    if not start:
        return ShardPlan("skip", spec, None, spec.content_function, None,
                         f"{spec.key} needs a migration of {p.qualified_table}.{p.embedding_column}")
    m = start_migration(conn, TargetKey(p.schema, p.table, live_fn, p.embedding_column, p.key_column), spec,
                        queue=p.queue, pipeline=p.name)
    return ShardPlan("migration", spec, m.shadow_column, spec.content_function, m,
                     f"started migration {m.id}: new vectors go to {m.shadow_column} until promotion")


# -- one shard -------------------------------------------------------------------------------------------
@dataclass
class _Page:
    """One page of a shard's candidates, scanned and embedded."""

    size: int  # candidate rows on the page
    empty_input: int  # of them, rows whose input is empty (nothing to embed)
    outcome: EmbedOutcome | None  # the provider's answer; None when nothing was embedded
    keys: list[str]  # the rows sent to the provider, in the outcome's order
    rows: list[tuple[str, bytes, bytes]]  # (key, content hash, COPY tuple) of the rows it embedded
    unreadable: dict[str, str] = field(default_factory=dict)  # key -> why its input could not be read


def _page_reader(target: Target, embedder: Embedder, model: str, shard: int, shards: int,
                 limit: int) -> Callable[[psycopg.Connection], _Page | None]:
    """Reads the shard's next page on the given connection (None at the end of the table) and
    embeds it. Pages follow each other in key order: call it from one thread at a time."""
    after: str | None = None

    def read(conn: psycopg.Connection) -> _Page | None:
        nonlocal after
        scanned_to, page, unreadable = _candidates(conn, target, model, shard, shards, after, limit)
        if scanned_to is None:
            return None
        after = scanned_to
        todo = [(k, text, h) for k, text, h in page if text is not None and text.strip()]
        if not todo:
            return _Page(len(page), len(page), None, [], [], unreadable)
        outcome = embedder.embed([text for _, text, _ in todo])
        # Each vector on its own (targets.badrows): one the column cannot hold fails its row alone.
        for i, problem in enumerate(check_vectors(target.vector_type, target.dimensions, outcome.vectors)):
            if problem is not None:
                outcome.vectors[i] = None
                outcome.errors[i] = EmbeddingError(problem, retryable=False)
        embedded = [(k, h, v) for (k, _, h), v in zip(todo, outcome.vectors) if v is not None]
        records = encode_vectors(target, [v for _, _, v in embedded])
        return _Page(len(page), len(page) - len(todo), outcome, [k for k, _, _ in todo],
                     [(k, h, record) for (k, h, _), record in zip(embedded, records)], unreadable)

    return read


def _count_page(stats: "ShardStats", target: Target, page: _Page) -> None:
    """The provider usage and the failures of an embedded page. A refusal that every request would
    get (401/403, unknown model) stops the shard: nothing of the page is written."""
    fatal = page.outcome.refusal
    if fatal is not None:
        raise ProviderConfigError(f"the provider refused the re-embed of {target.regclass}: {fatal} "
                                  "(fix the key or the model, then re-run the shard: it resumes where it stopped)")
    stats.tokens += page.outcome.tokens
    stats.requests += page.outcome.requests
    stats.limit_wait_seconds += page.outcome.limit_wait_seconds
    stats.batches += 1
    for k, error in zip(page.keys, page.outcome.errors):
        if error is None:
            continue
        stats.failed += 1
        if not isinstance(error, EmbeddingError) or error.retryable:
            stats.retryable_failures += 1
        stats.note_error(f"{target.regclass} id={k}: {error}")


@dataclass
class ShardResult:
    plan: ShardPlan
    stats: ShardStats
    coverage: Coverage | None  # of this shard, after the run
    before: Coverage | None = None  # of this shard, before the run

    @property
    def complete(self) -> bool:
        return self.coverage is not None and self.coverage.complete


# Keys scanned per page: the page's rows are about 1/shards of them.
MAX_SCAN_ROWS = 32_768


def _candidates(conn: psycopg.Connection, target: Target, model: str, shard: int, shards: int,
                after: str | None, limit: int) -> tuple[str | None, list[tuple[str, str | None, bytes | None]]]:
    """The next rows of the shard (key order, after `after`) that do not hold `model`'s vector of
    their current input: (the last key scanned, or None at the end of the table; [(key text,
    input, content hash)]).

    One page walks the next `limit * shards` keys of the key index (never the whole table), keeps
    those of the shard, and only for them computes the input and its hash and looks up
    embedding_state by its primary key. A page may hold fewer than `limit` rows (none when every
    scanned row of the shard is current): the caller goes on after the last key scanned."""
    scan = max(1, min(limit * shards, MAX_SCAN_ROWS))
    query = sql.SQL(
        """with scan as materialized (
               select t.{key} as kv from {table} t
               where %(after)s::text is null or t.{key} > %(after)s::text::{key_type}
               order by t.{key} limit %(scan)s),
           mine as materialized (
               select t.{key} as kv, t.{key}::text as k, i.input, autoembed.content_hash(i.input) as h,
                      t.{col} is not null as has_vector
               from scan join {table} t on t.{key} = scan.kv
               cross join lateral (select {fn}(t)::text as input) i
               where autoembed.shard_of(scan.kv::text, %(shards)s) = %(shard)s)
           select 0 as part, null as kv, (select max(kv) from scan)::text, null, null, null
           union all
           select 1, m.kv, null, m.k, m.input, m.h
           from mine m
           -- lateral + limit: one primary-key probe per row, whatever the (often stale) statistics
           -- of embedding_state say (a plain join became a nested loop over all the column's states)
           left join lateral (
               select s.model, s.content_hash from autoembed.embedding_state s
               where s.target_id = (select autoembed.state_target(%(schema)s, %(table)s, %(column)s)) and s.row_id = m.k
               limit 1) s on true  -- (the primary key: at most one row; the limit keeps it a probe)
           where not (m.has_vector and s.model is not distinct from %(model)s and s.content_hash = m.h)
           order by 1, 2"""
    ).format(key=target.key_sql, fn=target.function_sql, col=target.column_sql, table=target.table_sql,
             key_type=target.key_type_sql)
    params = {"shards": shards, "shard": shard, "after": after, "schema": target.key.schema,
              "table": target.key.table, "column": target.key.embedding_column, "model": model, "scan": scan}
    try:
        rows = conn.execute(query, params, prepare=False).fetchall()
    except psycopg.Error as exc:
        if not row_error(exc):
            raise
        return _candidates_isolating(conn, target, model, params)
    return rows[0][2], [(k, text, h) for _, _, _, k, text, h in rows[1:]], {}


def _candidates_isolating(conn: psycopg.Connection, target: Target, model: str, params: dict):
    """_candidates' page when the content function raises for some row of it: the page's keys, then
    their inputs read with the drain's isolation (drain.read), so only those rows fail."""
    from ..drain.read import read_rows_or_isolate

    keys = conn.execute(sql.SQL(
        """with scan as materialized (
               select t.{key} as kv from {table} t
               where %(after)s::text is null or t.{key} > %(after)s::text::{key_type}
               order by t.{key} limit %(scan)s)
           select (select max(kv) from scan)::text, array(select kv::text from scan
                   where autoembed.shard_of(kv::text, %(shards)s) = %(shard)s order by kv)""").format(
        key=target.key_sql, table=target.table_sql, key_type=target.key_type_sql), params, prepare=False).fetchone()
    rows, unreadable = read_rows_or_isolate(conn, target, keys[1])
    todo = [(r.key, r.input, r.hash) for k in keys[1] if (r := rows.get(k)) is not None
            and not (r.has_vector and r.state_model == model and r.state_hash == r.hash)]
    return keys[0], todo, unreadable


def embedder_for(p: Pipeline, spec: ModelSpec, target: Target, base: EmbedderSettings | None = None) -> Embedder:
    embedder = make_embedder(spec.settings(p.embedder_settings(base)), dimensions=target.dimensions)
    check_dimensions(target, embedder.identity.dimensions, embedder.identity.model)
    if embedder.identity.key != spec.identity_key:
        raise ConfigError(f"{spec.key}: the embedder reports itself as {embedder.identity.key}")
    return embedder


def backfill_shard(
    conn: psycopg.Connection,
    p: Pipeline,
    spec: ModelSpec,
    shard: int,
    shards: int,
    *,
    shard_plan: ShardPlan | None = None,
    batch_rows: int | None = None,
    max_rows: int | None = None,
    on_batch: Callable[[ShardStats, int], None] | None = None,
    base: EmbedderSettings | None = None,
    embedder: Embedder | None = None,
) -> ShardResult:
    """Embed every row of one shard that lacks `spec`'s vector of its current input.

    `max_rows`: stop after about this many vectors (a time-boxed run; the next one resumes).
    `on_batch(stats so far, rows this batch)` after each committed batch."""
    if not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} is not in 0..{shards - 1}")
    shard_plan = shard_plan or plan(conn, p, spec, base=base)
    try:
        return _backfill_shard(conn, p, spec, shard, shards, shard_plan, batch_rows, max_rows, on_batch, base, embedder)
    except psycopg.errors.UndefinedColumn:
        # Shards run in parallel: another one may have found the migration complete and promoted
        # it while this one was finishing, renaming the shadow column. Then the model is live:
        # finish (normally: find nothing left) on the promoted column.
        if shard_plan.mode != "migration":
            raise
        now = plan(conn, p, spec, start=False, base=base)
        if now.mode != "in_place":
            raise
        return _backfill_shard(conn, p, spec, shard, shards, now, batch_rows, max_rows, on_batch, base, None)


def _backfill_shard(conn: psycopg.Connection, p: Pipeline, spec: ModelSpec, shard: int, shards: int,
                    shard_plan: ShardPlan, batch_rows: int | None, max_rows: int | None,
                    on_batch: Callable[[ShardStats, int], None] | None, base: EmbedderSettings | None,
                    embedder: Embedder | None) -> ShardResult:
    stats = ShardStats(shard, shards)
    if shard_plan.mode == "skip":
        return ShardResult(shard_plan, stats, None)
    started = time.perf_counter()
    target = resolve(conn, shard_plan.target_key(p))
    embedder = embedder or embedder_for(p, spec, target, base)
    model = spec.identity_key
    before = coverage(conn, target, model, shard, shards)
    stats.current = before.current  # resumed: what an earlier (killed) run already wrote is skipped
    pin_session(conn)
    limit = batch_rows or min(getattr(embedder, "batch_size", None) or DEFAULT_BATCH_ROWS, 1024)
    slicer = Slicer()  # a page is written in slices (the application waits at most for one): sized for this shard

    def write(page: _Page) -> int | None:
        stats.empty_input += page.empty_input
        stats.failed += len(page.unreadable)
        for why in page.unreadable.values():
            stats.note_error(why)
        if page.outcome is None:
            return None
        _count_page(stats, target, page)
        if page.rows:
            # The drain's write of a vector column (core.targets.writes), with no message attached.
            w = write_page(conn, ColumnWrite(target, [(k, h, record, []) for k, h, record in page.rows],
                                             embedder.identity.key), slicer=slicer)
            stats.embedded += w.written
            stats.stale += w.stale
            # Written meanwhile by the drain, same input. (Rows the application kept locked are
            # left out: the coverage still counts them missing.)
            stats.current += len(page.rows) - w.written - w.stale - len(w.busy) - len(w.dead)
            stats.failed += len(w.dead)
            for why in w.dead.values():
                stats.note_error(why)
        return page.size

    # The next page is scanned and embedded on a second connection while this one is written.
    walk_pages(conn, p.name, stats, _page_reader(target, embedder, model, shard, shards, limit),
               write, read_ahead=f"the scans of shard {shard} of {p.qualified_table}", max_written=max_rows,
               planned=lambda page: len(page.rows), on_page=on_batch, started=started)
    after_cov = coverage(conn, target, model, shard, shards)
    stats.seconds = time.perf_counter() - started
    return ShardResult(shard_plan, stats, after_cov, before)


def estimated_shard_cost(spec: ModelSpec, tokens: int) -> float | None:
    return estimated_cost(tokens, spec.provider, spec.model)


# -- the column's parts of a whole backfill (core.migrate.shards.run_shards) ------------------------
class ColumnBackfill:
    """A vector column's backfill of `spec` (core.migrate.shards.ShapeBackfill): into the live
    column, or the shadow column of a model migration (started by `plan`), promoted when complete."""

    unit = "rows"

    def __init__(self, p: Pipeline, spec: ModelSpec, *, batch_rows: int | None = None,
                 on_batch: Callable[[ShardStats, int], None] | None = None, base: EmbedderSettings | None = None):
        self.p, self.spec, self.batch_rows, self.on_batch, self.base = p, spec, batch_rows, on_batch, base

    def plan(self, conn: psycopg.Connection) -> ShardPlan:
        return plan(conn, self.p, self.spec, base=self.base)

    def coverage(self, conn: psycopg.Connection, shard_plan: ShardPlan) -> Coverage:
        return coverage(conn, resolve(conn, shard_plan.target_key(self.p)), self.spec.identity_key)

    def fill(self, conn: psycopg.Connection, shard_plan: ShardPlan, shard: int, shards: int) -> ShardStats:
        return backfill_shard(conn, self.p, self.spec, shard, shards, shard_plan=shard_plan,
                              batch_rows=self.batch_rows, on_batch=self.on_batch, base=self.base).stats

    def promote(self, conn: psycopg.Connection, shard_plan: ShardPlan) -> PromoteResult:
        return promote(conn, shard_plan.migration)


def run_backfill(
    conn: psycopg.Connection,
    p: Pipeline,
    spec: ModelSpec,
    *,
    only: list[int] | None = None,
    shards: int | None = None,
    promote_when_complete: bool = True,
    batch_rows: int | None = None,
    on_batch: Callable[[ShardStats, int], None] | None = None,
    on_plan: Callable[[ShardPlan, Coverage], None] | None = None,
    base: EmbedderSettings | None = None,
) -> BackfillResult[ShardPlan]:
    """Every shard (or `only` these) of the column, then promote the migration if complete
    (core.migrate.shards.run_shards: refused while held, stopped by a pause or the window's end)."""
    return run_shards(conn, p, ColumnBackfill(p, spec, batch_rows=batch_rows, on_batch=on_batch, base=base),
                      only=only, shards=shards, promote_when_complete=promote_when_complete, on_plan=on_plan)
