"""Nothing a writer or a table owner creates runs with the project's rights.

A hostile role plants objects under every name the project's SECURITY DEFINER functions use, in
pg_temp and in a schema of its own, each with triggers that make the role a superuser when they
run with a superuser's rights; then it writes its table as an application would. The role must
not become a superuser, and its writes must still work and be queued."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from autoembed_dagster.core import api
from autoembed_dagster.core.targets.vectors import write_as_owner

from .test_least_privilege import acting_as, messages

_roles = itertools.count()

# Every table name a definer function of ours reads or writes (schema-qualified there), and the
# transition tables' names.
PLANTED_TABLES = ["autoembed_chunk_changes", "chunk_changes", "targets", "meta", "embedding_state", "dead_letters",
                  "message_errors", "q_embedding_jobs", "a_embedding_jobs", "autoembed_new", "autoembed_old",
                  "target_catalog", "model_migrations"]


@pytest.fixture
def hostile(conn):
    """A login-less role used through SET ROLE, with a schema of its own."""
    name = f"hostile_{conn.info.backend_pid}_{next(_roles)}"
    conn.execute(f"create role {name} nologin")
    conn.execute(f"create schema {name} authorization {name}")
    conn.execute(f"grant usage on schema autoembed to {name}")  # what a Supabase-trigger writer has
    yield name
    conn.execute("reset role")
    conn.execute("reset search_path")
    conn.execute(f"drop owned by {name} cascade")
    conn.execute(f"drop role {name}")


def is_superuser(conn, role) -> bool:
    return conn.execute("select rolsuper from pg_roles where rolname = %s", (role,)).fetchone()[0]


ESCALATE = """
create function {s}.escalate() returns trigger language plpgsql as $f$
begin
    execute format('alter role %I superuser', '{role}');
    return case when TG_LEVEL = 'ROW' and TG_OP <> 'DELETE' then NEW when TG_LEVEL = 'ROW' then OLD end;
end $f$;
create function {s}.escalate_f() returns text language plpgsql as $f$
begin
    execute format('alter role %I superuser', '{role}');
    return 'x';
end $f$;
"""


def plant(conn, role) -> None:
    """As `role`, in pg_temp and in its own schema: a table under every name in PLANTED_TABLES
    (columns any definer insert could name), each with row and statement triggers running
    `alter role <role> superuser`, and functions under the names of the helpers the definer
    functions call; then the role's search_path puts its own objects first."""
    with acting_as(conn, role):
        for schema in ("pg_temp", role):
            conn.execute(ESCALATE.format(s=schema, role=role))
            for table in PLANTED_TABLES:
                conn.execute(f"""
                    create table {schema}.{table} (target bigint, k text, id bigint, queue_name text, message jsonb,
                                                   row_id text, schema_name text, table_name text);
                    create trigger r before insert or update or delete on {schema}.{table}
                        for each row execute function {schema}.escalate();
                    create trigger s after insert or update or delete or truncate on {schema}.{table}
                        for each statement execute function {schema}.escalate();
                """)
            for fn in ("key_texts(anyarray)", "send_jobs(text, jsonb[])", "key_messages(text[], boolean, jsonb)",
                       "content_hash(text)", "live_target(bigint)", "require_owner(oid, text)",
                       "caller_role()", "send(text, jsonb)", "send_batch(text, jsonb[])"):
                name, args = fn.split("(")
                params = ", ".join(f"a{i} {t.strip()}" for i, t in enumerate(args.rstrip(")").split(",")) if t.strip())
                conn.execute(f"create function {schema}.{name}({params}) returns text language sql "
                             f"as $$ select {schema}.escalate_f() $$")
        conn.execute(f"set search_path = pg_temp, {role}, public")
    assert not is_superuser(conn, role)


# -- writers -------------------------------------------------------------------------------------
@pytest.fixture
def articles(conn, fake_openai):
    conn.execute("""
        create table articles (id bigint primary key, title text not null, body text);
        create function article_text(a articles) returns text language sql immutable
            as $$ select case when a.body is null then null else a.title || E'\\n\\n' || a.body end $$;
    """)
    api.enroll("articles", "article_text", chunk_tokens=64, chunk_overlap=8, url=conn.info.dsn)
    return conn


