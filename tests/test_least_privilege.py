"""An application role with rights on its own table only: its writes enqueue through the project's
SECURITY DEFINER functions, and it can neither read nor forge the queue or the registry."""

from __future__ import annotations

import contextlib
import itertools

import psycopg
import pytest


_roles = itertools.count()


@pytest.fixture
def app_role(conn):
    """A login-less role, used through SET ROLE from the test connection (a superuser)."""
    name = f"app_{conn.info.backend_pid}_{next(_roles)}"
    conn.execute(f"create role {name} nologin")
    yield name
    conn.execute("reset role")
    conn.execute(f"drop owned by {name} cascade")
    conn.execute(f"drop role {name}")


@contextlib.contextmanager
def acting_as(conn, role):
    conn.execute(f"set role {role}")
    try:
        yield
    finally:
        conn.execute("reset role")


def messages(conn):
    return [m for (m,) in conn.execute("select message from pgmq.q_embedding_jobs order by msg_id")]


def enrolled_notes(conn):
    conn.execute("""
        create table notes (id bigint primary key, body text, tag text, embedding vector(3));
        create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
        select autoembed.enroll('notes', 'note_input', 'embedding');
    """)
    return conn.execute("select id from autoembed.targets").fetchone()[0]


def test_a_role_with_rights_on_its_table_only_writes_an_enrolled_table(conn, app_role):
    target = enrolled_notes(conn)
    conn.execute(f"grant select, insert, update, delete, truncate on notes to {app_role}")
    header = {"schema": "public", "table": "notes", "contentFunction": "note_input", "embeddingColumn": "embedding",
              "target": target, "keyColumn": "id"}
    with acting_as(conn, app_role):
        conn.execute("insert into notes values (1, 'one', 't')")
        conn.execute("insert into notes select g, 'n' || g, 't' from generate_series(2, 4) g")
        conn.execute("update notes set embedding = '[1,2,3]'")  # a vector, as the drain would write it
        conn.execute("update notes set body = 'changed' where id = 2")
        conn.execute("update notes set tag = 'other' where id = 3")  # input unchanged
    assert messages(conn) == [{"id": 1, **header}, {"id": 2, "idRange": [2, 4], **header}, {"id": 2, **header}]
    assert conn.execute("select id from notes where embedding is null").fetchall() == [(2,)]

    conn.execute("""insert into autoembed.embedding_state (target_id, row_id, content_hash, model)
                    select autoembed.state_target('public', 'notes', 'embedding'), id::text, '\\x00', 'm' from notes""")
    with acting_as(conn, app_role):
        conn.execute("delete from notes where id = 1")
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 3
    with acting_as(conn, app_role):
        conn.execute("truncate notes")
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 0


def test_a_role_writes_a_table_with_supabases_triggers_given_usage_on_autoembed(supabase_docs, app_role):
    conn = supabase_docs
    conn.execute(f"grant select, insert, update, delete, truncate on documents to {app_role}")
    conn.execute(f"grant usage on schema autoembed to {app_role}")
    with acting_as(conn, app_role):
        conn.execute("insert into documents (title, content) values ('A', 'a'), ('B', 'b')")
        conn.execute("update documents set embedding = array_fill(0.5, array[1536])::halfvec")
        conn.execute("update documents set content = 'changed' where id = 1")
        conn.execute("update documents set content = content where id = 2")  # a re-save
        conn.execute("delete from documents where id = 2")
    target = conn.execute("select id, origin from autoembed.targets").fetchone()
    assert target[1] == "trigger"
    header = {"schema": "public", "table": "documents", "contentFunction": "embedding_input",
              "embeddingColumn": "embedding", "target": target[0], "keyColumn": "id"}
    assert messages(conn) == [{"id": 1, **header}, {"id": 2, **header}, {"id": 1, **header}]
    assert conn.execute("select id, embedding is null from documents").fetchall() == [(1, True)]
    with acting_as(conn, app_role):
        conn.execute("truncate documents")


def test_a_supabase_trigger_table_forgets_the_state_of_deleted_rows(supabase_docs, app_role, db_url, fake_openai,
                                                                   settings):
    """Supabase's triggers fire on INSERT/UPDATE only: the drain gives the table the project's
    DELETE/TRUNCATE state cleanup once the trigger has registered it (sql/013)."""
    from autoembed_dagster.core.db.server import connect
    from autoembed_dagster.core.drain import drain

    conn = supabase_docs
    conn.execute(f"grant select, insert, update, delete, truncate on documents to {app_role}")
    conn.execute(f"grant usage on schema autoembed to {app_role}")
    with acting_as(conn, app_role):
        conn.execute("insert into documents (title, content) select 't' || g, 'c' || g from generate_series(1, 5) g")
    with connect(db_url) as drainer:
        assert drain(drainer, settings).embedded == 5
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 5
    with acting_as(conn, app_role):
        conn.execute("delete from documents where id <= 2")
    assert conn.execute("select row_id from autoembed.embedding_state order by 1").fetchall() == [("3",), ("4",), ("5",)]
    with acting_as(conn, app_role):
        conn.execute("truncate documents")
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 0


