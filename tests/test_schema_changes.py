"""The schema changes under an enrolled table (issue 21): content functions dropped and re-created,
queues dropped, keys renamed, changed or no longer unique, tables truncated. No stale vector stays
searchable and the application's writes keep working. Real Postgres, real pgmq, the real OpenAI
client against the fake server; one test per change, each for both target shapes where both apply."""

from __future__ import annotations

import numpy as np
import pytest

from autoembed_dagster.core import api, health
from autoembed_dagster.core.drain import drain
from autoembed_dagster.core.db.schema import init_db

from .fake_openai import fake_vector

DIMS = 1536


@pytest.fixture
def app_role(conn):
    """A login-less application role (used through SET ROLE)."""
    import secrets

    name = f"app_{secrets.token_hex(4)}"
    conn.execute(f"create role {name} nologin")
    yield name
    conn.execute("reset role")
    conn.execute(f"drop owned by {name}; drop role {name}")


def make_table(conn, shape: str) -> int:
    """`notes` (integer key, body), enrolled as a vector column or a chunk target; returns its target id."""
    conn.execute("""
        create table notes (id integer primary key, body text, embedding halfvec(1536));
        create function note_text(n notes) returns text language sql immutable as $$ select n.body $$;
    """)
    if shape == "column":
        conn.execute("select autoembed.enroll('notes', 'note_text', 'embedding')")
    else:
        api.enroll("notes", "note_text", chunk_tokens=64, url=conn.info.dsn)
    return conn.execute("select id from autoembed.targets where relid = 'notes'::regclass").fetchone()[0]


def vectors(conn, shape: str) -> dict[int, list[np.ndarray]]:
    """Each row's stored vectors (one for a column target, the chunk set's for a chunk target)."""
    if shape == "column":
        rows = conn.execute("select id, embedding from notes where embedding is not null order by id").fetchall()
        return {i: [np.array(v.to_list(), dtype=np.float32)] for i, v in rows}
    out: dict[int, list[np.ndarray]] = {}
    for i, v in conn.execute("select id, embedding from notes_chunks order by id, chunk_index").fetchall():
        out.setdefault(i, []).append(np.array(v.to_list(), dtype=np.float32))
    return out


def assert_current(conn, shape: str, ids) -> None:
    """Every row `ids` has the vector of its current input (a short body is one chunk)."""
    held = vectors(conn, shape)
    for i in ids:
        text = conn.execute("select note_text(n) from notes n where id = %s", (i,)).fetchone()[0]
        assert i in held, f"row {i} has no vector"
        assert len(held[i]) == 1 and np.allclose(held[i][0], fake_vector(text, DIMS), atol=2e-3), \
            f"row {i} holds a vector of other content than {text!r}"


def queued_ids(conn, queue="embedding_jobs") -> set:
    out = set()
    for (m,) in conn.execute(f"select message from pgmq.q_{queue}"):
        if "idRange" in m:
            out |= set(range(m["idRange"][0], m["idRange"][1] + 1))
        elif isinstance(m.get("ids"), str):
            out |= {int(x) for x in m["ids"].split(",")}
        else:
            out |= set(m.get("ids") or [m["id"]])
    return out


