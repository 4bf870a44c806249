"""The drain gives way (issue 11): the application's writes never fail because of a drain, a
configuration error stops the drain without touching the jobs, and the vector write and the
message delete are one transaction."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import psycopg
import pytest

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer, ProviderConfigError, drain
from autoembed_dagster.core.embed import clear_embedder_cache

from .test_claims import wait_for
from .test_faults import ROOT, assert_all_current, drain_until_empty, settings_with
from .test_incremental import queue_depth


def visible(conn) -> int:
    return conn.execute("select count(*) from pgmq.q_embedding_jobs where vt <= clock_timestamp()").fetchone()[0]


def test_four_drains_never_abort_the_applications_random_order_updates(supabase_docs, fake_openai, settings,
                                                                          db_url):
    """Two-row transactions updating rows in random order (`where id = any(...)`, locks taken in
    heap order) beside 4 drains that lock the rows they write: no application statement fails
    because of a drain. The two application threads can deadlock with each other whatever the
    drains do (A locks 5 then 9, B 9 then 5): such a deadlock, every process of which is an
    application session (Postgres names them in the error's detail), is the application's own and
    is retried; any other error, a deadlock a drain takes part in included, fails the test."""
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || g, 'v0' from generate_series(1, 200) g")
    fake_openai.delay(0.005)
    s = settings_with(settings, read_batch=40)
    stop = threading.Event()
    app_errors: list[str] = []
    app_commits = [0]
    app_deadlocks: list[str] = []  # between the two application sessions only: retried
    app_pids: set[int] = set()
    drain_errors: list[str] = []

    def application(seed: int):
        rng = random.Random(seed)
        with connect(db_url, autocommit=False) as app:
            app_pids.add(app.info.backend_pid)
            while not stop.is_set():
                ids = rng.sample(range(1, 201), 4)
                try:
                    with app.transaction():
                        app.execute("update documents set content = %s where id = any(%s)",
                                    (f"v{rng.random()}", ids[:2]))
                        app.execute("update documents set content = %s where id = any(%s)",
                                    (f"w{rng.random()}", ids[2:]))
                    app_commits[0] += 1
                except psycopg.errors.DeadlockDetected as exc:
                    pids = deadlocked_processes(exc)
                    if pids and pids <= app_pids:
                        app_deadlocks.append(str(exc))  # the applications' own: not the drain's doing
                    else:
                        app_errors.append(f"{type(exc).__name__}: {exc} {exc.diag.message_detail}")
                except psycopg.Error as exc:
                    app_errors.append(f"{type(exc).__name__}: {exc}")

    def drainer():
        try:
            with connect(db_url) as c:
                while not stop.is_set():
                    Drainer(c, s).run(idle_timeout=0.5, time_budget=2)
        except Exception as exc:  # noqa: BLE001 - reported below
            drain_errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=application, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=drainer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: app_commits[0] >= 400 or app_errors, "the application to commit 400 transactions",
                 timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert app_errors == [], app_errors[:3]
    assert drain_errors == [], drain_errors[:3]
    assert app_commits[0] >= 400
    fake_openai.delay(0)
    drain_until_empty(conn, s)
    assert pgmq.dead_letters(conn) == []
    assert_all_current(conn)  # no stale vector, no row left without one


def deadlocked_processes(exc: psycopg.errors.DeadlockDetected) -> set[int]:
    """The backend pids a deadlock error names ("Process 12 waits for ...; blocked by process 34.")."""
    import re

    return {int(p) for p in re.findall(r"[Pp]rocess (\d+)", exc.diag.message_detail or "")}


@pytest.mark.parametrize("status, expected", [(401, "check OPENAI_API_KEY"), (403, "check OPENAI_API_KEY"),
                                              (404, "not found")])
def test_a_provider_configuration_error_stops_the_drain_and_leaves_every_job_queued(
        supabase_docs, fake_openai, settings, status, expected):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || g, 'c' || g from generate_series(1, 30) g")
    fake_openai.fail_next(100, status=status)

    with pytest.raises(ProviderConfigError, match=expected):
        drain(conn, settings_with(settings, read_batch=10))

    assert queue_depth(conn) == 30 and visible(conn) == 30, "every job stays queued and claimable"
    assert pgmq.dead_letters(conn) == []
    assert conn.execute("select count(*) from autoembed.message_errors").fetchone()[0] == 0
    fake_openai.reset()
    assert drain(conn, settings).embedded == 30


def test_the_cli_drain_fails_on_a_rejected_key(supabase_docs, fake_openai, db_url):
    supabase_docs.execute("insert into documents (title, content) values ('a', 'b')")
    fake_openai.fail_next(10, status=401)
    cli = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", "drain", "-q"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0
    assert "check OPENAI_API_KEY" in cli.stderr and "stay queued" in cli.stderr, cli.stderr
    assert "sk-test" not in cli.stderr + cli.stdout  # the key is never printed
    assert queue_depth(supabase_docs) == 1


def test_vector_write_and_message_delete_are_one_transaction(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('a', 'b'), ('c', 'd')")
    conn.execute("""
        create function refuse_delete() returns trigger language plpgsql
            as $$ begin raise exception 'deleting queue messages is broken'; end $$;
        create trigger refuse_delete before delete on pgmq.q_embedding_jobs
            for each row execute function refuse_delete();""")

    with pytest.raises(psycopg.errors.RaiseException, match="deleting queue messages is broken"):
        drain(conn, settings)

    assert conn.execute("select count(*) from documents where embedding is not null").fetchone()[0] == 0
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 0
    assert queue_depth(conn) == 2
    conn.execute("drop trigger refuse_delete on pgmq.q_embedding_jobs")
    conn.execute("select pgmq.set_vt('embedding_jobs', array(select msg_id from pgmq.q_embedding_jobs), 0)")
    assert drain(conn, settings).embedded == 2
    assert_all_current(conn)


def test_a_429_that_outlasts_the_clients_retries_is_retried_later_not_dead_lettered(
        supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('a', 'b')")
    fake_openai.fail_next(3, status=429, retry_after=0)  # the client tries 1 + 2 retries (conftest)

    s = settings_with(settings, max_attempts=2, retry_delay=60)

    first = drain(conn, s)

    assert (first.embedded, first.retried, first.dead_lettered) == (0, 1, 0), first.summary()
    error, attempts = conn.execute("select error, attempts from autoembed.message_errors").fetchone()
    assert "HTTP 429" in error and attempts == 1
    assert visible(conn) == 0, "the retry waits for its back-off"
    conn.execute("select pgmq.set_vt('embedding_jobs', array(select msg_id from pgmq.q_embedding_jobs), 0)")
    second = drain(conn, s)
    assert (second.embedded, second.dead_lettered) == (1, 0), second.summary()
    assert queue_depth(conn) == 0
    assert_all_current(conn)


def test_no_api_key_stops_the_drain_and_leaves_the_jobs(supabase_docs, settings, monkeypatch):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('a', 'b')")
    monkeypatch.setenv("AUTOEMBED_PROVIDER", "openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    clear_embedder_cache()

    with pytest.raises(ProviderConfigError, match="OPENAI_API_KEY is not set"):
        drain(conn, settings)

    assert queue_depth(conn) == 1 and visible(conn) == 1
    assert pgmq.dead_letters(conn) == []
