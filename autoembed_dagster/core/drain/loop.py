"""The drain loop: claim → read → embed → settle, batch after batch, pipelined.

The stages live in their own modules (claims, jobs, read, embed, settle); this one orders them,
keeps target and embedder lookups for the life of a Drainer, and waits for work (LISTEN/NOTIFY).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import psycopg
from psycopg import errors, sql

from ..queue import pgmq
from ..config import ConfigError, CredentialsError, Settings
from ..db.server import conninfo_of, second_connection
from ..embed.base import EmbeddingError, ProviderConfigError
from ..targets.splitter import Splitter, splitter_for
from ..targets.catalog import (Target, TargetChanged, TargetError, TargetKey, repair_schema, check_dimensions,
                               registered_target, target_key_from_message)
from ..targets.models import MigrationChanged
from .chunked import ChunkWork, embed_chunk_work, read_chunk_jobs, write_target
from ..queue.claims import Claims
from .embed import embed_work
from .jobs import History, Job, claim_history, row_jobs
from .outcome import Outcome
from .read import Work, read_rows_or_isolate, sort_jobs
from .resolvers import EmbedderResolver, default_resolver, resolve_embedder
from .settle import Settler
from .stats import UNKNOWN_TABLE, DrainStats, attributed, spent, table_key

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a run keeps coming back for rows it put back because the application held them locked
# (since its last batch that settled anything else), before it leaves them to the next run.
BUSY_PATIENCE_SECONDS = 30.0

# Keys travel as text; these settings make a key's text form the same in every session.
SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres"}


@dataclass
class Batch:
    """One claimed batch on its way through the drain: claimed → embedded → settled."""

    stats: DrainStats
    outcome: Outcome
    started: float
    work: list[Work] = field(default_factory=list)  # provider calls still to make
    msg_ids: list[int] = field(default_factory=list)  # every message claimed (to take the batch up again)
    retried: bool = False  # already the second attempt of a batch whose target changed under it
    stopped_by: EmbeddingError | None = None  # a configuration error from the provider


# What a batch meets when an embedding column changed under a drain that resolved it earlier: a
# model-migration promotion or rollback renames columns and changes their size in one transaction.
_TARGET_CHANGE_ERRORS: tuple[type[BaseException], ...] = (
    TargetChanged,
    MigrationChanged,  # the migration-aware resolver: the column's model changed since it was read
    errors.UndefinedColumn,  # the column was renamed away
    errors.UndefinedTable,
    errors.DatatypeMismatch,  # plpgsql: "type of parameter n does not match that when preparing the plan"
    errors.FeatureNotSupported,  # "cached plan must not change result type"
    errors.DataException,  # pgvector: "expected 512 dimensions, not 1536"
    errors.SerializationFailure,  # the migration guard on embedding_state: a vector of the old model
)


def target_changed(exc: BaseException) -> bool:
    return isinstance(exc, _TARGET_CHANGE_ERRORS)


# While a drain runs: a young collection every this many net container allocations (the default
# 700 means one every few rows), and never a full one by the allocation count.
QUIET_GC_THRESHOLD = (20_000, 10, 1_000_000)
_gc_lock = threading.Lock()
_gc_drains = 0  # drains running in this process under quiet_gc
_gc_restore: tuple[tuple[int, ...], bool] = ((700, 10, 10), False)  # thresholds, whether to unfreeze


@contextmanager
def quiet_gc():
    """The collector kept off what a drain does not free: everything allocated before the first
    drain of the process started (modules, the client, Dagster's objects, often a million objects)
    is frozen out of the collections, and collections are rarer. A full collection rescans every
    object and cost the drain several us per row; the drain's own garbage is freed by reference
    counting. Put back as it was when the last drain running in the process leaves (drains may run
    in several threads at once); a heap someone else froze before stays frozen."""
    global _gc_drains, _gc_restore
    with _gc_lock:
        if _gc_drains == 0:
            _gc_restore = (gc.get_threshold(), gc.get_freeze_count() == 0)
            gc.freeze()
            gc.set_threshold(*QUIET_GC_THRESHOLD)
        _gc_drains += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_drains -= 1
            if _gc_drains == 0:
                threshold, unfreeze = _gc_restore
                gc.set_threshold(*threshold)
                if unfreeze:
                    gc.unfreeze()


def pin_session(conn: psycopg.Connection) -> None:
    """Session settings under which key text is canonical (the triggers pin the same)."""
    for name, value in SESSION_SETTINGS.items():
        conn.execute("select set_config(%s, %s, false)", (name, value))


class Drainer:
    """Drains one queue. Keeps target and embedder lookups for the life of the object; when a
    batch fails because a target changed under it (a model-migration promotion), it forgets them
    and takes the batch up once more (its messages are still claimed: nothing is lost either way)."""

    def __init__(self, conn: psycopg.Connection, settings: Settings | None = None,
                 resolver: EmbedderResolver | None = None, *, pipeline: bool = True):
        if not conn.autocommit:
            raise ValueError("the drain needs an autocommit connection")
        self.conn = conn
        self.settings = settings or Settings.from_env()
        # Migrations are looked up in the database being drained, not the configured default.
        self.resolver = resolver or default_resolver(url=conninfo_of(conn))
        pin_session(conn)
        repair_schema(conn, self.settings.queue)
        self._targets: dict[TargetKey | tuple[str, int], Target] = {}
        self._splitters: dict[tuple[int, int, int], Splitter] = {}  # (embedder, tokens, overlap)
        s = self.settings
        self.claims = Claims(s.queue, s.visibility_timeout, s.read_batch)
        self.settler = Settler(conn, s, self.claims)
        self.pipeline = pipeline  # run(): embed batch N+1 in a worker thread while batch N is written
        # Claimed this often by drains that died holding it (a crash in the embedder, out of
        # memory): dead-lettered. A safety net: claims given back unused and failed attempts
        # (counted against max_attempts) are not counted (jobs.History.unsettled).
        self.max_claims = max(10, 3 * s.max_attempts)
        self._progress_at = time.monotonic()  # the last batch that settled more than busy rows

    # -- one batch ---------------------------------------------------------------------------
    def drain_batch(self) -> DrainStats:
        """Claim one batch and settle every claimed message (written, skipped, retried or dead)."""
        self.claims.beat_if_due(self.conn)
        batch = self._claim()
        if batch is None:
            return DrainStats(batches=0)
        self._embed(batch)
        return self._finish_or_retry(batch)

    def _claim(self, pending: Batch | None = None, conn: psycopg.Connection | None = None) -> Batch | None:
        """Claim messages and decide what to do with each, up to the embedding (no provider call).

        `pending`: a batch already embedded whose write has not committed yet (pipelined run). A
        job here whose row that batch is about to write with the same input is settled as
        unchanged instead of being embedded a second time. `conn`: the connection that claims and
        reads (default: the drain's own; a pipelined run claims on a second one)."""
        conn = conn or self.conn
        started = time.perf_counter()
        messages = self.claims.next_chunk(conn)
        if not messages:
            return None
        try:
            return self._prepare(messages, started, pending, conn=conn)
        except Exception as exc:
            if not target_changed(exc):
                raise  # the claims come back when their visibility timeout ends
            self._forget_targets(exc)
        return self._prepare(pgmq.read_claimed(conn, self.settings.queue, [m.msg_id for m in messages]),
                             started, pending, retried=True, conn=conn)

    def _prepare(self, messages: list[pgmq.Message], started: float, pending: Batch | None,
                 retried: bool = False, conn: psycopg.Connection | None = None) -> Batch:
        conn = conn or self.conn
        stats = DrainStats(batches=1, messages=len(messages))
        batch = Batch(stats, Outcome(), started, msg_ids=[m.msg_id for m in messages], retried=retried)
        history = claim_history(conn, self.settings.queue, messages)
        failures = {msg_id: h.failures for msg_id, h in history.items() if h.failures}
        groups: dict[Target, list[Job]] = defaultdict(list)
        for message in messages:
            table = UNKNOWN_TABLE
            try:
                h = history.get(message.msg_id) or History()
                if h.unsettled(message.read_ct) >= self.max_claims:
                    # Claims given back unused and attempts that ended in a recorded error are not
                    # counted: only drains that died holding it (a crash, out of memory, a killed run).
                    raise TargetError(
                        f"claimed {message.read_ct} times and never settled: {h.unsettled(message.read_ct)} drains "
                        f"died holding it (a crash or out of memory while embedding or writing it? a killed run?)"
                        + (f"; {h.failures} failed attempt(s) recorded, the last: {h.error}" if h.error
                           else "; no error was recorded for it"))
                key, row_ids = target_key_from_message(message.body)
                table = table_key(key)
                target = self._target(message.body, key, conn)
                table = table_key(target.key)
            except TargetError as exc:
                batch.outcome.dead.append((Job(message.msg_id, message.body, "", None,
                                               failures.get(message.msg_id, 0)), str(exc)))
                stats.rows += 1
                stats.table(table).rows += 1
                continue
            finally:
                stats.table(table).messages += 1
            stats.rows += len(row_ids)
            stats.table(table).rows += len(row_ids)
            groups[target] += row_jobs(message, target, row_ids, failures.get(message.msg_id, 0),
                                       batch.outcome.dead)
        for target, jobs in groups.items():
            in_flight = {w[0]: w[1] for w in pending.outcome.writes.get(target, ())} if pending else {}
            with attributed(stats, table_key(target.key), ("unchanged", "deleted_rows", "empty_input")):
                batch.work += self._read(target, jobs, batch, in_flight, conn)
        return batch

    def _read(self, target: Target, jobs: list[Job], batch: Batch, in_flight: dict[str, bytes],
              conn: psycopg.Connection) -> list[Work]:
        outcome = batch.outcome
        if target.chunked:
            target = write_target(conn, target)  # a model change's shadow chunk table while it exists
        try:
            embedder = resolve_embedder(self.resolver, target, conn)
            check_dimensions(target, embedder.identity.dimensions, embedder.identity.model)
        except TargetError as exc:
            outcome.dead += [(job, str(exc)) for job in jobs]
            return []
        except CredentialsError as exc:
            raise ProviderConfigError(f"the drain of {self.settings.queue} cannot call the provider: {exc} "
                                      "(the jobs stay queued until the configuration is fixed)") from exc
        except ConfigError as exc:
            # The configuration cannot embed this column (a model that cannot make its size).
            where = f"{target.regclass}.{target.key.embedding_column} ({target.vector_type}({target.dimensions}))"
            outcome.dead += [(job, f"{where}: {exc}") for job in jobs]
            return []
        if target.chunked:
            try:
                splitter = self._splitter(embedder, target)
            except ConfigError as exc:  # chunk tokens above this model's window
                outcome.dead += [(job, f"{target.regclass} -> {target.chunk_table}: {exc}") for job in jobs]
                return []
            return read_chunk_jobs(conn, target, embedder, splitter, jobs, outcome, batch.stats)
        rows, unreadable = read_rows_or_isolate(conn, target, [job.row_id for job in jobs])
        return sort_jobs(target, embedder, jobs, rows, unreadable, in_flight, outcome, batch.stats)

    def _splitter(self, embedder, target: Target) -> Splitter:
        """The splitter of a chunk target under `embedder`, kept (with its token-count cache)."""
        key = (id(embedder), target.chunk_tokens, target.chunk_overlap)
        if key not in self._splitters:
            self._splitters[key] = splitter_for(embedder, target.chunk_tokens, target.chunk_overlap)
        return self._splitters[key]

    def _embed(self, batch: Batch) -> Batch:
        """The provider calls of a claimed batch. Touches no database connection, so a pipelined
        run does this in a worker thread while the previous batch is written."""
        for work in batch.work:
            key = table_key(work.target.key)
            ts = batch.stats.table(key)
            started = time.perf_counter()
            embed = embed_chunk_work if isinstance(work, ChunkWork) else embed_work
            with attributed(batch.stats, key, ("tokens", "requests", "truncated", "limit_wait_seconds")):
                batch.stopped_by = embed(work, batch.outcome, batch.stats)
            ts.embed_seconds += time.perf_counter() - started
            ts.embed_calls += 1
            ts.texts += work.text_count
            if batch.stopped_by is not None:
                break  # every further request would be refused the same way
        batch.work = []
        return batch

    def _finish(self, batch: Batch) -> DrainStats:
        if batch.stopped_by is not None:
            raise ProviderConfigError(
                f"the provider refused the drain of {self.settings.queue}: {batch.stopped_by} "
                "(nothing was dead-lettered: the jobs stay queued until the configuration is fixed)")
        self.settler.settle(batch.outcome, batch.stats, batch.msg_ids)
        batch.stats.seconds = time.perf_counter() - batch.started
        if batch.stats.rows > batch.stats.busy:
            self._progress_at = time.monotonic()
        self.claims.observe(batch.stats.rows, batch.stats.seconds)
        return batch.stats

    def _finish_or_retry(self, batch: Batch, embedding: Future | None = None) -> DrainStats:
        """Settle an embedded batch. When that fails because a target changed under it (a model
        migration was promoted between the claim and the write), forget the targets and take the
        batch up once more: read its messages again, embed, settle. A second failure is raised;
        the messages were never deleted, so they come back after their visibility timeout.

        `embedding`: the next batch's provider calls, running in the worker (waited for first, so
        that two threads never embed at once)."""
        try:
            return self._finish(batch)
        except Exception as exc:
            if batch.retried or not target_changed(exc):
                raise
            self._forget_targets(exc)
        if embedding is not None:
            wait_futures([embedding])
        self.claims.hold(batch.msg_ids)
        again = self._prepare(pgmq.read_claimed(self.conn, self.settings.queue, batch.msg_ids), batch.started,
                              None, retried=True)
        self._embed(again)
        again.stats.add(spent(batch.stats))  # the first attempt's provider calls were made and paid for
        return self._finish(again)

    def _forget_targets(self, exc: BaseException) -> None:
        log.warning("a table changed under the drain of %s (%s: %s): resolving its targets again and "
                    "retrying the batch", self.settings.queue, type(exc).__name__, str(exc).strip())
        self._targets.clear()

    def _target(self, body: dict, key: TargetKey, conn: psycopg.Connection) -> Target:
        """The registered target a message points at (targets.registered_target), kept for the life
        of the Drainer by target id or by the names the message gives (`key`)."""
        wanted = body.get("target")
        cache_key = ("id", wanted) if type(wanted) is int else key
        target = self._targets.get(cache_key)
        if target is None:
            target, _ = registered_target(conn, body, self.settings.queue)
            self._targets[cache_key] = target
        return target

    # -- the loop ----------------------------------------------------------------------------
    def run(self, *, idle_timeout: float = 0.0, time_budget: float | None = None,
            on_batch: Callable[[DrainStats, DrainStats], None] | None = None) -> DrainStats:
        """Drain until the queue has no visible message; then wait up to `idle_timeout` seconds
        for more (LISTEN/NOTIFY), and stop when `time_budget` seconds have passed.

        Pipelined (the default): while batch N is written, a worker thread claims batch N+1 on a
        second connection and makes its provider calls; a heartbeat keeps every held claim alive
        on that connection. Every batch is still settled on its own, in order, in one transaction,
        on the drain's connection."""
        total = DrainStats()
        started = time.perf_counter()
        deadline = started + time_budget if time_budget else None
        listening = False
        pool = ThreadPoolExecutor(1, thread_name_prefix="autoembed-embed") if self.pipeline else None
        claim_conn = (second_connection(self.conn, f"the claims of the drain of {self.settings.queue}")
                      if pool is not None else None)
        if claim_conn is not None:
            pin_session(claim_conn)
            self.claims.start_heartbeat(claim_conn)
        current: Batch | None = None  # claimed; being embedded by `embedding`
        embedding: Future | None = None

        def report(stats: DrainStats) -> None:
            total.add(stats)
            total.seconds = time.perf_counter() - started
            if on_batch:
                on_batch(stats, total)

        def in_time() -> bool:
            return deadline is None or time.perf_counter() < deadline

        try:
            with quiet_gc():
                while True:
                    if claim_conn is None:
                        self.claims.beat_if_due(self.conn)
                    if current is None:
                        if not in_time() and not self.claims.pending:  # what is claimed already gets done
                            break
                        current = self._claim()
                        if current is None and in_time() and self._wait_for_busy_rows():
                            continue
                        if current is None:
                            report(DrainStats(batches=0))
                            if idle_timeout <= 0:
                                break
                            if not listening:
                                self.conn.execute(sql.SQL("listen {}").format(sql.Identifier(pgmq.NOTIFY_CHANNEL)))
                                listening = True
                                continue  # re-check: a job may have arrived before LISTEN took effect
                            wait = idle_timeout
                            if deadline is not None:
                                wait = min(wait, max(deadline - time.perf_counter(), 0))
                            if not self._wait_for_work(wait):
                                break
                            continue
                        embedding = self._start_embed(pool, current)
                    embedding.result()  # the worker catches provider errors per batch; this raises only on a bug
                    # The next batch is claimed and embedded while this one is written.
                    following: Future | None = None
                    if pool is not None and current.stopped_by is None and (in_time() or self.claims.pending):
                        if claim_conn is not None:
                            following = pool.submit(self._claim_and_embed, current, claim_conn)
                        else:
                            claimed = self._claim(pending=current)
                            following = self._start_embed(pool, claimed) if claimed is not None else None
                    try:
                        stats = self._finish_or_retry(current, following)
                    except BaseException:
                        if following is not None:
                            following.cancel()
                            wait_futures([following])
                        raise
                    report(stats)
                    current = following.result() if following is not None else None
                    embedding = following
        finally:
            self.claims.stop_heartbeat()
            # What this drain holds and did not settle (rows the application kept locked, claims no
            # batch took up, the jobs a configuration error stopped) is claimable at once.
            try:
                self.claims.give_back(self.conn)
            except psycopg.Error:
                pass  # a lost connection: the claims come back when their timeout ends
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if claim_conn is not None:
                claim_conn.close()
            if listening:
                self.conn.execute("unlisten *")
        total.seconds = time.perf_counter() - started
        return total

    def _claim_and_embed(self, pending: Batch, conn: psycopg.Connection) -> Batch | None:
        batch = self._claim(pending=pending, conn=conn)
        return self._embed(batch) if batch is not None else None

    def _start_embed(self, pool: ThreadPoolExecutor | None, batch: Batch) -> Future:
        """The provider calls of `batch`, in the worker when there is one; the future's result is the batch."""
        if pool is not None and batch.work:
            return pool.submit(self._embed, batch)
        return completed(self._embed, batch)

    def _wait_for_busy_rows(self) -> bool:
        """Wait for the rows this drain keeps because the application held them locked, until
        they are due. False when there are none, or the drain has waited for them long enough
        (it then hands them to the next drain)."""
        due_in = self.claims.later_due_in()
        if due_in is None:
            return False
        if time.monotonic() - self._progress_at > BUSY_PATIENCE_SECONDS:
            self.claims.give_back(self.conn)
            return False
        time.sleep(due_in)
        return True

    def _wait_for_work(self, timeout: float) -> bool:
        """True when a job may be waiting: a notification came, or a retried/expired job is due."""
        end = time.perf_counter() + timeout
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return False
            # Poll at least every second: retries and expired claims become visible without a NOTIFY.
            for _ in self.conn.notifies(timeout=min(left, 1.0), stop_after=1):
                return True
            if self.has_visible_work():
                return True

    def has_visible_work(self) -> bool:
        """Whether the queue holds a message a drain could claim now."""
        return pgmq.has_visible(self.conn, self.settings.queue)


def drain(conn: psycopg.Connection, settings: Settings | None = None, resolver: EmbedderResolver | None = None, *,
          idle_timeout: float = 0.0, time_budget: float | None = None,
          on_batch: Callable[[DrainStats, DrainStats], None] | None = None) -> DrainStats:
    """Drain `settings.queue` until it is empty (see Drainer.run)."""
    return Drainer(conn, settings, resolver).run(idle_timeout=idle_timeout, time_budget=time_budget,
                                                 on_batch=on_batch)


def completed(fn: Callable[..., T], *args) -> "Future[T]":
    """fn(*args) run now, as a finished future (what a worker would have returned)."""
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - re-raised by .result()
        done.set_exception(exc)
    return done
