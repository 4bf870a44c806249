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
from psycopg import errors, sql

from ..queue import pgmq
from ..config import Settings
from ..queue.claims import Claims
from ..targets.catalog import Target, ambiguous_key_error, ambiguous_keys
from ..targets.vectors import vector_array, vector_value, write_as_owner
from ..targets.badrows import write_isolating
from .chunked import still_target
from .jobs import Job, single_body
from .outcome import Outcome, Settled, TargetWrite, Write
from .stats import DrainStats, table_key, table_of_body

BUSY_RETRY_SECONDS = 1  # a row the application holds locked is tried again this much later
LOCK_TIMEOUT = "5s"  # a table lock (TRUNCATE, ALTER) the drain would wait for longer: give way
SETTLE_TRIES = 3


@dataclass
class Written:
    written: int = 0
    stale: int = 0
    busy: list[str] = field(default_factory=list)  # keys of rows another transaction held locked
    ambiguous: dict[str, int] = field(default_factory=dict)  # keys matching several rows: not written
    failed: dict[str, str] = field(default_factory=dict)  # key -> why its write failed (badrows)


def write_vectors(conn: psycopg.Connection, target: Target, writes: list[Write], model: str) -> Written:
    """Write vectors whose row still has the input they were made from (inside the caller's
    transaction). Rows locked by another transaction are skipped and reported busy."""
    out = Written()
    if not writes:
        return out
    writes = list({w[0]: w for w in writes}.values())  # one write per row
    ids = [w[0] for w in writes]
    current: dict[str, bytes] = {}
    has_vector: set[str] = set()
    locked = conn.execute(
        sql.SQL(
            """select t.{key}::text, autoembed.content_hash({fn}(t)::text), t.{col} is not null
               from {table} t where t.{key} = any(%s::text[]::{key_type}[])
               order by t.{key} for update of t skip locked"""
        ).format(key=target.key_sql, fn=target.function_sql, table=target.table_sql, col=target.column_sql,
                 key_type=target.key_type_sql),
        (ids,), prepare=False,
    ).fetchall()
    out.ambiguous = ambiguous_keys(k for k, _, _ in locked)
    for k, h, v in locked:
        if k in out.ambiguous:
            continue  # never write one row's vector onto another
        current[k] = h
        if v:
            has_vector.add(k)
    missing = [k for k in ids if k not in current and k not in out.ambiguous]
    if missing:
        # Not locked: deleted meanwhile (its job is done), or held by another transaction (busy).
        out.busy = [k for (k,) in conn.execute(
            sql.SQL("select t.{key}::text from {table} t where t.{key} = any(%s::text[]::{key_type}[])").format(
                key=target.key_sql, table=target.table_sql, key_type=target.key_type_sql),
            (missing,), prepare=False)]
    # Another drain may have written the same input meanwhile: then there is nothing to do.
    already = {
        row_id for row_id, state_hash, state_model in conn.execute(
            """select row_id, content_hash, model from autoembed.embedding_state
               where target_id = (select autoembed.state_target(%s, %s, %s)) and row_id = any(%s)""",
            (target.key.schema, target.key.table, target.key.embedding_column, sorted(has_vector)),
            prepare=False,
        ) if state_model == model and state_hash == current.get(row_id)
    } if has_vector else set()
    fresh = [w for w in writes if current.get(w[0]) == w[1] and w[0] not in already]
    out.stale = sum(1 for w in writes if w[0] in current and current[w[0]] != w[1])
    if not fresh:
        return out
    keys = [w[0] for w in fresh]
    # Through the target's write function (sql/019): the table owner's triggers run with the
    # owner's rights, never the drain's. The vectors go as one binary array of the column's type.
    write_as_owner(conn, "write_vector_rows", target.regclass, target.key.embedding_column, target.key.key_column,
                   "%s::regclass, %s, %s, %s::text[], %b",
                   (target.regclass, target.key.embedding_column, target.key.key_column, keys,
                    vector_array(conn, target.vector_type, [vector_value(w[2]) for w in fresh])))
    conn.execute(
        """insert into autoembed.embedding_state as e (target_id, row_id, content_hash, model, embedded_at)
           select %s, s.k, s.h, %s, now() from unnest(%s::text[], %s::bytea[]) s(k, h)
           on conflict (target_id, row_id) do update
           set content_hash = excluded.content_hash, model = excluded.model, embedded_at = now()""",
        (state_target(conn, target), model, keys, [w[1] for w in fresh]),
        prepare=False)
    out.written = len(fresh)
    return out


@dataclass
class Isolated:
    """What write_vectors_isolating did: the rows written (etc.) and the rows that failed alone."""

    written: Written
    failed: dict[str, str]  # row key -> why its write failed


def write_vectors_isolating(conn: psycopg.Connection, target: Target, writes: list[Write], model: str) -> Isolated:
    """write_vectors, with a row whose write fails (a trigger raising for it, a check constraint, a
    revoked grant) failing alone: the others are written in the same transaction (badrows)."""
    writes = list({w[0]: w for w in writes}.values())  # one write per row
    parts, failed = write_isolating(conn, writes,
                                    lambda part: write_vectors(conn, target, part, model),
                                    check=lambda: still_target(conn, target))
    total = Written()
    for w in parts:
        total.written += w.written
        total.stale += w.stale
        total.busy += w.busy
        total.ambiguous.update(w.ambiguous)
    return Isolated(total, {w[0]: f"{target.regclass} key {w[0]}: writing its vector failed: {why}"
                            for w, why in failed})