@pytest.mark.parametrize("shape", ["column", "chunk"])
def test_content_function_dropped_and_recreated_is_followed(conn, fake_openai, settings, shape):
    target = make_table(conn, shape)
    conn.execute("insert into notes (id, body) values (1, 'one'), (2, 'two'), (3, 'three')")
    drain(conn, settings)
    assert_current(conn, shape, [1, 2, 3])

    # Dropped: the cascade takes the trigger whose WHEN clause calls it. Until it comes back the
    # target is named as broken, never clean.
    conn.execute("drop function note_text(notes) cascade")
    broken = health.broken_targets(conn)
    assert [(b.target, b.problem) for b in broken] == [(target, "content function dropped")], broken
    assert "note_text" in broken[0].detail and "notes" in broken[0].label

    # Re-created under the same name and signature, with another body: the target is bound to it,
    # its triggers are back, and every row is queued (the drain re-embeds those whose input changed).
    conn.execute("create function note_text(n notes) returns text language sql immutable as $$ select upper(n.body) $$")
    assert health.broken_targets(conn) == []
    fn = conn.execute("select content_fn from autoembed.targets where id = %s", (target,)).fetchone()[0]
    assert fn == conn.execute("select 'note_text(notes)'::regprocedure::oid").fetchone()[0]
    assert queued_ids(conn) == {1, 2, 3}
    drain(conn, settings)
    assert_current(conn, shape, [1, 2, 3])

    # The input comparison is back: an UPDATE clears/queues the row as before the drop.
    conn.execute("update notes set body = 'uno' where id = 1")
    assert queued_ids(conn) == {1}
    drain(conn, settings)
    assert_current(conn, shape, [1, 2, 3])
    assert "broken" not in api_status_text(conn)


def api_status_text(conn) -> str:
    from autoembed_dagster.cli import main
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status"]) == 0
    return out.getvalue()


def test_content_function_dropped_shows_in_status_and_checks(conn, fake_openai, settings):
    make_table(conn, "chunk")
    conn.execute("drop function note_text(notes) cascade")
    text = api_status_text(conn)
    assert "broken" in text and "notes" in text and "content function dropped" in text, text

    from autoembed_dagster.core.drain import pipeline_resolver
    from autoembed_dagster.core.pipelines import discover_pipelines
    from autoembed_dagster.defs.checks import evaluate

    [p] = discover_pipelines(conn, [])
    outcomes = evaluate(conn, p, pipeline_resolver([p]))
    assert outcomes and not any(o.passed for o in outcomes)
    assert all("content function dropped" in o.description for o in outcomes), outcomes


@pytest.mark.parametrize("shape", ["column", "chunk", "supabase"])
def test_dropped_queue_is_recreated_and_writes_keep_working(conn, fake_openai, settings, shape):
    if shape == "supabase":
        conn.execute("""
            create table notes (id integer primary key, body text, embedding halfvec(1536));
            create function note_text(n notes) returns text language sql immutable as $$ select n.body $$;
            create trigger q after insert or update on notes for each row
                execute function util.queue_embeddings('note_text', 'embedding');
        """)
    else:
        make_table(conn, shape)
    conn.execute("insert into notes (id, body) values (1, 'one')")
    conn.execute("select pgmq.drop_queue('embedding_jobs')")

    conn.execute("insert into notes (id, body) values (2, 'two'), (3, 'three')")  # does not fail
    conn.execute("update notes set body = 'uno' where id = 1")
    assert queued_ids(conn) == {1, 2, 3}
    repairs = health.repairs(conn)
    assert any("embedding_jobs" in r.what and "re-created" in r.what for r in repairs), repairs
    assert "re-created" in api_status_text(conn)
    drain(conn, settings)
    assert_current(conn, "column" if shape == "supabase" else shape, [1, 2, 3])


def test_supabase_key_column_renamed_writes_keep_working(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'first')")
    drain(conn, settings)
    conn.execute("alter table documents rename column id to doc_id")
    conn.execute("insert into documents (title, content) values ('B', 'second')")
    conn.execute("update documents set content = 'changed' where doc_id = 1")
    assert conn.execute("select count(*) from documents where embedding is null").fetchone()[0] == 2
    stats = drain(conn, settings)
    assert stats.dead_lettered == 0
    for doc_id, text in conn.execute("select doc_id, embedding_input(d) from documents d").fetchall():
        vec = conn.execute("select embedding from documents where doc_id = %s", (doc_id,)).fetchone()[0]
        assert vec is not None and np.allclose(np.array(vec.to_list(), dtype=np.float32),
                                               fake_vector(text, DIMS), atol=2e-3)


