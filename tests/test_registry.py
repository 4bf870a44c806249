"""The target registry at the SQL level: exact keys, key and queue validation at enrolment, renames,
embedding_state cleanup on DELETE/TRUNCATE, identifier quoting. Real Postgres, real pgmq SQL."""

from __future__ import annotations

import psycopg
import pytest

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.db.schema import init_db


def messages(conn, queue="embedding_jobs"):
    return [m for (m,) in conn.execute(f"select message from pgmq.q_{queue} order by msg_id")]


def purge(conn, queue="embedding_jobs"):
    conn.execute("select pgmq.purge_queue(%s)", (queue,))


def catalog(conn, target_id):
    cur = conn.execute("select * from autoembed.target_catalog where id = %s", (target_id,))
    return dict(zip([d.name for d in cur.description], cur.fetchone()))


def make_docs(conn, key_type="text", key="doc_key"):
    conn.execute(f"""
        create table docs ({key} {key_type} primary key, body text, tag text, embedding vector(3));
        create function doc_input(d docs) returns text language sql immutable as $$ select d.body $$;
    """)


def test_enrolled_key_column_travels_in_every_message(conn):
    make_docs(conn)
    conn.execute("insert into docs values ('a', 'one'), ('b', 'two')")
    assert conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', 'doc_key')").fetchone()[0] == 2
    target = conn.execute("select id from autoembed.targets").fetchone()[0]
    header = {"schema": "public", "table": "docs", "contentFunction": "doc_input", "embeddingColumn": "embedding",
              "target": target, "keyColumn": "doc_key"}
    assert messages(conn) == [{"id": "a", "ids": ["a", "b"], **header}]
    purge(conn)

    conn.execute("insert into docs values ('c', 'three')")
    conn.execute("insert into docs values ('d', 'four'), ('', 'empty key')")
    conn.execute("update docs set embedding = '[1,2,3]'")  # a vector write: no input change, nothing queued
    conn.execute("update docs set body = body || '!' where doc_key in ('a', '')")
    assert messages(conn) == [{"id": "c", **header}, {"id": "d", "ids": ["d", ""], **header},
                              {"id": "a", "ids": ["a", ""], **header}]
    assert conn.execute("select doc_key from docs where embedding is null order by 1").fetchall() == [("",), ("a",)]

    conn.execute("insert into autoembed.embedding_state (target_id, row_id, content_hash, model)"
                 " select autoembed.state_target('public', 'docs', 'embedding'), doc_key, '\\x00', 'm' from docs")
    conn.execute("delete from docs where doc_key in ('b', '')")
    left = conn.execute("select row_id from autoembed.embedding_state order by 1").fetchall()
    assert left == [("a",), ("c",), ("d",)]