@dataclass
class ColumnWrite:
    """The vector-column TargetWrite (drain.outcome): one batch's vectors for one target's column."""

    target: Target
    writes: list[Write]
    model: str  # fixed when the vectors were made (a promotion meanwhile must not relabel them)
    jobs: dict[str, list[Job]]

    def keys(self) -> list[str]:
        return list({w[0]: None for w in self.writes})

    def settle(self, conn: psycopg.Connection) -> Settled:
        """Write the vectors whose rows still have their input (write_vectors_isolating): a row whose
        write fails alone, or whose key matches several rows, is dead; a row another transaction
        holds is busy."""
        isolated = write_vectors_isolating(conn, self.target, self.writes, self.model)
        w = isolated.written
        dead = dict(isolated.failed)
        for key, n in w.ambiguous.items():
            dead.setdefault(key, ambiguous_key_error(self.target, key, n))
        return Settled(written=w.written, stale=w.stale, busy=[k for k in w.busy if k not in dead], dead=dead)


def act_as_drain(conn: psycopg.Connection) -> None:
    """Inside a write transaction: the project's triggers skip the drain's own writes, and a table
    lock held longer than LOCK_TIMEOUT makes the drain give way (the statement fails, is retried)."""
    conn.execute("set local autoembed.draining = 'on'")
    conn.execute(sql.SQL("set local lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))


class VectorWriter:
    """The settle stage's vector write with no queue message attached (the backfill's writes):
    same locks, hash guard, COPY + UPDATE and state upsert. A row an application transaction
    holds is tried again a few times, never waited for."""

    BUSY_WAITS = (0.05, 0.2, 0.5, 1.0, 2.0)

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def write(self, target: Target, rows: list[tuple[str, bytes, bytes]], model: str) -> Written:
        """Write (row key, content hash the vector was made from, its COPY tuple). Rows still busy
        after the last try are returned in `busy`, unwritten; rows whose write fails alone in
        `failed` (key -> why)."""
        total = Written()
        pending = [(k, h, record, []) for k, h, record in rows]
        for wait in (*self.BUSY_WAITS, None):
            with self.conn.transaction():
                act_as_drain(self.conn)
                isolated = write_vectors_isolating(self.conn, target, pending, model)
            w = isolated.written
            total.failed.update(isolated.failed)
            total.ambiguous.update(w.ambiguous)
            total.written += w.written
            total.stale += w.stale
            busy = set(w.busy)
            pending = [p for p in pending if p[0] in busy]
            if not pending or wait is None:
                break
            time.sleep(wait)
        total.busy = [p[0] for p in pending]
        return total


def state_target(conn: psycopg.Connection, target: Target) -> int:
    """The registered target whose embedding_state records `target`'s vectors (by id: renames
    change nothing). A vector is written only for a registered target (its input function is)."""
    if target.registered is not None and not target.chunked:
        return target.registered
    found = conn.execute("select autoembed.state_target(%s, %s, %s)",
                         (target.key.schema, target.key.table, target.key.embedding_column)).fetchone()[0]
    if found is None:
        raise TargetError(f"{target.key.label} is not a registered target: enrol the table (autoembed enroll)")
    return found


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

    def __init__(self, conn: psycopg.Connection, settings: Settings, claims: Claims | None):
        self.conn = conn
        self.settings = settings
        self.claims = claims

    def settle(self, outcome: Outcome, stats: DrainStats, msg_ids: list[int]) -> None:
        """Write and settle `outcome` in one transaction (retried when a deadlock or lock timeout
        made the drain give way). `msg_ids`: every message of the batch."""
        if self.claims is not None:
            self.claims.release(msg_ids)  # the heartbeat must not touch what this settles
        for attempt in range(1, SETTLE_TRIES + 1):
            try:
                with self.conn.transaction():
                    result = self._settle_once(outcome)
                break
            except (errors.DeadlockDetected, errors.LockNotAvailable):
                if attempt == SETTLE_TRIES:
                    raise
                time.sleep(0.05 * attempt)
        self._count(result, stats)
        if self.claims is not None:
            self.claims.keep_for_later(result[1].later, BUSY_RETRY_SECONDS)

    def _settle_once(self, outcome: Outcome):
        conn, q = self.conn, self.settings.queue
        act_as_drain(conn)
        wrote: list[tuple[Target, Settled]] = []
        done = list(outcome.done)
        busy: list[Job] = []
        dead = list(outcome.dead)  # + jobs whose key matches several rows, or whose write failed alone
        # One path for every target's shape (drain.outcome.TargetWrite): a row (document) is
        # written whole under the stale-write guard, dead-lettered alone, or kept for later.
        for tw in self._target_writes(outcome):
            settled = tw.settle(conn)
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
        pgmq.delete(conn, q, fate.done)
        if fate.done:
            conn.execute("delete from autoembed.message_errors where queue_name = %s and msg_id = any(%s)",
                         (q, fate.done))
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
