"""Chunk targets through the core path: enrolment (registry, chunk table, triggers), the drain
(plan, embed only new chunk texts, swap each document's chunk set in the settle's transaction),
deletes, blanks, bulk statements, forged messages, failures, backfill and search. Real Postgres,
real pgmq, real HTTP to the fake OpenAI server through the real OpenAI embedder."""

from __future__ import annotations

import json
import random

import numpy as np
import psycopg
import pytest

from autoembed_dagster.core import api
from autoembed_dagster.core.targets import chunks
from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.targets.splitter import splitter_for
from autoembed_dagster.core.config import ConfigError, EmbedderSettings
from autoembed_dagster.core.drain import Drainer, drain
from autoembed_dagster.core.drain.chunked import chunk_target_of
from autoembed_dagster.core.embed import make_embedder
from autoembed_dagster.core.targets.catalog import lookup_registered

from .fake_openai import fake_vector

TOKENS, OVERLAP = 64, 8
MODEL = "openai:text-embedding-3-small:1536"


def _paragraphs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(15, 45))) + "." for _ in range(n)]


def _doc(n: int, seed: int) -> str:
    return "\n\n".join(_paragraphs(n, seed))


@pytest.fixture
def articles(conn, fake_openai):
    """A table of long articles, enrolled as a chunk target."""
    conn.execute("""
        create table articles (id bigint primary key, title text not null, body text);
        create function article_text(a articles) returns text language sql immutable
            as $$ select case when a.body is null then null else a.title || E'\\n\\n' || a.body end $$;
    """)
    queued = api.enroll("articles", "article_text", chunk_tokens=TOKENS, chunk_overlap=OVERLAP, url=conn.info.dsn)
    assert queued == 0
    return conn


def _embedder():
    return make_embedder(EmbedderSettings.from_env(), 1536)


def _splitter():
    return splitter_for(_embedder(), TOKENS, OVERLAP)


def chunk_rows(conn, doc_id, table="articles_chunks"):
    return conn.execute(f"select chunk_index, chunk, embedding, model, source_hash from {table} "
                        "where id = %s order by chunk_index", (doc_id,), prepare=False).fetchall()


def assert_current(conn, doc_id, table="articles_chunks", model=MODEL, dims=1536):
    """The document's chunk set is exactly the chunking of its current input, each chunk with the
    provider's vector of its own text under the current model."""
    text = conn.execute("select article_text(a) from articles a where id = %s", (doc_id,)).fetchone()[0]
    rows = chunk_rows(conn, doc_id, table)
    expected = _splitter().split(text)
    assert [r[1] for r in rows] == expected, f"document {doc_id}: chunk set is not the chunking of its input"
    assert [r[0] for r in rows] == list(range(len(expected)))
    for _, chunk, vec, model_key, _ in rows:
        assert model_key == model
        assert np.allclose(np.array(vec.to_list(), dtype=np.float32), fake_vector(chunk, dims), atol=2e-3)


def provider_inputs(fake_openai) -> list[str]:
    return [t for r in fake_openai.requests if r["status"] == 200 for t in r["inputs"]]


# -- enrolment -----------------------------------------------------------------------------------
def test_enrol_registers_the_chunk_target_creates_the_table_and_queues_the_backlog(conn, fake_openai):
    conn.execute("""
        create table notes (id integer primary key, body text);
        create function note_text(n notes) returns text language sql immutable as $$ select n.body $$;
        insert into notes values (1, 'one'), (2, 'two'), (3, null);
    """)
    assert api.enroll("notes", "note_text", chunk_tokens=128, chunk_overlap=16, url=conn.info.dsn) == 3
    reg = conn.execute("""select c.chunk_table, c.chunk_tokens, c.chunk_overlap, c.embedding_column, r.chunk_table::regclass::text
                          from autoembed.target_catalog c join autoembed.targets r using (id)
                          where c.table_name = 'notes'""").fetchone()
    assert reg == ("notes_chunks", 128, 16, None, "notes_chunks")
    target, queue = lookup_registered(conn, target_id=conn.execute(
        "select id from autoembed.targets where chunk_table = 'notes_chunks'::regclass").fetchone()[0])
    assert (target.chunk_table, target.chunk_tokens, target.chunk_overlap, target.vector_type, target.dimensions) == \
        ("notes_chunks", 128, 16, "halfvec", 1536)
    # Messages name the target by id (and the chunk table, for people reading the queue).
    message = conn.execute("select message from pgmq.q_embedding_jobs order by msg_id limit 1").fetchone()[0]
    assert message["target"] == target.registered and message["chunkTable"] == "notes_chunks"
    # The chunk table goes with the parent's rows (delete, key change, truncate: triggers of the
    # parent, fired by local writes and replicated ones alike, no foreign key), no vector-clearing
    # trigger on the parent. Local writes fire the enqueue triggers; rows arriving by logical
    # replication the REPLICA ones (R).
    triggers = {r[0]: r[1] for r in conn.execute(
        "select tgname, tgenabled from pg_trigger where tgrelid = 'notes'::regclass and not tgisinternal")}
    assert triggers == {"autoembed_enqueue_insert": "O", "autoembed_chunk_changed": "O", "autoembed_enqueue_update": "O",
                        "autoembed_replica_insert": "R", "autoembed_replica_update": "R", "autoembed_replica_delete": "R",
                        "autoembed_replica_rekey": "R",
                        "autoembed_chunks_delete": "O", "autoembed_chunks_key": "O", "autoembed_chunks_truncate": "A"}
    # Idempotent: enrolling again queues only rows without a chunk set, keeps one registration.
    api.enroll("notes", "note_text", chunk_tokens=128, chunk_overlap=16, url=conn.info.dsn)
    assert conn.execute("select count(*) from autoembed.targets where relid = 'notes'::regclass").fetchone()[0] == 1


