"""One provider rate limit for every worker (core/embed/ratelimit.py, sql/010_rate_limit.sql): the paced
schedule in Postgres, the pause a 429 sets for everyone, the OpenAI embedder's use of both, and
4 `autoembed drain` processes against a provider that answers 429 past its per-minute limit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from autoembed_dagster.core.embed import ratelimit
from autoembed_dagster.core.config import ConfigError, EmbedderSettings
from autoembed_dagster.core.embed import clear_embedder_cache, make_embedder
from autoembed_dagster.core.embed.ratelimit import Limiter, RateLimit, retry_after_seconds

BIN = Path(sys.executable).parent


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def limit_db(db_url):
    """The shared limit's state in this test's database (and back to the default after)."""
    ratelimit.configure(db_url)
    yield db_url
    ratelimit.configure(None)


def schedule(conn, provider: str, model: str):
    return conn.execute("select next_request_at, next_token_at, paused_until, requests, tokens, throttled "
                        "from autoembed.rate_limits where provider = %s and model = %s", (provider, model)).fetchone()


def test_requests_take_consecutive_slots_of_one_schedule(limit_db, conn):
    # Two limiters as two workers would hold them: they share the (provider, model) row.
    a = Limiter("openai", "m", RateLimit(requests_per_minute=600))
    b = Limiter("openai", "m", RateLimit(requests_per_minute=600))
    t0 = conn.execute("select clock_timestamp()").fetchone()[0]
    started = time.monotonic()
    for i in range(10):
        (a if i % 2 else b).acquire()
    elapsed = time.monotonic() - started
    next_at, _, _, requests, _, throttled = schedule(conn, "openai", "m")
    assert requests == 10 and throttled == 0
    # 10 requests at 10/s: the 10th may be sent 0.9 s after the first, and no earlier.
    assert next_at - t0 >= timedelta(seconds=1.0)
    assert elapsed >= 0.85
    # Another model has its own schedule: no wait.
    assert Limiter("openai", "other", RateLimit(requests_per_minute=600)).acquire() == 0.0


def test_tokens_are_paced_by_their_own_limit(limit_db, conn):
    lim = Limiter("openai", "t", RateLimit(tokens_per_minute=60_000))  # 1,000 tokens per second
    t0 = conn.execute("select clock_timestamp()").fetchone()[0]
    started = time.monotonic()
    for _ in range(3):
        lim.acquire(1000)
    elapsed = time.monotonic() - started
    _, next_token_at, _, requests, tokens, _ = schedule(conn, "openai", "t")
    assert (requests, tokens) == (3, 3000)
    assert next_token_at - t0 >= timedelta(seconds=3)
    assert elapsed >= 1.9  # the third request's 1,000 tokens start 2 s after the first's


def test_a_pause_holds_every_worker_and_a_reserved_slot_rechecks_it(limit_db, conn):
    other = Limiter("openai", "p", RateLimit(requests_per_minute=120))
    slept: list[float] = []

    def sleep_and_see_a_429(seconds: float) -> None:
        # While this worker sleeps on its reserved slot, another one sees a 429 asking for 1.5 s.
        if not slept:
            other.pause(1.5)
        slept.append(seconds)
        time.sleep(seconds)

    worker = Limiter("openai", "p", RateLimit(requests_per_minute=120), sleep=sleep_and_see_a_429)
    assert worker.acquire() == 0.0  # the first slot is now
    waited = worker.acquire()  # the next is 0.5 s later, then the pause: wait it out and take a new slot
    assert len(slept) >= 2, slept
    assert waited >= 1.4
    assert schedule(conn, "openai", "p")[5] == 1  # the 429 is counted
    assert other.paused_for() == 0.0


def test_retry_after_headers_are_read_like_the_openai_client_reads_them():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert retry_after_seconds({"retry-after": "Tue, 01 Dec 2026 00:00:10 GMT"}, now=1796083200.0) == 10.0
    assert retry_after_seconds({"retry-after": "tomorrow"}) == ratelimit.DEFAULT_PAUSE_SECONDS
    assert retry_after_seconds({}) == ratelimit.DEFAULT_PAUSE_SECONDS
    assert retry_after_seconds({"retry-after": "86400"}) == ratelimit.MAX_PAUSE_SECONDS


def test_limits_are_read_from_the_environment_and_bad_values_named(monkeypatch):
    monkeypatch.setenv("AUTOEMBED_PROVIDER", "openai")
    monkeypatch.setenv("AUTOEMBED_REQUESTS_PER_MINUTE", "3000")
    monkeypatch.setenv("AUTOEMBED_TOKENS_PER_MINUTE", "1000000")
    s = EmbedderSettings.from_env()
    assert RateLimit.of(s) == RateLimit(3000, 1_000_000) and RateLimit.of(s).enabled
    monkeypatch.setenv("AUTOEMBED_REQUESTS_PER_MINUTE", "0")
    with pytest.raises(ConfigError, match="AUTOEMBED_REQUESTS_PER_MINUTE='0' must be at least 1"):
        EmbedderSettings.from_env()
    monkeypatch.delenv("AUTOEMBED_REQUESTS_PER_MINUTE")
    monkeypatch.delenv("AUTOEMBED_TOKENS_PER_MINUTE")
    assert not RateLimit.of(EmbedderSettings.from_env()).enabled


def test_without_a_limit_the_embedder_never_touches_the_database(fake_openai, monkeypatch):
    # Nothing listens here: a single round trip to the limit's state would fail the embedding.
    ratelimit.configure("host=/nonexistent-socket-dir dbname=nothing connect_timeout=1")
    try:
        out = make_embedder().embed(["a", "b"])
    finally:
        ratelimit.configure(None)
    assert out.failed_indexes == [] and out.limit_wait_seconds == 0.0
    assert fake_openai.request_count == 1


def test_the_embedder_paces_requests_and_counts_the_wait(fake_openai, limit_db, conn, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_REQUESTS_PER_MINUTE", "300")  # one request per 0.2 s
    monkeypatch.setenv("AUTOEMBED_TOKENS_PER_MINUTE", "1000000")
    monkeypatch.setenv("AUTOEMBED_EMBED_BATCH", "1")
    clear_embedder_cache()
    embedder = make_embedder()
    started = time.monotonic()
    out = embedder.embed(["one", "two", "three", "four"])
    elapsed = time.monotonic() - started
    assert out.failed_indexes == [] and out.requests == 4
    # Requests 2-4 each waited for their slot: 4 requests span at least 3 slots, however slow the
    # machine (a slow request shortens the wait that follows it, so the wait alone has no floor).
    assert elapsed >= 0.58, elapsed
    assert out.limit_wait_seconds > 0.0
    _, _, _, requests, tokens, _ = schedule(conn, "openai@" + fake_openai.base_url.split("/")[2], "text-embedding-3-small")
    assert (requests, tokens) == (4, 4)  # exact token counts (one token each), not byte bounds


def test_a_429_pauses_every_worker_for_its_retry_after(fake_openai, limit_db, conn, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_REQUESTS_PER_MINUTE", "6000")
    monkeypatch.setenv("AUTOEMBED_MAX_RETRIES", "3")
    clear_embedder_cache()
    embedder = make_embedder()
    provider = "openai@" + fake_openai.base_url.split("/")[2]
    probe = Limiter(provider, "text-embedding-3-small", RateLimit(requests_per_minute=6000))
    fake_openai.fail_next(1, status=429, retry_after=3)
    first: dict = {}
    a = threading.Thread(target=lambda: first.setdefault("out", embedder.embed(["from worker a"])))
    a.start()
    wait_for(lambda: probe.paused_for() > 0, what="worker a's 429 to pause everyone")
    # Worker b (another thread, same limit) now starts: it must wait for the pause, not send.
    second = embedder.embed(["from worker b"])
    a.join(30)
    assert second.failed_indexes == [] and first["out"].failed_indexes == []
    assert second.limit_wait_seconds >= 1.0
    assert fake_openai.throttled_count == 1
    assert schedule(conn, provider, "text-embedding-3-small")[5] == 1
    statuses = [r["status"] for r in fake_openai.requests]
    assert statuses == [429, 200, 200]


# -- 4 drain processes, one limit -----------------------------------------------------------------
ROWS = 120
LIMIT = 600  # per minute: 10 requests/s; the same proof as 60/min, 10x faster
WINDOW = 6.0  # the fake provider allows LIMIT/10 requests in any 6 s (it enforces the minute in parts)


def _drain_processes(db_url: str, base_url: str, n: int, limit: int | None) -> list[subprocess.Popen]:
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": db_url, "OPENAI_BASE_URL": base_url,
           "OPENAI_API_KEY": "sk-test-not-a-real-key", "AUTOEMBED_PROVIDER": "openai",
           "AUTOEMBED_MODEL": "text-embedding-3-small", "AUTOEMBED_EMBED_BATCH": "1", "AUTOEMBED_READ_BATCH": "20",
           "AUTOEMBED_MAX_RETRIES": "8", "AUTOEMBED_RETRY_DELAY": "0", "AUTOEMBED_REQUEST_TIMEOUT": "30"}
    env.pop("AUTOEMBED_REQUESTS_PER_MINUTE", None)
    if limit:
        env["AUTOEMBED_REQUESTS_PER_MINUTE"] = str(limit)
    return [subprocess.Popen([str(BIN / "autoembed"), "drain", "-q", "--idle-timeout", "2"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(n)]


def _run_drains(conn, db_url, fake_openai, limit: int | None) -> dict:
    conn.execute("truncate documents")
    conn.execute("delete from autoembed.rate_limits")
    conn.execute("insert into documents (title, content) select 'doc ' || g, 'body of ' || g "
                 "from generate_series(1, %s) g", (ROWS,))
    fake_openai.reset()
    fake_openai.limit_per_minute(LIMIT, window_seconds=WINDOW)
    started = time.monotonic()
    procs = _drain_processes(db_url, fake_openai.base_url, 4, limit)
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    seconds = time.monotonic() - started
    assert [p.returncode for p in procs] == [0] * 4, outputs
    written = conn.execute("select count(*) from documents where embedding is not null").fetchone()[0]
    queued = conn.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0]
    dead = conn.execute("select count(*) from autoembed.dead_letters").fetchone()[0]
    accepted = sum(1 for r in fake_openai.requests if r["status"] == 200)
    result = {"written": written, "queued": queued, "dead": dead, "throttled": fake_openai.throttled_count,
              "accepted": accepted, "seconds": round(seconds, 1)}
    print(f"\n4 drains, provider limit {LIMIT}/min, project limit {limit or 'none'}: {result}")
    return result


def test_four_drain_processes_share_one_limit_and_stay_under_the_providers(supabase_docs, db_url, fake_openai):
    limited = _run_drains(supabase_docs, db_url, fake_openai, limit=LIMIT)
    assert (limited["written"], limited["queued"], limited["dead"]) == (ROWS, 0, 0)  # all written, nothing lost
    assert limited["accepted"] >= ROWS
    # Near zero: pacing at exactly the provider's rate, a request delayed on its way can still
    # make a 61st in the provider's window (then its Retry-After pauses every worker).
    assert limited["throttled"] <= max(3, limited["accepted"] // 25), limited
    requests, throttled = supabase_docs.execute(
        "select requests, throttled from autoembed.rate_limits where model = 'text-embedding-3-small'").fetchone()
    assert requests >= limited["accepted"]  # every attempt took a slot of the one schedule
    assert throttled == limited["throttled"]  # every 429 paused every worker

    # The contrast, and the proof that this provider really limits: the same drains, no limit.
    unlimited = _run_drains(supabase_docs, db_url, fake_openai, limit=None)
    # Every drain meets the full window at least once: many more than the limited run in practice
    # (the count depends on how the workers race for each freed slot; see bench/bench_scale.py).
    assert unlimited["throttled"] >= 4, (limited, unlimited)
