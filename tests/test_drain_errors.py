"""Retries, dead letters and bad input on the incremental path: nothing is lost, errors are clear."""

from __future__ import annotations

import time

import numpy as np
import pytest

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.drain import Drainer, drain

from .fake_openai import fake_vector
from .test_incremental import assert_current, queue_depth


def settings_with(settings: Settings, **kw) -> Settings:
    return Settings(**{**settings.__dict__, **kw})


def test_429_with_retry_after_is_retried_by_the_client(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'a')")
    fake_openai.fail_next(1, status=429, retry_after=1)
    stats = drain(conn, settings)
    assert stats.embedded == 1 and stats.retried == 0
    assert [r["status"] for r in fake_openai.requests] == [429, 200]
    assert_current(conn, 1)


def test_persistent_500_puts_jobs_back_then_succeeds(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'a'), ('B', 'b')")
    # More failures than the client's own retries (AUTOEMBED_MAX_RETRIES=2 → 3 tries).
    fake_openai.fail_next(3, status=500)
    first = Drainer(conn, settings).drain_batch()
    assert first.retried == 2 and first.embedded == 0 and first.dead_lettered == 0
    status = pgmq.status(conn, "embedding_jobs")[0]
    assert status.depth == 2 and status.retrying == 2
    errors = [r[0] for r in conn.execute("select error from autoembed.message_errors").fetchall()]
    assert all("500" in e for e in errors), errors
    stats = drain(conn, settings)  # retry delay is 0 in tests: the jobs are visible again
    assert stats.embedded == 2
    assert pgmq.status(conn, "embedding_jobs")[0].retrying == 0
    assert_current(conn, 1)
    assert_current(conn, 2)


def test_timeouts_are_retried(supabase_docs, fake_openai, settings, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_REQUEST_TIMEOUT", "0.5")
    monkeypatch.setenv("AUTOEMBED_MAX_RETRIES", "0")
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'a')")
    fake_openai.timeout_next(1, seconds=2)
    first = Drainer(conn, settings).drain_batch()
    assert first.retried == 1
    assert any("time" in e.lower() for e in first.errors), first.errors
    assert drain(conn, settings).embedded == 1
    assert_current(conn, 1)