@pytest.mark.parametrize("shape", ["column", "chunk"])
def test_key_no_longer_unique_dead_letters_instead_of_copying_a_vector(conn, fake_openai, settings, shape):
    target = make_table(conn, shape)
    conn.execute("insert into notes (id, body) values (1, 'one'), (2, 'two')")
    drain(conn, settings)
    # The primary key goes (cascade: a chunk table's foreign key hangs on it), and a second row 1 comes.
    conn.execute("alter table notes drop constraint notes_pkey cascade")
    conn.execute("insert into notes (id, body) values (1, 'impostor'), (3, 'three')")
    assert [(b.target, b.problem) for b in health.broken_targets(conn)] == [(target, "key not unique")]

    stats = drain(conn, settings)

    assert stats.dead_lettered == 1
    [(error,)] = conn.execute("select error from autoembed.dead_letters").fetchall()
    assert "'1' matches 2 rows" in error and "no longer unique" in error
    # Row 3 got its vector; no row 1 holds the other one's vector.
    if shape == "column":
        rows = conn.execute("select body, embedding from notes where id = 1 order by body").fetchall()
        assert rows[0][1] is None  # the impostor
        assert np.allclose(np.array(rows[1][1].to_list(), dtype=np.float32), fake_vector("one", DIMS), atol=2e-3)
        assert_current(conn, shape, [3])
    else:
        held = vectors(conn, shape)
        assert np.allclose(held[1][0], fake_vector("one", DIMS), atol=2e-3) and len(held[1]) == 1
        assert np.allclose(held[3][0], fake_vector("three", DIMS), atol=2e-3)
    assert "key not unique" in api_status_text(conn)


def test_chunk_target_chunks_follow_key_changes_deletes_and_truncate(conn, fake_openai, settings, app_role):
    """The application changes a key, deletes rows and truncates the table of a chunk target, as a
    role with rights on its own table only: the chunks go with the rows (before, the chunk table's
    foreign key refused the key change and the TRUNCATE)."""
    make_table(conn, "chunk")
    conn.execute(f"grant select, insert, update, delete, truncate on notes to {app_role}; "
                 f"grant usage on schema autoembed to {app_role}")
    conn.execute("insert into notes (id, body) values (1, 'one'), (2, 'two'), (3, 'three')")
    drain(conn, settings)
    # A chunk table made before (hanging on a foreign key that cascades deletes): `db init` upgrades it.
    conn.execute("delete from autoembed.chunk_tables; drop trigger autoembed_chunks_delete on notes; "
                 "drop trigger autoembed_chunks_key on notes; drop trigger autoembed_chunks_truncate on notes; "
                 "alter table notes_chunks add foreign key (id) references notes (id) on delete cascade")
    init_db(conn)
    assert conn.execute("select count(*) from pg_constraint where conrelid = 'notes_chunks'::regclass"
                        " and contype = 'f'").fetchone()[0] == 0

    conn.execute(f"set role {app_role}")
    conn.execute("update notes set id = 10 where id = 1")
    conn.execute("delete from notes where id = 2")
    conn.execute("reset role")
    assert sorted(vectors(conn, "chunk")) == [3, 10]
    assert_current(conn, "chunk", [3, 10])
    assert drain(conn, settings).dead_lettered == 0

    conn.execute(f"set role {app_role}")
    conn.execute("truncate notes")
    conn.execute("reset role")
    assert conn.execute("select count(*) from notes_chunks").fetchone()[0] == 0
    conn.execute("insert into notes (id, body) values (1, 'again')")
    drain(conn, settings)
    assert_current(conn, "chunk", [1])


