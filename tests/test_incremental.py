"""The incremental path end to end: Supabase's SQL → trigger → pgmq → drain → vector."""

from __future__ import annotations

import threading
import time

import numpy as np

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer, drain
from autoembed_dagster.core.db.schema import init_db

from .fake_openai import fake_vector


def stored(conn, doc_id):
    row = conn.execute("select embedding, embedding_input(d) from documents d where id = %s", (doc_id,)).fetchone()
    return (None if row[0] is None else np.array(row[0].to_list(), dtype=np.float32)), row[1]


def assert_current(conn, doc_id, dims=1536):
    """The stored vector is the provider's vector of the row's *current* input (halfvec precision)."""
    vec, text = stored(conn, doc_id)
    assert vec is not None, f"row {doc_id} has no vector"
    assert np.allclose(vec, fake_vector(text, dims), atol=2e-3), f"row {doc_id} holds a vector of other content"


def queue_depth(conn, queue="embedding_jobs"):
    """Rows waiting in the queue (a bulk statement's message covers up to 200)."""
    return pgmq.status(conn, queue)[0].rows


def test_supabase_sql_runs_unchanged_and_rows_get_embedded(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('Cats', 'Cats purr.'), ('Dogs', 'Dogs bark.')")
    assert queue_depth(conn) == 2
    message = conn.execute("select message from pgmq.q_embedding_jobs order by msg_id limit 1").fetchone()[0]
    # Supabase's message, plus the registered target (from the trigger's own arguments) and the key.
    target = conn.execute("select id from autoembed.target_catalog where table_name = 'documents'").fetchone()[0]
    assert message == {"id": 1, "schema": "public", "table": "documents", "contentFunction": "embedding_input",
                       "embeddingColumn": "embedding", "target": target, "keyColumn": "id"}

    stats = drain(conn, settings)

    assert stats.embedded == 2 and stats.dead_lettered == 0
    assert queue_depth(conn) == 0
    for doc_id in (1, 2):
        assert_current(conn, doc_id)
    assert fake_openai.requests[-1]["dimensions"] == 1536


def test_update_clears_then_reembeds_current_content(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'first')")
    drain(conn, settings)
    assert_current(conn, 1)

    conn.execute("update documents set content = 'second' where id = 1")
    assert stored(conn, 1)[0] is None, "a stale vector must be cleared in the updating transaction"
    drain(conn, settings)
    assert_current(conn, 1)
    assert stored(conn, 1)[1].endswith("second")


def test_resave_and_unrelated_column_change_enqueue_nothing(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'same')")
    drain(conn, settings)
    before = fake_openai.request_count

    conn.execute("update documents set title = title, content = content where id = 1")
    conn.execute("update documents set created_at = now() where id = 1")

    assert queue_depth(conn) == 0
    assert stored(conn, 1)[0] is not None
    assert drain(conn, settings).embedded == 0
    assert fake_openai.request_count == before


def test_duplicate_jobs_for_unchanged_input_are_not_reembedded(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'x')")
    drain(conn, settings)
    before = fake_openai.request_count
    # A replayed job (e.g. a retried message) for content that is already embedded.
    pgmq.send_batch(conn, "embedding_jobs", [{"id": 1, "schema": "public", "table": "documents",
                                              "contentFunction": "embedding_input", "embeddingColumn": "embedding"}])
    stats = drain(conn, settings)
    assert stats.unchanged == 1 and stats.embedded == 0
    assert fake_openai.request_count == before
    assert queue_depth(conn) == 0


def test_deleted_row_drops_its_job(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'x'), ('B', 'y')")
    conn.execute("delete from documents where id = 1")
    stats = drain(conn, settings)
    assert stats.deleted_rows == 1 and stats.embedded == 1 and stats.dead_lettered == 0
    assert queue_depth(conn) == 0
    assert_current(conn, 2)


def test_bulk_statement_trigger_sends_one_batch_and_only_changed_rows(conn, fake_openai, settings):
    conn.execute("""
        create table notes (id bigint primary key, body text, tag text, embedding vector(64));
        create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
    """)
    conn.execute("insert into notes select g, 'note ' || g, 't', null from generate_series(1, 50) g")
    queued = conn.execute("select autoembed.enroll('notes', 'note_input', 'embedding')").fetchone()[0]
    assert queued == 50
    conn.execute("insert into notes select g, 'note ' || g, 't', null from generate_series(51, 3050) g")
    assert queue_depth(conn) == 3050
    # One queue row per 200 rows of a statement; "id" is the first of them. Consecutive integer
    # keys travel as a range, others as a list.
    messages = [m for (m,) in conn.execute("select message from pgmq.q_embedding_jobs order by msg_id")]
    assert len(messages) == 1 + 15
    assert messages[0]["ids"] == ",".join(str(i) for i in range(1, 51))  # the backlog
    assert messages[1]["id"] == 51 and messages[1]["idRange"] == [51, 250] and messages[-1]["idRange"] == [2851, 3050]
    assert {k: v for k, v in messages[1].items() if k not in ("id", "idRange")} == {
        "schema": "public", "table": "notes", "contentFunction": "note_input", "embeddingColumn": "embedding",
        "target": 1, "keyColumn": "id"}
    conn.execute("insert into notes select g, 'note ' || g, 't', null from generate_series(5001, 5500, 2) g")
    gapped = [m for (m,) in conn.execute("select message from pgmq.q_embedding_jobs where msg_id > %s order by msg_id",
                                         (conn.execute("select max(msg_id) - 2 from pgmq.q_embedding_jobs").fetchone()[0],))]
    assert [m["ids"] for m in gapped] == [",".join(str(i) for i in range(5001, 5400, 2)),
                                          ",".join(str(i) for i in range(5401, 5500, 2))]
    assert queue_depth(conn) == 3050 + 250
    fake_openai.default_dims = 64
    stats = drain(conn, settings)
    assert stats.embedded == 3050 + 250
    conn.execute("delete from notes where id > 5000")

    # A bulk update touching content of 10 rows and only the tag of 1000 others.
    conn.execute("update notes set body = body || '!' where id <= 10")
    conn.execute("update notes set tag = 'u' where id > 2000")
    assert queue_depth(conn) == 10
    assert conn.execute("select count(*) from notes where embedding is null").fetchone()[0] == 10
    drain(conn, settings)
    rows = conn.execute("select body, embedding from notes where id <= 10").fetchall()
    for body, vec in rows:
        assert np.allclose(vec.to_numpy(), fake_vector(body, 64), atol=1e-6)


def test_dimension_mismatch_is_a_clear_dead_letter(conn, fake_openai, settings, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_PROVIDER", "local")
    monkeypatch.delenv("AUTOEMBED_MODEL")
    conn.execute("""
        create table items (id int primary key, body text, embedding vector(1536));
        create function item_input(i items) returns text language sql immutable as $$ select i.body $$;
        create trigger q after insert on items for each row
            execute function util.queue_embeddings('item_input', 'embedding');
        insert into items values (1, 'hello');
    """)
    stats = drain(conn, Settings.from_env())
    assert stats.dead_lettered == 1
    error = pgmq.dead_letters(conn)[0]["error"]
    assert "items" in error and "embedding" in error and "1536" in error and "384" in error


def test_queue_status_view(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 't', 'c' || g from generate_series(1, 5) g")
    status = pgmq.status(conn, "embedding_jobs")[0]
    assert (status.depth, status.visible, status.in_flight, status.dead_letters) == (5, 5, 0, 0)
    assert len(pgmq.read(conn, "embedding_jobs", 30, 2)) == 2
    status = pgmq.status(conn, "embedding_jobs")[0]
    assert (status.visible, status.in_flight) == (3, 2)
    assert status.oldest_age_seconds >= 0


def test_stale_write_guard_when_row_changes_during_embedding(supabase_docs, fake_openai, settings, db_url):
    """The provider is slow; the row is updated while its old input is being embedded."""
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'old content')")
    fake_openai.delay(1.0)
    drainer = Drainer(conn, settings)
    done = threading.Event()
    result = {}

    def run():
        result["stats"] = drainer.drain_batch()
        done.set()

    t = threading.Thread(target=run)
    t.start()
    # While the first batch is at the provider, the row changes (its own transaction commits).
    while not fake_openai.requests:
        time.sleep(0.01)
    with connect(db_url) as other:
        other.execute("update documents set content = 'new content' where id = 1")
    t.join(30)
    assert done.is_set()
    assert result["stats"].stale == 1 and result["stats"].embedded == 0
    assert stored(conn, 1)[0] is None, "the vector of old content must not be written"
    fake_openai.delay(0)
    drain(conn, settings)
    assert_current(conn, 1)
    assert stored(conn, 1)[1].endswith("new content")


def test_concurrent_updates_during_drain_never_leave_stale_vectors(supabase_docs, fake_openai, settings, db_url):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || g, 'v0' from generate_series(1, 200) g")
    fake_openai.delay(0.02)
    stop = threading.Event()

    def writer():
        rng = np.random.default_rng(1)
        with connect(db_url) as w:
            n = 0
            while not stop.is_set():
                n += 1
                w.execute("update documents set content = %s where id = %s",
                          (f"v{n}", int(rng.integers(1, 201))))

    t = threading.Thread(target=writer)
    t.start()
    try:
        s = Settings(**{**settings.__dict__, "read_batch": 20})
        drained = drain(conn, s, time_budget=4.0)
        assert drained.embedded > 0
    finally:
        stop.set()
        t.join()
    fake_openai.delay(0)
    drain(conn, settings)
    assert queue_depth(conn) == 0
    for doc_id in range(1, 201):
        assert_current(conn, doc_id)


def test_two_drains_at_once_write_each_row_once_and_lose_none(supabase_docs, fake_openai, db_url, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || g, 'c' || g from generate_series(1, 600) g")
    # Duplicate jobs too: each row is queued twice.
    conn.execute("update documents set content = content || '.'")
    assert queue_depth(conn) == 1200
    fake_openai.delay(0.01)
    s = Settings(**{**settings.__dict__, "read_batch": 50})
    results = []

    def one():
        with connect(db_url) as c:
            results.append(drain(c, s))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(r.embedded for r in results) == 600, [r.summary() for r in results]
    assert all(r.embedded > 0 for r in results), "both drains should have taken work"
    assert sum(r.dead_lettered for r in results) == 0
    assert queue_depth(conn) == 0
    assert conn.execute("select count(*) from documents where embedding is null").fetchone()[0] == 0
    for doc_id in (1, 300, 600):
        assert_current(conn, doc_id)


def test_overloaded_content_function_names_across_enrolled_tables(conn, fake_openai, settings):
    """Supabase's convention: one `embedding_input(<table>)` per table, all with the same name."""
    for table in ("posts", "pages"):
        conn.execute(f"""
            create table {table} (id int primary key, body text, embedding vector(16));
            create function embedding_input(r {table}) returns text language sql immutable
                as $$ select '{table}: ' || r.body $$;
            insert into {table} values (1, 'one'), (2, 'two');
        """)
        conn.execute("select autoembed.enroll(%s, 'embedding_input', 'embedding')", (table,))
    fake_openai.default_dims = 16
    drain(conn, settings)
    conn.execute("update posts set body = body || '!'")  # bulk update through the statement trigger
    conn.execute("update pages set body = body")  # no real change: nothing queued
    assert queue_depth(conn) == 2
    drain(conn, settings)
    for table in ("posts", "pages"):
        for body, vec in conn.execute(f"select embedding_input(t), embedding from {table} t").fetchall():
            assert np.allclose(vec.to_numpy(), fake_vector(body, 16), atol=1e-6)


def _clear_trigger_calls(conn, statement: str, draining: bool) -> int:
    """How often `statement` entered the clear trigger's function (rolled back afterwards)."""
    with conn.transaction(force_rollback=True):
        conn.execute("set local track_functions = 'pl'")
        if draining:
            conn.execute("set local autoembed.draining = 'on'")
        calls = ("select coalesce(sum(pg_stat_get_xact_function_calls(tgfoid)), 0) from pg_trigger"
                 " where tgname = 'autoembed_clear'")
        before = conn.execute(calls).fetchone()[0]  # counts not flushed yet carry over between transactions
        conn.execute(statement)
        return conn.execute(calls).fetchone()[0] - before


def test_the_drains_writes_skip_the_clear_trigger_also_on_tables_enrolled_before(conn):
    conn.execute("""
        create table notes (id bigint primary key, body text, embedding vector(3));
        create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
        insert into notes select g, 'note ' || g, '[1,2,3]' from generate_series(1, 20) g;
    """)
    conn.execute("select autoembed.enroll('notes', 'note_input', 'embedding', enqueue_backlog => false)")
    write_vectors = "update notes set embedding = '[3,2,1]' where id <= 10"
    user_edit = "update notes set body = body || '!' where id <= 10"
    assert _clear_trigger_calls(conn, write_vectors, draining=True) == 0
    assert _clear_trigger_calls(conn, user_edit, draining=False) == 10

    # A table enrolled by an older version: its clear trigger has neither the drain check nor the
    # input comparison in its WHEN clause. `db init` enrols it again (tests/test_registry.py has
    # the full upgrade).
    conn.execute("drop trigger autoembed_clear on notes")
    conn.execute("create trigger autoembed_clear before update on notes for each row "
                 "execute function autoembed.clear_on_change('note_input', 'embedding')")
    assert _clear_trigger_calls(conn, write_vectors, draining=True) == 10
    init_db(conn)
    init_db(conn)  # idempotent
    definition = conn.execute("select pg_get_triggerdef(oid) from pg_trigger where tgname = 'autoembed_clear'").fetchone()[0]
    assert "WHEN" in definition and "autoembed.draining" in definition and "new.embedding IS NOT NULL" in definition
    # (the input comparison is in the generated function: a content function raising for a row
    # must not fail the application's write, tests/test_bad_rows.py)
    source = conn.execute("select p.prosrc from pg_trigger t join pg_proc p on p.oid = t.tgfoid"
                          " where t.tgname = 'autoembed_clear'").fetchone()[0]
    assert "note_input(OLD) is not distinct from public.note_input(NEW)" in source.replace("public.note_input(OLD)", "note_input(OLD)")
    assert _clear_trigger_calls(conn, write_vectors, draining=True) == 0
    conn.execute(user_edit)
    assert conn.execute("select count(*) from notes where embedding is null").fetchone()[0] == 10