def test_a_writer_planting_objects_gains_nothing_on_a_chunk_target(articles, hostile):
    """The chunk triggers noted changed keys in pg_temp.autoembed_chunk_changes: a role that
    created that temp table first, with a trigger, became a superuser on its next UPDATE."""
    conn = articles
    conn.execute(f"grant select, insert, update, delete on articles to {hostile}")
    plant(conn, hostile)
    with acting_as(conn, hostile):
        conn.execute("insert into articles values (1, 'A', 'alpha'), (2, 'B', 'beta'), (3, 'C', 'gamma')")
        conn.execute("update articles set body = 'delta' where id = 2")
        conn.execute("update articles set body = body || '!'")  # a bulk UPDATE: every row changed
        conn.execute("update articles set title = title where id = 1")  # a re-save: nothing queued
        conn.execute("update articles set id = 4 where id = 3")  # a key change: the new key queued
        conn.execute("delete from articles where id = 4")
    assert not is_superuser(conn, hostile)
    conn.execute("reset search_path")
    queued = [sorted(str(m.get("ids", m["id"])).split(",")) for m in messages(conn)]
    assert queued == [["1", "2", "3"], ["2"], ["1", "2", "3"], ["4"]]
    for table in ("autoembed_chunk_changes",):
        assert conn.execute(f"select count(*) from pg_temp.{table}").fetchone()[0] == 0  # never written


def test_a_writer_planting_objects_gains_nothing_on_an_enrolled_column(conn, hostile):
    conn.execute("""
        create table notes (id bigint primary key, body text, embedding vector(3));
        create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
        select autoembed.enroll('notes', 'note_input', 'embedding');
    """)
    conn.execute(f"grant select, insert, update, delete, truncate on notes to {hostile}")
    plant(conn, hostile)
    with acting_as(conn, hostile):
        conn.execute("insert into notes values (1, 'one')")
        conn.execute("insert into notes select g, 'n' || g from generate_series(2, 4) g")
        conn.execute("update notes set embedding = '[1,2,3]'")
        conn.execute("update notes set body = 'changed' where id = 2")
        conn.execute("update notes set id = 5 where id = 3")  # a key change: its state record follows
        conn.execute("delete from notes where id = 4")
        conn.execute("truncate notes")
    assert not is_superuser(conn, hostile)
    conn.execute("reset search_path")
    assert [(m["id"], m.get("idRange")) for m in messages(conn)] == [(1, None), (2, [2, 4]), (2, None)]


def test_a_writer_planting_objects_gains_nothing_through_supabases_triggers(supabase_docs, hostile):
    conn = supabase_docs
    conn.execute(f"grant select, insert, update, delete, truncate on documents to {hostile}")
    plant(conn, hostile)
    with acting_as(conn, hostile):
        conn.execute("insert into documents (title, content) values ('A', 'a'), ('B', 'b')")
        conn.execute("update documents set content = 'changed' where id = 1")
        conn.execute("delete from documents where id = 2")
    assert not is_superuser(conn, hostile)
    conn.execute("reset search_path")
    assert [m["id"] for m in messages(conn)] == [1, 2, 1]


CAST = """
create type {s}.k as (v integer);
create function {s}.k_text({s}.k) returns text language plpgsql as $f$
begin
    execute format('alter role %I superuser', '{role}');
    return 'x';
end $f$;
create cast ({s}.k as text) with function {s}.k_text({s}.k);
"""