@pytest.mark.parametrize("schema, table, column, key, function", [
    ("Docs", "Notes", "Embedding", "ID", "NoteText"),  # capitals
    ("odd schema", 'my "table".x', "vec col", 'key"id', "text of"),  # spaces, quotes, dots
])
def test_cli_and_sql_take_every_legal_identifier_the_same_way(conn, fake_openai, settings, monkeypatch,
                                                               schema, table, column, key, function):
    """Tables and content functions are SQL names (quoted as in SQL, qualified by a dot: what
    regclass and util.queue_embeddings take); columns and keys are exact names (as Supabase's
    embedding column argument). The same strings work in SQL and in every command."""
    from psycopg import sql

    q = lambda *parts: ".".join(sql.Identifier(p).as_string(conn) for p in parts)  # noqa: E731
    conn.execute(sql.SQL("""
        create schema {s};
        create table {t} ({k} integer primary key, body text, {c} halfvec(1536));
        create function {f}(n {t}) returns text language sql immutable as $$ select n.body $$;
        insert into {t} values (1, 'alpha'), (2, 'beta');
    """).format(s=sql.Identifier(schema), t=sql.Identifier(schema, table), k=sql.Identifier(key),
                c=sql.Identifier(column), f=sql.Identifier(schema, function)))
    status = lambda: api_status_text(conn)  # noqa: E731
    from autoembed_dagster.cli import main

    assert main(["enroll", q(schema, table), "--content-function", q(schema, function), "--column", column,
                 "--key", key]) == 0
    # The same strings in SQL: enrolling again changes nothing.
    conn.execute("select autoembed.enroll(%s, %s, %s, %s, enqueue_backlog => false)",
                 (q(schema, table), q(schema, function), column, key))
    assert conn.execute("select count(*) from autoembed.targets").fetchone()[0] == 1
    assert main(["drain", "-q"]) == 0
    assert conn.execute(sql.SQL("select count({c}) from {t}").format(
        c=sql.Identifier(column), t=sql.Identifier(schema, table))).fetchone()[0] == 2
    status()

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", "alpha", "--table", q(schema, table), "--content-function", q(schema, function),
                     "--column", column, "--key", key, "-k", "1"]) == 0
    assert "id=1" in out.getvalue(), out.getvalue()

    # A job that cannot apply (a key the table does not have the type of) is a dead letter listed by name.
    target = conn.execute("select id from autoembed.targets").fetchone()[0]
    conn.execute("select pgmq.send('embedding_jobs', %s::jsonb)", (
        f'{{"id": "x", "schema": {json_str(schema)}, "table": {json_str(table)}, "contentFunction": '
        f'{json_str(q(schema, function))}, "embeddingColumn": {json_str(column)}, "keyColumn": {json_str(key)}, '
        f'"target": {target}}}',))
    assert main(["drain", "-q"]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["dead-letters"]) == 0
    assert table in out.getvalue(), out.getvalue()

    # The backfill of the discovered pipeline (its name made from the table's).
    from autoembed_dagster.core.pipelines import discover_pipelines

    [p] = discover_pipelines(conn, [])
    conn.execute(sql.SQL("update {t} set {c} = null").format(t=sql.Identifier(schema, table), c=sql.Identifier(column)))
    assert main(["backfill", p.name, "-q"]) == 0
    assert conn.execute(sql.SQL("select count({c}) from {t}").format(
        c=sql.Identifier(column), t=sql.Identifier(schema, table))).fetchone()[0] == 2


def json_str(value: str) -> str:
    import json

    return json.dumps(value)


@pytest.mark.parametrize("shape", ["column", "chunk"])
def test_content_function_body_changed_marks_a_discovered_target_stale_and_backfill_reembeds(
        conn, fake_openai, settings, shape):
    from autoembed_dagster.cli import main
    from autoembed_dagster.core.drain import pipeline_resolver
    from autoembed_dagster.core.pipelines import content_function_digest, discover_pipelines
    from autoembed_dagster.defs.assets import model_version
    from autoembed_dagster.defs.checks import evaluate

    make_table(conn, shape)
    conn.execute("insert into notes (id, body) values (1, 'one'), (2, 'two')")
    drain(conn, settings)
    [p] = discover_pipelines(conn, [])
    before = model_version(p, content_function_digest(conn, p))
    assert all(o.passed for o in evaluate(conn, p, pipeline_resolver([p])) if o.name == "staleness")

    conn.execute("create or replace function note_text(n notes) returns text language sql immutable "
                 "as $$ select 'note: ' || n.body $$")

    assert model_version(p, content_function_digest(conn, p)) != before  # the asset is stale in Dagster
    [stale] = [o for o in evaluate(conn, p, pipeline_resolver([p])) if o.name == "staleness"]
    assert not stale.passed and "2" in stale.description
    assert main(["backfill", p.name, "-q"]) == 0
    assert_current(conn, shape, [1, 2])
    assert all(o.passed for o in evaluate(conn, p, pipeline_resolver([p])) if o.name == "staleness")


