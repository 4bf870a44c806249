"""The drain: claim jobs from pgmq, embed the rows' current input, write vectors.

One batch = claim (pgmq.read with a visibility timeout) → read current inputs → embed → one
transaction that writes vectors and deletes/archives the messages. A crash anywhere loses nothing:
claimed messages reappear when their visibility timeout ends. Plain Python: the CLI, the Python
API, Dagster runs and benchmarks all call `drain()`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, TypeVar

import numpy as np
import psycopg
from psycopg import errors, sql

from . import queue as pgmq
from .config import EmbedderSettings, Settings
from .database import conninfo_of, lending, second_connection
from .embedders import make_embedder
from .embedders.base import Embedder, EmbeddingError
from .targets import (Target, TargetError, TargetKey, check_dimensions, key_value, message_row_count, resolve,
                      target_key_from_message)

log = logging.getLogger(__name__)
T = TypeVar("T")

EmbedderResolver = Callable[[Target], Embedder]

SHARED_MESSAGE_ROWS = 200  # rows per message of a bulk statement (sql/003 autoembed.job_messages)

TableKey = tuple[str, str, str]  # (schema, table, embedding column): how pipelines name a target
UNKNOWN_TABLE: TableKey = ("?", "?", "?")  # messages too malformed to name a table


@dataclass
class _Counts:
    """What a drain counts, in total (DrainStats) and per table (TableStats)."""

    embedded: int = 0  # rows whose vector was written
    unchanged: int = 0  # jobs skipped: the stored vector already matches the input and model
    deleted_rows: int = 0  # jobs whose row no longer exists
    empty_input: int = 0  # rows whose input is NULL or blank: no vector, column left NULL
    stale: int = 0  # vectors not written because the row changed meanwhile (a newer job exists)
    retried: int = 0  # jobs put back for a later attempt
    dead_lettered: int = 0
    messages: int = 0  # messages claimed
    rows: int = 0  # rows those messages cover
    tokens: int = 0
    requests: int = 0  # provider requests (HTTP calls, or local model batches)
    truncated: int = 0

    @property
    def skipped(self) -> int:
        """Jobs settled with no provider call: unchanged input, deleted row, empty input."""
        return self.unchanged + self.deleted_rows + self.empty_input

    def _add_counts(self, other: "_Counts", names: tuple[str, ...]) -> None:
        for name in names:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_COUNTS = tuple(f.name for f in fields(_Counts))


@dataclass
class TableStats(_Counts):
    """One table's (embedding column's) share of a drain: DrainStats.by_table."""

    texts: int = 0  # texts sent to the embedder
    embed_calls: int = 0  # embedder calls (one per provider batch of the drain)
    embed_seconds: float = 0.0  # time inside the embedder

    def add(self, other: "TableStats") -> None:
        self._add_counts(other, tuple(f.name for f in fields(self)))


def table_key(key: TargetKey) -> TableKey:
    return (key.schema, key.table, key.embedding_column)


def _table_of_body(body: object) -> TableKey:
    try:
        key, _ = target_key_from_message(body)
    except TargetError:
        return UNKNOWN_TABLE
    return table_key(key)


@contextmanager
def _attributed(stats: "DrainStats", key: TableKey, names: tuple[str, ...]):
    """Add what the block adds to `stats` counters `names` to the table's share as well."""
    before = [getattr(stats, n) for n in names]
    yield
    ts = stats.table(key)
    for n, b in zip(names, before):
        setattr(ts, n, getattr(ts, n) + getattr(stats, n) - b)


@dataclass
class DrainStats(_Counts):
    batches: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # distinct error texts seen (capped)
    # The same numbers per table (messages too malformed to name one: UNKNOWN_TABLE); they add up
    # to the totals above.
    by_table: dict[TableKey, TableStats] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def table(self, key: TableKey) -> TableStats:
        ts = self.by_table.get(key)
        if ts is None:
            ts = self.by_table[key] = TableStats()
        return ts

    def add(self, other: "DrainStats") -> None:
        self._add_counts(other, (*_COUNTS, "batches"))
        for key, ts in other.by_table.items():
            self.table(key).add(ts)
        for e in other.errors:
            self.note_error(e)

    def note_error(self, text: str) -> None:
        if text not in self.errors and len(self.errors) < 20:
            self.errors.append(text)

    def summary(self) -> str:
        return (
            f"{self.embedded} embedded, {self.unchanged} unchanged, {self.deleted_rows} deleted rows, "
            f"{self.empty_input} empty inputs, {self.stale} stale, {self.retried} retried, "
            f"{self.dead_lettered} dead-lettered; {self.tokens} tokens, {self.requests} requests; "
            f"{self.seconds:.1f} s, {self.rows_per_second:.0f} rows/s"
        )


def resolve_embedder(resolver: EmbedderResolver, target: Target, conn: psycopg.Connection) -> Embedder:
    """resolver(target), with `conn` (a connection to the database `target` is in) lent for the
    migration lookup: the right database, and no connection of the resolver's own."""
    with lending(conn):
        return resolver(target)


