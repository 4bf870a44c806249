"""Fault tests: the no-loss promise under kill -9, provider faults, a Postgres restart and hostile
input. Each is bounded in time; together they take well under three minutes on 2 cores."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.db.server import connect, ensure_database, start_embedded
from autoembed_dagster.core.drain import Drainer, drain
from autoembed_dagster.core.embed import clear_embedder_cache
from autoembed_dagster.core.db.schema import init_db

from .conftest import SUPABASE_SQL
from .fake_openai import fake_vector
from .test_incremental import assert_current, queue_depth

ROOT = Path(__file__).resolve().parents[1]

# A drain in its own process, as `autoembed drain` runs it; prints READY once warm and connected.
DRAIN_SCRIPT = r"""
import sys
from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer
from autoembed_dagster.core.embed import make_embedder
make_embedder(dimensions=1536).count_tokens("warm up: imports and tokenizer, so kills land mid-work")
with connect() as conn:
    print("READY", flush=True)
    Drainer(conn, Settings.from_env()).run(idle_timeout=float(sys.argv[1]))
"""


def settings_with(settings: Settings, **kw) -> Settings:
    return Settings(**{**settings.__dict__, **kw})


def drain_until_empty(conn, settings: Settings, budget: float = 60.0) -> None:
    """Drain until no message is left (claims of killed drains come back after their timeout)."""
    end = time.monotonic() + budget
    while queue_depth(conn) and time.monotonic() < end:
        drain(conn, settings, idle_timeout=1.5, time_budget=max(end - time.monotonic(), 0.1))
    assert queue_depth(conn) == 0, f"{queue_depth(conn)} messages left after {budget:.0f} s"


def audit(conn) -> None:
    """Record every enqueued job and every vector write, to count writes per message."""
    conn.execute("""
        create table audit_enqueued (row_id text);
        create table audit_written (row_id text);
        create function audit_enq() returns trigger language plpgsql as $$
        begin insert into public.audit_enqueued select n.message ->> 'id' from audit_new n; return null; end $$;
        create trigger audit_enq after insert on pgmq.q_embedding_jobs referencing new table as audit_new
            for each statement execute function audit_enq();
        create function audit_wr() returns trigger language plpgsql as $$
        begin
            if NEW.embedding is not null then insert into audit_written values (NEW.id::text); end if;
            return null;
        end $$;
        create trigger audit_wr after update of embedding on documents for each row execute function audit_wr();
    """)


def assert_all_current(conn, dims: int = 1536) -> None:
    rows = conn.execute("select id, embedding, embedding_input(d) from documents d order by id").fetchall()
    missing = [r[0] for r in rows if r[1] is None]
    assert not missing, f"{len(missing)} rows without a vector, e.g. {missing[:5]}"
    stale = [r[0] for r in rows if not np.allclose(r[1].to_numpy(), fake_vector(r[2], dims), atol=2e-3)]
    assert not stale, f"{len(stale)} rows hold a vector of other content, e.g. {stale[:5]}"


# -- kill -9 ---------------------------------------------------------------------------------------
def test_kill_9_at_random_points_loses_nothing(supabase_docs, fake_openai, settings, db_url):
    conn = supabase_docs
    audit(conn)
    conn.execute("insert into documents (title, content) select 'd' || g, 'v0 ' || g from generate_series(1, 300) g")
    fake_openai.delay(0.01)  # a little provider time, so kills land in every phase
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": db_url, "AUTOEMBED_VISIBILITY_TIMEOUT": "2",
           "AUTOEMBED_READ_BATCH": "25", "AUTOEMBED_EMBED_BATCH": "10", "AUTOEMBED_RETRY_DELAY": "0",
           "PYTHONPATH": str(ROOT)}
    stop = threading.Event()
    writes = [0]

    def writer():
        rng = random.Random(7)
        with connect(db_url) as w:
            while not stop.is_set():
                if rng.random() < 0.2:
                    w.execute("insert into documents (title, content) values ('new', %s)", (f"n{writes[0]}",))
                else:
                    w.execute("update documents set content = %s where id = %s",
                              (f"v{writes[0]}", rng.randint(1, 300)))
                writes[0] += 1
                time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    rng = random.Random(42)
    kills = 0
    try:
        while kills < 20:
            proc = subprocess.Popen([sys.executable, "-c", DRAIN_SCRIPT, "30"], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout.readline().strip() == "READY"
            time.sleep(rng.uniform(0.0, 0.8))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            kills += 1
    finally:
        stop.set()
        t.join()
    assert writes[0] > 100, "the writer should have kept writing during the kills"
    by_killed = conn.execute("select count(*) from audit_written").fetchone()[0]
    assert by_killed > 0, "the killed drains should have written some vectors before dying"
    fake_openai.delay(0)
    drain_until_empty(conn, settings_with(settings, visibility_timeout=2))

    assert_all_current(conn)
    assert pgmq.dead_letters(conn) == []
    over = conn.execute("""
        select w.row_id, w.n, coalesce(e.n, 0) from
            (select row_id, count(*) n from audit_written group by row_id) w
            left join (select row_id, count(*) n from audit_enqueued group by row_id) e using (row_id)
        where w.n > coalesce(e.n, 0)""").fetchall()
    assert over == [], f"rows written more often than they were queued: {over[:5]}"


# -- provider faults -------------------------------------------------------------------------------
def test_provider_faults_are_retried_or_dead_lettered_and_nothing_else_is_affected(
        supabase_docs, fake_openai, settings, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_REQUEST_TIMEOUT", "0.5")
    monkeypatch.setenv("AUTOEMBED_MAX_RETRIES", "1")
    monkeypatch.setenv("AUTOEMBED_EMBED_BATCH", "8")
    clear_embedder_cache()
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || g, 'ok ' || g from generate_series(1, 60) g")
    conn.execute("insert into documents (title, content) values ('bad', 'REJECTED input'), ('flaky', 'ALWAYS500 input')")
    fake_openai.poison("REJECTED", status=400, message="this input is not allowed")
    fake_openai.poison("ALWAYS500", status=500, message="upstream exploded")
    fake_openai.fail_next(1, status=429, retry_after=0.2)  # the client waits Retry-After, then succeeds
    fake_openai.fail_next(2, status=500)  # more than the client's own retry: the drain retries
    fake_openai.fail_next(1, status=503)
    fake_openai.timeout_next(2, seconds=1.5)
    for kind in ("malformed_json", "wrong_count", "wrong_dimension", "nan", "invalid_utf8"):
        fake_openai.bad_payload_next(1, kind)
    s = settings_with(settings, max_attempts=3, retry_delay=0, read_batch=16)

    retried = 0
    for _ in range(12):
        stats = drain(conn, s)
        retried += stats.retried
        if queue_depth(conn) == 0:
            break
    assert queue_depth(conn) == 0
    assert retried > 0, "transient faults should have been retried by the drain"
    statuses = {r["status"] for r in fake_openai.requests}
    assert {429, 500, 503, 400}.issubset(statuses), statuses

    dead = {d["row_id"]: d for d in pgmq.dead_letters(conn)}
    assert set(dead) == {"61", "62"}, dead
    assert "400" in dead["61"]["error"] and "not allowed" in dead["61"]["error"]
    assert dead["61"]["attempts"] == 1, "a rejected input is not retried"
    assert "500" in dead["62"]["error"] and "gave up after 3 failed attempts" in dead["62"]["error"]
    assert dead["62"]["attempts"] == 3
    for doc_id in range(1, 61):
        assert_current(conn, doc_id)
    assert conn.execute("select count(*) from documents where id > 60 and embedding is not null").fetchone()[0] == 0
    assert conn.execute("select count(*) from autoembed.message_errors").fetchone()[0] == 0


# -- Postgres restart ------------------------------------------------------------------------------
@pytest.fixture
def own_server():
    """A separate embedded server in its own temp dir (never the shared session server)."""
    home = Path(tempfile.mkdtemp(prefix="autoembed-restart-"))
    server = start_embedded(home / "pgdata")
    try:
        yield home / "pgdata", server
    finally:
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass
        shutil.rmtree(home, ignore_errors=True)


def test_postgres_restart_during_a_drain_fails_cleanly_and_the_next_drain_finishes(
        own_server, fake_openai, settings, monkeypatch):
    pgdata, server = own_server
    url = ensure_database(server.get_uri(), "restart")
    monkeypatch.setenv("AUTOEMBED_DATABASE_URL", url)
    with connect(url) as c:
        init_db(c)
        c.execute(SUPABASE_SQL)
        c.execute("insert into documents (title, content) select 'd' || g, 'c' || g from generate_series(1, 400) g")
    fake_openai.delay(0.2)  # 20 batches of 0.2 s at least: the server stops mid-drain
    s = settings_with(settings, read_batch=20, visibility_timeout=2)
    result: dict = {}

    def run():
        try:
            with connect(url) as c:
                result["stats"] = Drainer(c, s).run()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    with connect(url) as c:  # a few batches in
        end = time.monotonic() + 60
        while c.execute("select count(*) from documents where embedding is not null").fetchone()[0] < 40:
            assert time.monotonic() < end and t.is_alive(), "the drain should be writing"
            time.sleep(0.05)
    server.stop()
    t.join(30)
    assert not t.is_alive(), "the drain hung after the server went away"
    assert isinstance(result.get("error"), psycopg.OperationalError), result

    # The CLI, with the server still down: a one-line error and exit code 1, promptly.
    started = time.monotonic()
    cli = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", "drain", "-q"], cwd=ROOT,
                         env={**os.environ, "AUTOEMBED_DATABASE_URL": url}, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 1 and "OperationalError" in cli.stderr, cli.stderr
    assert time.monotonic() - started < 30

    server.start()  # the same data directory, started again
    fake_openai.delay(0)
    with connect(url) as c:
        drain_until_empty(c, s)
        assert_all_current(c)
        assert pgmq.dead_letters(c) == []


# -- hostile input -----------------------------------------------------------------------------------
def test_huge_text_is_truncated_not_lost(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('big', repeat('lorem ipsum ', 400000)), ('small', 'x')")
    stats = drain(conn, settings)
    assert stats.embedded == 2 and stats.truncated == 1 and stats.dead_lettered == 0
    assert_current(conn, 2)
    assert conn.execute("select embedding is not null from documents where id = 1").fetchone()[0]
    sent = max(len(t) for r in fake_openai.requests for t in r["inputs"])
    assert sent < 100_000, "the huge input should have been cut to the model's token limit"


def test_a_content_function_that_fails_on_a_row_dead_letters_only_that_row(conn, fake_openai, settings):
    """NUL bytes cannot be stored in text; they reach us through conversions in the content
    function (bytea -> text), which then fail on that row. One bad row must not poison the batch."""
    conn.execute(r"""
        create table blobs (id int primary key, raw bytea, embedding vector(1536));
        create function blob_input(b blobs) returns text language sql immutable
            as $$ select convert_from(b.raw, 'UTF8') $$;
        insert into blobs values (1, convert_to('fine', 'UTF8')), (2, '\x6e756c00627974'::bytea),
                                 (3, '\xff fe'::bytea), (4, convert_to('also fine', 'UTF8'));
    """)
    assert conn.execute("select autoembed.enroll('blobs', 'blob_input', 'embedding')").fetchone()[0] == 4
    stats = drain(conn, settings)
    assert stats.embedded == 2 and stats.dead_lettered == 2, stats.summary()
    dead = {d["row_id"]: d["error"] for d in pgmq.dead_letters(conn)}
    assert set(dead) == {"2", "3"}
    assert all("blob_input" in e and "key " in e for e in dead.values()), dead
    assert "0x00" in dead["2"], dead["2"]
    assert queue_depth(conn) == 0
    for i, text in ((1, "fine"), (4, "also fine")):
        vec = conn.execute("select embedding from blobs where id = %s", (i,)).fetchone()[0].to_numpy()
        assert np.allclose(vec, fake_vector(text), atol=1e-6)
    # NUL itself never reaches the queue: jsonb refuses it, so the writer sees the error, not us.
    with pytest.raises(psycopg.errors.UntranslatableCharacter):
        conn.execute("""select pgmq.send('embedding_jobs', '{"id": "1\\u0000", "schema": "public"}'::jsonb)""")


def test_quoted_table_names_work_and_injection_attempts_drop_nothing(conn, fake_openai, settings):
    weird = 'we"ird; drop table victims --'
    conn.execute("create table victims (id int primary key)")
    conn.execute(psycopg.sql.SQL("""
        create table {t} (id int primary key, body text, embedding vector(1536));
        create function weird_input(w {t}) returns text language sql immutable as $$ select w.body $$;
        create trigger q after insert or update of body on {t} for each row
            execute function util.queue_embeddings('weird_input', 'embedding');
        create trigger q2 after insert on {t} for each row
            execute function util.queue_embeddings('weird_input', 'embedding; drop table victims --');
        create trigger q3 after insert on {t} for each row
            execute function util.queue_embeddings('weird_input(); drop table victims; --', 'embedding');
    """).format(t=psycopg.sql.Identifier(weird)))
    conn.execute(psycopg.sql.SQL("insert into {} values (1, 'hello')").format(psycopg.sql.Identifier(weird)))
    # A hand-made hostile message as well.
    pgmq.send_batch(conn, "embedding_jobs", [{"id": "1); drop table victims; --", "schema": "public",
                                              "table": weird, "contentFunction": "weird_input",
                                              "embeddingColumn": "embedding"},
                                             {"id": 1, "schema": "public'; drop table victims; --",
                                              "table": weird, "contentFunction": "weird_input",
                                              "embeddingColumn": "embedding"}])
    stats = drain(conn, settings)
    assert stats.embedded == 1, stats.summary()
    assert queue_depth(conn) == 0
    assert conn.execute("select to_regclass('public.victims') is not null").fetchone()[0], "a table was dropped"
    vec = conn.execute(psycopg.sql.SQL("select embedding from {} where id = 1").format(
        psycopg.sql.Identifier(weird))).fetchone()[0]
    assert np.allclose(vec.to_numpy(), fake_vector("hello"), atol=1e-6)
    errors = sorted(d["error"] for d in pgmq.dead_letters(conn))
    assert len(errors) == 4, errors
    joined = "\n".join(errors)
    assert "embedding; drop table victims --" in joined
    assert "weird_input(); drop table victims; --" in joined
    assert "1); drop table victims; --" in joined
    assert "public'; drop table victims; --" in joined