@pytest.mark.parametrize("key_type, value, text", [
    ("numeric", "1.50", "1.50"),
    ("bigint", "9007199254740993", 9007199254740993),  # beyond 2^53: a JSON number, exact
    ("text", "001", "001"),
    ("char(3)", "ab", "ab"),  # bpchar::text drops the padding; equality ignores it too
    ("uuid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("date", "2024-02-03", "2024-02-03"),
    ("timestamp", "2024-02-03 04:05:06.5", "2024-02-03 04:05:06.5"),
    ("timestamptz", "2024-02-03 04:05:06+05:30", "2024-02-02 22:35:06+00"),
])
def test_keys_travel_as_their_exact_text_whatever_the_session_settings(conn, key_type, value, text):
    make_docs(conn, key_type, "k")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', 'k')")
    # The writer's own settings must not change a key's text.
    conn.execute("set timezone = 'America/New_York'; set datestyle = 'SQL, DMY'; set intervalstyle = 'sql_standard'")
    conn.execute("insert into docs values (%s, 'x')", (value,))
    (message,) = messages(conn)
    assert message["id"] == text
    # The text names the row under the pinned settings the drain uses.
    conn.execute("set timezone = 'UTC'; set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'")
    found = conn.execute(f"select count(*) from docs where k = %s::{key_type}", (str(text),)).fetchone()[0]
    assert found == 1


@pytest.mark.parametrize("ddl, key, needle", [
    ("k float8 primary key", "k", "double precision"),
    ("k jsonb not null", "k", "jsonb"),
    ("k money primary key", "k", "money"),
    ("k int[] primary key", "k", "integer[]"),
    ("k int not null", "k", "not unique"),
    ("k int unique", "k", "nullable"),
    ("k int", "k", "not unique (no primary key or unique index on exactly it) and nullable"),
    ("k int, k2 int, unique (k, k2)", "k", "not unique"),
])
def test_enroll_refuses_keys_that_cannot_name_one_row_exactly(conn, ddl, key, needle):
    conn.execute(f"create table bad ({ddl}, body text, embedding vector(3))")
    conn.execute("create function bad_input(b bad) returns text language sql immutable as $$ select b.body $$")
    with pytest.raises(psycopg.Error, match="key column") as err:
        conn.execute("select autoembed.enroll('bad', 'bad_input', 'embedding', %s)", (key,))
    assert needle in str(err.value)
    assert "--key" in (err.value.diag.message_hint or "")
    assert conn.execute("select count(*) from autoembed.targets").fetchone()[0] == 0


def test_enroll_refuses_queue_names_pgmq_would_change_and_status_survives_them(conn):
    make_docs(conn, "int", "id")
    for bad in ("MyQueue", "my-queue", "1q", "q" * 48):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not a valid pgmq queue name") as err:
            conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', queue => %s)", (bad,))
        assert bad[:40] in str(err.value)
    assert "'q" in (err.value.diag.message_hint or "")
    # A mixed-case queue made before (pgmq's table is q_<lower(name)>) must not break status.
    conn.execute("select pgmq.create('MixedCase')")
    names = {s.queue_name for s in pgmq.status(conn)}
    assert {"MixedCase", "embedding_jobs"} <= names


def test_content_function_must_be_the_table_owners_and_not_volatile(conn):
    make_docs(conn, "int", "id")
    conn.execute("create function vol_input(d docs) returns text language sql volatile as $$ select d.body $$")
    with pytest.raises(psycopg.errors.InvalidFunctionDefinition, match="VOLATILE"):
        conn.execute("select autoembed.enroll('docs', 'vol_input', 'embedding')")
    role = f"other_owner_{conn.info.backend_pid}"
    conn.execute(f"create role {role}")
    try:
        conn.execute(f"alter function doc_input(docs) owner to {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"owned by {role}"):
            conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding')")
    finally:
        conn.execute("alter function doc_input(docs) owner to current_user")
        conn.execute(f"drop role {role}")


RENAMES = {
    "column": "alter table docs rename column embedding to vec",
    "table": "alter table docs rename to papers",
    "function": "alter function doc_input(docs) rename to paper_input",
    "schema": "create schema archive; alter table docs set schema archive",
}


@pytest.mark.parametrize("rename", RENAMES)
def test_renames_are_followed_and_no_stale_vector_stays(conn, rename):
    make_docs(conn, "int", "id")
    conn.execute("insert into docs values (1, 'one', 't', '[1,2,3]'), (2, 'two', 't', '[1,2,3]')")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', enqueue_backlog => false)")
    target = conn.execute("select id from autoembed.targets").fetchone()[0]
    conn.execute(RENAMES[rename])
    conn.execute("set search_path = public, archive")
    table = {"table": "papers", "schema": "archive.docs"}.get(rename, "docs")
    column = "vec" if rename == "column" else "embedding"
    conn.execute(f"update {table} set body = 'changed' where id = 1")
    conn.execute(f"update {table} set tag = 'other' where id = 2")  # input unchanged: vector kept
    assert conn.execute(f"select id from {table} where {column} is null").fetchall() == [(1,)]
    row = catalog(conn, target)
    assert (row["schema_name"], row["table_name"], row["embedding_column"]) == (
        "archive" if rename == "schema" else "public", "papers" if rename == "table" else "docs", column)
    assert row["function"] == ("paper_input" if rename == "function" else "doc_input")
    assert row["content_function"] == "doc_input"  # as registered
    (message,) = messages(conn)
    assert message == {"id": 1, "schema": row["schema_name"], "table": row["table_name"], "contentFunction": "doc_input",
                       "embeddingColumn": column, "target": target, "keyColumn": "id"}


@pytest.mark.parametrize("queue", ["embedding_jobs", "other_jobs"])
def test_statement_triggers_send_pgmq_messages_and_wake_the_drains(conn, db_url, queue):
    """Any queue is written through pgmq.send (one message) or pgmq.send_batch: the messages are
    read by pgmq.read, only in the target's queue, and each statement sends one NOTIFY."""
    make_docs(conn, "int", "id")
    conn.execute("select pgmq.create('other_jobs')")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', queue => %s, enqueue_backlog => false)",
                 (queue,))
    target = conn.execute("select id from autoembed.targets").fetchone()[0]
    header = {"schema": "public", "table": "docs", "contentFunction": "doc_input", "embeddingColumn": "embedding",
              "target": target, "keyColumn": "id"}
    with connect(db_url) as listener:
        listener.execute("listen autoembed")
        conn.execute("insert into docs values (1, 'one')")
        conn.execute("insert into docs select g, 'b' from generate_series(2, 4) g")
        conn.execute("insert into docs values (10, 'x'), (12, 'y')")
        conn.execute("insert into docs select 2 * g, 'z' from generate_series(100, 300) g")  # 201 keys: 2 messages
        woken = [n.payload for n in listener.notifies(timeout=30, stop_after=4)]
    assert woken == [queue] * 4
    read = conn.execute("select message, read_ct from pgmq.read(%s, 30, 10)", (queue,)).fetchall()
    assert read[:3] == [({"id": 1, **header}, 1), ({"id": 2, "idRange": [2, 4], **header}, 1),
                        ({"id": 10, "ids": "10,12", **header}, 1)]
    rest = [m for m, _ in read[3:]]
    assert [m["ids"].count(",") + 1 if "ids" in m else 1 for m in rest] == [200, 1]
    assert rest[1] == {"id": 600, **header}
    assert messages(conn, "other_jobs" if queue == "embedding_jobs" else "embedding_jobs") == []


def test_a_statement_trigger_naming_another_tables_target_enqueues_nothing(conn):
    """The statement trigger's argument is a target id; a table's owner who names another table's
    target (or no target) gets a warning and no message, and the write goes on."""
    make_docs(conn, "int", "id")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', enqueue_backlog => false)")
    target = conn.execute("select id from autoembed.targets").fetchone()[0]
    conn.execute("create table other (id int primary key, body text, embedding vector(3))")
    warnings = []
    conn.add_notice_handler(lambda d: warnings.append(d.message_primary))
    for row_id, arg in enumerate((str(target), "no target")):
        conn.execute(f"""create or replace trigger forged after insert on other referencing new table as autoembed_new
                         for each statement execute function autoembed.queue_embeddings_bulk('{arg}')""")
        warnings.clear()
        conn.execute("insert into other values (%s, 'x')", (row_id,))
        assert messages(conn) == []
        assert any("names no target of this table" in w for w in warnings), warnings
    assert conn.execute("select count(*) from other").fetchone()[0] == 2
    conn.execute("insert into docs values (1, 'one')")  # the enrolled table's own trigger still enqueues
    assert [(m["id"], m["target"]) for m in messages(conn)] == [(1, target)]


def test_a_target_whose_key_column_is_gone_enqueues_nothing_and_warns(conn):
    make_docs(conn, "int", "id")
    conn.execute("alter table docs add column doc_key text not null unique default 'k'")
    conn.execute("alter table docs alter column doc_key drop default")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', 'doc_key', enqueue_backlog => false)")
    # CASCADE: the trigger that moves a row's embedding_state record when its key changes
    # (autoembed_state_key, sql/022) watches the key column, as a chunk target's key trigger does.
    conn.execute("alter table docs drop column doc_key cascade")
    warnings = []
    conn.add_notice_handler(lambda d: warnings.append(d.message_primary))
    conn.execute("insert into docs values (1, 'one')")
    assert messages(conn) == []
    assert any("lost its key or embedding column" in w for w in warnings), warnings


def test_dropped_content_function_or_column_leaves_no_usable_target(conn):
    make_docs(conn, "int", "id")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding')")
    conn.execute("insert into docs values (1, 'one', 't', '[1,2,3]')")
    # The clear trigger's function calls the content function inside an exception block (one that
    # raises, or is gone, must not fail the application's write): the function drops alone, and
    # an UPDATE still clears the vector (never a stale one) and queues the row.
    conn.execute("drop function doc_input(docs)")
    row = catalog(conn, conn.execute("select id from autoembed.targets").fetchone()[0])
    assert row["function"] is None
    conn.execute("update docs set body = 'changed' where id = 1")
    assert conn.execute("select embedding from docs where id = 1").fetchone()[0] is None


def test_truncate_forgets_every_state_record_of_the_table(conn):
    make_docs(conn, "int", "id")
    conn.execute("create table other (id int primary key, body text, embedding vector(3))")
    conn.execute("create function other_input(o other) returns text language sql immutable as $$ select o.body $$")
    conn.execute("insert into docs select g, 'b' from generate_series(1, 5) g")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding')")
    conn.execute("select autoembed.enroll('other', 'other_input', 'embedding')")
    conn.execute("""insert into autoembed.embedding_state (target_id, row_id, content_hash, model)
                    select autoembed.state_target('public', t, 'embedding'), g::text, '\\x00', 'm'
                    from generate_series(1, 5) g, unnest(array['docs', 'other']) t""")
    conn.execute("truncate docs")
    assert conn.execute("select c.table_name, count(*) from autoembed.embedding_state s"
                        " join autoembed.target_catalog c on c.id = s.target_id group by 1").fetchall() == [("other", 5)]


def test_mixed_case_names_with_spaces_are_quoted_in_enrolment_and_after_mode_clearing(conn):
    conn.execute('''
        create schema "My Schema";
        create table "My Schema"."My Table" ("Doc Key" text primary key, "Body Text" text,
                                             "The Embedding" vector(3), "Other Vec" vector(3));
        create function "My Schema"."My Input"(r "My Schema"."My Table") returns text language sql immutable
            as $$ select r."Body Text" $$;
        insert into "My Schema"."My Table" values ('k 1', 'one', null, '[1,2,3]'), ('k''2', 'two', '[1,1,1]', '[1,2,3]');
    ''')
    # Enrolment's backlog: the row without a vector.
    queued = conn.execute("""select autoembed.enroll('"My Schema"."My Table"', '"My Schema"."My Input"',
                                                     'The Embedding', 'Doc Key')""").fetchone()[0]
    assert queued == 1
    (backlog,) = messages(conn)
    assert (backlog["id"], backlog["schema"], backlog["table"], backlog["keyColumn"], backlog["embeddingColumn"]) == (
        "k 1", "My Schema", "My Table", "Doc Key", "The Embedding")
    purge(conn)
    # Supabase's trigger in AFTER mode clears with an UPDATE of its own: every name quoted.
    conn.execute('''create trigger "Q Trigger" after update on "My Schema"."My Table" for each row
                    execute function util.queue_embeddings('"My Schema"."My Input"', 'Other Vec', 'Doc Key')''')
    conn.execute('''update "My Schema"."My Table" set "Body Text" = 'changed' where "Doc Key" = 'k''2' ''')
    rows = conn.execute('''select "Doc Key", "The Embedding" is null, "Other Vec" is null
                           from "My Schema"."My Table" order by 1''').fetchall()
    assert rows == [("k 1", True, False), ("k'2", True, True)]
    # (the clearing UPDATE is a change of a row without a vector for the enrolled triggers: a
    # second job for the same row, which the drain's content hash makes free)
    kinds = {(m["embeddingColumn"], m["id"]) for m in messages(conn)}
    assert kinds == {("Other Vec", "k'2"), ("The Embedding", "k'2")}


def test_db_init_upgrades_triggers_of_tables_enrolled_before_the_registry(conn):
    make_docs(conn, "int", "id")
    conn.execute("insert into docs values (1, 'one', 't', '[1,2,3]')")
    # What an older version installed: names as trigger arguments, no registry row.
    conn.execute("""
        create trigger autoembed_clear before update on docs for each row
            execute function autoembed.clear_on_change('doc_input', 'embedding');
        create trigger autoembed_enqueue_update after update on docs
            referencing old table as autoembed_old new table as autoembed_new
            for each statement execute function autoembed.queue_embeddings_bulk('doc_input', 'embedding', 'id', 'embedding_jobs');
    """)
    init_db(conn)
    init_db(conn)  # idempotent
    (target,) = conn.execute("select id from autoembed.targets where origin = 'enroll'").fetchone()
    defs = dict(conn.execute("select tgname, pg_get_triggerdef(oid) from pg_trigger where tgrelid = 'docs'::regclass"))
    assert f"queue_embeddings_bulk('{target}')" in defs["autoembed_enqueue_update"]
    assert "new.embedding IS NOT NULL" in defs["autoembed_clear"] and "clear_target_" in defs["autoembed_clear"]
    conn.execute("update docs set body = 'changed'")
    assert conn.execute("select embedding is null from docs").fetchone()[0]
    assert [m["target"] for m in messages(conn)] == [target]


SUPABASE_RENAMES = {
    "column": "alter table documents rename column embedding to vec",
    "table": "alter table documents rename to papers",
    "function": "alter function embedding_input(documents) rename to paper_input",
}


@pytest.mark.parametrize("rename", SUPABASE_RENAMES)
def test_supabase_triggers_follow_renames_through_their_registration(supabase_docs, rename):
    """Supabase's triggers name the column and function in their arguments; once a write
    registered them, a rename is followed through the registry and the stale vector is cleared."""
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'a'), ('B', 'b')")
    with conn.transaction():
        conn.execute("set local autoembed.draining = 'on'")
        conn.execute("update documents set embedding = array_fill(0.5, array[1536])::halfvec")
    purge(conn)
    target = conn.execute("select id from autoembed.targets").fetchone()[0]
    conn.execute(SUPABASE_RENAMES[rename])
    table = "papers" if rename == "table" else "documents"
    column = "vec" if rename == "column" else "embedding"
    conn.execute(f"update {table} set content = 'changed' where id = 1")
    conn.execute(f"update {table} set content = content where id = 2")  # a re-save
    assert conn.execute(f"select id from {table} where {column} is null").fetchall() == [(1,)]
    assert messages(conn) == [{"id": 1, "schema": "public", "table": table, "contentFunction": "embedding_input",
                               "embeddingColumn": column, "target": target, "keyColumn": "id"}]