def default_resolver(settings: EmbedderSettings | None = None, *, url: str | None = None,
                     migrations: bool = True) -> EmbedderResolver:
    """The model for every table: AUTOEMBED_PROVIDER / AUTOEMBED_MODEL, sized to the column.

    Migration-aware (core.migration): a column in a model migration gets the migration's model,
    looked up in the database at `url` (default: the configured one)."""
    settings = settings or EmbedderSettings.from_env()
    if not migrations:
        return lambda target: make_embedder(settings, dimensions=target.dimensions)
    from .migration import migration_aware  # imported here: migration.py imports this module's peers

    return migration_aware(lambda schema, table, column: settings, url)


@dataclass
class _Job:
    """One row of a claimed message (a message of a bulk statement covers up to 200 rows)."""

    msg_id: int
    read_ct: int
    body: object
    row_id: str
    attempts: int = 1  # attempts at this row including this one (see _attempts)
    message_rows: int = 1  # rows the message covers

    @property
    def shared(self) -> bool:
        return self.message_rows > 1


@dataclass
class _Row:
    input: str | None
    hash: bytes | None
    has_vector: bool
    state_hash: bytes | None
    state_model: str | None


@dataclass
class _Outcome:
    """What one batch decided, applied in one transaction."""

    done: list[int] = field(default_factory=list)  # delete these messages
    dead: list[tuple[_Job, str]] = field(default_factory=list)
    retry: list[tuple[_Job, str]] = field(default_factory=list)
    # (row id, content hash the vector was made from, its binary COPY tuple, message ids)
    writes: dict[Target, list[tuple[str, bytes, bytes, list[int]]]] = field(default_factory=dict)
    deleted_rows: dict[Target, list[str]] = field(default_factory=dict)
    # The model that made each target's vectors, fixed at embedding time: a promotion between
    # embedding and writing must not relabel old-model vectors as the new model.
    models: dict[Target, str] = field(default_factory=dict)


@dataclass
class _Batch:
    """One claimed batch on its way through the drain: claimed → embedded → settled."""

    stats: DrainStats
    outcome: _Outcome
    started: float
    # provider calls still to make: (target, embedder, row ids, rows read, jobs by row id)
    work: list[tuple[Target, Embedder, list[str], dict[str, "_Row"], dict[str, list[_Job]]]] = field(
        default_factory=list)
    msg_ids: list[int] = field(default_factory=list)  # every message claimed (to take the batch up again)
    retried: bool = False  # already the second attempt of a batch whose target changed under it


class TargetChanged(RuntimeError):
    """A table/column resolved earlier no longer is what the drain resolved (renamed, resized...)."""


# What a batch meets when an embedding column changed under a drain that resolved it earlier: a
# model-migration promotion or rollback renames columns and changes their size in one transaction.
# MigrationChanged (the migration-aware resolver) is added lazily: see _target_changed().
_TARGET_CHANGE_ERRORS: tuple[type[BaseException], ...] = (
    TargetChanged,
    errors.UndefinedColumn,  # the column was renamed away
    errors.UndefinedTable,
    errors.DatatypeMismatch,  # plpgsql: "type of parameter n does not match that when preparing the plan"
    errors.FeatureNotSupported,  # "cached plan must not change result type"
    errors.DataException,  # pgvector: "expected 512 dimensions, not 1536"
    errors.SerializationFailure,  # the migration guard on embedding_state: a vector of the old model
)


def _target_changed(exc: BaseException) -> bool:
    from .migration import MigrationChanged  # imported here like in default_resolver

    return isinstance(exc, (MigrationChanged, *_TARGET_CHANGE_ERRORS))


