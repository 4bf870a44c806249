"""Claimed messages → jobs: one job per row a message covers, with its target and its failures.

A message is a pointer (target + keys), never an instruction: the target it names is resolved
against what the database says (core.targets.catalog), and its keys are kept as exact text.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from ..queue import pgmq
from ..targets.catalog import INTEGER_KEY_TYPES, Target, TargetError, key_text
from ..targets.badrows import INTEGER_RANGE, key_problem

MAX_RECORDED_ATTEMPTS = 1000  # an "attempts" field beyond this is not ours: ignored


@dataclass
class Job:
    """One row of a claimed message (a message of a bulk statement covers up to 200 rows)."""

    msg_id: int
    body: object
    row_id: str  # the key as exact text (what the message carried)
    key: object = None  # the key as a message sends it: an integer key a JSON number, any other its text
    failures: int = 0  # recorded failures of this row before this attempt (never claims)
    message_rows: int = 1  # rows the message covers

    @property
    def attempts(self) -> int:
        """Attempts at this row including the one running now."""
        return self.failures + 1

    @property
    def shared(self) -> bool:
        return self.message_rows > 1

    @property
    def failed_before(self) -> bool:
        return self.failures > 0


def recorded_failures(conn: psycopg.Connection, queue: str, messages: list[pgmq.Message]) -> dict[int, int]:
    """Failures recorded for each message: the error record of a message retried before, else the
    "attempts" a row split off a shared message carries. A claim is not a failure: a drain killed
    while holding a message costs it nothing."""
    return {msg_id: h.failures for msg_id, h in claim_history(conn, queue, messages).items() if h.failures}


@dataclass
class History:
    """What is known of a claimed message's earlier claims."""

    failures: int = 0  # recorded failures (attempts that ended in an error)
    returned: int = 0  # claims given back unused by a drain that stopped (claims.returned)
    error: str | None = None  # the last recorded error

    def unsettled(self, read_ct: int) -> int:
        """Earlier claims that ended neither in a recorded failure nor given back: drains that
        died holding the message (the claim running now excluded)."""
        return read_ct - 1 - self.failures - self.returned


def claim_history(conn: psycopg.Connection, queue: str, messages: list[pgmq.Message]) -> dict[int, History]:
    """History of each claimed message (see recorded_failures)."""
    out: dict[int, History] = {}
    for m in messages:
        carried = m.body.get("attempts") if isinstance(m.body, dict) else None
        if isinstance(carried, int) and not isinstance(carried, bool) and 0 <= carried < MAX_RECORDED_ATTEMPTS:
            out[m.msg_id] = History(failures=carried)
    ids = [m.msg_id for m in messages]
    if ids:
        for msg_id, attempts, error, returned in conn.execute(
            """select m, e.attempts, e.error, r.returned from unnest(%s::bigint[]) m
               left join autoembed.message_errors e on e.queue_name = %s and e.msg_id = m
               left join autoembed.message_returns r on r.queue_name = %s and r.msg_id = m
               where e.msg_id is not null or r.msg_id is not null""",
            (ids, queue, queue), prepare=False,
        ):
            h = out.setdefault(msg_id, History())
            h.failures = max(h.failures, attempts or 0)
            h.error = error
            h.returned = returned or 0
    return out


def row_jobs(message: pgmq.Message, target: Target, row_ids: list[object], failures: int,
             bad: list[tuple[Job, str]]) -> list[Job]:
    """The jobs of one message's rows; a key that cannot be one of `target`'s goes to `bad` alone."""
    jobs = []
    # An integer key sent as a JSON integer inside the column's range is its own canonical text:
    # what key_text and key_problem would conclude, without their regex and parse (~1.5 us a key).
    bounds = INTEGER_RANGE.get(target.key_type)
    low, high = bounds if bounds is not None else (1, 0)
    for raw in row_ids:
        job = Job(message.msg_id, message.body, str(raw), raw, failures, len(row_ids))
        if type(raw) is int and low <= raw <= high:
            jobs.append(job)
            continue
        try:
            job.row_id = key_text(raw, target)
        except TargetError as exc:
            bad.append((job, str(exc)))
            continue
        problem = key_problem(job.row_id, target.key_type)
        if problem is not None:  # each key on its own: the others of the message go on
            bad.append((job, f"{target.regclass} key {job.row_id}: not a value of its key column "
                             f"{target.key.key_column}: {problem}"))
            continue
        job.key = int(job.row_id) if target.key_type in INTEGER_KEY_TYPES else job.row_id
        jobs.append(job)
    return jobs


def single_body(job: Job, failures: int) -> dict:
    """The one-row message of a row split off a shared message (Supabase's shape, plus the
    failures so far in "attempts")."""
    body = {k: v for k, v in job.body.items() if k not in ("ids", "idRange")}
    body["id"] = job.key
    body["attempts"] = failures
    return body
