"""Per-table numbers of a drain (the core `DrainStats` is per queue).

`ReportingDrainer` is the core `Drainer`, unchanged in behaviour; it only attributes each batch's
outcome to the table it concerns, so a drain lane shared by several pipelines can report rows,
tokens and time per pipeline:

- tokens, provider requests and embedding time: through the resolver (a counting wrapper around
  each table's embedder: the public interface);
- jobs claimed, rows written, stale writes, retries and dead letters: from the Drainer's
  per-target steps (`_process_target`, `_settle`, `_write_vectors`, `_dead_letter`,
  `_schedule_retries`). For the settle step only the attempt that committed counts (it is retried
  once on a deadlock). `mismatches()` compares the sums with the core's own totals, so a change of
  those internals shows up in tests and in the run log instead of as wrong numbers.

The core could report this itself (a `by_table` in DrainStats); then this module goes away.
Plain Python, no Dagster.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from psycopg import sql

from . import queue as pgmq
from .drain import Drainer, DrainStats, default_resolver
from .targets import TargetError, target_key_from_message

TableKey = tuple[str, str, str]  # (schema, table, embedding column): how pipelines name a target
UNKNOWN: TableKey = ("?", "?", "?")  # messages too malformed to name a table


@dataclass
class TargetStats:
    messages: int = 0  # jobs claimed for this table
    embedded: int = 0  # rows whose vector was written
    stale: int = 0  # vectors not written: the row changed after it was read (a newer job follows)
    settled_by_write: int = 0  # jobs settled by a vector write (written or stale; several per row possible)
    retried: int = 0
    dead_lettered: int = 0
    tokens: int = 0
    requests: int = 0  # provider requests (HTTP calls, or local model batches)
    truncated: int = 0
    texts: int = 0  # texts sent to the embedder
    embed_calls: int = 0
    embed_seconds: float = 0.0  # time inside the embedder

    @property
    def skipped(self) -> int:
        """Jobs settled without a vector write: unchanged input, deleted row, empty input."""
        return max(self.messages - self.settled_by_write - self.retried - self.dead_lettered, 0)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped}


def _table_of_body(body: Any) -> TableKey:
    try:
        key, _ = target_key_from_message(body)
    except TargetError:
        return UNKNOWN
    return (key.schema, key.table, key.embedding_column)


def _table_of_target(target) -> TableKey:
    return (target.key.schema, target.key.table, target.key.embedding_column)


class _CountingEmbedder:
    """An embedder that adds its calls to a table's TargetStats (thread-safe: a pipelined drain
    embeds in a worker thread)."""

    def __init__(self, inner, stats: TargetStats, lock: threading.Lock):
        self._inner, self._stats, self._lock = inner, stats, lock
        self.identity = inner.identity

    def embed(self, texts: Sequence[str]):
        started = time.perf_counter()
        try:
            out = self._inner.embed(texts)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self._stats.embed_calls += 1
                self._stats.embed_seconds += elapsed
                self._stats.texts += len(texts)
        with self._lock:
            self._stats.tokens += out.tokens
            self._stats.requests += out.requests
            self._stats.truncated += out.truncated
        return out

    def count_tokens(self, text: str) -> int:
        return self._inner.count_tokens(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ReportingDrainer(Drainer):
    """A Drainer that also fills `by_table`: {(schema, table, column): TargetStats}."""

    def __init__(self, conn, settings=None, resolver=None, **kwargs: Any) -> None:
        self.by_table: dict[TableKey, TargetStats] = {}
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        inner = resolver or default_resolver()

        def counting_resolver(target):
            return _CountingEmbedder(inner(target), self._stats(_table_of_target(target)), self._lock)

        super().__init__(conn, settings, counting_resolver, **kwargs)

    def _stats(self, key: TableKey) -> TargetStats:
        with self._lock:
            return self.by_table.setdefault(key, TargetStats())

    def _process_target(self, target, jobs, *args: Any, **kwargs: Any):
        ts = self._stats(_table_of_target(target))
        with self._lock:
            ts.messages += len(jobs)
        return super()._process_target(target, jobs, *args, **kwargs)

    def _settle(self, outcome, *args: Any, **kwargs: Any):
        self._pending = {"written": {}, "dead": Counter(), "retry": Counter()}
        try:
            result = super()._settle(outcome, *args, **kwargs)
            pending = self._pending
            for target, writes in outcome.writes.items():
                ts = self._stats(_table_of_target(target))
                with self._lock:
                    ts.settled_by_write += sum(len(w[-1]) for w in writes)  # each write: (..., msg ids)
            for key, (written, stale) in pending["written"].items():
                ts = self._stats(key)
                with self._lock:
                    ts.embedded += written
                    ts.stale += stale
            for key, n in pending["dead"].items():
                ts = self._stats(key)
                with self._lock:
                    ts.dead_lettered += n
                    if key == UNKNOWN:
                        ts.messages += n  # malformed: never reached _process_target
            for key, n in pending["retry"].items():
                ts = self._stats(key)
                with self._lock:
                    ts.retried += n
            return result
        finally:
            self._pending = None

    # Each of these runs once per settle attempt: assignment (not addition) keeps the last attempt.
    def _write_vectors(self, target, *args: Any, **kwargs: Any):
        written, stale = super()._write_vectors(target, *args, **kwargs)
        if self._pending is not None:
            self._pending["written"][_table_of_target(target)] = (written, stale)
        return written, stale

    def _dead_letter(self, dead, *args: Any, **kwargs: Any):
        result = super()._dead_letter(dead, *args, **kwargs)
        if self._pending is not None:
            self._pending["dead"] = Counter(_table_of_body(job.body) for job, _ in dead)
        return result

    def _schedule_retries(self, retry, *args: Any, **kwargs: Any):
        result = super()._schedule_retries(retry, *args, **kwargs)
        if self._pending is not None:
            self._pending["retry"] = Counter(_table_of_body(job.body) for job, _ in retry)
        return result

    def mismatches(self, total: DrainStats) -> list[str]:
        """Where the per-table sums disagree with the core's totals (should be none)."""
        out = []
        with self._lock:
            tables = list(self.by_table.values())
        for name in ("messages", "embedded", "stale", "retried", "dead_lettered", "tokens", "requests"):
            mine = sum(getattr(t, name) for t in tables)
            if mine != getattr(total, name):
                out.append(f"{name}: per-table sum {mine} != drain total {getattr(total, name)}")
        return out