def test_a_model_migration_keeps_an_enrolled_tables_clearing_on_the_live_column(conn, fake_openai):
    """Promotion and rollback rename columns: the target ids keep their role (the live column) and
    the enrolled triggers are re-created for the column that is live now. (fake_openai: the
    migration proves its target model with one probe embedding before it starts.)"""
    from autoembed_dagster.core.migrate.migration import promote, rollback, start_migration
    from autoembed_dagster.core.targets.models import ModelSpec
    from autoembed_dagster.core.targets.catalog import TargetKey

    make_docs(conn, "int", "id")
    conn.execute("create function doc_input2(d docs) returns text language sql immutable as $$ select 'v2 ' || d.body $$")
    conn.execute("insert into docs values (1, 'one', 't', '[1,2,3]'), (2, 'two', 't', '[1,2,3]')")
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding', enqueue_backlog => false)")
    live = conn.execute("select id from autoembed.targets").fetchone()[0]
    m = start_migration(conn, TargetKey("public", "docs", "doc_input", "embedding"),
                        ModelSpec("openai", "m2", 3, "doc_input2"))
    shadow = conn.execute("select id from autoembed.target_catalog where embedding_column = 'embedding__next'").fetchone()[0]
    assert catalog(conn, shadow)["origin"] == "migration"
    with conn.transaction():
        conn.execute("set local autoembed.draining = 'on'")
        conn.execute("update docs set embedding__next = '[3,2,1]'")
    purge(conn)

    promote(conn, m, force=True)
    assert (catalog(conn, live)["embedding_column"], catalog(conn, live)["function"]) == ("embedding", "doc_input2")
    assert catalog(conn, shadow)["embedding_column"] == "embedding__old"
    conn.execute("update docs set body = 'changed' where id = 1")
    assert conn.execute("select id, embedding is null, embedding__old is null from docs order by id").fetchall() == [
        (1, True, False), (2, False, False)]
    assert [(x["target"], x["embeddingColumn"], x["contentFunction"]) for x in messages(conn)] == [
        (live, "embedding", "doc_input2")]
    purge(conn)

    rollback(conn, m)
    assert (catalog(conn, live)["embedding_column"], catalog(conn, live)["function"]) == ("embedding", "doc_input")
    conn.execute("update docs set body = 'changed again' where id = 2")
    assert conn.execute("select embedding is null from docs where id = 2").fetchone()[0]
    assert {(x["target"], x["embeddingColumn"]) for x in messages(conn) if x["id"] == 2} >= {(live, "embedding")}