def test_a_writer_cannot_run_a_cast_of_its_own_in_the_row_enqueue(conn, hostile):
    """autoembed.queue_embedding_job (SECURITY DEFINER, callable from any trigger) converted its
    key to text with `::text`: a key of the caller's own type ran the caller's cast as the definer."""
    with acting_as(conn, hostile):
        conn.execute(CAST.format(s=hostile, role=hostile))
        conn.execute(f"""
            create table {hostile}.mine (id int primary key, embedding vector(3));
            create function {hostile}.forge() returns trigger language plpgsql as $f$
            begin
                perform autoembed.queue_embedding_job('{hostile}.mine'::regclass, 'f', null, 'embedding', 'id',
                                                      'embedding_jobs', row(1)::{hostile}.k);
                return null;
            end $f$;
            create trigger forge after insert on {hostile}.mine for each row execute function {hostile}.forge();
        """)
        with pytest.raises(psycopg.errors.DatatypeMismatch, match="not a key type"):
            conn.execute(f"insert into {hostile}.mine values (1)")
    assert not is_superuser(conn, hostile)
    assert messages(conn) == []


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_a_table_owner_cannot_run_a_cast_of_its_own_when_queueing_its_rows(conn, hostile, shape):
    """autoembed.enqueue_keys / enqueue_chunk_keys (SECURITY DEFINER) take keys of any type."""
    with acting_as(conn, hostile):
        conn.execute(CAST.format(s=hostile, role=hostile))
        conn.execute(f"""
            create table {hostile}.notes (id bigint primary key, body text, embedding vector(3));
            create function {hostile}.note_input(n {hostile}.notes) returns text language sql immutable
                as $$ select n.body $$;
        """)
        if shape == "column":
            conn.execute(f"select autoembed.enroll('{hostile}.notes', '{hostile}.note_input', 'embedding')")
            call = "autoembed.enqueue_keys"
        else:
            conn.execute(f"select autoembed.enroll_chunks('{hostile}.notes', '{hostile}.note_input', 64, 0,"
                         " dimensions => 3, vector_type => 'vector')")
            call = "autoembed.enqueue_chunk_keys"
    target = conn.execute("select id from autoembed.target_catalog where schema_name = %s", (hostile,)).fetchone()[0]
    with acting_as(conn, hostile):
        with pytest.raises(psycopg.errors.DatatypeMismatch, match="not a key type"):
            conn.execute(f"select {call}({target}, array[row(1)::{hostile}.k])")
        assert conn.execute(f"select {call}({target}, array[7::bigint])").fetchone()[0] == 1
    assert not is_superuser(conn, hostile)
    assert [m["id"] for m in messages(conn)] == [7]


# -- table owners: the content function runs with the owner's rights, never the reader's ------------
# A STABLE content function that calls a volatile function trying `alter role <owner> superuser`
# (it works when the function runs as a superuser: the drain on the zero-config default) and
# moving the session's search_path to the owner's schema; its text says whose rights it ran with.
HOSTILE_INPUT = """
create table {s}.notes (id bigint primary key, body text{column});
create function {s}.grab() returns text language plpgsql volatile as $f$
begin
    begin
        execute format('alter role %I superuser', '{s}');
    exception when insufficient_privilege then
        null;
    end;
    perform set_config('search_path', '{s}, pg_catalog', false);
    return current_user;
end $f$;
create function {s}.note_input(n {s}.notes) returns text language sql stable
    as $$ select case when n.body is not null then n.body || ' as ' || {s}.grab() end $$;
"""


def hostile_owner_table(conn, owner, *, chunks: bool) -> None:
    """As `owner`: its table, the content function above, enrolment (a column target of
    vector(3), or a chunk target) and two rows."""
    with acting_as(conn, owner):
        conn.execute(HOSTILE_INPUT.format(s=owner, column="" if chunks else ", embedding vector(3)"))
        if chunks:
            conn.execute(f"select autoembed.enroll_chunks('{owner}.notes', '{owner}.note_input', 64, 0)")
        else:
            conn.execute(f"select autoembed.enroll('{owner}.notes', '{owner}.note_input', 'embedding')")
        conn.execute(f"insert into {owner}.notes values (1, 'one'), (2, 'two')")
    conn.execute("reset search_path")


def provider_inputs(fake_openai) -> list[str]:
    return sorted(t for r in fake_openai.requests if r["status"] == 200 for t in r["inputs"])


def search_path(conn) -> str:
    return conn.execute("show search_path").fetchone()[0]


def test_a_column_targets_content_function_runs_with_its_owners_rights_in_drain_status_and_search(
        conn, db_url, hostile, fake_openai, settings):
    from autoembed_dagster.core.drain import drain
    from autoembed_dagster.core.health import target_health
    from autoembed_dagster.core.targets.catalog import lookup_registered

    fake_openai.default_dims = 3
    hostile_owner_table(conn, hostile, chunks=False)
    before = search_path(conn)
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 0), stats.summary()
    assert not is_superuser(conn, hostile)
    assert provider_inputs(fake_openai) == [f"one as {hostile}", f"two as {hostile}"]
    assert search_path(conn) == before  # what the function changed was undone

    target_id = conn.execute("select id from autoembed.target_catalog where schema_name = %s", (hostile,)).fetchone()[0]
    health = target_health(conn, lookup_registered(conn, target_id=target_id)[0], "openai:text-embedding-3-small:3")
    assert (health.rows, health.current) == (2, 2)
    hits = api.search("one", table="notes", schema=hostile, content_function=f"{hostile}.note_input", k=2, url=db_url)
    assert sorted(h.input for h in hits) == [f"one as {hostile}", f"two as {hostile}"]
    assert not is_superuser(conn, hostile)
    assert search_path(conn) == before


