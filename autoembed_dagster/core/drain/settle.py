"""The settle stage: in ONE transaction, write the vectors whose rows still have the input they
were made from, and settle every claimed message (deleted, dead-lettered, or put back).

The drain gives way, never the application: it locks the rows it writes with SKIP LOCKED, so it
never waits for a row an application transaction holds (and so can never be part of a deadlock
with one); a row it could not lock is put back for a moment later, with no attempt counted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import psycopg
from psycopg import errors

from ..queue import pgmq
from ..config import Settings
from ..queue.claims import Claims
from ..targets.catalog import Target
# The one write interface of both shapes (core.targets.writes), shared with the backfill's pages;
# re-exported here for what imported it from the settle stage.
from ..targets.writes import (LOCK_TIMEOUT, ColumnWrite, Isolated, Slicer, Written, act_as_drain,  # noqa: F401
                              state_target, write_vectors, write_vectors_isolating)
from .jobs import Job, single_body
from .outcome import Outcome, Settled, TargetWrite
from .stats import DrainStats, table_key, table_of_body

BUSY_RETRY_SECONDS = 1  # a row the application holds locked is tried again this much later
SETTLE_TRIES = 3


def forget_rows(conn: psycopg.Connection, target: Target, row_ids: list[str]) -> None:
    conn.execute(
        """delete from autoembed.embedding_state where target_id = (select autoembed.state_target(%s, %s, %s)) and row_id = any(%s)""",
        (target.key.schema, target.key.table, target.key.embedding_column, row_ids),
    )


@dataclass
class _Fate:
    """What becomes of the claimed messages that are not simply deleted."""

    dead: list[tuple[Job, str]]
    retry: list[tuple[Job, str]]  # failed: the failure is recorded
    busy: list[Job]  # rows the application held locked: taken up again a moment later, no failure counted
    done: list[int]
    later: list[int] = field(default_factory=list)  # messages of busy rows, kept claimed by this drain


class Settler:
    """Settles batches of one queue on the drain's connection."""

    # A vector column's rows are written in slices (core.targets.writes.Slicer), each in a
    # transaction of its own, so that an application's write of a row waits at most for the slice
    # holding it, not for the whole batch. The messages are settled with the last slice: a drain
    # that dies between slices leaves them queued, and the rows already written are then found unchanged.

    def __init__(self, conn: psycopg.Connection, settings: Settings, claims: Claims | None):
        self.conn = conn
        self.settings = settings
        self.claims = claims
        self.slicer = Slicer()

    def settle(self, outcome: Outcome, stats: DrainStats, msg_ids: list[int]) -> None:
        """Write and settle `outcome`: vector-column rows in slices (a transaction each), the last
        one together with every message's fate (each transaction retried when a deadlock or lock
        timeout made the drain give way). `msg_ids`: every message of the batch."""
        if self.claims is not None:
            self.claims.release(msg_ids)  # the heartbeat must not touch what this settles
        early: list[tuple[TargetWrite, Settled]] = []  # slices written and committed already
        last: list[TargetWrite] = []
        for tw in self._target_writes(outcome):
            for part, is_last in self.slicer.slices(tw):
                if is_last:
                    last.append(part)
                else:
                    early.append((part, self._in_transaction(lambda: self.slicer.write(self.conn, part))))
        result = self._in_transaction(lambda: self._settle_once(outcome, last, early))
        self._count(result, stats)
        if self.claims is not None:
            self.claims.keep_for_later(result[1].later, BUSY_RETRY_SECONDS)

    def _in_transaction(self, fn):
        for attempt in range(1, SETTLE_TRIES + 1):
            try:
                with self.conn.transaction():
                    return fn()
            except (errors.DeadlockDetected, errors.LockNotAvailable):
                if attempt == SETTLE_TRIES:
                    raise
                time.sleep(0.05 * attempt)

    def _settle_once(self, outcome: Outcome, writes: list[TargetWrite],
                     written: list[tuple[TargetWrite, Settled]]):
        """`writes`: what to write now (each target's last slice); `written`: slices written
        before, in transactions of their own, whose messages are settled here."""
        conn, q = self.conn, self.settings.queue
        act_as_drain(conn)
        wrote: list[tuple[Target, Settled]] = []
        done = list(outcome.done)
        busy: list[Job] = []
        dead = list(outcome.dead)  # + jobs whose key matches several rows, or whose write failed alone
        # One path for every target's shape (core.targets.writes.TargetWrite): a row (document) is
        # written whole under the stale-write guard, dead-lettered alone, or kept for later.
        now = [(tw, tw.settle(conn)) for tw in writes]
        for tw, settled in [*written, *now]:
            wrote.append((tw.target, settled))
            busy_keys = set(settled.busy)
            for key in tw.keys():
                jobs = tw.jobs.get(key, ())
                if key in settled.dead:
                    dead.extend((job, settled.dead[key]) for job in jobs)
                elif key in busy_keys:
                    busy.extend(jobs)
                else:
                    done.extend(job.msg_id for job in jobs)
        for target, row_ids in outcome.deleted_rows.items():
            forget_rows(conn, target, row_ids)
        retry: list[tuple[Job, str]] = []
        for job, error in outcome.retry:
            if job.attempts >= self.settings.max_attempts:
                dead.append((job, f"{error} (gave up after {job.attempts} failed attempts)"))
            else:
                retry.append((job, error))
        fate = self._split_shared(_Fate(dead, retry, busy, done))
        self._dead_letter(fate.dead)
        self._schedule_retries(fate.retry)
        if fate.done:
            # The messages and any failure recorded for them, in one round trip.
            conn.execute(
                """with e as (delete from autoembed.message_errors where queue_name = %s and msg_id = any(%b::bigint[]))
                   select pgmq.delete(%s, %b::bigint[])""",
                (q, fate.done, q, fate.done)).fetchall()
        return wrote, fate

    @staticmethod
    def _target_writes(outcome: Outcome) -> list[TargetWrite]:
        return ([ColumnWrite(target, writes, outcome.models[target], outcome.jobs.get(target, {}))
                 for target, writes in outcome.writes.items()] + list(outcome.chunk_writes))

    def _split_shared(self, fate: _Fate) -> _Fate:
        """Rows of a message for several rows that are not done. When every row of it failed at a
        first attempt (a provider outage, a timeout) or was busy, the message is put back whole.
        Otherwise each such row gets a message of its own (Supabase's shape plus "attempts": its
        failures so far), retried alone, dead-lettered or kept for later, and the shared message
        is deleted."""
        open_rows: dict[int, list[tuple[Job, str | None, str]]] = defaultdict(list)
        for kind, pairs in (("dead", fate.dead), ("retry", fate.retry), ("busy", [(j, None) for j in fate.busy])):
            for job, error in pairs:
                if job.shared:
                    open_rows[job.msg_id].append((job, error, kind))
        whole: set[int] = set()
        own: list[tuple[Job, str | None, str]] = []
        for msg_id, rows in open_rows.items():
            first_time = all(kind == "busy" or (kind == "retry" and not job.failed_before) for job, _, kind in rows)
            if first_time and len(rows) == rows[0][0].message_rows:
                whole.add(msg_id)
            else:
                own += rows
        split = self._send_own(own)
        # A message put back whole is settled once: as a failure when any of its rows failed, else
        # (all busy) kept claimed like a busy one-row message.
        whole_failed = {job.msg_id for job, _ in fate.retry if job.msg_id in whole}
        kept = {j.msg_id for j in fate.busy if not j.shared or (j.msg_id in whole and j.msg_id not in whole_failed)}
        return _Fate(
            dead=[d for d in fate.dead if not d[0].shared] + [(j, e) for j, e, k in split if k == "dead"],
            retry=(_one_per_message([r for r in fate.retry if not r[0].shared or r[0].msg_id in whole])
                   + [(j, e) for j, e, k in split if k == "retry"]),
            busy=fate.busy,
            done=fate.done + sorted({job.msg_id for job, _, _ in own}),
            later=sorted(kept) + [j.msg_id for j, _, k in split if k == "busy"],
        )

    def _send_own(self, rows: list[tuple[Job, str | None, str]]) -> list[tuple[Job, str | None, str]]:
        """A one-row message for each (job, error, kind) row split off a shared message; the new
        jobs. A busy row's message is sent invisible for a full timeout: it is this drain's, taken
        up again in a moment (a failed row's is made visible by its retry or archived)."""
        split = []
        for busy in (False, True):
            group = [r for r in rows if (r[2] == "busy") == busy]
            bodies = [single_body(job, job.failures + (not busy)) for job, _, _ in group]
            ids = pgmq.send_batch(self.conn, self.settings.queue, bodies,
                                  delay=self.settings.visibility_timeout if busy else 0)
            split += [(Job(msg_id, body, job.row_id, job.key, job.failures, 1), error, kind)
                      for (job, error, kind), body, msg_id in zip(group, bodies, ids)]
        return split

    def _dead_letter(self, dead: list[tuple[Job, str]]) -> None:
        if not dead:
            return
        q = self.settings.queue
        with self.conn.cursor() as cur:
            cur.executemany(
                """insert into autoembed.dead_letters (queue_name, msg_id, message, error, attempts)
                   values (%s, %s, %s, %s, %s)
                   on conflict (queue_name, msg_id) do update set error = excluded.error,
                       attempts = excluded.attempts, failed_at = now()""",
                [(q, job.msg_id, psycopg.types.json.Jsonb(job.body), clean(error), job.attempts)
                 for job, error in dead],
            )
        ids = [job.msg_id for job, _ in dead]
        pgmq.archive(self.conn, q, ids)
        self.conn.execute("delete from autoembed.message_errors where queue_name = %s and msg_id = any(%s)", (q, ids))

    def _schedule_retries(self, retry: list[tuple[Job, str]]) -> None:
        """Record the failure (the attempt count is the number of recorded failures) and make the
        message visible again after a back-off that grows with it."""
        if not retry:
            return
        q = self.settings.queue
        with self.conn.cursor() as cur:
            cur.executemany(
                """insert into autoembed.message_errors (queue_name, msg_id, error, attempts)
                   values (%s, %s, %s, %s)
                   on conflict (queue_name, msg_id) do update set error = excluded.error,
                       attempts = greatest(autoembed.message_errors.attempts, excluded.attempts), failed_at = now()""",
                [(q, job.msg_id, clean(error), job.attempts) for job, error in retry],
            )
        by_delay: dict[int, list[int]] = defaultdict(list)
        for job, _ in retry:
            by_delay[self.settings.retry_delay * max(job.attempts, 1)].append(job.msg_id)
        for delay, ids in by_delay.items():
            pgmq.set_vt(self.conn, q, ids, delay)

    def _count(self, result, stats: DrainStats) -> None:
        wrote, fate = result
        for target, settled in wrote:
            ts = stats.table(table_key(target.key))
            for counts in (ts, stats):
                counts.embedded += settled.written  # rows (documents) whose vector (chunk set) was written
                counts.stale += settled.stale
                counts.chunks_embedded += settled.chunks_embedded
                counts.chunks_reused += settled.chunks_reused
                counts.chunks_deleted += settled.chunks_deleted
        stats.dead_lettered += len(fate.dead)
        stats.retried += sum(job.message_rows for job, _ in fate.retry)  # a message retried whole: its rows
        stats.busy += len(fate.busy)
        for _, error in fate.dead:
            stats.note_error(error)
        for job, _ in fate.dead:
            stats.table(table_of_body(job.body)).dead_lettered += 1
        for job, _ in fate.retry:
            stats.table(table_of_body(job.body)).retried += job.message_rows
        for job in fate.busy:
            stats.table(table_of_body(job.body)).busy += 1


def _one_per_message(pairs: list[tuple[Job, str]]) -> list[tuple[Job, str]]:
    """One entry per message (a message put back whole is listed once per row)."""
    seen: dict[int, tuple[Job, str]] = {}
    for job, error in pairs:
        seen.setdefault(job.msg_id, (job, error))
    return list(seen.values())


def clean(text: str) -> str:
    """Error text that Postgres can store (no NUL) and that stays readable."""
    return text.replace("\x00", "\\0")[:4000]