def snapshot(drainer: ReportingDrainer) -> dict[TableKey, TargetStats]:
    with drainer._lock:
        return {k: TargetStats(**asdict(v)) for k, v in drainer.by_table.items()}


def delta(now: dict[TableKey, TargetStats], before: dict[TableKey, TargetStats]) -> dict[TableKey, TargetStats]:
    """Per-table numbers accumulated since `before` (tables without new jobs left out)."""
    out = {}
    for key, ts in now.items():
        prev = before.get(key, TargetStats())
        d = TargetStats(**{f: getattr(ts, f) - getattr(prev, f) for f in asdict(ts)})
        if d.messages:
            out[key] = d
    return out


@dataclass
class Piece:
    stats: DrainStats
    settled: bool  # the queue had no claimable job when the piece ended (a burst is done)


def run_in_chunks(
    drainer: Drainer,
    *,
    idle_timeout: float,
    time_budget: float,
    chunk_seconds: float = 60.0,
    on_batch=None,
) -> Iterator[Piece]:
    """`drainer.run(idle_timeout=..., time_budget=...)` cut into pieces so the caller can report
    while a long drain goes on. A piece ends when the queue has no claimable job (a backlog or a
    burst is done: `settled`), or after `chunk_seconds` of continuous work.

    Same overall behaviour as one `run()`: drain until empty, then wait for more work (LISTEN/
    NOTIFY, plus a check every second for retries coming due) until `idle_timeout` seconds pass with
    none, and stop claiming after `time_budget` seconds.
    """
    started = time.monotonic()
    deadline = started + time_budget
    last_work = [started]

    def track(batch: DrainStats, total: DrainStats) -> None:
        if batch.messages:
            last_work[0] = time.monotonic()
        if on_batch:
            on_batch(batch, total)

    queue = drainer.settings.queue
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        stats = drainer.run(idle_timeout=0, time_budget=min(chunk_seconds, left), on_batch=track)
        settled = not claimable(drainer.conn, queue)
        yield Piece(stats, settled)
        if not settled:
            continue
        idle_left = idle_timeout - (time.monotonic() - last_work[0])
        left = deadline - time.monotonic()
        if idle_left <= 0 or left <= 0 or not wait_for_work(drainer.conn, queue, min(idle_left, left)):
            return


def claimable(conn, queue: str) -> bool:
    """Whether the queue holds a message a drain could claim now."""
    return conn.execute(
        sql.SQL("select exists (select 1 from pgmq.{} where vt <= clock_timestamp())").format(
            sql.Identifier("q_" + queue))
    ).fetchone()[0]


def wait_for_work(conn, queue: str, timeout: float) -> bool:
    """Wait up to `timeout` s for a claimable job: a NOTIFY on the channel the triggers use, or a
    retried/expired job coming due (checked every second). Autocommit connection."""
    conn.execute(sql.SQL("listen {}").format(sql.Identifier(pgmq.NOTIFY_CHANNEL)))
    try:
        end = time.monotonic() + timeout
        while True:
            if claimable(conn, queue):  # also covers a job that came before LISTEN took effect
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            for _ in conn.notifies(timeout=min(left, 1.0), stop_after=1):
                pass
    finally:
        conn.execute(sql.SQL("unlisten {}").format(sql.Identifier(pgmq.NOTIFY_CHANNEL)))