def test_without_usage_a_supabase_trigger_names_the_missing_grant(supabase_docs, app_role):
    conn = supabase_docs
    conn.execute(f"grant insert on documents to {app_role}")
    with acting_as(conn, app_role), pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema autoembed"):
        conn.execute("insert into documents (title, content) values ('A', 'a')")


FORBIDDEN = [
    ("read the queue", "select * from pgmq.q_embedding_jobs"),
    ("send a message", """select pgmq.send('embedding_jobs', '{"id": 1}')"""),
    ("send a batch", """select pgmq.send_batch('embedding_jobs', array['{"id": 1}'::jsonb])"""),
    ("write the registry", "insert into autoembed.targets (relid, key_column, key_attnum, key_type, embedding_column,"
                           " embedding_attnum, content_function, content_fn, queue, origin)"
                           " values ('notes'::regclass, 'id', 1, 'bigint', 'embedding', 4, 'f', 1, 'embedding_jobs', 'enroll')"),
    ("change the registry", "update autoembed.targets set content_fn = 'pg_sleep(float8)'::regprocedure"),
    ("read embedding_state", "select * from autoembed.embedding_state"),
    ("register a target on a table it does not own",
     "select autoembed.register_target('notes', 'note_input', 'note_input(notes)', 'embedding', 'id', 'embedding_jobs', 'enroll')"),
    ("claim a trigger registration without the trigger",
     "select autoembed.register_target('notes', 'note_input', 'note_input(notes)', 'embedding', 'id', 'embedding_jobs', 'trigger')"),
    ("queue rows of a table it does not own", "select autoembed.enqueue_keys(1, array[1, 2])"),
    ("call the row enqueue outside a trigger",
     "select autoembed.queue_embedding_job('notes'::regclass, 'note_input', 'note_input(notes)', 'embedding', 'id', 'embedding_jobs', 1)"),
    ("drop the registration", "select autoembed.unregister_targets('notes')"),
    ("enrol a table it does not own", "select autoembed.enroll('notes', 'note_input', 'embedding')"),
]


@pytest.mark.parametrize("what, statement", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_the_role_can_neither_read_nor_forge_queue_or_registry(conn, app_role, what, statement):
    enrolled_notes(conn)
    conn.execute(f"grant select, insert, update, delete on notes to {app_role}")
    conn.execute(f"grant usage on schema autoembed to {app_role}")  # even with USAGE
    before = messages(conn), conn.execute("select * from autoembed.targets").fetchall()
    with acting_as(conn, app_role), pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)
    assert (messages(conn), conn.execute("select * from autoembed.targets").fetchall()) == before


def test_a_trigger_of_its_own_cannot_queue_jobs_for_a_table_it_may_not_write(conn, app_role):
    """The row enqueue checks the writing role's rights on the table it is asked to queue for."""
    enrolled_notes(conn)
    conn.execute(f"create schema own authorization {app_role}")
    conn.execute(f"grant usage on schema autoembed to {app_role}")
    with acting_as(conn, app_role):
        conn.execute("""
            create table own.mine (id int primary key);
            create function own.forge() returns trigger language plpgsql as $$
            begin
                perform autoembed.queue_embedding_job('public.notes'::regclass, 'note_input',
                                                      'public.note_input(public.notes)'::regprocedure,
                                                      'embedding', 'id', 'embedding_jobs', 42::bigint);
                return null;
            end $$;
            create trigger forge after insert on own.mine for each row execute function own.forge();
        """)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not write public.notes"):
            conn.execute("insert into own.mine values (1)")
    assert messages(conn) == []


