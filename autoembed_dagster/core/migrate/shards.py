"""What a re-embed does the same way whatever the shape of its target, written once:

- `walk_pages`: one shard's pages in key order, the pipeline's pause and time window checked
  before each page is read (core.migrate.backfill_control), optionally one page read ahead on a
  second connection while the current one is written, a time box (`room`), the shard's clock;
- `ShardStats`: what a shard did, summed over shards (`add`), said in one line (`summary`);
- `run_shards`: a whole backfill in one process (the CLI): refused while held, the plan (which
  makes the shadow when the model changes), every shard one after the other (a stop stops the
  rest), the coverage after, the promotion of a complete shadow; `BackfillResult`.

What differs per shape (where a shard writes, how a page is read and written, the coverage, the
promotion) is a `ShapeBackfill`: core.migrate.backfill.ColumnBackfill (a vector column: shadow
column, migration record) and core.migrate.chunk_backfill.ChunkSetBackfill (a chunk set: shadow
chunk table). A third shape is a third implementation.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, TypeVar

import psycopg

from ..db.server import second_connection
from ..drain import completed
from ..drain.loop import pin_session
from ..pipelines import Pipeline
from ..targets.shadow import Coverage
from . import backfill_control
from .migration import PromoteResult

Page = TypeVar("Page")
MAX_ERRORS = 20  # distinct errors a shard keeps (the rest are counted, not listed)


@dataclass
class ShardStats:
    """One shard's work (or every shard's: `add`). `unit` is what it counts: "rows" of a vector
    column (`embedded`: vectors written) or "documents" of a chunk set (`written`: chunk sets
    (re)written, with their chunks embedded or reused)."""

    shard: int
    shards: int
    unit: str = "rows"
    written: int = 0  # rows whose vector / documents whose chunk set was written
    current: int = 0  # skipped: they already hold the vectors of their input under the model
    empty_input: int = 0
    stale: int = 0  # not written: changed meanwhile (the incremental path embeds them)
    busy: int = 0  # documents the application held locked: left for the next run
    failed: int = 0  # the provider could not embed them (see errors)
    retryable_failures: int = 0
    documents: int = 0  # documents looked at
    chunks_embedded: int = 0
    chunks_reused: int = 0
    tokens: int = 0
    requests: int = 0
    batches: int = 0
    seconds: float = 0.0
    limit_wait_seconds: float = 0.0  # waiting for the shared provider rate limit
    stopped: str | None = None  # why the shard stopped before its end (paused, outside its window)
    errors: list[str] = field(default_factory=list)

    _SUMMED = ("written", "current", "empty_input", "stale", "busy", "failed", "retryable_failures", "documents",
               "chunks_embedded", "chunks_reused", "tokens", "requests", "batches", "limit_wait_seconds")

    @property
    def embedded(self) -> int:
        """Vectors written (a vector column's name for `written`)."""
        return self.written

    @embedded.setter
    def embedded(self, value: int) -> None:
        self.written = value

    @property
    def rows_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def note_error(self, text: str) -> None:
        if text not in self.errors and len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def add(self, other: "ShardStats") -> None:
        self.stopped = self.stopped or other.stopped
        for name in self._SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for e in other.errors:
            self.note_error(e)

    def summary(self, with_stop: bool = True) -> str:
        """One line; `with_stop=False` leaves out why it stopped (a caller that says it once)."""
        if self.unit == "documents":
            done = (f"{self.written} documents written, {self.current} already current, {self.busy} busy, "
                    f"{self.stale} stale (left to the queue), {self.failed} failed; chunks: {self.chunks_embedded} "
                    f"embedded, {self.chunks_reused} reused; {self.tokens} tokens; {self.seconds:.1f} s")
        else:
            done = (f"{self.written} embedded, {self.current} already current, {self.empty_input} empty, "
                    f"{self.stale} stale (left to the queue), {self.failed} failed; {self.tokens} tokens, "
                    f"{self.requests} requests; {self.seconds:.1f} s, {self.rows_per_second:.0f} rows/s"
                    + (f", {self.limit_wait_seconds:.1f} s waiting for the rate limit"
                       if self.limit_wait_seconds else ""))
        return done + (f"; stopped: {self.stopped}" if self.stopped and with_stop else "")


def walk_pages(conn: psycopg.Connection, pipeline: str | None, stats: ShardStats,
               read: Callable[[psycopg.Connection], Page | None], write: Callable[[Page], int | None], *,
               read_ahead: str | None = None, max_written: int | None = None,
               planned: Callable[[Page], int] = lambda page: 0,
               on_page: Callable[[ShardStats, int], None] | None = None, started: float | None = None) -> None:
    """Read and write one shard's pages until `read` returns None (the end of the shard), the
    backfill of `pipeline` is paused or leaves its window (checked before each page is read: what
    was written stays, the next run resumes after it), or the time box is full: `max_written`
    units (`stats.written`: rows, documents) written, whatever the shape (a page may end past it).
    `write(page)` returns the units to report to `on_page(stats, units)` (None: nothing to report).

    `read_ahead` (what the second connection is for, in messages): the next page is read (and
    embedded) on a second connection while this one is written; a page after `page` is read before
    `page` is written only when `page`'s `planned` writes leave room in the time box (a time-boxed
    run never pays for a page it will not write). Without it pages are read, then written, one
    after the other."""
    started = time.perf_counter() if started is None else started

    def room(page: Page | None) -> bool:
        return max_written is None or stats.written + (planned(page) if page is not None else 0) < max_written

    ahead_conn = second_connection(conn, read_ahead) if read_ahead else None
    if ahead_conn is not None:
        pin_session(ahead_conn)
    pool = ThreadPoolExecutor(1, thread_name_prefix="autoembed-backfill") if ahead_conn is not None else None

    def next_page() -> Future:
        return pool.submit(read, ahead_conn) if pool is not None else completed(read, conn)

    def go_on() -> bool:
        stats.stopped = backfill_control.stop_reason(conn, pipeline) if pipeline is not None else None
        return stats.stopped is None

    try:
        pending: Future | None = next_page() if room(None) and go_on() else None
        while pending is not None:
            page = pending.result()
            if page is None:
                break
            pending = next_page() if read_ahead and room(page) and go_on() else None
            units = write(page)
            stats.seconds = time.perf_counter() - started
            if on_page is not None and units is not None:
                on_page(stats, units)
            if pending is None and stats.stopped is None and room(None) and (read_ahead or go_on()):
                pending = next_page()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if ahead_conn is not None:
            ahead_conn.close()
    stats.seconds = time.perf_counter() - started


# -- a whole backfill ------------------------------------------------------------------------------
class BackfillPlan(Protocol):
    mode: str  # "in_place", "skip", or a shadow's: "migration" (a column), "shadow" (a chunk set)
    reason: str

    @property
    def into_shadow(self) -> bool:
        """Whether the shard writes a shadow that is promoted when complete."""


PlanT = TypeVar("PlanT", bound=BackfillPlan)


class ShapeBackfill(Protocol[PlanT]):
    """The per-shape parts of a backfill (see the module doc)."""

    unit: str

    def plan(self, conn: psycopg.Connection) -> PlanT:
        """Where the vectors go; makes the shadow when the model changes."""

    def coverage(self, conn: psycopg.Connection, plan: PlanT) -> Coverage:
        """Of the table the plan writes."""

    def fill(self, conn: psycopg.Connection, plan: PlanT, shard: int, shards: int) -> ShardStats:
        """Bring one shard up to date (walk_pages)."""

    def promote(self, conn: psycopg.Connection, plan: PlanT) -> PromoteResult:
        """Swap the complete shadow in (core.migrate.migration.step); returns what the promotion did."""


@dataclass
class BackfillResult(Generic[PlanT]):
    plan: PlanT
    shards: list[ShardStats]
    total: ShardStats
    coverage: Coverage | None  # of the table written, after the run; None when skipped
    promotion: PromoteResult | None = None  # what the shape's promote did, when the shadow was promoted
    not_run: list[int] = field(default_factory=list)  # shards not started: a pause or the window stopped the run

    @property
    def stopped_shards(self) -> list[int]:
        """Shards a pause or the window's end stopped before their end, and those not started."""
        return [s.shard for s in self.shards if s.stopped] + self.not_run


def run_shards(conn: psycopg.Connection, p: Pipeline, shape: ShapeBackfill, *, only: list[int] | None = None,
               shards: int | None = None, promote_when_complete: bool = True,
               on_plan: Callable[[Any, Coverage], None] | None = None) -> BackfillResult:
    """Every shard (or `only` these) one after the other, then promote a complete shadow.

    Refused up front (BackfillHeld, nothing started: no shadow made) while the pipeline's backfill
    is paused or outside its window; a pause or the window's end during the run stops it after the
    current page (`total.stopped`, the shards in `stopped_shards`)."""
    n = shards or p.shards
    backfill_control.refuse_if_held(conn, p.name)
    plan = shape.plan(conn)
    total = ShardStats(-1, n, shape.unit)
    if plan.mode == "skip":
        return BackfillResult(plan, [], total, None)
    if on_plan:
        on_plan(plan, shape.coverage(conn, plan))
    started = time.perf_counter()
    results, todo = [], list(only if only is not None else range(n))
    for i in todo:
        stats = shape.fill(conn, plan, i, n)
        results.append(stats)
        total.add(stats)
        if stats.stopped:
            break  # the same pause or window stops every later shard
    total.seconds = time.perf_counter() - started
    cov = shape.coverage(conn, plan)
    promotion = shape.promote(conn, plan) if plan.into_shadow and promote_when_complete and cov.complete else None
    return BackfillResult(plan, results, total, cov, promotion, todo[len(results):])