def test_a_backfill_page_runs_the_content_function_with_its_owners_rights(conn, hostile, fake_openai, settings):
    from autoembed_dagster.core.migrate.backfill import backfill_shard, resolve_spec
    from autoembed_dagster.core.pipelines import Pipeline

    fake_openai.default_dims = 3
    hostile_owner_table(conn, hostile, chunks=False)
    p = Pipeline(name="notes", schema=hostile, table="notes", content_function=f"{hostile}.note_input",
                 dimensions=3, shards=1)
    result = backfill_shard(conn, p, resolve_spec(conn, p), 0, 1)
    assert result.complete and result.stats.embedded == 2, result.stats.summary()
    assert not is_superuser(conn, hostile)
    assert provider_inputs(fake_openai) == [f"one as {hostile}", f"two as {hostile}"]


def test_a_chunk_backfill_runs_the_content_function_with_its_owners_rights(conn, hostile, fake_openai, settings):
    """The chunk backfill reads each document's input through the target's input function too:
    the owner's content function never runs with the rights of whoever runs the backfill."""
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
    from autoembed_dagster.core.pipelines import Pipeline

    hostile_owner_table(conn, hostile, chunks=True)
    p = Pipeline(name="notes", schema=hostile, table="notes", content_function=f"{hostile}.note_input",
                 shards=1, chunk_tokens=64)
    assert run_chunk_backfill(conn, p).total.written == 2
    assert not is_superuser(conn, hostile)
    assert provider_inputs(fake_openai) == [f"one as {hostile}", f"two as {hostile}"]


def test_a_chunk_targets_content_function_runs_with_its_owners_rights_in_drain_status_and_search(
        conn, db_url, hostile, fake_openai, settings):
    from autoembed_dagster.core.drain import drain

    hostile_owner_table(conn, hostile, chunks=True)
    before = search_path(conn)
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 0), stats.summary()
    assert not is_superuser(conn, hostile)
    assert provider_inputs(fake_openai) == [f"one as {hostile}", f"two as {hostile}"]
    assert conn.execute(f"select array_agg(chunk order by id) from {hostile}.notes_chunks").fetchone()[0] == [
        f"one as {hostile}", f"two as {hostile}"]

    [(target, health)] = api.chunk_targets_health(url=db_url)
    assert (health.rows, health.current) == (2, 2)
    hits = api.search_chunks("one", table="notes", schema=hostile, content_function=f"{hostile}.note_input", k=2,
                             url=db_url)
    assert sorted(h.chunk for h in hits) == [f"one as {hostile}", f"two as {hostile}"]
    assert not is_superuser(conn, hostile)
    assert search_path(conn) == before


# -- table owners: their triggers on the tables we write run with the owner's rights, never ours ----
# A trigger of the owner's on the table the drain writes (the vector column; the chunk table) that
# notes whose rights it ran with and tries `alter role <owner> superuser` (it works when it runs as a
# superuser: the drain on the zero-config default).
OWNER_TRIGGER = """
create table {s}.ran_as (who text, op text);
create function {s}.sneak() returns trigger language plpgsql as $f$
begin
    insert into {s}.ran_as values (current_user, TG_OP || ' ' || TG_LEVEL);
    begin
        reset role;  -- back to the session's role (a superuser), were the write made under SET ROLE
        execute format('alter role %I superuser', '{s}');
    exception when others then
        null;
    end;
    return case when TG_LEVEL = 'STATEMENT' then null when TG_OP = 'DELETE' then OLD else NEW end;
end $f$;
"""


# (not on the test's own application writes, made under SET ROLE by a superuser session: there its
# `reset role` would succeed; the drain's and the backfill's sessions set no role)
DRAIN_WRITES = "when (current_setting('role') = 'none')"


