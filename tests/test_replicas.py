"""Logical replication subscribers: rows that arrive by replication get their vectors, and
replicated UPDATEs, DELETEs and TRUNCATEs leave no stale vector, as local writes do.

One server of its own (the suite's server runs with wal_level = replica): wal_level = logical, a
publisher database and a subscriber database in it, one publication, one subscription (its slot
created first: a subscription to the same cluster cannot create it). The subscriber runs
autoembed; the publisher is a plain application database. Real Postgres, real pgmq, the real
drain against the fake OpenAI server."""

from __future__ import annotations

import time

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from autoembed_dagster.core import api
from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.targets.splitter import splitter_for
from autoembed_dagster.core.config import EmbedderSettings
from autoembed_dagster.core.db.server import connect, throwaway_server, with_database
from autoembed_dagster.core.drain import drain
from autoembed_dagster.core.embed import make_embedder
from autoembed_dagster.core.db.schema import init_db

from .fake_openai import fake_vector

WAIT_SECONDS = 180  # the apply worker on a loaded 2-core machine; polled, never slept through
TOKENS = 64

SCHEMA = """
create table docs (id integer primary key, title text not null, body text, views integer default 0,
                   embedding halfvec(1536));
create table notes (id integer primary key, body text not null, embedding halfvec(1536));
create table articles (id integer primary key, title text not null, body text);
create table sync_marker (id integer primary key);
"""

DOC_INPUT = """
create function doc_input(d docs) returns text language plpgsql immutable as $$
begin
    if d.title = 'boom' then
        raise exception 'doc_input cannot read %', d.id;  -- a content function that raises for one row
    end if;
    return d.title || E'\\n\\n' || coalesce(d.body, '');
end $$;
"""
NOTE_INPUT = """
create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
"""
ARTICLE_TEXT = """
create function article_text(a articles) returns text language sql immutable
    as $$ select case when a.body is null then null else a.title || E'\\n\\n' || a.body end $$;
"""
SUBSCRIBER_FUNCTIONS = DOC_INPUT + NOTE_INPUT + ARTICLE_TEXT

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def long_text(seed: int, paragraphs: int = 4) -> str:
    import random

    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "."
                       for _ in range(paragraphs))


@pytest.fixture(scope="module")
def replication():
    """(publisher URL, subscriber URL) on a server of their own with wal_level = logical; the
    subscription is created by the test (after or before enrolment) and dropped here."""
    with throwaway_server("autoembed-replica-", "AUTOEMBED_TEST_REPLICA_URL", {"wal_level": "logical"}) as url:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("create database replica_pub")
            c.execute("create database replica_sub")
        pub, sub = with_database(url, "replica_pub"), with_database(url, "replica_sub")
        with psycopg.connect(pub, autocommit=True) as p:
            p.execute("create extension vector")
            p.execute(SCHEMA)
        with connect(sub) as s:
            init_db(s)
            s.execute(SCHEMA)
            s.execute(SUBSCRIBER_FUNCTIONS)
        try:
            yield pub, sub
        finally:
            with psycopg.connect(sub, autocommit=True) as s:
                s.execute("drop subscription if exists autoembed_sub")  # drops its slot on the publisher too
            with psycopg.connect(url, autocommit=True) as c:
                for db in ("replica_sub", "replica_pub"):
                    c.execute(f"drop database if exists {db} with (force)")


def wait_for(url: str, query: str, what: str, params=()) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        with psycopg.connect(url, autocommit=True) as c:
            if c.execute(query, params).fetchone()[0]:
                return
        time.sleep(0.2)
    raise AssertionError(f"not within {WAIT_SECONDS}s: {what}")


_marks = iter(range(1, 10_000))


def replicated(pub: str, sub: str) -> None:
    """Return once everything the publisher committed so far has been applied on the subscriber:
    a marker row committed after it arrives (the apply worker applies transactions in commit order)."""
    mark = next(_marks)
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("insert into sync_marker values (%s)", (mark,))
    wait_for(sub, "select exists (select 1 from sync_marker where id = %s)", f"marker {mark} replicated", (mark,))


def vector(conn, table: str, key: int):
    row = conn.execute(f"select embedding from {table} where id = %s", (key,)).fetchone()
    return None if row is None or row[0] is None else np.array(row[0].to_list(), dtype=np.float32)


def assert_current(conn, table: str, fn: str, key: int) -> None:
    """The row's vector is the provider's vector of its current input (halfvec precision)."""
    text = conn.execute(f"select {fn}(t) from {table} t where id = %s", (key,)).fetchone()[0]
    vec = vector(conn, table, key)
    assert vec is not None, f"{table} {key} has no vector"
    assert np.allclose(vec, fake_vector(text, 1536), atol=2e-3), f"{table} {key} holds a vector of other content"


def queued_keys(conn) -> list:
    """The keys the subscriber's queue holds (messages of one row each: the replica triggers)."""
    return sorted(m["id"] for (m,) in conn.execute("select message from pgmq.q_embedding_jobs").fetchall())