def test_enrol_refuses_bad_chunk_settings_with_the_fix(conn, fake_openai):
    conn.execute("""
        create table notes (id integer primary key, body text, embedding halfvec(1536));
        create function note_text(n notes) returns text language sql immutable as $$ select n.body $$;
    """)
    with pytest.raises(ConfigError, match="chunk_tokens=8191 or less"):
        api.enroll("notes", "note_text", chunk_tokens=9000, url=conn.info.dsn)
    with pytest.raises(ConfigError, match="more than half"):
        api.enroll("notes", "note_text", chunk_tokens=100, chunk_overlap=80, url=conn.info.dsn)
    api.enroll("notes", "note_text", "embedding", url=conn.info.dsn)  # a column target already
    with pytest.raises(psycopg.errors.ObjectInUse, match="one kind of enrolment"):
        api.enroll("notes", "note_text", chunk_tokens=100, url=conn.info.dsn)
    conn.execute("select autoembed.unenroll('notes')")
    api.enroll("notes", "note_text", chunk_tokens=100, url=conn.info.dsn)
    with pytest.raises(psycopg.errors.ObjectInUse, match="enrolled as a chunk target"):
        api.enroll("notes", "note_text", "embedding", url=conn.info.dsn)
    conn.execute("select autoembed.unenroll('notes')")  # enqueue triggers and registration go
    # (the chunk table stays, and so do the triggers that keep it with the table's rows)
    assert {r[0] for r in conn.execute("select tgname from pg_trigger where tgrelid = 'notes'::regclass"
                                       " and not tgisinternal")} == {"autoembed_chunks_delete", "autoembed_chunks_key",
                                                                     "autoembed_chunks_truncate"}
    assert conn.execute("select count(*) from autoembed.targets").fetchone()[0] == 0


# -- the drain -----------------------------------------------------------------------------------
def test_long_documents_are_chunked_embedded_and_current_after_a_drain(articles, fake_openai, settings):
    conn = articles
    for i in range(1, 6):
        conn.execute("insert into articles values (%s, %s, %s)", (i, f"Article {i}", _doc(30, seed=i)))
    stats = drain(conn, settings)
    assert stats.dead_lettered == 0 and stats.embedded == 5
    total = conn.execute("select count(*) from articles_chunks").fetchone()[0]
    assert total > 5 * 5 and stats.chunks_embedded + stats.chunks_reused == total
    for i in range(1, 6):
        assert_current(conn, i)
    assert pgmq.status(conn, "embedding_jobs")[0].rows == 0
    ts = stats.by_table[("public", "articles", "articles_chunks")]
    assert ts.embedded == 5 and ts.chunks_embedded == stats.chunks_embedded
    assert "chunks:" in stats.summary()
    # A re-save and a change to another column queue nothing; a second drain has nothing to do.
    fake_openai.reset()
    conn.execute("update articles set title = title where id = 1")
    assert pgmq.status(conn, "embedding_jobs")[0].rows == 0
    assert drain(conn, settings).embedded == 0 and fake_openai.request_count == 0


def test_editing_one_paragraph_reembeds_at_most_three_chunks(articles, fake_openai, settings):
    conn = articles
    paras = _paragraphs(160, seed=7)
    conn.execute("insert into articles values (1, 'Long', %s)", ("\n\n".join(paras),))
    drain(conn, settings)
    before = len(chunk_rows(conn, 1))
    assert before >= 40
    fake_openai.reset()
    paras[80] = paras[80] + " An extra closing sentence about omega."
    conn.execute("update articles set body = %s where id = 1", ("\n\n".join(paras),))
    stats = drain(conn, settings)
    sent = provider_inputs(fake_openai)
    assert 1 <= len(sent) <= 3, f"{len(sent)} chunk texts re-embedded for a one-paragraph edit"
    assert stats.chunks_embedded == len(sent) and stats.chunks_reused >= before - 3
    assert_current(conn, 1)


