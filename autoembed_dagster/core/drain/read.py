"""The read stage: the current input of the rows a batch's jobs name, and what to do with each.

Nothing is locked here (the application is never made to wait on a read); the write stage
checks the input again under its locks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import psycopg
from psycopg import sql

from ..embed.base import Embedder
from ..targets.catalog import Target, check_target
from ..targets.badrows import cast_problem, describe, read_isolating
from .jobs import Job
from .outcome import Outcome
from .stats import DrainStats

T = TypeVar("T")


@dataclass
class Row:
    key: str  # the key's canonical text (the drain's session settings): embedding_state.row_id
    input: str | None
    hash: bytes | None
    has_vector: bool
    state_hash: bytes | None
    state_model: str | None
    # The row version read (xmin): the write's guard recomputes the input only of a row whose
    # version changed since (drain.settle.write_vectors).
    version: str | None = None


@dataclass
class Work:
    """One provider call to make: rows of one target, embedded together."""

    target: Target
    embedder: Embedder
    row_ids: list[str]  # keys as the jobs name them
    rows: dict[str, Row]
    jobs: dict[str, list[Job]]  # by key: several jobs for one row are embedded once

    @property
    def text_count(self) -> int:
        return len(self.row_ids)


def read_rows(conn: psycopg.Connection, target: Target, row_ids: list[str]) -> dict[str, Row]:
    """The rows that exist, by the key text the jobs gave. Keys are matched as values of the key
    column's type (a text that is not the canonical form still finds its row) and stored state is
    looked up by the canonical text."""
    # Each side is read once, bounded by the key arrays, whatever the planner's statistics say (a
    # state table filled by this very drain still looks empty to it): the rows by their key index,
    # the content function called once per row (MATERIALIZED: a flattened subquery would call it
    # again for the hash); the stored state in one scan of its primary key for all the keys. (A
    # join on the computed key was planned as a scan of every state row per row; a key array
    # tested inside a per-row index probe costs rows x keys.) A key given in a text that is not
    # its canonical form finds its row, not its state: it is then embedded again, never wrongly
    # skipped.
    query = sql.SQL(
        """with r as materialized (
               select t.{key} as value, t.{key}::text as key, {fn}(t)::text as input, t.{col} is not null as has_vector,
                      t.xmin::text as version
               from {table} t where t.{key} = any(%(ids)b::text[]::{key_type}[])),
           s as materialized (
               select s.row_id, s.content_hash, s.model from autoembed.embedding_state s
               where s.target_id = (select autoembed.state_target(%(schema)s, %(table)s, %(column)s))
                 and s.row_id = any(%(ids)b::text[]))
           select u.k, r.key, r.input, autoembed.content_hash(r.input), r.has_vector, s.content_hash, s.model,
                  r.version
           from r join unnest(%(ids)b::text[]) u(k) on r.value = u.k::{key_type}
           left join s on s.row_id = r.key"""
    ).format(key=target.key_sql, fn=target.function_sql, col=target.column_sql,
             table=target.table_sql, key_type=target.key_type_sql)
    ids = list(dict.fromkeys(row_ids))
    # prepare=False wherever a key array is bound: a cached generic plan can scan the whole table.
    # (The key array goes binary, dumped once for its three uses: no per-element quoting.)
    cur = conn.execute(query, {"ids": ids, "schema": target.key.schema, "table": target.key.table,
                               "column": target.key.embedding_column}, prepare=False)
    return {r[0]: Row(*r[1:]) for r in cur.fetchall()}


def read_rows_or_isolate(conn: psycopg.Connection, target: Target, row_ids: list[str],
                         read: Callable[[psycopg.Connection, Target, list[str]], dict[str, T]] = read_rows,
                         ) -> tuple[dict[str, T], dict[str, str]]:
    """read(...) (default read_rows; a chunk target's documents: drain.chunked); when the batch
    read fails because the content function fails on some row (or a key is not a value of the key
    type), read them one by one so that only those rows fail, with the reason (badrows).
    Connection and server errors are raised: the claims come back later."""
    def why(row_id: str, exc: BaseException) -> str:
        cast = cast_problem(conn, row_id, target.key_type_sql)
        if cast is not None:
            return f"{target.regclass} key {row_id}: not a value of its key type {target.key_type}: {cast}"
        return (f"{target.regclass} key {row_id}: reading its input with {target.key.content_function} failed: "
                f"{describe(exc)}")

    # (a chunk target may be its shadow here, not the registered one: no catalog check then)
    check = None if target.chunked else (lambda: check_target(conn, target))
    return read_isolating(conn, list(dict.fromkeys(row_ids)), lambda ids: read(conn, target, ids), why, check=check)


def sort_jobs(target: Target, embedder: Embedder, jobs: list[Job], rows: dict[str, Row],
              unreadable: dict[str, str], in_flight: dict[str, bytes], outcome: Outcome,
              stats: DrainStats) -> list[Work]:
    """Settle what needs no provider call (deleted row, empty or unchanged input, an input the
    batch before is writing) and return the provider calls to make for the rest."""
    model = embedder.identity.key
    to_embed: dict[str, list[Job]] = {}
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
        elif in_flight.get(row.key) == row.hash:
            # The batch before this one is writing this very input (it commits first): written
            # there, or found stale there because a newer job for the row exists.
            stats.unchanged += 1
            outcome.done.append(job.msg_id)
        else:
            to_embed.setdefault(job.row_id, []).append(job)
    if not to_embed:
        return []
    # A row that really failed before is embedded in a request of its own, so a row that keeps
    # failing every request it is in (a 500 on its content, say) cannot fail its neighbours.
    # A claim alone is not a failure: after a crash the rows go back into full batches.
    # (A shared message that failed is retried whole once, then split into one-row messages.)
    first_try = [r for r in to_embed if not _isolated(to_embed[r])]
    isolated = [[r] for r in to_embed if _isolated(to_embed[r])]
    return [Work(target, embedder, ids, rows, to_embed) for ids in ([first_try] if first_try else []) + isolated]



def _isolated(jobs: list[Job]) -> bool:
    return any(not j.shared and j.failed_before for j in jobs)
