"""Claims are not failures (issue 15): a drain keeps what it claimed while it works (heartbeat),
and a drain killed while holding claims costs its messages no attempt, so the next drain takes
them in full batches, at the normal rate, and dead-letters none of them."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer

from .test_faults import DRAIN_SCRIPT, ROOT, assert_all_current, settings_with
from .test_incremental import queue_depth


def wait_for(condition, what: str, timeout: float = 60.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def claimed(conn) -> int:
    return conn.execute("select count(*) from pgmq.q_embedding_jobs where vt > clock_timestamp()").fetchone()[0]


def test_a_drain_killed_while_holding_claims_costs_no_attempt(supabase_docs, fake_openai, settings, db_url):
    """Three drains are killed -9 while they hold claims (each message is then claimed up to three
    times). With max_attempts=2 the old rule (attempts = claims) dead-lettered them or embedded
    each row in a request of its own; now the next drain embeds them in full batches."""
    conn = supabase_docs
    rows = 300
    conn.execute("insert into documents (title, content) select 'd' || g, 'c' || g from generate_series(1, %s) g",
                 (rows,))
    fake_openai.delay(0.3)  # slow enough that each kill lands while claims are held
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": db_url, "AUTOEMBED_VISIBILITY_TIMEOUT": "2",
           "AUTOEMBED_READ_BATCH": "100", "AUTOEMBED_EMBED_BATCH": "25", "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", DRAIN_SCRIPT, "30"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "READY"
        wait_for(lambda: claimed(conn) >= 100, "the drain to hold claims")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: claimed(conn) == 0, "the dead drain's claims to expire")
    reclaimed = conn.execute("select count(*) from pgmq.q_embedding_jobs where read_ct >= 2").fetchone()[0]
    assert reclaimed > 0, "some messages should have been claimed by more than one killed drain"
    left = queue_depth(conn)
    fake_openai.delay(0)
    before = fake_openai.request_count

    stats = Drainer(conn, settings_with(settings, max_attempts=2, read_batch=100)).run()

    assert stats.dead_lettered == 0 and stats.retried == 0, stats.summary()
    assert pgmq.dead_letters(conn) == []
    assert conn.execute("select count(*) from autoembed.message_errors").fetchone()[0] == 0
    assert queue_depth(conn) == 0
    # Full batches (256 texts per request by default; at most one per claimed batch of 100
    # messages), not one request per row as isolation of "failed" rows would make.
    requests = fake_openai.request_count - before
    assert requests <= math.ceil(left / 100) + 1, f"{requests} requests for {left} rows"
    assert_all_current(conn)


def test_the_heartbeat_keeps_a_slow_batch_claimed(supabase_docs, fake_openai, settings, db_url, monkeypatch):
    """A batch that takes several visibility timeouts (slow provider, many requests) keeps its
    claims: a second reader finds nothing to take meanwhile, and no row is embedded twice."""
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || g, 'c' || g from generate_series(1, 40) g")
    fake_openai.delay(0.5)
    monkeypatch.setenv("AUTOEMBED_EMBED_BATCH", "5")
    s = settings_with(settings, visibility_timeout=1, read_batch=100)
    result = {}

    def run():
        with connect(db_url) as c:
            result["stats"] = Drainer(c, s).run()

    t = threading.Thread(target=run)
    t.start()
    stolen = []
    with connect(db_url) as thief:
        wait_for(lambda: claimed(conn) == 40 or not t.is_alive(), "the drain to claim every message")
        # 8 requests of 0.5 s: the batch outlives its 1 s timeout four times over.
        while t.is_alive():
            stolen += pgmq.read(thief, "embedding_jobs", 30, 100)
            time.sleep(0.1)
    t.join()
    assert stolen == [], f"another reader took {len(stolen)} messages the drain was working on"
    assert result["stats"].embedded == 40, result["stats"].summary()
    texts = [t for r in fake_openai.requests for t in r["inputs"]]
    assert len(texts) == len(set(texts)) == 40, "every row embedded exactly once"
    assert_all_current(conn)