def test_the_table_owner_enrols_its_own_table_without_rights_on_the_registry(conn, app_role):
    conn.execute(f"create schema own authorization {app_role}")
    conn.execute(f"grant usage on schema autoembed to {app_role}")
    with acting_as(conn, app_role):
        conn.execute("""
            create table own.notes (id int primary key, body text, embedding vector(3));
            create function own.note_input(n own.notes) returns text language sql immutable as $$ select n.body $$;
            insert into own.notes values (1, 'one'), (2, 'two');
        """)
        assert conn.execute("select autoembed.enroll('own.notes', 'own.note_input', 'embedding')").fetchone()[0] == 2
        conn.execute("insert into own.notes values (3, 'three')")
    assert [m["id"] for m in messages(conn)] == [1, 3]
    assert conn.execute("select origin from autoembed.target_catalog where schema_name = 'own'").fetchone()[0] == "enroll"


def readme_grants() -> dict[str, str]:
    """The SQL blocks of README "Roles and grants", by the role they grant to ("drain",
    "dashboard"): the test runs them as written, so README and test cannot drift."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Roles and grants", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    by_role = {}
    for block in blocks:
        role = re.search(r"\bto (\w+);", block).group(1)
        by_role[role] = block
    assert set(by_role) == {"drain", "dashboard"}, by_role.keys()
    return by_role


def as_written(block: str, role: str, name: str, db: str) -> str:
    """The README's block for `role`, granting to `name` in database `db` (the only changes)."""
    import re

    return re.sub(rf"\bto {role}\b", f"to {name}", block).replace("database mydb", f"database {db}")


README_TABLE = """
create table documents (id bigint primary key, title text not null, content text not null, embedding halfvec(1536));
create function embedding_input(doc documents) returns text language sql immutable
    as $$ select '# ' || doc.title || E'\\n\\n' || doc.content $$;
select autoembed.enroll('documents', 'embedding_input', 'embedding');
"""


def test_the_drain_and_dashboard_roles_work_with_the_grants_the_readme_lists(conn, db_url, fake_openai, settings,
                                                                            monkeypatch, capsys):
    """README "Roles and grants", as written: login roles with exactly those grants drain an
    enrolled table, run a backfill page, `autoembed status` and the Dagster checks (the drain's
    role), and `autoembed status` (the dashboard role)."""
    from autoembed_dagster import cli
    from autoembed_dagster.core.db.server import connect
    from autoembed_dagster.core.drain import default_resolver, drain
    from autoembed_dagster.core.migrate.backfill import backfill_shard, resolve_spec
    from autoembed_dagster.core.pipelines import Pipeline
    from autoembed_dagster.defs.checks import evaluate

    grants = readme_grants()
    roles = {r: f"{r}_{conn.info.backend_pid}" for r in grants}
    for name in roles.values():
        conn.execute(f"create role {name} login")
    try:
        conn.execute(README_TABLE)
        conn.execute("insert into documents select g, 'title ' || g, 'content ' || g from generate_series(1, 20) g")
        for role, block in grants.items():
            conn.execute(as_written(block, role, roles[role], conn.info.dbname))
        urls = {r: psycopg.conninfo.make_conninfo(db_url, user=name) for r, name in roles.items()}

        with connect(urls["drain"]) as drainer:
            assert drainer.execute("select current_user").fetchone()[0] == roles["drain"]
            stats = drain(drainer, settings)
            assert (stats.embedded, stats.dead_lettered) == (20, 0), stats.summary()
            conn.execute("insert into documents select g, 'title ' || g, 'content ' || g from generate_series(21, 25) g")
            p = Pipeline(name="documents", schema="public", table="documents", shards=1)
            page = backfill_shard(drainer, p, resolve_spec(drainer, p), 0, 1)
            assert page.complete and page.stats.embedded == 5, page.stats.summary()
            monkeypatch.setenv("AUTOEMBED_DATABASE_URL", urls["drain"])
            outcomes = evaluate(drainer, p, default_resolver(url=urls["drain"]))
            assert {o.name: o.passed for o in outcomes} == dict.fromkeys(
                ("coverage", "staleness", "dead_letters", "dimensions"), True), outcomes
        assert conn.execute("select count(*) from documents where embedding is null").fetchone()[0] == 0

        for role in ("drain", "dashboard"):
            monkeypatch.setenv("AUTOEMBED_DATABASE_URL", urls[role])
            capsys.readouterr()
            assert cli.main(["-v", "status"]) == 0
            out = capsys.readouterr().out
            assert "embedding_jobs" in out
            # The drain's role sees the target's health; the dashboard's (no select on the table)
            # is told why the target is not shown and what grant would show it.
            assert ("targets not shown" in out) == (role == "dashboard"), out
            if role == "dashboard":
                assert f"role {roles['dashboard']} may not read it" in out and "grant it select on public.documents" in out, out
    finally:
        for name in roles.values():
            conn.execute(f"drop owned by {name} cascade")
            conn.execute(f"drop role {name}")