def test_delete_blank_and_null_leave_no_chunks(articles, fake_openai, settings):
    conn = articles
    conn.execute("insert into articles values (1, 'A', %s), (2, 'B', %s), (3, 'C', null), (4, 'D', '   ')",
                 (_doc(12, 1), _doc(12, 2)))
    drain(conn, settings)
    assert len(chunk_rows(conn, 1)) > 0 and len(chunk_rows(conn, 2)) > 0
    assert chunk_rows(conn, 3) == []
    conn.execute("delete from articles where id = 1")
    assert chunk_rows(conn, 1) == []  # the foreign key cascades
    conn.execute("update articles set body = null where id = 2")
    conn.execute("insert into articles values (5, 'E', %s)", (_doc(12, 5),))
    conn.execute("delete from articles where id = 5")  # queued, then gone before the drain
    stats = drain(conn, settings)
    assert chunk_rows(conn, 2) == [] and stats.chunks_deleted > 0 and stats.empty_input == 1
    assert stats.deleted_rows == 1 and stats.dead_lettered == 0 and chunk_rows(conn, 5) == []


def test_a_bulk_update_statement_queues_only_changed_rows_and_all_become_current(articles, fake_openai, settings):
    conn = articles
    with conn.cursor() as cur:
        cur.executemany("insert into articles values (%s, %s, %s)", [(i, f"T{i}", _doc(6, i)) for i in range(1, 301)])
    drain(conn, settings)
    conn.execute("update articles set body = body || E'\\n\\nAppendix.' where id % 3 = 0")
    conn.execute("update articles set title = title")  # a re-save of every row: nothing queued
    # The row trigger notes the 100 changed keys; the statement trigger sends them in one message.
    assert (pgmq.status(conn, "embedding_jobs")[0].depth, pgmq.status(conn, "embedding_jobs")[0].rows) == (1, 100)
    stats = drain(conn, settings)
    assert stats.embedded == 100 and stats.dead_lettered == 0
    for i in (3, 150, 299, 300):
        assert_current(conn, i)


def test_a_forged_message_writes_only_the_registered_chunk_table(articles, fake_openai, settings):
    conn = articles
    conn.execute("""
        create table other (id bigint primary key, body text);
        create function other_text(o other) returns text language sql immutable as $$ select o.body $$;
        insert into other values (1, 'secret');
        insert into articles values (1, 'A', 'alpha');
    """)
    chunks.create_chunk_table(conn, "public", "other", dimensions=1536)
    target = conn.execute("select id from autoembed.targets where chunk_table = 'articles_chunks'::regclass").fetchone()[0]
    drain(conn, settings)
    fake_openai.reset()
    # Names another table and chunk table, with the articles target's id: the registry wins.
    pgmq.send_batch(conn, "embedding_jobs", [
        {"id": 1, "schema": "public", "table": "other", "contentFunction": "other_text", "embeddingColumn": "other_chunks",
         "chunkTable": "other_chunks", "target": target, "keyColumn": "id"},
        # No target id: names only, which resolve to no registered target (dead-lettered).
        {"id": 1, "schema": "public", "table": "other", "contentFunction": "other_text", "embeddingColumn": "other_chunks",
         "chunkTable": "other_chunks", "keyColumn": "id"},
    ])
    stats = drain(conn, settings)
    assert conn.execute("select count(*) from other_chunks").fetchone()[0] == 0
    assert all("secret" not in t for t in provider_inputs(fake_openai))
    assert stats.dead_lettered == 1
    error = conn.execute("select error from autoembed.dead_letters").fetchone()[0]
    assert "not a registered target" in error


def test_a_failure_mid_batch_leaves_the_old_chunk_set_whole_then_retries(articles, fake_openai, settings):
    conn = articles
    conn.execute("insert into articles values (1, 'A', %s), (2, 'B', %s)", (_doc(20, 1), _doc(20, 2)))
    drain(conn, settings)
    old = {i: chunk_rows(conn, i) for i in (1, 2)}
    conn.execute("update articles set body = body || E'\\n\\nNew closing paragraph number one.' where id = 1")
    conn.execute("update articles set body = body || E'\\n\\nPOISON closing paragraph.' where id = 2")
    fake_openai.poison("POISON", status=500)
    stats = Drainer(conn, settings).drain_batch()
    # The request holding document 2's new chunk failed (document 1's new chunk was in it too):
    # both old sets are intact, never half-replaced, and the jobs are retried.
    assert chunk_rows(conn, 2) == old[2] and chunk_rows(conn, 1) == old[1]
    assert stats.retried == 2 and stats.embedded == 0 and stats.dead_lettered == 0
    fake_openai.reset()
    stats = drain(conn, settings)
    assert stats.embedded == 2
    assert_current(conn, 1)
    assert_current(conn, 2)


def test_the_drain_gives_way_to_an_application_holding_the_row(articles, fake_openai, settings, db_url):
    conn = articles
    conn.execute("insert into articles values (1, 'A', %s)", (_doc(10, 1),))
    with psycopg.connect(db_url) as app:
        app.execute("select 1 from articles where id = 1 for update")
        drainer = Drainer(conn, settings)
        stats = drainer.drain_batch()
        assert stats.busy == 1 and chunk_rows(conn, 1) == []
        app.rollback()
    assert drainer.run().embedded == 1  # the drain kept the job and takes it up again
    assert_current(conn, 1)


