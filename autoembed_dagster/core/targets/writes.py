"""How the vectors made for some rows of one target are written, whatever the target's shape: the
one write interface of the drain's settle (core.drain.settle: with the batch's messages) and of
the backfill's pages (core.migrate: no message attached).

- `TargetWrite`: the vectors one page (batch) made for one target, written in the caller's
  transaction under the stale-write guard (a vector lands only if its row still has the input it
  was made from), through the target's write function (the table owner's rights, sql/019), a row
  whose write fails failing alone. `Settled` says what it did, by row key (a vector column's row,
  a chunk set's document). One implementation per shape: `ColumnWrite` (a vector column: one
  vector per row, embedding_state upserted), `ChunkWrite` (a chunk set: each document's set
  swapped whole, core.targets.chunks.write). A third shape is a third implementation.
- `Slicer`: a vector column's write cut into slices of rows, each its own transaction, sized by
  the time the last slice took: an application's write of a row waits only for the slice holding
  it (its guard's row lock lasts to the slice's commit), not for a whole batch or page (issue 20).
  Used by the drain's settle and by `write_page`.
- `write_page`: a TargetWrite in slices, each a transaction of its own, as the drain writes
  (`act_as_drain`): a row an application transaction holds is tried again a few times, never waited for.
- `still_target` (the target is still what the write resolved: a promotion renames),
  `write_target` (where a chunk target's documents go: its shadow during a model change).

May import (as core.targets): core.config, core.db, core.embed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol

import numpy as np
import psycopg
from psycopg import sql

from . import chunks
from .badrows import write_isolating
from .catalog import (Target, TargetChanged, TargetError, ambiguous_key_error, ambiguous_keys, check_target,
                      lookup_registered)
from .shapes import chunk_shadow_of
from .vectors import vector_array, write_as_owner

# (row key as canonical text, content hash the vector was made from, the vector's binary value,
#  the ids of the messages it settles[, the row version (xmin) its input was read from, or None:
#  the guard then reads the input again])
Write = tuple  # (str, bytes, bytes, list[int]) or (str, bytes, bytes, list[int], str | None)
LOCK_TIMEOUT = "5s"  # a table lock (TRUNCATE, ALTER) the drain would wait for longer: give way
BUSY_WAITS = (0.05, 0.2, 0.5, 1.0, 2.0)  # write_page: a busy row is tried again after each


@dataclass
class Settled:
    """What writing one target's vectors under the stale-write guard did (TargetWrite.settle), by
    row key: a vector column's row, a chunk target's document. A key neither busy nor dead is
    settled: its messages are deleted (written, stale: a newer job exists, gone with its row)."""

    written: int = 0  # rows (documents) whose vector (chunk set) was written
    stale: int = 0  # not written: the input changed since it was read
    busy: list[str] = field(default_factory=list)  # not written now: taken up again later, no attempt counted
    dead: dict[str, str] = field(default_factory=dict)  # key -> why it cannot be written (its write failed alone...)
    chunks_embedded: int = 0
    chunks_reused: int = 0
    chunks_deleted: int = 0

    def add(self, other: "Settled") -> None:
        """Sum `other` (a later try of the busy keys) into this one."""
        self.written += other.written
        self.stale += other.stale
        self.dead.update(other.dead)
        self.chunks_embedded += other.chunks_embedded
        self.chunks_reused += other.chunks_reused
        self.chunks_deleted += other.chunks_deleted


class TargetWrite(Protocol):
    """The vectors one batch (page) made for one target (see the module doc)."""

    target: Target
    jobs: dict[str, list]  # the jobs (core.drain.jobs.Job) of each row key written; none for a backfill page
    sliced: bool  # written in slices of keys (Slicer); False: whole (a chunk set's page, for now)

    def keys(self) -> list[str]:
        """The row keys written (each once)."""
        ...

    def only(self, keys: list[str]) -> "TargetWrite":
        """The same write, of these keys only (write_page's next try of the busy ones)."""
        ...

    def settle(self, conn: psycopg.Connection) -> Settled:
        ...


def act_as_drain(conn: psycopg.Connection) -> None:
    """Inside a write transaction: the project's triggers skip the drain's own writes, and a table
    lock held longer than LOCK_TIMEOUT makes the drain give way (the statement fails, is retried)."""
    conn.execute("select set_config('autoembed.draining', 'on', true), set_config('lock_timeout', %s, true)",
                 (LOCK_TIMEOUT,))  # (one round trip)


class Slicer:
    """Cuts a TargetWrite into slices of its keys, written one after another, each in a transaction
    of its own: an application's write of a row waits at most for the slice holding it. A slice
    is sized by the time the last one took (aim SECONDS; into an HNSW index a row costs
    milliseconds). One per writer (a drain's settler, a backfill shard): it learns that writer's pace."""

    SECONDS = 0.05  # (an application write waits up to about this long for a row the drain writes)
    MIN_ROWS = 8
    MAX_ROWS = 4000
    START_ROWS = 16
    ADAPTIVE = True

    def __init__(self) -> None:
        self.rows = self.START_ROWS  # rows of the next slice: adapted after each write (adaptive=False: fixed)
        self.adaptive = self.ADAPTIVE

    def slices(self, tw: TargetWrite) -> Iterator[tuple[TargetWrite, bool]]:
        """(slice, is the last) of `tw`, each sized when asked for: write one before asking the next."""
        while tw.sliced and len(keys := tw.keys()) > (n := self.rows):  # (n: the write of the slice changes rows)
            yield tw.only(keys[:n]), False
            tw = tw.only(keys[n:])
        yield tw, True

    def write(self, conn: psycopg.Connection, tw: TargetWrite) -> Settled:
        """Write the slice `tw` as the drain writes, in the caller's transaction; time it."""
        started = time.perf_counter()
        act_as_drain(conn)
        settled = tw.settle(conn)
        if self.adaptive:
            took = max(time.perf_counter() - started, 1e-4)
            self.rows = int(min(max(len(tw.keys()) * self.SECONDS / took, self.MIN_ROWS), self.MAX_ROWS))
        return settled


def write_page(conn: psycopg.Connection, tw: TargetWrite, busy_waits: tuple[float, ...] = BUSY_WAITS,
               slicer: Slicer | None = None) -> Settled:
    """Write `tw` with no queue message attached (a backfill page), in slices (`slicer`: the
    writer's, else a new one), each a transaction of its own as the drain writes. Keys an
    application transaction holds are tried again after each of `busy_waits`; those still busy
    after the last try are returned in `busy`, unwritten."""
    slicer = slicer or Slicer()
    total = Settled()
    for wait in (*busy_waits, None):
        busy: list[str] = []
        for part, _ in slicer.slices(tw):
            with conn.transaction():
                settled = slicer.write(conn, part)
            total.add(settled)
            busy += settled.busy
        total.busy = busy
        if not busy or wait is None:
            break
        time.sleep(wait)
        tw = tw.only(busy)
    return total


# -- a vector column -----------------------------------------------------------------------------
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
    made_from = {w[0]: w[1] for w in writes}
    current: dict[str, bytes] = {}
    has_vector: set[str] = set()
    # The guard: each row locked (SKIP LOCKED: never waiting for the application) and its input's
    # hash compared. A row still at the version its input was read from (the same xmin: nothing
    # wrote it since) has that input: its content function is not run again. Any other row's
    # input (a write without a version: a backfill page) is read again and hashed. (Key arrays go
    # binary, the keys dumped once for both uses: no per-element quoting on the client.)
    locked = conn.execute(
        sql.SQL(
            """select t.{key}::text,
                      case when t.xmin = v.version::xid then null
                           else autoembed.content_hash({fn}(t)::text) end,
                      t.{col} is not null
               from {table} t join unnest(%(ids)b::text[], %(versions)b::text[]) v(k, version)
                    on t.{key} = v.k::{key_type}
               where t.{key} = any(%(ids)b::text[]::{key_type}[])
               order by t.{key} for update of t skip locked"""
        ).format(key=target.key_sql, fn=target.function_sql, table=target.table_sql, col=target.column_sql,
                 key_type=target.key_type_sql),
        {"ids": ids, "versions": [w[4] if len(w) > 4 else None for w in writes]}, prepare=False,
    ).fetchall()
    out.ambiguous = ambiguous_keys(k for k, _, _ in locked)
    for k, h, v in locked:
        if k in out.ambiguous:
            continue  # never write one row's vector onto another
        current[k] = made_from[k] if h is None else h
        if v:
            has_vector.add(k)
    missing = [k for k in ids if k not in current and k not in out.ambiguous]
    if missing:
        # Not locked: deleted meanwhile (its job is done), or held by another transaction (busy).
        out.busy = [k for (k,) in conn.execute(
            sql.SQL("select t.{key}::text from {table} t where t.{key} = any(%b::text[]::{key_type}[])").format(
                key=target.key_sql, table=target.table_sql, key_type=target.key_type_sql),
            (missing,), prepare=False)]
    # Another drain may have written the same input meanwhile: then there is nothing to do.
    already = {
        row_id for row_id, state_hash, state_model in conn.execute(
            """select row_id, content_hash, model from autoembed.embedding_state
               where target_id = (select autoembed.state_target(%s, %s, %s)) and row_id = any(%b::text[])""",
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
                   "%s::regclass, %s, %s, %b::text[], %b",
                   (target.regclass, target.key.embedding_column, target.key.key_column, keys,
                    vector_array(conn, target.vector_type, [w[2] for w in fresh])))
    conn.execute(
        """insert into autoembed.embedding_state as e (target_id, row_id, content_hash, model, embedded_at)
           select %s, s.k, s.h, %s, now() from unnest(%b::text[], %b::bytea[]) s(k, h)
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
    """The vector-column TargetWrite: one page's vectors for one target's column."""

    target: Target
    writes: list[Write]
    model: str  # fixed when the vectors were made (a promotion meanwhile must not relabel them)
    jobs: dict[str, list] = field(default_factory=dict)
    sliced = True

    def keys(self) -> list[str]:
        return list({w[0]: None for w in self.writes})

    def only(self, keys: list[str]) -> "ColumnWrite":
        keep = set(keys)
        return replace(self, writes=[w for w in self.writes if w[0] in keep],
                       jobs={k: j for k, j in self.jobs.items() if k in keep})

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


# -- a chunk set ---------------------------------------------------------------------------------
@dataclass
class ChunkWrite:
    """A planned and embedded set of documents: the chunk-set TargetWrite (core.targets.chunks.write:
    each document's set swapped whole)."""

    target: Target
    chunk_target: chunks.ChunkTarget
    plan: chunks.ChunkPlan
    vectors: dict[bytes, np.ndarray] = field(default_factory=dict)  # chunk hash -> new vector
    jobs: dict[str, list] = field(default_factory=dict)  # by document key (a backfill page: no jobs)
    sliced = False  # a page's documents in one transaction (slicing them is not done yet)

    def keys(self) -> list[str]:
        return list(self.jobs) if self.jobs else list(self.plan.documents)

    def only(self, keys: list[str]) -> "ChunkWrite":
        keep = [k for k in keys if k in self.plan.documents]
        return replace(self, plan=replace(self.plan, documents={k: self.plan.documents[k] for k in keep}),
                       jobs={k: j for k, j in self.jobs.items() if k in set(keep)})

    def settle(self, conn: psycopg.Connection) -> Settled:
        """Swap the planned chunk sets in, in the caller's transaction. A document whose write fails
        alone (targets.badrows) is dead; one not written now (its parent row busy, a reused vector
        gone) is busy; the others are settled."""
        w, failed = chunks.write_isolating(conn, self.chunk_target, self.plan, self.vectors, self.plan.model,
                                           check=lambda: still_target(conn, self.target))
        dead = {key: ambiguous_key_error(self.target, key, n) for key, n in w.ambiguous.items()}
        dead.update({key: f"{self.target.regclass} key {key}: {why}" for key, why in failed.items()})
        return Settled(written=len(w.written), stale=len(w.stale),
                       busy=[k for k in dict.fromkeys(w.busy + w.missing) if k not in dead], dead=dead,
                       chunks_embedded=w.chunks_embedded, chunks_reused=w.chunks_reused,
                       chunks_deleted=w.chunks_deleted)


def write_target(conn: psycopg.Connection, target: Target) -> Target:
    """Where a chunk target's documents are written: the shadow chunk table while a model change is
    in progress (so the promotion finds it complete), else the registered one."""
    return chunk_shadow_of(conn, target) or target


def still_target(conn: psycopg.Connection, target: Target) -> None:
    """Raise TargetChanged when the table or column `target` names changed under the write (a
    model-migration promotion renamed it): then the whole batch is taken up again, no row is blamed."""
    if not target.chunked:
        check_target(conn, target)
        return
    try:
        now = write_target(conn, lookup_registered(conn, target_id=target.registered)[0])
    except TargetError as exc:
        raise TargetChanged(f"{target.key.label}: {exc}") from exc
    if (now.chunk_table, now.vector_type, now.dimensions) != (target.chunk_table, target.vector_type, target.dimensions):
        raise TargetChanged(f"{target.key.label} writes into {now.chunk_table} now, not {target.chunk_table}")