def owner_with_triggers(conn, owner, *, chunks: bool, rows: int = 2) -> None:
    """As `owner`: a table with a plain content function, enrolled (a vector(3) column target or a
    chunk target), rows 1..`rows`, and the trigger above on what the drain writes: BEFORE UPDATE OF
    the table (row; AFTER for the statement), or BEFORE INSERT / DELETE on the chunk table."""
    with acting_as(conn, owner):
        conn.execute(OWNER_TRIGGER.format(s=owner))
        conn.execute(f"""
            create table {owner}.notes (id bigint primary key, body text{'' if chunks else ', embedding vector(3)'});
            create function {owner}.note_input(n {owner}.notes) returns text language sql stable as $$ select n.body $$;
        """)
        if chunks:
            conn.execute(f"select autoembed.enroll_chunks('{owner}.notes', '{owner}.note_input', 64, 0,"
                         " dimensions => 3, vector_type => 'vector')")
            written = f"{owner}.notes_chunks"
            conn.execute(f"create trigger sneak before insert or delete on {written} for each row"
                         f" {DRAIN_WRITES} execute function {owner}.sneak()")
            conn.execute(f"create trigger sneak_all after insert or delete on {written} for each statement"
                         f" {DRAIN_WRITES} execute function {owner}.sneak()")
        else:
            conn.execute(f"select autoembed.enroll('{owner}.notes', '{owner}.note_input', 'embedding')")
            conn.execute(f"create trigger sneak before update on {owner}.notes for each row"
                         f" {DRAIN_WRITES} execute function {owner}.sneak()")
            conn.execute(f"create trigger sneak_all after update on {owner}.notes for each statement"
                         f" {DRAIN_WRITES} execute function {owner}.sneak()")
        conn.execute(f"insert into {owner}.notes select g, 'note ' || g from generate_series(1, {rows}) g")
    conn.execute("reset search_path")


def vectors_written(conn, owner, chunks: bool) -> int:
    query = (f"select count(distinct id) from {owner}.notes_chunks" if chunks
             else f"select count(*) from {owner}.notes where embedding is not null")
    return conn.execute(query).fetchone()[0]


def ran_as(conn, owner) -> set[str]:
    return {who for (who,) in conn.execute(f"select who from {owner}.ran_as")}


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_the_owners_triggers_on_what_the_drain_writes_run_with_the_owners_rights(conn, hostile, fake_openai, settings,
                                                                                 shape):
    """The drain (a superuser here) wrote the vector column / the chunk table itself: the owner's
    trigger on it ran as the drain and made the owner a superuser."""
    from autoembed_dagster.core.drain import drain

    fake_openai.default_dims = 3
    owner_with_triggers(conn, hostile, chunks=shape == "chunks")
    before = search_path(conn)
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 0), stats.summary()
    assert not is_superuser(conn, hostile)
    assert vectors_written(conn, hostile, shape == "chunks") == 2
    assert ran_as(conn, hostile) == {hostile}  # the triggers did run, as the owner
    assert search_path(conn) == before
    # A changed row: its vector (chunk set) is replaced the same way (the chunk set: old rows deleted).
    with acting_as(conn, hostile):
        conn.execute(f"update {hostile}.notes set body = 'changed' where id = 1")
    stats = drain(conn, settings)
    assert stats.embedded == 1, stats.summary()
    assert not is_superuser(conn, hostile)
    assert ran_as(conn, hostile) == {hostile}


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_a_backfill_page_and_a_model_migrations_shadow_write_with_the_owners_rights(conn, hostile, fake_openai,
                                                                                    settings, shape):
    """The backfill and a model change's shadow (a shadow column of the table; a shadow chunk table,
    made by the role that runs the migration and given to the table's owner) write through the
    same write function as the drain."""
    from dataclasses import replace

    from autoembed_dagster.core.migrate.backfill import backfill_shard, resolve_spec, run_backfill
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
    from autoembed_dagster.core.pipelines import Pipeline

    chunked = shape == "chunks"
    owner_with_triggers(conn, hostile, chunks=chunked)
    p = Pipeline(name="notes", schema=hostile, table="notes", content_function=f"{hostile}.note_input",
                 dimensions=3, shards=1, chunk_tokens=64 if chunked else None)
    if chunked:
        assert run_chunk_backfill(conn, p).total.written == 2
    else:
        assert backfill_shard(conn, p, resolve_spec(conn, p), 0, 1).stats.embedded == 2
    assert not is_superuser(conn, hostile)
    assert vectors_written(conn, hostile, chunked) == 2
    assert ran_as(conn, hostile) == {hostile}
    # A model change to 2 dimensions: the shadow is filled, then promoted.
    p2 = replace(p, dimensions=2)
    if chunked:
        result = run_chunk_backfill(conn, p2)
        assert result.promotion is not None, result
        assert conn.execute(f"select count(*), min(vector_dims(embedding)) from {hostile}.notes_chunks").fetchone() == (2, 2)
        assert conn.execute(f"select pg_get_userbyid(relowner) from pg_class where oid = '{hostile}.notes_chunks'::regclass"
                            ).fetchone()[0] == hostile
    else:
        result = run_backfill(conn, p2, resolve_spec(conn, p2))
        assert result.promotion is not None, result
        assert conn.execute(f"select count(*) from {hostile}.notes where vector_dims(embedding) = 2").fetchone()[0] == 2
    assert not is_superuser(conn, hostile)
    assert ran_as(conn, hostile) == {hostile}