def test_chunk_target_of_uses_the_registered_chunk_table(articles):
    target_id = articles.execute("select id from autoembed.targets where chunk_table is not null").fetchone()[0]
    target, _ = lookup_registered(articles, target_id=target_id)
    ct = chunk_target_of(target)
    assert (ct.chunk_table, ct.key_column, ct.vector_type) == ("articles_chunks", "id", "halfvec")
    assert json.dumps(target.chunk_tokens) == str(TOKENS)


# -- health, CLI ---------------------------------------------------------------------------------
def test_health_counts_current_missing_and_stale_documents(articles, fake_openai, settings):
    from autoembed_dagster.core.health import chunk_targets, target_health

    conn = articles
    conn.execute("insert into articles values (1, 'A', %s), (2, 'B', %s), (3, 'C', null)", (_doc(10, 1), _doc(10, 2)))
    drain(conn, settings)
    conn.execute("insert into articles values (4, 'D', %s)", (_doc(10, 4),))  # queued, no chunks yet
    conn.execute("update articles set body = body || ' more' where id = 2")  # stale until drained
    [target] = chunk_targets(conn)
    h = target_health(conn, target, _embedder())
    assert (h.rows, h.embeddable, h.current, h.missing, h.stale) == (4, 3, 1, 1, 1)
    drain(conn, settings)
    h = target_health(conn, target, _embedder())
    assert (h.current, h.missing, h.stale, h.coverage) == (3, 0, 0, 1.0)


def test_cli_enrol_status_and_search_over_chunks(conn, db_url, fake_openai, settings):
    from .test_cli import run

    env = {"AUTOEMBED_DATABASE_URL": db_url, "OPENAI_BASE_URL": fake_openai.base_url, "OPENAI_API_KEY": "sk-test",
           "AUTOEMBED_PROVIDER": "openai", "AUTOEMBED_MODEL": "text-embedding-3-small"}
    conn.execute("""
        create table articles (id bigint primary key, title text not null, body text);
        create function article_text(a articles) returns text language sql immutable
            as $$ select a.title || E'\\n\\n' || a.body $$;
    """)
    needle = "The walrus sings a lullaby to the harbour at dawn."
    paras = _paragraphs(40, seed=5)
    paras[25] = needle
    conn.execute("insert into articles values (1, 'Sea', %s), (2, 'Other', %s)", ("\n\n".join(paras), _doc(40, 9)))
    out = run(["enroll", "articles", "--content-function", "article_text", "--chunk-tokens", "64",
               "--chunk-overlap", "8"], env).stdout
    assert "articles_chunks" in out and "2 existing rows queued" in out
    bad = run(["enroll", "articles", "--content-function", "article_text", "--chunk-tokens", "9000"], env, check=False)
    assert bad.returncode != 0 and "--chunk-tokens 8191 or less" in bad.stderr
    status = run(["status"], env).stdout
    assert "public.articles -> articles_chunks" in status and "64/8" in status
    run(["drain", "-q"], env)
    # The fake provider's vectors are random by text (no meaning): query with the exact text of the
    # chunk that holds the sentence, which then is the nearest chunk (distance 0).
    passage = next(c for c in _splitter().split("Sea\n\n" + "\n\n".join(paras)) if needle in c)
    out = run(["search", passage, "--table", "articles", "--content-function", "article_text", "--chunks", "-k", "2"],
              env).stdout
    first, second = out.splitlines()[:2]
    assert first.startswith("1. [0.000] public.articles id=1 chunk ") and "walrus" in first
    assert second.startswith("2. [") and "id=2 chunk" in second  # one line per parent row
    status = run(["status"], env).stdout
    row = next(line for line in status.splitlines() if line.startswith("public.articles -> articles_chunks"))
    assert row.split()[4:7] == ["2", "2", "0"]  # documents, current, no chunks
    # Enrolled in SQL only: a discovered chunked pipeline, which searches its chunks by itself.
    assert "articles_chunks (64/8 tokens)" in run(["pipelines"], env).stdout
    out = run(["search", passage, "--pipeline", "articles", "-k", "1"], env).stdout
    assert out.startswith("1. [0.000] public.articles id=1 chunk ")
    out = run(["backfill", "articles"], env).stdout
    assert "(in_place)" in out and "100% (2/2 documents)" in out


# -- backfill and model change -------------------------------------------------------------------
def _pipeline(**fields):
    from autoembed_dagster.core.pipelines import make_pipeline

    return make_pipeline("articles", table="articles", content_function="article_text", chunk_tokens=TOKENS,
                         chunk_overlap=OVERLAP, shards=2, **fields)