def test_dead_letter_after_max_attempts_without_blocking_others(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    s = settings_with(settings, max_attempts=3)
    conn.execute("insert into documents (title, content) values ('good', 'fine'), ('bad', 'BROKEN text')")
    # The provider answers 500 for any request containing the bad row, so it never succeeds.
    fake_openai.poison("BROKEN", status=500, message="upstream exploded")
    total_dead = 0
    for _ in range(4):
        total_dead += drain(conn, s).dead_lettered
    assert total_dead == 1
    assert queue_depth(conn) == 0
    dead = pgmq.dead_letters(conn)
    assert len(dead) == 1 and dead[0]["row_id"] == "2" and dead[0]["attempts"] == 3
    assert "gave up after 3 failed attempts" in dead[0]["error"]
    archived = conn.execute("select count(*) from pgmq.a_embedding_jobs").fetchone()[0]
    assert archived == 1
    assert_current(conn, 1)

    # Fixing the cause and re-queuing the dead letter finishes the job.
    fake_openai.reset()
    moved = conn.execute("select autoembed.retry_dead_letters('embedding_jobs')").fetchone()[0]
    assert moved == 1 and pgmq.dead_letters(conn) == []
    drain(conn, s)
    assert_current(conn, 2)


def test_bad_request_for_one_row_dead_letters_only_that_row(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 't' || g, 'c' || g from generate_series(1, 9) g")
    conn.execute("insert into documents (title, content) values ('x', 'POISON pill')")
    fake_openai.poison("POISON", status=400, message="This input is not allowed")
    stats = drain(conn, settings)
    assert stats.embedded == 9 and stats.dead_lettered == 1
    dead = pgmq.dead_letters(conn)
    assert dead[0]["row_id"] == "10" and "not allowed" in dead[0]["error"]


def test_null_and_blank_input_leave_no_vector_and_no_job(conn, fake_openai, settings):
    conn.execute("""
        create table posts (id int primary key, body text, embedding vector(1536));
        create function post_input(p posts) returns text language sql immutable as $$ select p.body $$;
        create trigger q after insert or update on posts for each row
            execute function util.queue_embeddings('post_input', 'embedding');
        insert into posts values (1, null), (2, ''), (3, '   '), (4, 'real text');
    """)
    stats = drain(conn, settings)
    assert (stats.empty_input, stats.embedded, stats.dead_lettered) == (3, 1, 0)
    assert queue_depth(conn) == 0
    rows = dict(conn.execute("select id, embedding is not null from posts").fetchall())
    assert rows == {1: False, 2: False, 3: False, 4: True}
    # Content arriving later is embedded as usual.
    conn.execute("update posts set body = 'now it has text' where id = 1")
    drain(conn, settings)
    vec = conn.execute("select embedding from posts where id = 1").fetchone()[0].to_numpy()
    assert np.allclose(vec, fake_vector("now it has text"), atol=1e-6)


def test_missing_content_function_warns_enqueues_and_dead_letters_clearly(conn, fake_openai, settings):
    conn.execute("""
        create table t1 (id int primary key, body text, embedding vector(1536));
        create trigger q after insert or update on t1 for each row
            execute function util.queue_embeddings('no_such_function', 'embedding');
    """)
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute("insert into t1 values (1, 'x')")  # the user's write succeeds
    conn.execute("update t1 set body = 'y' where id = 1")
    assert any("no_such_function" in n for n in notices), notices
    assert conn.execute("select body from t1").fetchone()[0] == "y"
    stats = drain(conn, settings)
    assert stats.dead_lettered == 2
    error = pgmq.dead_letters(conn)[0]["error"]
    assert "no_such_function" in error and "does not exist" in error


@pytest.mark.parametrize(
    "content_function, column",
    [
        ("embedding_input(); drop table victims; --", "embedding"),
        ("embedding_input", 'embedding"; drop table victims; --'),
        ("pg_catalog.pg_sleep", "embedding"),
        ('"weird"."name"."parts"', "embedding"),
    ],
)
def test_hostile_trigger_arguments_never_execute_and_lose_nothing(conn, fake_openai, settings, content_function, column):
    conn.execute("create table victims (id int)")
    conn.execute("""
        create table docs (id int primary key, body text, embedding vector(1536));
        create function embedding_input(d docs) returns text language sql immutable as $$ select d.body $$;
    """)
    conn.execute(
        "create trigger q after insert or update on docs for each row "
        "execute function util.queue_embeddings(%s, %s)".replace("%s", "{}").format(
            "'" + content_function.replace("'", "''") + "'", "'" + column.replace("'", "''") + "'")
    )
    conn.execute("insert into docs values (1, 'hello')")
    conn.execute("update docs set body = 'changed' where id = 1")
    assert conn.execute("select body from docs").fetchone()[0] == "changed"
    stats = drain(conn, settings)
    assert stats.embedded == 0 and stats.dead_lettered == 2
    assert conn.execute("select to_regclass('victims') is not null").fetchone()[0], "injection ran"
    errors = " ".join(d["error"] for d in pgmq.dead_letters(conn))
    assert (content_function in errors) or (column in errors), errors
    assert queue_depth(conn) == 0


def test_hostile_message_fields_are_dead_lettered_with_their_value(conn, fake_openai, settings):
    conn.execute("create table victims (id int)")
    bad = [
        {"id": 1, "schema": "public", "table": "victims; drop table victims", "contentFunction": "f", "embeddingColumn": "e"},
        {"id": 1, "schema": "public", "table": "x" * 100, "contentFunction": "f", "embeddingColumn": "e"},
        {"schema": "public", "table": "victims"},
        "not an object",
    ]
    pgmq.send_batch(conn, "embedding_jobs", bad)
    stats = drain(conn, settings)
    assert stats.dead_lettered == 4 and queue_depth(conn) == 0
    errors = [d["error"] for d in pgmq.dead_letters(conn)]
    assert any("victims; drop table victims" in e for e in errors)
    assert any("longer than 63 bytes" in e for e in errors)
    assert any("lacks" in e for e in errors)
    assert conn.execute("select to_regclass('victims') is not null").fetchone()[0]


def test_enroll_rejects_bad_arguments_with_named_values(conn):
    conn.execute("create table notes (id int primary key, body text, embedding vector(3))")
    conn.execute("create function note_input(n notes) returns text language sql as $$ select n.body $$")
    import psycopg

    with pytest.raises(psycopg.errors.UndefinedFunction, match="nope"):
        conn.execute("select autoembed.enroll('notes', 'nope', 'embedding')")
    with pytest.raises(psycopg.errors.UndefinedColumn, match="body"):
        conn.execute("select autoembed.enroll('notes', 'note_input', 'body')")
    with pytest.raises(psycopg.errors.UndefinedColumn, match="uuid"):
        conn.execute("select autoembed.enroll('notes', 'note_input', 'embedding', 'uuid')")
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("select autoembed.enroll('missing_table', 'note_input', 'embedding')")


def _enrolled_notes(conn, fake_openai, dims: int = 32) -> None:
    conn.execute(f"""
        create table notes (id bigint primary key, body text, embedding vector({dims}));
        create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
        select autoembed.enroll('notes', 'note_input', 'embedding');
    """)
    fake_openai.default_dims = dims


def test_rows_of_a_bulk_message_fail_alone_and_the_rest_is_written(conn, fake_openai, settings):
    _enrolled_notes(conn, fake_openai)
    conn.execute("""insert into notes select g, case g when 7 then 'POISON ' when 150 then 'BROKEN ' else '' end
                    || 'note ' || g from generate_series(1, 300) g""")
    assert conn.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0] == 2  # 200 + 100 rows
    fake_openai.poison("POISON", status=400, message="This input is not allowed")
    fake_openai.poison("BROKEN", status=500, message="upstream exploded")
    s = settings_with(settings, max_attempts=3)

    stats = drain(conn, s)

    assert (stats.embedded, stats.dead_lettered) == (298, 2), stats.summary()
    assert queue_depth(conn) == 0
    dead = {d["row_id"]: d for d in pgmq.dead_letters(conn)}
    assert set(dead) == {"7", "150"}
    assert "not allowed" in dead["7"]["error"] and dead["7"]["attempts"] == 1
    assert "gave up after 3 failed attempts" in dead["150"]["error"] and dead["150"]["attempts"] == 3
    # Each failed row went on in a message of its own: Supabase's shape plus the attempts made
    # before that message (one, in the shared message).
    message = conn.execute("select message from autoembed.dead_letter_jobs where row_id = '150'").fetchone()[0]
    assert message == {
        "attempts": 1, "id": 150, "schema": "public", "table": "notes", "contentFunction": "note_input", "embeddingColumn": "embedding",
        "target": 1, "keyColumn": "id"}
    # After its first failure the broken row was sent alone, so it cannot fail its neighbours.
    broken = [r["inputs"] for r in fake_openai.requests if any("BROKEN" in t for t in r["inputs"])]
    assert len(broken) >= 3 and all(len(inputs) == 1 for inputs in broken[-2:])
    # The shared messages were deleted, the two split-off ones archived as dead letters.
    assert conn.execute("select count(*) from pgmq.a_embedding_jobs").fetchone()[0] == 2
    for row_id in (1, 6, 8, 149, 151, 300):
        vec = conn.execute("select embedding from notes where id = %s", (row_id,)).fetchone()[0]
        assert np.allclose(vec.to_numpy(), fake_vector(f"note {row_id}", 32), atol=1e-6)

    fake_openai.reset()
    assert conn.execute("select autoembed.retry_dead_letters('embedding_jobs')").fetchone()[0] == 2
    assert drain(conn, s).embedded == 2
    assert conn.execute("select count(*) from notes where embedding is null").fetchone()[0] == 0


def test_hostile_ids_in_a_message_are_dead_lettered_with_their_value(conn, fake_openai, settings):
    _enrolled_notes(conn, fake_openai)
    conn.execute("insert into notes select g, 'note ' || g from generate_series(1, 3) g")
    drain(conn, settings)
    with conn.transaction():  # as the drain writes: nothing queued
        conn.execute("set local autoembed.draining = 'on'")
        conn.execute("update notes set embedding = null")
    base = {"schema": "public", "table": "notes", "contentFunction": "note_input", "embeddingColumn": "embedding"}
    pgmq.send_batch(conn, "embedding_jobs", [
        {**base, "id": 1, "ids": "1,2;drop table notes,--5,3"},  # bad ids among good ones
        {**base, "id": 1, "ids": {"a": 1}},
        {**base, "id": 1, "ids": list(range(20_000))},
        {**base, "id": 3, "idRange": [3, 1]},
        {**base, "id": 0, "idRange": [0, 10**12]},
    ])
    stats = drain(conn, settings)
    assert stats.embedded == 2 and stats.dead_lettered == 6, stats.summary()
    # The status views read every message and cope with these too.
    assert pgmq.status(conn, "embedding_jobs")[0].dead_letters == 6
    errors = sorted(d["error"] for d in pgmq.dead_letters(conn))
    assert any("'2;drop table notes' is not a valid bigint key" in e for e in errors), errors
    assert any("'--5' is not a valid bigint key" in e for e in errors), errors
    assert any("comma-separated string, got {'a': 1}" in e for e in errors), errors
    assert any("20000 ids" in e for e in errors), errors
    assert any("idRange must be [first, last] integers, got [3, 1]" in e for e in errors), errors
    assert any("covers more than 10000 ids" in e for e in errors), errors
    # Rows 1 and 3 of the first message were written; nothing else was touched.
    assert [r[0] for r in conn.execute("select id from notes where embedding is not null order by id")] == [1, 3]


def test_a_provider_outage_retries_a_bulk_message_whole(conn, fake_openai, settings):
    _enrolled_notes(conn, fake_openai)
    conn.execute("insert into notes select g, 'note ' || g from generate_series(1, 50) g")
    fake_openai.fail_next(3, status=500)  # the client's own 3 tries, all failing

    first = Drainer(conn, settings).drain_batch()

    assert (first.retried, first.embedded, first.dead_lettered) == (50, 0, 0)
    # Still one message for the 50 rows, waiting for its retry with the error recorded.
    assert conn.execute("select count(*), min(autoembed.message_rows(message)) from pgmq.q_embedding_jobs"
                        ).fetchone() == (1, 50)
    assert pgmq.status(conn, "embedding_jobs")[0].retrying == 1
    before = fake_openai.request_count
    assert drain(conn, settings).embedded == 50
    # A transient failure of the whole message does not split it: one request for the 50 rows.
    assert [len(r["inputs"]) for r in fake_openai.requests[before:]] == [50]


def test_a_claim_bigger_than_a_batch_is_worked_through_in_batches(conn, fake_openai, settings):
    _enrolled_notes(conn, fake_openai)
    s = settings_with(settings, read_batch=50, visibility_timeout=3)
    drainer = Drainer(conn, s)
    for i in range(1, 4):  # one-row messages: the drainer learns to read many messages at once
        conn.execute("insert into notes values (%s, %s)", (i, f"note {i}"))
    assert drainer.run().embedded == 3
    conn.execute("insert into notes select g, 'note ' || g from generate_series(4, 803) g")  # 4 messages of 200

    first = drainer.drain_batch()

    # One read claimed all four messages; they are taken up one batch (message) at a time.
    assert (first.messages, first.rows, first.embedded) == (1, 200, 200)
    claimed = "select count(*) from pgmq.q_embedding_jobs where vt > clock_timestamp() + %s * interval '1 s'"
    assert conn.execute(claimed, (0,)).fetchone()[0] == 3
    time.sleep(1.5)  # past a third of the visibility timeout: the claims still held are extended
    assert drainer.drain_batch().rows == 200
    assert conn.execute(claimed, (2,)).fetchone()[0] == 2
    rest = drainer.run()
    assert (rest.messages, rest.embedded) == (2, 400) and queue_depth(conn) == 0
    assert conn.execute("select count(*) from notes where embedding is null").fetchone()[0] == 0