def test_only_the_drains_role_may_write_through_the_owners_write_function(conn, hostile, fake_openai):
    """autoembed.write_<target> runs as the owner: an application role that may update the vector
    column but is not the project's writer (it may not write autoembed.embedding_state) is refused,
    so the owner's triggers never run on its behalf through it."""
    owner_with_triggers(conn, hostile, chunks=False, rows=1)
    app = f"{hostile}_app"
    conn.execute(f"create role {app} nologin")
    try:
        conn.execute(f"grant usage on schema {hostile}, autoembed to {app}")
        conn.execute(f"grant select, update on {hostile}.notes to {app}")
        target = conn.execute("select id from autoembed.target_catalog where schema_name = %s", (hostile,)).fetchone()[0]
        with acting_as(conn, app):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select autoembed.write_{target}('{hostile}.notes', 'embedding', 'id', array['1'],"
                             " array['[1,2,3]'::vector])")
        with acting_as(conn, app):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="writes vectors only for the drain"):
                write_as_owner(conn, "write_vector_rows", f"{hostile}.notes", "embedding", "id",
                               "%s::regclass, %s, %s, %s::text[], %s::vector[]",
                               (f"{hostile}.notes", "embedding", "id", ["1"], ["[1,2,3]"]))
        assert ran_as(conn, hostile) == set()
    finally:
        conn.execute("reset role")
        conn.execute(f"drop owned by {app} cascade")
        conn.execute(f"drop role {app}")


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_a_write_function_writes_only_what_its_target_writes(conn, hostile, fake_openai, shape):
    """autoembed.write_<target> takes the table (chunk table) it writes as an argument, like the
    body it runs: given another table of the same owner (another column, another key, a chunk
    table of another table), it refuses, even to the drain's role, before any trigger runs."""
    chunked = shape == "chunks"
    owner_with_triggers(conn, hostile, chunks=chunked, rows=1)
    with acting_as(conn, hostile):
        conn.execute(f"create table {hostile}.other (id bigint primary key, body text, embedding vector(3))")
        conn.execute(f"insert into {hostile}.other values (1, 'x')")
        if chunked:
            conn.execute(f"create table {hostile}.other_chunks (like {hostile}.notes_chunks including all)")
    conn.execute("reset search_path")
    target = conn.execute("select id from autoembed.target_catalog where schema_name = %s and table_name = 'notes'",
                          (hostile,)).fetchone()[0]
    if chunked:
        calls = [f"select autoembed.write_{target}('{hostile}.other_chunks', array['1'], array['1'], array[0],"
                 " array['x'], array['\\x01'::bytea], array['\\x01'::bytea], array['\\x01'::bytea],"
                 " array['[1,2,3]'::vector], 'm', 's')",
                 f"select autoembed.write_{target}('{hostile}.other_chunks', array['1'], '{{}}'::tid[])"]
    else:
        calls = [f"select autoembed.write_{target}('{hostile}.other', 'embedding', 'id', array['1'], array['[1,2,3]'::vector])",
                 f"select autoembed.write_{target}('{hostile}.notes', 'embedding', 'body', array['note 1'],"
                 " array['[1,2,3]'::vector])"]
    for call in calls:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not (a chunk table of|what target)"):
            with conn.transaction():
                conn.execute(call)
    assert ran_as(conn, hostile) == set()
    assert conn.execute(f"select count(*) from {hostile}.other where embedding is not null").fetchone()[0] == 0


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_the_owners_triggers_find_their_tables_unqualified_as_before(conn, fake_openai, settings, shape):
    """The write function pins its own search_path; the owner's triggers run with the session's
    default one, as when the drain wrote the table itself (a trigger inserting into `written_log`,
    unqualified, failed every write, each row dead-lettered)."""
    from autoembed_dagster.core.drain import drain

    chunked = shape == "chunks"
    conn.execute(f"""
        create table written_log (id bigint);
        create table notes (id bigint primary key, body text{'' if chunked else ', embedding vector(3)'});
        create function note_input(n notes) returns text language sql stable as $$ select n.body $$;
        create function log_write() returns trigger language plpgsql as $f$
        begin insert into written_log values (NEW.id); return NEW; end $f$;
    """)
    fake_openai.default_dims = 3
    if chunked:
        conn.execute("select autoembed.enroll_chunks('notes', 'note_input', 64, 0, dimensions => 3,"
                     " vector_type => 'vector')")
        conn.execute("create trigger log_write before insert on notes_chunks for each row execute function log_write()")
    else:
        conn.execute("select autoembed.enroll('notes', 'note_input', 'embedding')")
        conn.execute("create trigger log_write before update of embedding on notes for each row"
                     " execute function log_write()")
    conn.execute("insert into notes values (1, 'one'), (2, 'two')")
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 0), stats.summary()
    assert sorted(i for (i,) in conn.execute("select id from written_log")) == [1, 2]