def chunk_sets(conn) -> dict[int, list[str]]:
    sets: dict[int, list[str]] = {}
    for key, chunk in conn.execute("select id, chunk from articles_chunks order by id, chunk_index"):
        sets.setdefault(key, []).append(chunk)
    return sets


def test_replicated_writes_get_current_vectors_on_the_subscriber(replication, fake_openai, settings):
    pub, sub = replication
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("insert into docs (id, title, body) select g, 'title ' || g, 'body ' || g from generate_series(1, 3) g")
        p.execute("insert into notes (id, body) values (1, 'note one')")
        for i in (1, 2, 3):
            p.execute("insert into articles values (%s, %s, %s)", (i, f"article {i}", long_text(i)))
        # docs publishes no embedding column (the subscriber embeds); notes publishes its own, which
        # the publisher's application writes: the subscriber's drain must not fight it.
        p.execute("create publication autoembed_pub for table docs (id, title, body, views), notes, articles, sync_marker")
        p.execute("select pg_create_logical_replication_slot('autoembed_sub', 'pgoutput')")
    host = conninfo_to_dict(pub)["host"]
    with connect(sub) as s:
        # docs and notes enrolled before the subscription: its initial copy queues their rows.
        assert api.enroll("docs", "doc_input", url=sub) == 0
        assert api.enroll("notes", "note_input", url=sub) == 0
        s.execute(f"create subscription autoembed_sub connection '{make_conninfo(host=host, dbname='replica_pub', user='postgres')}' "
                  "publication autoembed_pub with (create_slot = false, slot_name = 'autoembed_sub')")
    wait_for(sub, "select count(*) = 4 and bool_and(srsubstate = 'r') from pg_subscription_rel", "initial copy done")

    with connect(sub) as s:
        # The initial copy fires no statement trigger enabled for local writes: the replica row triggers queued it.
        assert queued_keys(s) == [1, 1, 2, 3]
        # articles enrolled after the subscription copied it: enrolment's backlog queues its rows.
        assert api.enroll("articles", "article_text", chunk_tokens=TOKENS, url=sub) == 3
        stats = drain(s, settings)
        assert stats.dead_lettered == 0
        for key in (1, 2, 3):
            assert_current(s, "docs", "doc_input", key)
        assert_current(s, "notes", "note_input", 1)
        splitter = splitter_for(make_embedder(EmbedderSettings.from_env(), 1536), TOKENS, 0)
        assert chunk_sets(s) == {i: splitter.split(f"article {i}\n\n{long_text(i)}") for i in (1, 2, 3)}

    with psycopg.connect(pub, autocommit=True) as p:
        with p.transaction():  # one remote transaction: applied in one local one
            p.execute("insert into docs (id, title, body) values (4, 'four', 'new row'), (5, 'five', 'another')")
            p.execute("update docs set title = 'title one, edited' where id = 1")
            p.execute("update docs set views = views + 1 where id = 2")  # not part of the input
            p.execute("delete from docs where id = 3")
        p.execute("update articles set body = %s where id = 1", (long_text(11),))
        p.execute("insert into articles values (4, 'article 4', %s)", (long_text(4),))
        p.execute("delete from articles where id = 3")
        p.execute("update articles set id = 20 where id = 2")  # a key change: the chunks follow it
    replicated(pub, sub)

    with connect(sub) as s:
        # Committed on the subscriber, before any drain: the edited row's stale vector is gone, the
        # untouched input kept its vector, the deleted rows' state and chunks went with them, and an
        # article's chunks followed its new key.
        assert vector(s, "docs", 1) is None
        assert_current(s, "docs", "doc_input", 2)
        assert s.execute("select count(*) from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id where table_name = 'docs' "
                         "and row_id = '3'").fetchone()[0] == 0
        assert s.execute("select count(*) from articles_chunks where id in (2, 3)").fetchone()[0] == 0
        assert chunk_sets(s)[20] == splitter.split(f"article 2\n\n{long_text(2)}")
        # docs 1, 4, 5; articles 1 (edited), 4 and 20 (its key changed: the set it took along is checked)
        assert queued_keys(s) == [1, 1, 4, 4, 5, 20]
        stats = drain(s, settings)
        assert stats.dead_lettered == 0
        for key in (1, 2, 4, 5):
            assert_current(s, "docs", "doc_input", key)
        sets = chunk_sets(s)
        assert sets[1] == splitter.split(f"article 1\n\n{long_text(11)}")
        assert sets[4] == splitter.split(f"article 4\n\n{long_text(4)}")
        assert 3 not in sets and 2 not in sets
        assert sets[20] == splitter.split(f"article 2\n\n{long_text(2)}")
        assert pgmq.status(s, "embedding_jobs")[0].rows == 0

    # The publisher's application writes a vector of its own into notes, published with the row:
    # for unchanged input the subscriber keeps its own vector (nothing queued, no fight); a vector
    # that comes with changed input or a new row is replaced by the subscriber's drain.
    foreign = "[" + ",".join(["0.5"] * 1536) + "]"
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("update notes set embedding = %s::halfvec where id = 1", (foreign,))
        p.execute("insert into notes values (2, 'note two', %s::halfvec)", (foreign,))
    replicated(pub, sub)
    with connect(sub) as s:
        assert_current(s, "notes", "note_input", 1)
        assert queued_keys(s) == [2]
        with psycopg.connect(pub, autocommit=True) as p:
            p.execute("update notes set body = 'note one, edited', embedding = %s::halfvec where id = 1", (foreign,))
        replicated(pub, sub)
        assert vector(s, "notes", 1) is None  # changed input: the stale vector is cleared, whoever wrote it
        drain(s, settings)
        assert_current(s, "notes", "note_input", 1)
        assert_current(s, "notes", "note_input", 2)

    # A TRUNCATE on the publisher: the subscriber's rows and their state go; rows inserted after
    # it are embedded (a key used before gets its new content's vector, not the old state's).
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("truncate docs")
        p.execute("insert into docs (id, title, body) values (1, 'title 1', 'body 1'), (6, 'six', 'after truncate')")
    replicated(pub, sub)
    with connect(sub) as s:
        assert s.execute("select count(*) from docs").fetchone()[0] == 2
        assert s.execute("select array_agg(row_id order by row_id) from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                         "where table_name = 'docs'").fetchone()[0] is None
        drain(s, settings)
        for key in (1, 6):
            assert_current(s, "docs", "doc_input", key)
        assert s.execute("select array_agg(row_id order by row_id) from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                         "where table_name = 'docs'").fetchone()[0] == ["1", "6"]

    # A replicated key change: the row keeps its vector and its embedding_state record follows the
    # new key (the ALWAYS-enabled autoembed_state_key), so nothing looks stale there.
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("update docs set id = 11 where id = 1")
    replicated(pub, sub)
    with connect(sub) as s:
        assert_current(s, "docs", "doc_input", 11)
        assert s.execute("select array_agg(row_id order by row_id) from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                         "where table_name = 'docs'").fetchone()[0] == ["11", "6"]
        assert queued_keys(s) == []

    # A TRUNCATE of a chunk target's table on the publisher: the subscriber's chunk table is
    # truncated with it (the ALWAYS-enabled autoembed_chunks_truncate; no foreign key refuses it),
    # the subscription goes on, and rows inserted after it get their chunks.
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("truncate articles")
        p.execute("insert into articles values (5, 'article 5', %s)", (long_text(5),))
    replicated(pub, sub)
    with connect(sub) as s:
        assert s.execute("select array_agg(id) from articles").fetchone()[0] == [5]
        assert chunk_sets(s) == {}
        assert queued_keys(s) == [5]
        assert drain(s, settings).dead_lettered == 0
        assert chunk_sets(s) == {5: splitter.split(f"article 5\n\n{long_text(5)}")}

    # A content function that raises for a replicated row fails neither the apply worker nor the
    # replication: the change counts as one (the vector is cleared, the row queued, later
    # dead-lettered by the drain with the reason), and later transactions are applied.
    with psycopg.connect(pub, autocommit=True) as p:
        p.execute("update docs set title = 'boom' where id = 6")
        p.execute("insert into docs (id, title, body) values (7, 'boom', 'unreadable')")
    replicated(pub, sub)
    with connect(sub) as s:
        assert vector(s, "docs", 6) is None
        assert queued_keys(s) == [6, 7]


def test_db_init_gives_tables_enrolled_before_the_replica_triggers(conn):
    """A table enrolled by an earlier version (no replica triggers) gets them from `db init`,
    column and chunk targets alike, enabled REPLICA; the triggers of local writes stay as they were."""
    conn.execute("""
        create table docs (id integer primary key, title text not null, body text, views integer default 0,
                           embedding halfvec(1536));
        create table articles (id integer primary key, title text not null, body text);
    """)
    conn.execute(DOC_INPUT + ARTICLE_TEXT)
    conn.execute("select autoembed.enroll('docs', 'doc_input', 'embedding')")
    conn.execute("select autoembed.enroll_chunks('articles', 'article_text', 64)")

    def triggers(table):
        return dict(conn.execute("select tgname, tgenabled from pg_trigger where tgrelid = %s::regclass "
                                 "and not tgisinternal", (table,)).fetchall())

    enrolled = {t: triggers(t) for t in ("docs", "articles")}
    assert enrolled["docs"]["autoembed_replica_insert"] == "R" and enrolled["docs"]["autoembed_clear"] == "A"
    for table, names in (("docs", ["autoembed_replica_insert", "autoembed_replica_update", "autoembed_replica_keep",
                                   "autoembed_forget_row"]),
                         ("articles", ["autoembed_replica_insert", "autoembed_replica_update",
                                       "autoembed_replica_delete", "autoembed_replica_rekey"])):
        for name in names:
            conn.execute(f"drop trigger {name} on {table}")
    conn.execute("alter table docs enable trigger autoembed_clear")  # as an earlier version left it

    init_db(conn)

    assert {t: triggers(t) for t in ("docs", "articles")} == enrolled