def test_backfill_in_place_skips_current_documents_and_fills_missing_ones(articles, fake_openai, settings):
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill

    conn = articles
    conn.execute("insert into articles values (1, 'A', %s), (2, 'B', %s)", (_doc(10, 1), _doc(10, 2)))
    drain(conn, settings)
    # Rows written while the triggers were away (no job queued): only a backfill finds them.
    conn.execute("alter table articles disable trigger user")
    conn.execute("insert into articles values (3, 'C', %s)", (_doc(10, 3),))
    conn.execute("alter table articles enable trigger user")
    fake_openai.reset()
    result = run_chunk_backfill(conn, _pipeline())
    assert result.plan.mode == "in_place" and result.promotion is None
    assert (result.total.written, result.total.current) == (1, 2)
    assert result.coverage.complete and len(provider_inputs(fake_openai)) == len(chunk_rows(conn, 3))
    for i in (1, 2, 3):
        assert_current(conn, i)


def test_a_chunk_backfill_the_provider_refuses_stops_and_writes_nothing(articles, fake_openai, settings):
    """A rejected key fails every request alike: the re-embed stops at its first page with the
    reason (a configuration error, not rows that failed), as a column backfill does."""
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
    from autoembed_dagster.core.drain import ProviderConfigError

    conn = articles
    conn.execute("alter table articles disable trigger user")
    conn.execute("insert into articles values (1, 'A', %s), (2, 'B', %s)", (_doc(10, 1), _doc(10, 2)))
    conn.execute("alter table articles enable trigger user")
    fake_openai.reset()
    fake_openai.fail_next(1000, 401)
    with pytest.raises(ProviderConfigError, match="refused the chunks of public.articles"):
        run_chunk_backfill(conn, _pipeline())
    assert len(fake_openai.requests) == 1
    assert conn.execute("select count(*) from articles_chunks").fetchone()[0] == 0


def test_backfill_to_a_new_size_fills_a_shadow_the_drain_follows_then_promotes_it(articles, fake_openai, settings):
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
    from autoembed_dagster.core.drain import pipeline_resolver

    conn = articles
    conn.execute("insert into articles values (1, 'A', %s), (2, 'B', %s), (3, 'C', %s)",
                 (_doc(10, 1), _doc(10, 2), _doc(10, 3)))
    drain(conn, settings)
    old_rows = {i: chunk_rows(conn, i) for i in (1, 2, 3)}
    p = _pipeline(dimensions=512)
    new_model = "openai:text-embedding-3-small:512"
    # One shard of two, no promotion yet: the shadow is partly filled; search still reads the live table.
    first = run_chunk_backfill(conn, p, only=[0])
    assert first.plan.mode == "shadow" and first.plan.write_to.chunk_table == "articles_chunks__next"
    assert first.promotion is None and not first.coverage.complete
    assert {i: chunk_rows(conn, i) for i in (1, 2, 3)} == old_rows
    # Meanwhile a document changes: the drain (configured with the new size) writes it to the shadow.
    conn.execute("update articles set body = body || E'\\n\\nA late paragraph.' where id = 2")
    assert drain(conn, settings, pipeline_resolver([p])).embedded == 1
    assert chunk_rows(conn, 2) == old_rows[2]
    assert_current(conn, 2, table="articles_chunks__next", model=new_model, dims=512)
    done = run_chunk_backfill(conn, p)
    assert done.coverage.complete and done.promotion.old == "articles_chunks__old"
    kinds = conn.execute("""select format_type(a.atttypid, a.atttypmod) from pg_attribute a
                            where a.attrelid = 'articles_chunks'::regclass and a.attname = 'embedding'""").fetchone()[0]
    assert kinds == "halfvec(512)"
    # The registry follows the promoted table: jobs go on to the table search reads.
    assert conn.execute("select chunk_table::regclass::text from autoembed.targets where chunk_table is not null"
                        ).fetchone()[0] == "articles_chunks"
    for i in (1, 2, 3):
        assert_current(conn, i, model=new_model, dims=512)
    conn.execute("update articles set body = body || E'\\n\\nAfter the promotion.' where id = 3")
    assert drain(conn, settings, pipeline_resolver([p])).embedded == 1
    assert_current(conn, 3, model=new_model, dims=512)
    hits = api.search_chunks(chunk_rows(conn, 1)[0][1], table="articles", content_function="article_text",
                             embedder_settings=p.embedder_settings(), url=conn.info.dsn)
    assert hits[0].id == "1" and hits[0].distance < 1e-3


