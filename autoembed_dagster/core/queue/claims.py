"""The claim stage: take messages from pgmq with a visibility timeout, and keep them.

A drain keeps what it claimed: while its batches are in flight a heartbeat extends the
visibility of every message it holds (every third of the timeout, whatever the batches are
doing), so a slow provider never lets a claim expire under a live drain, and the drain never
takes its own messages a second time. When the drain dies, the heartbeat dies with it and the
messages come back once their timeout ends; a claim costs no attempt (jobs.recorded_failures), and
a claim given back unused is recorded as such (returned), so the safety net for messages that
kill the drains holding them counts only the claims of drains that died.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import psycopg
from psycopg import sql

from . import pgmq
from ..targets.catalog import message_row_count

log = logging.getLogger(__name__)

MIN_CLAIM_ROWS = 50


class Claims:
    """The messages a drain holds: claimed from pgmq and not yet settled."""

    def __init__(self, queue: str, visibility_timeout: int, read_batch: int):
        self.queue = queue
        self.visibility_timeout = visibility_timeout
        self.read_batch = read_batch
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._chunks: deque[list[pgmq.Message]] = deque()  # claimed, not yet taken up
        self._rows_per_message = 1
        self._rows_per_second: float | None = None  # settled rows per second, smoothed
        self._beaten_at = time.monotonic()
        self._later: list[int] = []  # held messages whose rows were busy: taken up again when due
        self._later_due = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- claiming ----------------------------------------------------------------------------
    @property
    def batch_rows(self) -> int:
        """Rows per batch: `read_batch`, or fewer when the measured rate says a batch of that size
        would take more than a quarter of the visibility timeout."""
        if self._rows_per_second is None:
            return self.read_batch
        fits = int(self._rows_per_second * self.visibility_timeout / 4)
        return max(min(self.read_batch, fits), min(MIN_CLAIM_ROWS, self.read_batch))

    def observe(self, rows: int, seconds: float) -> None:
        """A batch of `rows` took `seconds` from claim to commit."""
        if rows <= 0 or seconds <= 0:
            return
        rate = rows / seconds
        self._rows_per_second = rate if self._rows_per_second is None else 0.7 * self._rows_per_second + 0.3 * rate

    @property
    def pending(self) -> bool:
        """Claimed messages not yet taken up by a batch."""
        return bool(self._chunks)

    def next_chunk(self, conn: psycopg.Connection) -> list[pgmq.Message]:
        """The next batch of about `batch_rows` rows: held messages whose busy rows are due, what
        is claimed already, or a new read. Messages cover 1 to 200 rows: the read size follows the
        largest message of the last read; a read that brought more rows than a batch is worked
        through in chunks."""
        if not self._chunks:
            if self._later and time.monotonic() >= self._later_due:
                ids, self._later = self._later, []
                return pgmq.read_claimed(conn, self.queue, ids)  # still ours: no new claim
            self._read(conn)
        return self._chunks.popleft() if self._chunks else []

    def keep_for_later(self, msg_ids: list[int], delay: float) -> None:
        """Hold messages whose rows the application had locked, to take them up again in `delay`
        seconds. They stay claimed by this drain (the heartbeat extends them)."""
        if not msg_ids:
            return
        with self._lock:
            self._held.update(msg_ids)
        self._later += msg_ids
        self._later_due = time.monotonic() + delay

    def later_due_in(self) -> float | None:
        """Seconds until the held busy rows are due (None when there are none)."""
        return max(self._later_due - time.monotonic(), 0.0) if self._later else None

    def _read(self, conn: psycopg.Connection) -> None:
        rows_wanted = self.batch_rows
        qty = max(1, rows_wanted // self._rows_per_message)
        messages = pgmq.read(conn, self.queue, self.visibility_timeout, qty)
        with self._lock:
            # A message this drain holds already (only possible if a heartbeat came too late)
            # is not taken up twice.
            fresh = [m for m in messages if m.msg_id not in self._held]
            self._held.update(m.msg_id for m in fresh)
        if len(fresh) < len(messages):
            log.warning("the drain of %s read back %d of its own claims; the heartbeat was late",
                        self.queue, len(messages) - len(fresh))
        if not fresh:
            return
        sizes = [message_row_count(m.body) for m in fresh]
        self._rows_per_message = max(sizes)
        chunk: list[pgmq.Message] = []
        rows = 0
        for message, size in zip(fresh, sizes):
            if chunk and rows + size > rows_wanted:
                self._chunks.append(chunk)
                chunk, rows = [], 0
            chunk.append(message)
            rows += size
        self._chunks.append(chunk)

    def hold(self, msg_ids: list[int]) -> None:
        """Hold messages again (a batch taken up once more after a failed settle)."""
        with self._lock:
            self._held.update(msg_ids)

    def release(self, msg_ids) -> None:
        """Stop extending these messages: they are about to be settled (deleted, archived, or
        given a retry time), which the heartbeat must not overwrite. Waits for a heartbeat in
        progress, so after this returns no heartbeat touches them."""
        with self._lock:
            self._held.difference_update(msg_ids)

    def give_back(self, conn: psycopg.Connection) -> None:
        """Make every held message claimable at once: a drain that stops hands what it did not
        settle (rows kept for later, claims no batch took up) to the next drain, now."""
        with self._lock:
            ids = sorted(self._held)
            self._held.clear()
        self._chunks.clear()
        self._later = []
        pgmq.set_vt(conn, self.queue, ids, 0)
        returned(conn, self.queue, ids)

    # -- heartbeat ---------------------------------------------------------------------------
    def beat(self, conn: psycopg.Connection) -> None:
        """Extend every held message's visibility by a full timeout."""
        with self._lock:
            ids = sorted(self._held)
            if ids:
                pgmq.set_vt(conn, self.queue, ids, self.visibility_timeout)
            self._beaten_at = time.monotonic()

    def beat_if_due(self, conn: psycopg.Connection) -> None:
        """The heartbeat of a drain without a heartbeat thread, between its steps."""
        if time.monotonic() - self._beaten_at > self.visibility_timeout / 3:
            self.beat(conn)

    def start_heartbeat(self, conn: psycopg.Connection) -> None:
        """Beat every third of the timeout in a thread, on `conn` (an autocommit connection not
        used inside a transaction by anyone else)."""
        self._beaten_at = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, args=(conn,), name="autoembed-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _heartbeat(self, conn: psycopg.Connection) -> None:
        interval = max(self.visibility_timeout / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                self.beat(conn)
            except psycopg.Error as exc:  # the drain itself notices a lost connection
                log.warning("heartbeat of the drain of %s failed: %s", self.queue, str(exc).strip())

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def returned(conn: psycopg.Connection, queue: str, msg_ids: list[int]) -> None:
    """Count claims given back unused: they were no attempt (the safety net in drain.loop counts
    claims of drains that died holding a message). Records of messages gone are pruned here."""
    if not msg_ids:
        return
    conn.execute(
        """insert into autoembed.message_returns as r (queue_name, msg_id, returned)
           select %s, m, 1 from unnest(%s::bigint[]) m
           on conflict (queue_name, msg_id) do update set returned = r.returned + 1""",
        (queue, msg_ids), prepare=False)
    conn.execute(sql.SQL(
        """delete from autoembed.message_returns r where r.queue_name = %s
           and not exists (select 1 from {} q where q.msg_id = r.msg_id)""").format(pgmq.table_of(queue)),
        (queue,))