def test_renames_keep_the_state_and_a_dropped_table_takes_it_along(conn, fake_openai, settings):
    """embedding_state follows renames of the schema, table and column (nothing looks stale, a
    backfill re-sends nothing), and goes with a dropped table."""
    from autoembed_dagster.cli import main
    from autoembed_dagster.core.pipelines import discover_pipelines

    make_table(conn, "column")
    conn.execute("insert into notes (id, body) select i, 'note ' || i from generate_series(1, 20) i")
    drain(conn, settings)
    conn.execute("create schema archive; alter table notes set schema archive")
    conn.execute("alter table archive.notes rename to memos")
    conn.execute("alter table archive.memos rename column embedding to vec")
    conn.execute("alter schema archive rename to kept")
    [p] = discover_pipelines(conn, [])
    assert (p.schema, p.table, p.embedding_column) == ("kept", "memos", "vec")
    assert conn.execute("select count(*) from autoembed.embedding_state where schema_name = 'kept'"
                        " and table_name = 'memos' and embedding_column = 'vec'").fetchone()[0] == 20
    from autoembed_dagster.core.targets.catalog import TargetKey

    target, _ = health.resolve_target(conn, TargetKey("kept", "memos", "note_text", "vec"))
    th = health.target_health(conn, target, "openai:text-embedding-3-small:1536")
    assert (th.current, th.stale) == (20, 0)
    sent = len(fake_openai.requests)
    assert main(["backfill", p.name, "-q"]) == 0
    assert len(fake_openai.requests) == sent  # nothing re-embedded

    conn.execute("drop table kept.memos cascade")
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 0
    assert conn.execute("select count(*) from autoembed.targets").fetchone()[0] == 0


@pytest.mark.parametrize("shape", ["column", "chunk"])
def test_dropped_triggers_of_ours_are_recreated_by_the_drain(conn, fake_openai, settings, shape):
    target = make_table(conn, shape)
    if shape == "column":  # the clear trigger's generated function, dropped with CASCADE, and an enqueue trigger
        conn.execute(f"drop function autoembed.clear_target_{target}() cascade; drop trigger autoembed_enqueue_insert on notes")
    else:  # the function that keeps the chunk tables with the rows, with CASCADE: its three triggers go
        fn = conn.execute("select p.oid::regprocedure::text from pg_proc p"
                          " where p.proname = 'autoembed_chunks_follow_' || 'notes'::regclass::oid").fetchone()[0]
        conn.execute(f"drop function {fn} cascade; drop trigger autoembed_enqueue_insert on notes")
    [broken] = health.broken_targets(conn)
    assert (broken.target, broken.problem) == (target, "triggers missing") and "autoembed_enqueue_insert" in broken.detail
    drain(conn, settings)  # its start re-creates them
    assert health.broken_targets(conn) == []
    assert any("re-created" in r.what and r.target == target for r in health.repairs(conn))
    conn.execute("insert into notes (id, body) values (1, 'one'), (2, 'two')")
    conn.execute("update notes set body = 'uno' where id = 1")
    drain(conn, settings)
    assert_current(conn, shape, [1, 2])
    if shape == "chunk":
        conn.execute("truncate notes")
        assert vectors(conn, shape) == {}
