"""Thin wrappers over pgmq's SQL functions (the queue is pgmq's; nothing here re-implements it)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

NOTIFY_CHANNEL = "autoembed"


@dataclass(frozen=True)
class Message:
    msg_id: int
    read_ct: int
    enqueued_at: datetime
    body: Any  # the JSON message, normally a dict


def read(conn: psycopg.Connection, queue: str, vt: int, qty: int) -> list[Message]:
    """Claim up to `qty` messages, invisible to other readers for `vt` seconds."""
    rows = conn.execute(
        "select msg_id, read_ct, enqueued_at, message from pgmq.read(%s, %s, %s)", (queue, vt, qty)
    ).fetchall()
    return [Message(*row) for row in rows]


def table_of(queue: str) -> sql.Identifier:
    """pgmq's table of `queue`: pgmq lower-cases the name it creates (`MyQueue` -> pgmq.q_myqueue)."""
    return sql.Identifier("pgmq", "q_" + queue.lower())


def has_visible(conn: psycopg.Connection, queue: str) -> bool:
    """Whether the queue holds a message a drain could claim now."""
    return conn.execute(sql.SQL("select exists (select 1 from {} where vt <= clock_timestamp())")
                        .format(table_of(queue))).fetchone()[0]


class Listening:
    """LISTEN on the channel the enqueue triggers and send_batch notify (payload: the queue's
    name), for as long as the `with` block lasts. Needs an autocommit connection: a session in a
    transaction gets its notifications only at commit."""

    def __init__(self, conn: psycopg.Connection, queue: str):
        self.conn, self.queue = conn, queue

    def __enter__(self) -> "Listening":
        self.conn.execute(sql.SQL("listen {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.conn.execute(sql.SQL("unlisten {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        except psycopg.Error:
            pass  # a closed connection listens to nothing

    def wait(self, timeout: float) -> bool:
        """True as soon as a send to this queue is notified, False after `timeout` seconds without
        one (notifications of other queues are skipped)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            for note in self.conn.notifies(timeout=left, stop_after=1):
                if note.payload == self.queue:
                    return True
        return False


def read_claimed(conn: psycopg.Connection, queue: str, msg_ids: Sequence[int]) -> list[Message]:
    """Messages this reader claimed and still holds (no new claim, read_ct unchanged); deleted
    ones are left out. pgmq has no function for it: its queue table, by primary key."""
    if not msg_ids:
        return []
    rows = conn.execute(
        sql.SQL("select msg_id, read_ct, enqueued_at, message from {} where msg_id = any(%s) order by msg_id")
        .format(table_of(queue)),
        (list(msg_ids),),
    ).fetchall()
    return [Message(*row) for row in rows]


def send_batch(conn: psycopg.Connection, queue: str, bodies: Iterable[dict], delay: int = 0) -> list[int]:
    """Send messages (visible after `delay` seconds); returns their ids."""
    payload = [Jsonb(b) for b in bodies]
    if not payload:
        return []
    rows = conn.execute("select * from pgmq.send_batch(%s, %s::jsonb[], %s)", (queue, payload, delay)).fetchall()
    conn.execute("select pg_notify(%s, %s)", (NOTIFY_CHANNEL, queue))
    return [r[0] for r in rows]


def delete(conn: psycopg.Connection, queue: str, msg_ids: Sequence[int]) -> None:
    if msg_ids:
        conn.execute("select pgmq.delete(%s, %s::bigint[])", (queue, list(msg_ids)))


def archive(conn: psycopg.Connection, queue: str, msg_ids: Sequence[int]) -> None:
    if msg_ids:
        conn.execute("select pgmq.archive(%s, %s::bigint[])", (queue, list(msg_ids)))


def set_vt(conn: psycopg.Connection, queue: str, msg_ids: Sequence[int], seconds: int) -> None:
    """Make messages visible again in `seconds` (a retry delay)."""
    if msg_ids:
        conn.execute("select pgmq.set_vt(%s, %s::bigint[], %s)", (queue, list(msg_ids), seconds))


def queue_exists(conn: psycopg.Connection, queue: str) -> bool:
    return conn.execute("select 1 from pgmq.meta where queue_name = %s", (queue,)).fetchone() is not None


@dataclass(frozen=True)
class QueueStatus:
    queue_name: str
    depth: int  # messages
    rows: int  # rows the messages cover (a bulk statement's message covers up to 200)
    visible: int
    in_flight: int
    retrying: int
    oldest_age_seconds: float
    dead_letters: int


def status(conn: psycopg.Connection, queue: str | None = None) -> list[QueueStatus]:
    rows = conn.execute(
        "select * from autoembed.queue_status() where %(q)s::text is null or queue_name = %(q)s",
        {"q": queue},
    ).fetchall()
    return [QueueStatus(*r) for r in rows]


def rows(conn: psycopg.Connection, queue: str) -> int:
    """Rows the queue's messages cover (a bulk statement's message covers up to 200)."""
    return conn.execute(sql.SQL("select coalesce(sum(autoembed.message_rows(message)), 0) from {}")
                        .format(table_of(queue))).fetchone()[0]


def depth(conn: psycopg.Connection, queue: str) -> tuple[int, float]:
    """(messages in the queue, age of the oldest in seconds) from pgmq.metrics (see metrics())."""
    row = conn.execute(
        "select queue_length, coalesce(oldest_msg_age_sec, 0) from pgmq.metrics(%s)", (queue,)
    ).fetchone()
    return int(row[0]), float(row[1])


@dataclass(frozen=True)
class QueueMetrics:
    queue: str
    depth: int  # messages in the queue (claimable + claimed + waiting for a retry)
    visible: int  # messages a drain could claim right now
    oldest_age_seconds: float
    total_sent: int  # messages ever sent to the queue

    @property
    def invisible(self) -> int:
        return self.depth - self.visible


def metrics(conn: psycopg.Connection, queue: str) -> QueueMetrics | None:
    """pgmq.metrics of one queue (one count over the queue table), or None when it does not exist.
    `visible` is pgmq's queue_visible_length (pgmq >= 1.5; older: every message counts as visible)."""
    if not queue_exists(conn, queue):
        return None
    m = conn.execute("select to_jsonb(m) from pgmq.metrics(%s) m", (queue,)).fetchone()[0]
    total = int(m.get("queue_length") or 0)
    visible = m.get("queue_visible_length")
    return QueueMetrics(
        queue=queue,
        depth=total,
        visible=total if visible is None else int(visible),
        oldest_age_seconds=float(m.get("oldest_msg_age_sec") or 0),
        total_sent=int(m.get("total_messages") or 0),
    )


def dead_letters(conn: psycopg.Connection, queue: str | None = None, limit: int = 50) -> list[dict]:
    cur = conn.execute(
        """select queue_name, msg_id, schema_name, table_name, row_id, embedding_column, attempts,
                  error, failed_at
           from autoembed.dead_letter_jobs
           where %(q)s::text is null or queue_name = %(q)s
           order by failed_at desc limit %(n)s""",
        {"q": queue, "n": limit},
    )
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def dumps(body: Any) -> str:
    return json.dumps(body, sort_keys=True, default=str)