def test_a_role_with_rights_on_its_table_only_writes_a_chunk_target(articles, fake_openai, settings):
    """The chunk triggers are SECURITY DEFINER and call no user function; the WHEN clause compares
    the input in the writer's context: the writer needs no grant on the project's schemas."""
    from .test_least_privilege import acting_as

    conn = articles
    role = f"app_{conn.info.backend_pid}"
    conn.execute(f"create role {role} nologin")
    try:
        conn.execute(f"grant select, insert, update, delete on articles to {role}")
        with acting_as(conn, role):
            conn.execute("insert into articles values (1, 'A', 'alpha'), (2, 'B', 'beta')")
            conn.execute("update articles set body = 'gamma' where id = 2")
            conn.execute("update articles set title = title where id = 1")  # a re-save: nothing queued
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select * from pgmq.q_embedding_jobs")
        bodies = [m for (m,) in conn.execute("select message from pgmq.q_embedding_jobs order by msg_id")]
        assert [(m["id"], m.get("ids")) for m in bodies] == [(1, "1,2"), (2, None)]
        assert drain(conn, settings).embedded == 2
        assert_current(conn, 2)
    finally:
        conn.execute(f"drop owned by {role} cascade")
        conn.execute(f"drop role {role}")


def test_backfill_refuses_a_declaration_that_splits_otherwise_than_the_enrolment(articles, fake_openai):
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
    from autoembed_dagster.core.pipelines import make_pipeline

    p = make_pipeline("articles", table="articles", content_function="article_text", chunk_tokens=128)
    with pytest.raises(ConfigError, match=r"enrolled with 64 \(overlap 8\).*--chunk-tokens 128 --chunk-overlap 0"):
        run_chunk_backfill(articles, p)
    plain = make_pipeline("plain", table="plain", content_function="f", chunk_tokens=64)
    with pytest.raises(Exception, match="not enrolled as a chunk target: autoembed enroll public.plain"):
        run_chunk_backfill(articles, plain)


def test_a_renamed_key_column_is_followed_by_the_chunk_triggers(articles, fake_openai, settings):
    """The UPDATE row trigger and the chunk table name the key column: after `rename column`, the
    event trigger renames the chunk table's column and re-creates the trigger, so the application's
    UPDATE goes on, is queued and drained."""
    conn = articles
    conn.execute("insert into articles values (1, 'One', %s), (2, 'Two', %s)", (_doc(6, 1), _doc(6, 2)))
    drain(conn, settings)
    conn.execute("alter table articles rename column id to article_id")
    conn.execute("update articles set body = %s where article_id = 2", (_doc(6, 3),))
    assert conn.execute("select message->>'id' from pgmq.q_embedding_jobs").fetchall() == [("2",)]
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (1, 0), stats.summary()
    text = conn.execute("select article_text(a) from articles a where article_id = 2").fetchone()[0]
    got = [c for (c,) in conn.execute("select chunk from articles_chunks where article_id = 2 order by chunk_index",
                                      prepare=False)]
    assert got == _splitter().split(text)


def test_a_change_to_a_column_the_content_function_does_not_read_queues_nothing(articles, fake_openai, settings):
    conn = articles
    conn.execute("alter table articles add column views integer not null default 0")
    conn.execute("insert into articles values (1, 'One', %s), (2, 'Two', %s)", (_doc(4, 1), _doc(4, 2)))
    drain(conn, settings)
    conn.execute("update articles set views = views + 1")
    conn.execute("update articles set views = 7 where id = 2")
    assert pgmq.status(conn, "embedding_jobs")[0].depth == 0
    conn.execute("update articles set views = 8, title = 'Two, retitled' where id = 2")  # one it reads: queued
    assert conn.execute("select message->>'id' from pgmq.q_embedding_jobs").fetchall() == [("2",)]


class HeldWrite:
    """One drain batch in a thread, held inside the write of document 1's new chunk set (see
    held_chunk_write)."""

    def __init__(self, conn, settings, db_url: str, statement: str):
        import threading

        self.conn, self.statement = conn, statement
        self.drain_conn = psycopg.connect(db_url, autocommit=True)  # (closed by the fixture)
        self.drainer = Drainer(self.drain_conn, settings)
        self.done: dict = {}
        self._thread = threading.Thread(target=lambda: self.done.setdefault("stats", self.drainer.drain_batch()))
        self.gate = psycopg.connect(db_url, autocommit=True)

    def __enter__(self) -> "HeldWrite":
        self.gate.execute("select pg_advisory_lock(4242)")
        self._thread.start()
        # Wait (on a condition) until the drain's statement on the chunk table waits for the gate.
        for _ in range(600):
            if self.gate.execute("select exists (select 1 from pg_locks where pid = %s and locktype = 'advisory'"
                                 " and not granted)", (self.drain_conn.info.backend_pid,)).fetchone()[0]:
                return self
            self._thread.join(0.1)
        self.__exit__(None, None, None)
        pytest.fail(f"the drain never reached the chunk write's {self.statement}")

    def __exit__(self, *exc):
        self.gate.execute("select pg_advisory_unlock(4242)")
        self._thread.join(120)
        self.gate.close()
        self.conn.execute("drop trigger hold on articles_chunks")

    @property
    def stats(self):
        return self.done["stats"]