class Drainer:
    """Drains one queue. Keeps target and embedder lookups for the life of the object; when a
    batch fails because a target changed under it (a model-migration promotion), it forgets them
    and takes the batch up once more (its messages are still claimed: nothing is lost either way)."""

    def __init__(
        self,
        conn: psycopg.Connection,
        settings: Settings | None = None,
        resolver: EmbedderResolver | None = None,
        *,
        pipeline: bool = True,
    ):
        if not conn.autocommit:
            raise ValueError("the drain needs an autocommit connection")
        self.conn = conn
        self.settings = settings or Settings.from_env()
        # Migrations are looked up in the database being drained, not the configured default.
        self.resolver = resolver or default_resolver(url=conninfo_of(conn))
        self._encoding = conn.info.encoding  # of the keys in COPY tuples, made in the worker thread too
        self._targets: dict[TargetKey, Target] = {}
        self._stages: set[str] = set()  # vector types whose temp staging table exists
        self._claimed: deque[list[pgmq.Message]] = deque()  # claimed, not yet taken up (_next_messages)
        self._claimed_at = 0.0
        self._rows_per_message = SHARED_MESSAGE_ROWS
        self.pipeline = pipeline  # run(): embed batch N+1 in a worker thread while batch N is written

    # -- claim -----------------------------------------------------------------------------
    def drain_batch(self) -> DrainStats:
        """Claim one batch and settle every claimed message (written, skipped, retried or dead)."""
        batch = self._claim()
        if batch is None:
            return DrainStats(batches=0)
        self._embed(batch)
        return self._finish_or_retry(batch)

    def _claim(self, pending: "_Batch | None" = None, conn: psycopg.Connection | None = None) -> "_Batch | None":
        """Claim messages and decide what to do with each, up to the embedding (no provider call).

        `pending`: a batch already embedded whose write has not committed yet (pipelined run). A
        job here whose row that batch is about to write with the same input is settled as
        unchanged instead of being embedded a second time. `conn`: the connection that claims and
        reads (default: the drain's own; a pipelined run claims on a second one)."""
        conn = conn or self.conn
        started = time.perf_counter()
        messages = self._next_messages(conn)
        if not messages:
            return None
        try:
            return self._prepare(messages, started, pending, conn=conn)
        except Exception as exc:
            if not _target_changed(exc):
                raise  # the claims come back when their visibility timeout ends
            self._forget_targets(exc)
        return self._prepare(self._reread([m.msg_id for m in messages], conn), started, pending, retried=True,
                             conn=conn)

    def _next_messages(self, conn: psycopg.Connection) -> list[pgmq.Message]:
        """The next chunk of about `read_batch` rows from claimed messages, reading from pgmq when
        none are left. Messages cover 1 to 200 rows: the read size follows the largest message of
        the last read; a read that brought more rows than one batch is worked through in chunks,
        and its claims are extended while that takes long."""
        s = self.settings
        if not self._claimed:
            qty = max(1, s.read_batch // self._rows_per_message)
            messages = pgmq.read(conn, s.queue, s.visibility_timeout, qty)
            if not messages:
                return []
            sizes = [message_row_count(m.body) for m in messages]
            self._rows_per_message = max(sizes)
            chunk: list[pgmq.Message] = []
            rows = 0
            for message, size in zip(messages, sizes):
                if chunk and rows + size > s.read_batch:
                    self._claimed.append(chunk)
                    chunk, rows = [], 0
                chunk.append(message)
                rows += size
            self._claimed.append(chunk)
            self._claimed_at = time.monotonic()
        elif time.monotonic() - self._claimed_at > s.visibility_timeout / 3:
            pgmq.set_vt(conn, s.queue, [m.msg_id for c in self._claimed for m in c], s.visibility_timeout)
            self._claimed_at = time.monotonic()
        return self._claimed.popleft()

    def _prepare(self, messages: list[pgmq.Message], started: float, pending: "_Batch | None",
                 retried: bool = False, conn: psycopg.Connection | None = None) -> "_Batch":
        conn = conn or self.conn
        stats = DrainStats(batches=1, messages=len(messages))
        batch = _Batch(stats, _Outcome(), started, msg_ids=[m.msg_id for m in messages], retried=retried)
        groups: dict[Target, list[_Job]] = defaultdict(list)
        for message in messages:
            table = UNKNOWN_TABLE
            try:
                key, row_ids = target_key_from_message(message.body)
                table = table_key(key)
                target = self._target(key, conn)
            except TargetError as exc:
                batch.outcome.dead.append((_Job(message.msg_id, message.read_ct, message.body, "",
                                                _attempts(message)), str(exc)))
                stats.rows += 1
                stats.table(table).rows += 1
                continue
            finally:
                stats.table(table).messages += 1
            stats.rows += len(row_ids)
            stats.table(table).rows += len(row_ids)
            attempts = _attempts(message)
            for row_id in row_ids:
                job = _Job(message.msg_id, message.read_ct, message.body, str(row_id), attempts, len(row_ids))
                try:
                    job.row_id = _id_text(row_id, target)
                except TargetError as exc:
                    batch.outcome.dead.append((job, str(exc)))
                    continue
                groups[target].append(job)
        for target, jobs in groups.items():
            in_flight = {}
            if pending is not None:
                in_flight = {w[0]: w[1] for w in pending.outcome.writes.get(target, ())}
            with _attributed(stats, table_key(target.key), ("unchanged", "deleted_rows", "empty_input")):
                self._process_target(target, jobs, batch, in_flight, conn)
        return batch

    def _embed(self, batch: "_Batch") -> "_Batch":
        """The provider calls of a claimed batch (returned, embedded). Touches no database
        connection, so a pipelined run does this in a worker thread while the previous batch is
        written."""
        for target, embedder, row_ids, rows, to_embed in batch.work:
            ts = batch.stats.table(table_key(target.key))
            started = time.perf_counter()
            with _attributed(batch.stats, table_key(target.key), ("tokens", "requests", "truncated")):
                self._embed_rows(target, embedder, row_ids, rows, to_embed, batch.outcome, batch.stats)
            ts.embed_seconds += time.perf_counter() - started
            ts.embed_calls += 1
            ts.texts += len(row_ids)
        batch.work = []
        return batch

    def _finish(self, batch: "_Batch") -> DrainStats:
        self._settle(batch.outcome, batch.stats)
        batch.stats.seconds = time.perf_counter() - batch.started
        return batch.stats

    def _finish_or_retry(self, batch: "_Batch", embedding: Future | None = None) -> DrainStats:
        """Settle an embedded batch. When that fails because a target changed under it (a model
        migration was promoted between the claim and the write), forget the targets and take the
        batch up once more: read its messages again, embed, settle. A second failure is raised;
        the messages were never deleted, so they come back after their visibility timeout.

        `embedding`: the next batch's provider calls, running in the worker (waited for first, so
        that two threads never embed at once)."""
        try:
            return self._finish(batch)
        except Exception as exc:
            if batch.retried or not _target_changed(exc):
                raise
            self._forget_targets(exc)
        if embedding is not None:
            wait_futures([embedding])
        again = self._prepare(self._reread(batch.msg_ids), batch.started, None, retried=True)
        self._embed(again)
        again.stats.add(_spent(batch.stats))  # the first attempt's provider calls were made and paid for
        return self._finish(again)

    def _forget_targets(self, exc: BaseException) -> None:
        log.warning("a table changed under the drain of %s (%s: %s): resolving its targets again and "
                    "retrying the batch", self.settings.queue, type(exc).__name__, str(exc).strip())
        self._targets.clear()

    def _reread(self, msg_ids: list[int], conn: psycopg.Connection | None = None) -> list[pgmq.Message]:
        """The messages of a batch still claimed: those the change deleted (a promotion purges the
        jobs of the shadow column) are gone, and are not retried."""
        return pgmq.read_claimed(conn or self.conn, self.settings.queue, msg_ids)

    def _check_target(self, target: Target, conn: psycopg.Connection | None = None) -> None:
        """Raise TargetChanged when `target` no longer is what the catalog says (one lookup)."""
        try:
            now = resolve(conn or self.conn, target.key)
        except TargetError as exc:
            raise TargetChanged(f"{target.key.label}: {exc}") from exc
        if now != target:
            raise TargetChanged(f"{target.key.label} is {now.vector_type}({now.dimensions}) now, "
                                f"was {target.vector_type}({target.dimensions})")

    def _target(self, key: TargetKey, conn: psycopg.Connection | None = None) -> Target:
        target = self._targets.get(key)
        if target is None:
            target = resolve(conn or self.conn, key)
            self._targets[key] = target
        return target

    # -- read + embed ------------------------------------------------------------------------
    def _process_target(self, target: Target, jobs: list[_Job], batch: "_Batch",
                        in_flight: dict[str, bytes] | None = None, conn: psycopg.Connection | None = None) -> None:
        outcome, stats = batch.outcome, batch.stats
        try:
            embedder = resolve_embedder(self.resolver, target, conn or self.conn)
            check_dimensions(target, embedder.identity.dimensions, embedder.identity.model)
        except (TargetError, ValueError) as exc:
            # ValueError covers ConfigError (e.g. the model cannot make this size).
            where = f"{target.regclass}.{target.key.embedding_column} ({target.vector_type}({target.dimensions}))"
            for job in jobs:
                outcome.dead.append((job, str(exc) if isinstance(exc, TargetError) else f"{where}: {exc}"))
            return
        model = embedder.identity.key
        rows, unreadable = self._read_rows_or_isolate(target, [job.row_id for job in jobs], conn or self.conn)
        to_embed: dict[str, list[_Job]] = {}
        for job in jobs:
            row = rows.get(job.row_id)
            if job.row_id in unreadable:
                # The content function fails on this row (bad bytes, a RAISE...): retrying cannot help.
                outcome.dead.append((job, unreadable[job.row_id]))
            elif row is None:
                stats.deleted_rows += 1
                outcome.done.append(job.msg_id)
                outcome.deleted_rows.setdefault(target, []).append(job.row_id)
            elif row.input is None or not row.input.strip():
                stats.empty_input += 1
                outcome.done.append(job.msg_id)
            elif row.has_vector and row.state_hash == row.hash and row.state_model == model:
                stats.unchanged += 1
                outcome.done.append(job.msg_id)
            elif in_flight and in_flight.get(job.row_id) == row.hash:
                # The batch before this one is writing this very input (it commits first): written
                # there, or found stale there because a newer job for the row exists.
                stats.unchanged += 1
                outcome.done.append(job.msg_id)
            else:
                # Several jobs for one row are embedded once.
                to_embed.setdefault(job.row_id, []).append(job)
        if not to_embed:
            return
        # Rows that failed before are embedded one per request, so a row that keeps failing
        # the whole request (a 500 on its content, say) cannot drag its neighbours down with it.
        first_try = [r for r in to_embed if not _isolated(to_embed[r])]
        retrying = [[r] for r in to_embed if _isolated(to_embed[r])]
        for row_ids in ([first_try] if first_try else []) + retrying:
            batch.work.append((target, embedder, row_ids, rows, to_embed))

    def _embed_rows(self, target: Target, embedder: Embedder, row_ids: list[str], rows: dict[str, "_Row"],
                    to_embed: dict[str, list[_Job]], outcome: _Outcome, stats: DrainStats) -> None:
        try:
            result = embedder.embed([rows[r].input for r in row_ids])
        except Exception as exc:  # an embedder bug or outage must not lose the batch: retry later
            text = f"{target.regclass}: embedding failed: {type(exc).__name__}: {exc}"
            stats.note_error(text)
            outcome.retry.extend((job, text) for r in row_ids for job in to_embed[r])
            return
        stats.tokens += result.tokens
        stats.requests += result.requests
        stats.truncated += result.truncated
        outcome.models[target] = embedder.identity.key
        embedded = [(row_id, rows[row_id].hash, vector)
                    for row_id, vector in zip(row_ids, result.vectors) if vector is not None]
        # Encoded here, in the pipelined run's worker: the writer only joins the tuples.
        records = copy_records(target, embedded, self._encoding)
        outcome.writes.setdefault(target, []).extend(
            (row_id, h, record, [j.msg_id for j in to_embed[row_id]])
            for (row_id, h, _), record in zip(embedded, records))
        for row_id, error in zip(row_ids, result.errors):
            if error is None:
                continue
            row_jobs = to_embed[row_id]
            text = f"{target.regclass} id={row_id}: {error}"
            stats.note_error(text)
            for job in row_jobs:
                if isinstance(error, EmbeddingError) and not error.retryable:
                    outcome.dead.append((job, text))
                else:
                    outcome.retry.append((job, text))

    def _read_rows_or_isolate(self, target: Target, row_ids: list[str],
                              conn: psycopg.Connection) -> tuple[dict[str, _Row], dict[str, str]]:
        """Read the rows; when the batch read fails because the content function fails on some
        row, read them one by one so that only those rows fail (with the reason), not the batch.
        Connection and transient server errors are raised: the claims come back later."""
        try:
            return self._read_rows(target, row_ids, conn), {}
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except psycopg.Error:
            self._check_target(target, conn)  # a column renamed away by a promotion: retry the batch, not per row
        rows: dict[str, _Row] = {}
        unreadable: dict[str, str] = {}
        for row_id in dict.fromkeys(row_ids):
            try:
                rows.update(self._read_rows(target, [row_id], conn))
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except psycopg.Error as exc:
                unreadable[row_id] = (f"{target.regclass} id={row_id}: content function {target.function} failed: "
                                      f"{type(exc).__name__}: {str(exc).strip()}")
        return rows, unreadable

    def _read_rows(self, target: Target, row_ids: list[str], conn: psycopg.Connection) -> dict[str, _Row]:
        query = sql.SQL(
            """select r.k, r.input, autoembed.content_hash(r.input), r.has_vector, s.content_hash, s.model
               from (select t.{key}::text as k, {fn}(t)::text as input, t.{col} is not null as has_vector
                     from {table} t where t.{key} = any(%s::text[]::{key_type}[])) r
               left join autoembed.embedding_state s
                 on s.schema_name = %s and s.table_name = %s and s.embedding_column = %s and s.row_id = r.k
                and s.row_id = any(%s::text[])"""
        ).format(key=target.key_sql, fn=target.function_sql, col=target.column_sql,
                 table=target.table_sql, key_type=target.key_type_sql)
        ids = list(set(row_ids))
        cur = conn.execute(query, (ids, target.key.schema, target.key.table,
                                        target.key.embedding_column, ids), prepare=False)
        return {r[0]: _Row(r[1], r[2], r[3], r[4], r[5]) for r in cur.fetchall()}

    # -- write -------------------------------------------------------------------------------
    def _settle(self, outcome: _Outcome, stats: DrainStats) -> None:
        """Write vectors and settle messages in one transaction (retried once on deadlock)."""
        self._ensure_stages(outcome)
        for attempt in (1, 2):
            try:
                with self.conn.transaction():
                    self.conn.execute("set local autoembed.draining = 'on'")
                    written = stale = 0
                    wrote: list[tuple[Target, int, int]] = []
                    done = list(outcome.done)
                    used_stages: set[str] = set()
                    for target, writes in outcome.writes.items():
                        w, s = self._write_vectors(target, writes, used_stages, outcome.models.get(target))
                        written += w
                        stale += s
                        wrote.append((target, w, s))
                        done.extend(m for *_, msg_ids in writes for m in msg_ids)
                    for target, row_ids in outcome.deleted_rows.items():
                        self._forget_rows(target, row_ids)
                    dead = list(outcome.dead)
                    retry: list[tuple[_Job, str]] = []
                    for job, error in outcome.retry:
                        if job.attempts >= self.settings.max_attempts:
                            dead.append((job, f"{error} (gave up after {job.attempts} attempts)"))
                        else:
                            retry.append((job, error))
                    dead, retry = self._split_shared(dead, retry, done)
                    self._dead_letter(dead)
                    self._schedule_retries(retry)
                    pgmq.delete(self.conn, self.settings.queue, done)
                    if done:
                        self.conn.execute(
                            "delete from autoembed.message_errors where queue_name = %s and msg_id = any(%s)",
                            (self.settings.queue, done),
                        )
                break
            except errors.DeadlockDetected:
                if attempt == 2:
                    raise
        stats.embedded += written
        stats.stale += stale
        stats.dead_lettered += len(dead)
        stats.retried += sum(job.message_rows for job, _ in retry)  # a shared message retried whole: its rows
        for _, error in dead:
            stats.note_error(error)
        for target, w, s in wrote:
            ts = stats.table(table_key(target.key))
            ts.embedded += w
            ts.stale += s
        for job, _ in dead:
            stats.table(_table_of_body(job.body)).dead_lettered += 1
        for job, _ in retry:
            stats.table(_table_of_body(job.body)).retried += job.message_rows

    def _ensure_stages(self, outcome: "_Outcome") -> None:
        """Create the session's staging tables (one per vector type) outside the settle transaction,
        so a rolled-back settle cannot leave the drain believing a stage exists."""
        for target, writes in outcome.writes.items():
            if writes and target.vector_type not in self._stages:
                self.conn.execute(sql.SQL(
                    "create temp table if not exists {} (k text, h bytea, v {}) on commit delete rows"
                ).format(sql.Identifier(_stage_name(target)), sql.SQL(target.vector_type)))
                self._stages.add(target.vector_type)

    def _write_vectors(self, target: Target, writes: list[tuple[str, bytes, bytes, list[int]]],
                       used_stages: set[str] | None = None, model: str | None = None) -> tuple[int, int]:
        """Write vectors whose row still has the input they were made from. Returns (written, stale)."""
        if not writes:
            return 0, 0
        model = model or self.resolver(target).identity.key
        ids = [w[0] for w in writes]
        # Lock the rows (in key order: no deadlock between drains), then read their input as of now.
        # prepare=False everywhere a key array is bound: a cached generic plan for `= any($1)` can
        # fall back to a sequential scan of the whole table (measured: 350 ms per batch at 20k rows).
        current: dict[str, bytes] = {}
        has_vector: set[str] = set()
        for k, h, v in self.conn.execute(
            sql.SQL(
                """select t.{key}::text, autoembed.content_hash({fn}(t)::text), t.{col} is not null
                   from {table} t where t.{key} = any(%s::text[]::{key_type}[]) order by t.{key} for update"""
            ).format(key=target.key_sql, fn=target.function_sql, table=target.table_sql, col=target.column_sql,
                     key_type=target.key_type_sql),
            (ids,), prepare=False,
        ).fetchall():
            current[k] = h
            if v:
                has_vector.add(k)
        # Another drain may have written the same input meanwhile: then there is nothing to do.
        # (A new statement, so it sees what committed while we waited for the locks.)
        already = {
            row_id for row_id, state_hash, state_model in self.conn.execute(
                """select row_id, content_hash, model from autoembed.embedding_state
                   where schema_name = %s and table_name = %s and embedding_column = %s and row_id = any(%s)""",
                (target.key.schema, target.key.table, target.key.embedding_column, [k for k in has_vector]),
                prepare=False,
            ) if state_model == model and state_hash == current.get(row_id)
        } if has_vector else set()
        fresh = [w for w in writes if current.get(w[0]) == w[1] and w[0] not in already]
        stale = sum(1 for w in writes if w[0] in current and current[w[0]] != w[1])
        if not fresh:
            return 0, stale
        stage = sql.Identifier(_stage_name(target))
        with self.conn.cursor() as cur:
            if used_stages is not None:
                if target.vector_type in used_stages:
                    cur.execute(sql.SQL("truncate {}").format(stage))  # rows of another target, same transaction
                used_stages.add(target.vector_type)
            # One binary COPY of the tuples copy_records() made, already in the column's own
            # type: no per-value adapters, no cast on the server.
            with cur.copy(sql.SQL("copy {} (k, h, v) from stdin with (format binary)").format(stage)) as copy:
                copy.write(b"".join([_COPY_HEADER, *(w[2] for w in fresh), _COPY_TRAILER]))
            fresh_ids = [w[0] for w in fresh]
            # The key array lets the planner probe the key index instead of hashing the whole table.
            cur.execute(
                sql.SQL(
                    """update {table} t set {col} = s.v from {stage} s
                       where t.{key} = s.k::{key_type} and t.{key} = any(%s::text[]::{key_type}[])"""
                ).format(table=target.table_sql, col=target.column_sql, stage=stage,
                         key=target.key_sql, key_type=target.key_type_sql),
                (fresh_ids,), prepare=False,
            )
            cur.execute(
                sql.SQL(
                    """insert into autoembed.embedding_state as e
                           (schema_name, table_name, embedding_column, row_id, content_hash, model, embedded_at)
                       select %s, %s, %s, s.k, s.h, %s, now() from {stage} s
                       on conflict (schema_name, table_name, embedding_column, row_id) do update
                       set content_hash = excluded.content_hash, model = excluded.model, embedded_at = now()"""
                ).format(stage=stage),
                (target.key.schema, target.key.table, target.key.embedding_column, model),
            )
        return len(fresh), stale

    def _forget_rows(self, target: Target, row_ids: list[str]) -> None:
        self.conn.execute(
            """delete from autoembed.embedding_state where schema_name = %s and table_name = %s
               and embedding_column = %s and row_id = any(%s)""",
            (target.key.schema, target.key.table, target.key.embedding_column, row_ids),
        )

    def _split_shared(self, dead: list[tuple[_Job, str]], retry: list[tuple[_Job, str]],
                      done: list[int]) -> tuple[list[tuple[_Job, str]], list[tuple[_Job, str]]]:
        """Failed rows of a message for several rows. When all of them failed at a first attempt (a
        provider outage, a timeout), the message is retried whole. Otherwise each failed row gets a
        message of its own (Supabase's shape plus "attempts"), retried alone or dead-lettered, and
        the shared message is deleted (`done`) with the rest of its rows."""
        failed: dict[int, int] = defaultdict(int)
        for job, _ in dead + retry:
            if job.shared:
                failed[job.msg_id] += 1
        retried_whole = {job.msg_id for job, _ in retry
                         if job.shared and job.attempts <= 1 and failed[job.msg_id] == job.message_rows}
        whole = {job.msg_id: (job, error) for job, error in retry if job.msg_id in retried_whole}
        own = [(job, error, is_dead) for is_dead, jobs in ((True, dead), (False, retry))
               for job, error in jobs if job.shared and job.msg_id not in retried_whole]
        bodies = [_single_body(job) for job, _, _ in own]
        new_ids = pgmq.send_batch(self.conn, self.settings.queue, bodies)
        done.extend(job.msg_id for job, _, _ in own)
        split = [((_Job(msg_id, 0, body, job.row_id, job.attempts), error), is_dead)
                 for (job, error, is_dead), body, msg_id in zip(own, bodies, new_ids)]
        return ([d for d in dead if not d[0].shared] + [pair for pair, is_dead in split if is_dead],
                [r for r in retry if not r[0].shared] + list(whole.values())
                + [pair for pair, is_dead in split if not is_dead])

    def _dead_letter(self, dead: list[tuple[_Job, str]]) -> None:
        if not dead:
            return
        q = self.settings.queue
        with self.conn.cursor() as cur:
            cur.executemany(
                """insert into autoembed.dead_letters (queue_name, msg_id, message, error, attempts)
                   values (%s, %s, %s, %s, %s)
                   on conflict (queue_name, msg_id) do update set error = excluded.error,
                       attempts = excluded.attempts, failed_at = now()""",
                [(q, job.msg_id, psycopg.types.json.Jsonb(job.body), _clean(error), job.attempts)
                 for job, error in dead],
            )
        ids = [job.msg_id for job, _ in dead]
        pgmq.archive(self.conn, q, ids)
        self.conn.execute(
            "delete from autoembed.message_errors where queue_name = %s and msg_id = any(%s)", (q, ids)
        )

    def _schedule_retries(self, retry: list[tuple[_Job, str]]) -> None:
        if not retry:
            return
        q = self.settings.queue
        with self.conn.cursor() as cur:
            cur.executemany(
                """insert into autoembed.message_errors (queue_name, msg_id, error, attempts)
                   values (%s, %s, %s, %s)
                   on conflict (queue_name, msg_id) do update set error = excluded.error,
                       attempts = excluded.attempts, failed_at = now()""",
                [(q, job.msg_id, _clean(error), job.attempts) for job, error in retry],
            )
        # Back off linearly with the attempt number so a struggling provider gets air.
        by_delay: dict[int, list[int]] = defaultdict(list)
        for job, _ in retry:
            by_delay[self.settings.retry_delay * max(job.attempts, 1)].append(job.msg_id)
        for delay, ids in by_delay.items():
            pgmq.set_vt(self.conn, q, ids, delay)

    # -- loop --------------------------------------------------------------------------------
    def run(
        self,
        *,
        idle_timeout: float = 0.0,
        time_budget: float | None = None,
        on_batch: Callable[[DrainStats, DrainStats], None] | None = None,
    ) -> DrainStats:
        """Drain until the queue has no visible message; then wait up to `idle_timeout` seconds
        for more (LISTEN/NOTIFY), and stop when `time_budget` seconds have passed.

        Pipelined (the default): while batch N is written, a worker thread claims batch N+1 on a
        second connection and makes its provider calls. Every batch is still settled on its own,
        in order, in one transaction, on the drain's connection."""
        total = DrainStats()
        started = time.perf_counter()
        deadline = started + time_budget if time_budget else None
        listening = False
        pool = ThreadPoolExecutor(1, thread_name_prefix="autoembed-embed") if self.pipeline else None
        claim_conn = (second_connection(self.conn, f"the claims of the drain of {self.settings.queue}")
                      if pool is not None else None)
        current: _Batch | None = None  # claimed; being embedded by `embedding`
        embedding: Future | None = None

        def report(stats: DrainStats) -> None:
            total.add(stats)
            total.seconds = time.perf_counter() - started
            if on_batch:
                on_batch(stats, total)

        def in_time() -> bool:
            return deadline is None or time.perf_counter() < deadline

        try:
            while True:
                if current is None:
                    if not in_time() and not self._claimed:  # what is claimed already gets done
                        break
                    current = self._claim()
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
                if pool is not None and (in_time() or self._claimed):
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
                    raise  # the next batch's claims come back when their visibility timeout ends
                report(stats)
                current = following.result() if following is not None else None
                embedding = following
        finally:
            self._claimed.clear()  # after an error: those claims come back when their timeout ends
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if claim_conn is not None:
                claim_conn.close()
            if listening:
                self.conn.execute("unlisten *")
        total.seconds = time.perf_counter() - started
        return total

    def _claim_and_embed(self, pending: "_Batch", conn: psycopg.Connection) -> "_Batch | None":
        batch = self._claim(pending=pending, conn=conn)
        return self._embed(batch) if batch is not None else None

    def _start_embed(self, pool: ThreadPoolExecutor | None, batch: "_Batch") -> Future:
        """The provider calls of `batch`, in the worker when there is one; the future's result is the batch."""
        if pool is not None and batch.work:
            return pool.submit(self._embed, batch)
        return completed(self._embed, batch)

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
        return self.conn.execute(
            sql.SQL("select exists (select 1 from pgmq.{} where vt <= clock_timestamp())").format(
                sql.Identifier("q_" + self.settings.queue))
        ).fetchone()[0]


def drain(
    conn: psycopg.Connection,
    settings: Settings | None = None,
    resolver: EmbedderResolver | None = None,
    *,
    idle_timeout: float = 0.0,
    time_budget: float | None = None,
    on_batch: Callable[[DrainStats, DrainStats], None] | None = None,
) -> DrainStats:
    """Drain `settings.queue` until it is empty (see Drainer.run)."""
    return Drainer(conn, settings, resolver).run(
        idle_timeout=idle_timeout, time_budget=time_budget, on_batch=on_batch
    )


def completed(fn: Callable[..., T], *args) -> "Future[T]":
    """fn(*args) run now, as a finished future (what a worker would have returned)."""
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - re-raised by .result()
        done.set_exception(exc)
    return done


def _spent(stats: DrainStats) -> DrainStats:
    """The provider usage of a batch (per table too), without its outcome."""
    out = DrainStats(tokens=stats.tokens, requests=stats.requests, truncated=stats.truncated)
    for key, ts in stats.by_table.items():
        out.by_table[key] = TableStats(tokens=ts.tokens, requests=ts.requests, truncated=ts.truncated,
                                       texts=ts.texts, embed_calls=ts.embed_calls, embed_seconds=ts.embed_seconds)
    return out


def _attempts(message: pgmq.Message) -> int:
    """Attempts at a message: its claims, plus, for a row split off a shared message, the attempts
    before ("attempts")."""
    before = message.body.get("attempts") if isinstance(message.body, dict) else None
    if isinstance(before, int) and not isinstance(before, bool) and 0 <= before < 1000:
        return message.read_ct + before
    return message.read_ct


def _isolated(jobs: list[_Job]) -> bool:
    """Whether a row is embedded in a request of its own: a one-row message that failed before,
    so that a row failing every request it is in cannot fail its neighbours."""
    return any(not j.shared and j.attempts > 1 for j in jobs)


def _single_body(job: _Job) -> dict:
    """The one-row message of a row split off a shared message."""
    body = {k: v for k, v in job.body.items() if k not in ("ids", "idRange")}
    body["id"] = key_value(job.row_id)
    body["attempts"] = job.attempts
    return body


def _id_text(row_id: object, target: Target) -> str:
    """The message's row id as text, checked against an integer key so a bad id fails alone."""
    text = str(row_id)
    if target.key_type in ("integer", "bigint", "smallint"):
        try:
            int(text)
        except ValueError:
            raise TargetError(f"id {row_id!r} is not a valid {target.key_type} key of {target.regclass}") from None
    return text


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def _stage_name(target: Target) -> str:
    return f"autoembed_stage_{target.vector_type}"


def copy_records(target: Target, rows: list[tuple[str, bytes, np.ndarray]], encoding: str) -> list[bytes]:
    """The binary COPY tuple of each (key text, content hash bytea, vector|halfvec) row.

    The vectors are converted to big-endian float32/float16 in one numpy call; each tuple is then
    three length-prefixed fields. pgvector's binary format: int16 dim, int16 unused, elements.
    """
    if not rows:
        return []
    dims = target.dimensions
    elem = np.dtype(">f2") if target.vector_type == "halfvec" else np.dtype(">f4")
    matrix = np.asarray(np.stack([r[2] for r in rows]), dtype=np.float32).astype(elem)
    if matrix.shape[1] != dims:
        raise ValueError(f"vectors have {matrix.shape[1]} dimensions, the column {dims}")
    vector_head = struct.pack(">ihh", 4 + dims * elem.itemsize, dims, 0)
    pack = struct.Struct(">hi").pack
    pack_length = struct.Struct(">i").pack
    records = []
    for (key, content_hash, _), vector in zip(rows, matrix):
        kb = key.encode(encoding)
        records.append(b"".join((pack(3, len(kb)), kb, pack_length(len(content_hash)), content_hash,
                                 vector_head, vector.tobytes())))
    return records


def _clean(text: str) -> str:
    """Error text that Postgres can store (no NUL) and that stays readable."""
    return text.replace("\x00", "\\0")[:4000]


def pipeline_resolver(pipelines, base: EmbedderSettings | None = None, *, url: str | None = None,
                      migrations: bool = True) -> EmbedderResolver:
    """Each pipeline's own model for its table; the default model for any other enrolled table.

    Migration-aware like default_resolver: during a model migration the shadow column gets the new
    model and the live column keeps the model of the vectors it holds, whatever the config says."""
    base = base or EmbedderSettings.from_env()
    by_target = {(p.schema, p.table, p.embedding_column): p.embedder_settings(base) for p in pipelines}

    def configured(schema: str, table: str, column: str) -> EmbedderSettings:
        return by_target.get((schema, table, column), base)

    if migrations:
        from .migration import migration_aware

        return migration_aware(configured, url)

    def resolve_embedder(target: Target) -> Embedder:
        return make_embedder(configured(target.key.schema, target.key.table, target.key.embedding_column),
                             dimensions=target.dimensions)

    return resolve_embedder
