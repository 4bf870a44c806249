"""A drain cut into pieces, so that a long-lived drain (a Dagster run) can report as it goes.

The numbers themselves are the core's: each piece's `DrainStats`, per table in `by_table`.
Plain Python, no Dagster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from psycopg import sql

from ..queue import pgmq
from . import Drainer, DrainStats


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
    on_batch: Callable[[DrainStats, DrainStats], None] | None = None,
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

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        stats = drainer.run(idle_timeout=0, time_budget=min(chunk_seconds, left), on_batch=track)
        settled = not drainer.has_visible_work()
        yield Piece(stats, settled)
        if not settled:
            continue
        idle_left = idle_timeout - (time.monotonic() - last_work[0])
        left = deadline - time.monotonic()
        if idle_left <= 0 or left <= 0 or not wait_for_work(drainer, min(idle_left, left)):
            return


def wait_for_work(drainer: Drainer, timeout: float) -> bool:
    """Wait up to `timeout` s for a claimable job: a NOTIFY on the channel the triggers use, or a
    retried/expired job coming due (checked every second)."""
    conn = drainer.conn
    conn.execute(sql.SQL("listen {}").format(sql.Identifier(pgmq.NOTIFY_CHANNEL)))
    try:
        end = time.monotonic() + timeout
        while True:
            if drainer.has_visible_work():  # also covers a job that came before LISTEN took effect
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            for _ in conn.notifies(timeout=min(left, 1.0), stop_after=1):
                pass
    finally:
        conn.execute(sql.SQL("unlisten {}").format(sql.Identifier(pgmq.NOTIFY_CHANNEL)))