@pytest.fixture
def held_chunk_write(articles, fake_openai, settings, db_url):
    """Document 1 with a drained chunk set (`held_chunk_write.old`), then a long new input
    (queued). `held_chunk_write(statement)`: a context manager that runs one drain batch and
    returns once the drain's `statement` ('insert': the new set going in; 'delete': the old set
    going) on the chunk table waits for advisory lock 4242 (a statement trigger makes the write
    take as long as the test wants); leaving it lets the write go on and waits for the batch."""
    conn = articles
    conn.execute("insert into articles values (1, 'A', %s)", (_doc(8, 1),))
    assert drain(conn, settings).embedded == 1
    conn.execute("update articles set body = %s where id = 1", (_doc(40, 2),))  # a long new input, queued
    conn.execute("""
        create function hold_chunk_write() returns trigger language plpgsql as $$
        begin perform pg_advisory_lock_shared(4242); perform pg_advisory_unlock_shared(4242); return null; end $$""")

    made: list[HeldWrite] = []

    def hold(statement: str) -> HeldWrite:
        conn.execute(f"create trigger hold after {statement} on articles_chunks "
                     "for each statement execute function hold_chunk_write()")
        made.append(HeldWrite(conn, settings, db_url, statement))
        return made[-1]

    hold.old = chunk_rows(conn, 1)
    yield hold
    for write in made:
        write.drain_conn.close()


@pytest.mark.parametrize("held", ["insert", "delete"])
def test_the_application_never_waits_for_the_write_of_a_chunk_set(held_chunk_write, articles, settings, db_url, held):
    """The settle writes a document's new chunk set without holding its parent row, and deletes
    its old set under a KEY SHARE lock only: the application's UPDATE of that row while the new set
    goes in ('insert') or while the old one goes ('delete') goes through at once (lock_timeout 2 s,
    far below the write, which a trigger on the chunk table holds until the test lets it go), and
    the stale-write guard then keeps the set that was made from the old input out."""
    conn = articles
    with psycopg.connect(db_url, autocommit=True) as app, held_chunk_write(held) as write:
        app.execute("set lock_timeout = '2s'")
        app.execute("update articles set body = %s where id = 1", (_doc(6, 3),))  # does not wait
    assert write.stats.embedded == 0  # the guard saw the input change: the set of the old input is out
    assert chunk_rows(conn, 1) == held_chunk_write.old  # never the set of the input the application replaced
    assert drain(conn, settings).embedded == 1
    assert_current(conn, 1)


def test_search_skips_a_document_whose_content_function_raises(conn, fake_openai, settings, db_url):
    """autoembed.search_chunks compares each hit's chunk set with its parent's current input: a
    content function raising for one parent among the hits failed the whole search. That parent is
    skipped (its chunk set cannot be shown to be current), the others are found."""
    from .test_bad_rows import BAD, ROWS, make_items, raise_for

    make_items(conn, "chunks")
    drain(conn, settings)
    raise_for(conn, BAD)
    hits = api.search_chunks("item number 7 of the list", table="items", content_function="item_text", k=ROWS,
                             url=db_url)
    assert sorted(int(h.id) for h in hits) == sorted(set(range(1, ROWS + 1)) - {BAD})
    # The same query once the function reads the row again: it is found as before.
    conn.execute("create or replace function item_text(i items) returns text language plpgsql immutable"
                 " as $$ begin return i.body; end $$")
    hits = api.search_chunks("item number 7 of the list", table="items", content_function="item_text", k=ROWS,
                             url=db_url)
    assert sorted(int(h.id) for h in hits) == list(range(1, ROWS + 1))