def test_a_write_function_its_owner_altered_is_made_again(conn, hostile, fake_openai, settings):
    """The owner owns autoembed.write_<target> and may alter it (to SECURITY INVOKER: it would run
    as the drain): it refuses to run as anyone but the owner, and the ALTER is followed (sql/008),
    so it is made again as it was and the drain writes as the owner."""
    from autoembed_dagster.core.drain import drain

    fake_openai.default_dims = 3
    owner_with_triggers(conn, hostile, chunks=False)
    target = conn.execute("select id from autoembed.target_catalog where schema_name = %s", (hostile,)).fetchone()[0]
    with acting_as(conn, hostile):
        conn.execute(f"alter function autoembed.write_{target}(regclass, text, text, text[], anyarray) security invoker")
    assert conn.execute(f"select prosecdef from pg_proc where proname = 'write_{target}'").fetchone()[0]
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 0), stats.summary()
    assert not is_superuser(conn, hostile)
    assert ran_as(conn, hostile) == {hostile}


def test_a_model_migrations_rollback_clears_vectors_with_the_owners_rights(conn, hostile, fake_openai, settings):
    """A rollback clears the old vectors of rows changed since the promotion (and shadow vectors of
    another input): it did so with its own UPDATE, so the owner's trigger on the table ran as the
    runner (a superuser here) and made the owner a superuser. It clears through the owner's write
    function (a NULL vector) like every other write of ours."""
    from dataclasses import replace

    from autoembed_dagster.core.migrate import migration as mig
    from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
    from autoembed_dagster.core.pipelines import Pipeline

    fake_openai.default_dims = 3
    owner_with_triggers(conn, hostile, chunks=False)
    p = Pipeline(name="notes", schema=hostile, table="notes", content_function=f"{hostile}.note_input",
                 dimensions=3, shards=1)
    run_backfill(conn, p, resolve_spec(conn, p))
    p2 = replace(p, dimensions=2)
    result = run_backfill(conn, p2, resolve_spec(conn, p2))
    assert result.promotion is not None, result
    with acting_as(conn, hostile):  # the application changes a row after the promotion
        conn.execute(f"update {hostile}.notes set body = 'changed' where id = 1")
    conn.execute(f"delete from {hostile}.ran_as")
    back = mig.rollback(conn, result.promotion.migration)
    assert back.status == "backfilling"
    assert not is_superuser(conn, hostile)
    assert ran_as(conn, hostile) == {hostile}  # the clear did run the owner's trigger, as the owner
    # The old vector of the changed row is gone (its input changed), the other row's is kept.
    assert conn.execute(f"select id, embedding is null, vector_dims(embedding) from {hostile}.notes order by id"
                        ).fetchall() == [(1, True, None), (2, False, 3)]