@pytest.mark.parametrize("statement", ["delete", "key update", "for update"])
def test_the_applications_delete_key_change_and_row_lock_never_wait_for_the_write_of_a_chunk_set(
        held_chunk_write, articles, settings, db_url, statement):
    """As above, for the statements that conflicted with the KEY SHARE lock the write held on the
    parent (DELETE, a change of the key, SELECT ... FOR UPDATE) and, through the parent's triggers
    that delete or move its chunks, with the old chunk rows the write had deleted: each goes
    through at once while the new set goes in. A deleted parent leaves no chunk behind, a changed
    key takes the old set along, and the set written meanwhile never lands under the old key."""
    conn = articles
    old = held_chunk_write.old
    with psycopg.connect(db_url) as app:
        with held_chunk_write("insert") as write:
            app.execute("set lock_timeout = '2s'")
            if statement == "delete":
                app.execute("delete from articles where id = 1")
            elif statement == "key update":
                app.execute("update articles set id = 100 where id = 1")
            else:
                app.execute("select * from articles where id = 1 for update")
            if statement != "for update":
                app.commit()  # (FOR UPDATE: held until the drain's guard has given way)
        app.commit()
    assert write.stats.embedded == 0, write.stats.summary()
    if statement == "delete":
        assert chunk_rows(conn, 1) == []  # no chunk left behind
    elif statement == "key update":
        assert chunk_rows(conn, 1) == [] and chunk_rows(conn, 100) == old  # moved; the new set never landed
    else:
        assert write.stats.busy == 1
        assert chunk_rows(conn, 1) == old  # the guard found the row held: the set waits for the next drain
        assert write.drainer.run().embedded == 1  # the drain kept the job and takes it up again
        assert_current(conn, 1)


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_a_row_re_keyed_while_its_job_is_pending_is_embedded_under_its_new_key(conn, fake_openai, settings, shape):
    """A row's input changes (its job is pending), then the application changes its key: the job
    of the old key finds no row, so the new key must be queued by the key change itself. After
    one drain the new key holds the embedding of the row's current input (a chunk target: its
    chunk set is the chunking of it), and nothing of the old input is left under either key."""
    from .test_bad_rows import make_items, written

    make_items(conn, shape, rows=3)
    assert drain(conn, settings).embedded == 3
    new_text = "item two, rewritten while its job waits"
    conn.execute("update items set body = %s where id = 2", (new_text,))  # queued under key 2
    conn.execute("update items set id = 200 where id = 2")
    stats = drain(conn, settings)
    assert stats.dead_lettered == 0, stats.summary()
    assert written(conn, shape) == {1, 3, 200}
    if shape == "column":
        (vec,) = conn.execute("select embedding from items where id = 200").fetchone()
        assert np.allclose(np.array(vec.to_list(), dtype=np.float32), fake_vector(new_text, 1536), atol=2e-3)
    else:
        rows = conn.execute("select id, chunk, embedding from items_chunks where id in (2, 200) order by chunk_index",
                            prepare=False).fetchall()
        assert [(k, c) for k, c, _ in rows] == [(200, new_text)]  # the old input's chunks are gone
        assert np.allclose(np.array(rows[0][2].to_list(), dtype=np.float32), fake_vector(new_text, 1536), atol=2e-3)
    assert pgmq.status(conn, "embedding_jobs")[0].depth == 0


@pytest.mark.parametrize("statement", ["delete", "key update"])
def test_a_delete_or_key_change_while_the_old_chunk_set_goes_waits_for_that_delete_only(
        held_chunk_write, articles, settings, db_url, statement):
    """While the old set is deleted the parent is held FOR KEY SHARE: the application's DELETE or
    key change (whose triggers delete or move those rows) waits for that delete and the commit,
    never for the write of the new set, and never deadlocks with the guard that follows: the
    drain gives way (its job is kept) or commits first, and either way no chunk is left behind
    under the old key."""
    import threading

    conn = articles
    done: dict = {}
    with held_chunk_write("delete") as write:
        def app_statement():
            with psycopg.connect(db_url, autocommit=True) as app:
                app.execute("delete from articles where id = 1" if statement == "delete"
                            else "update articles set id = 100 where id = 1")
                done["ok"] = True
        app = threading.Thread(target=app_statement)
        app.start()
        # Wait (on a condition) until the application's statement waits for the drain's lock.
        for _ in range(600):
            if conn.execute("select exists (select 1 from pg_locks l join pg_stat_activity a on a.pid = l.pid"
                            " where not l.granted and l.locktype in ('transactionid', 'tuple')"
                            " and a.query like %s)", ("%articles%",)).fetchone()[0] or done:
                break
            app.join(0.1)
    app.join(120)
    assert done.get("ok"), "the application's statement failed"
    assert write.stats.dead_lettered == 0, write.stats.summary()
    assert chunk_rows(conn, 1) == []  # nothing left under the old key
    if statement == "key update":
        drain(conn, settings)  # (the new key was queued by the key change)
        text = conn.execute("select article_text(a) from articles a where id = 100").fetchone()[0]
        assert [c for _, c, _, _, _ in chunk_rows(conn, 100)] == _splitter().split(text)


def test_db_init_makes_an_older_chunk_tables_key_deferrable_and_gives_it_to_its_tables_owner(articles, settings):
    """Chunk tables made before the deferrable key (the new set goes in beside the old one) or
    owned by another role (a shadow whoever ran the backfill made) are converted by `db init`,
    one pass over them; the drain then writes them as usual."""
    from autoembed_dagster.core.db.schema import init_db

    conn = articles
    role = f"other_{conn.info.backend_pid}"
    conn.execute(f"create role {role} nologin")
    try:
        conn.execute("alter table articles_chunks drop constraint articles_chunks_pkey,"
                     " add constraint articles_chunks_pkey primary key (id, chunk_index)")
        conn.execute(f"alter table articles_chunks owner to {role}")
        conn.commit()
        init_db(conn)
        assert conn.execute("select condeferrable from pg_constraint where conname = 'articles_chunks_pkey'"
                            ).fetchone()[0]
        assert conn.execute("select c.relowner = p.relowner from pg_class c, pg_class p"
                            " where c.oid = 'articles_chunks'::regclass and p.oid = 'articles'::regclass").fetchone()[0]
        conn.execute("insert into articles values (1, 'A', %s)", (_doc(3, 1),))
        assert drain(conn, settings).embedded == 1
        assert_current(conn, 1)
    finally:
        conn.execute(f"drop owned by {role} cascade")
        conn.execute(f"drop role {role}")
