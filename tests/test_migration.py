"""Model migration and re-embed backfills, core layer: real Postgres, the real OpenAI client against
the local HTTP fake, real concurrency (threads, a subprocess killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace

import numpy as np
import psycopg
import pytest

from autoembed_dagster.core.migrate import migration as mig
from autoembed_dagster.core.migrate.backfill import backfill_shard, embedder_for, plan, resolve_spec, run_backfill
from autoembed_dagster.core.db.server import connect, with_database
from autoembed_dagster.core.drain import Drainer, default_resolver, drain
from autoembed_dagster.core.migrate.migration import MigrationIncomplete
from autoembed_dagster.core.targets.models import MigrationChanged, ModelSpec
from autoembed_dagster.core.db.schema import init_db
from autoembed_dagster.core.pipelines import Pipeline, shard_keys, shard_of
from autoembed_dagster.core.search import search
from autoembed_dagster.core.targets.catalog import TargetKey, resolve

from .fake_openai import fake_vector
from .test_incremental import queue_depth

DOCS = Pipeline(name="documents", schema="public", table="documents", shards=4)  # 1536: the column's size
DOCS_512 = replace(DOCS, dimensions=512)  # the model change under test: 1536 -> 512 dimensions


# -- helpers (test_backfill.py uses them too) -------------------------------------------------------
def seed(conn, settings, n: int, prefix: str = "doc") -> None:
    """n documents, embedded by the incremental path with the current (1536-dim) model."""
    conn.execute("insert into documents (title, content) select %s || i, 'content of ' || %s || i "
                 "from generate_series(1, %s) i", (prefix, prefix, n))
    drain(conn, settings)


def stored(conn, column: str = "embedding", fn: str = "embedding_input") -> dict[int, tuple[np.ndarray | None, str]]:
    rows = conn.execute(f"select id, {column}, {fn}(d) from documents d order by id").fetchall()
    return {i: (None if v is None else np.array(v.to_list(), dtype=np.float32), text) for i, v, text in rows}


def assert_all_current(conn, dims: int, column: str = "embedding", fn: str = "embedding_input") -> int:
    """Every row holds the provider's vector of its *current* input at `dims` (halfvec precision)."""
    rows = stored(conn, column, fn)
    assert rows, "no rows"
    for doc_id, (vec, text) in rows.items():
        assert vec is not None, f"row {doc_id}: no vector in {column}"
        assert vec.shape == (dims,), f"row {doc_id}: {vec.shape[0]} dims in {column}, expected {dims}"
        assert np.allclose(vec, fake_vector(text, dims), atol=2e-3), f"row {doc_id}: {column} holds a vector of other content"
    return len(rows)


def column_type(conn, column: str = "embedding") -> str | None:
    row = conn.execute("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'documents'::regclass"
                       " and attname = %s and not attisdropped", (column,)).fetchone()
    return row[0] if row else None


def drain_all(conn, settings, rounds: int = 5) -> None:
    for _ in range(rounds):
        drain(conn, settings)
        if queue_depth(conn) == 0:
            return
    assert queue_depth(conn) == 0, "the queue did not empty"


class WritesDuring:
    """The real HTTP embedder; runs `action(texts)` once, right after its first provider call
    returns: a user's write landing between a backfill's read and its write."""

    def __init__(self, inner, action):
        self.inner, self.action, self.done = inner, action, False
        self.identity = inner.identity

    def embed(self, texts):
        out = self.inner.embed(texts)
        if not self.done:
            self.done = True
            self.action(texts)
        return out


# -- shards and specs ---------------------------------------------------------------------------------
def test_shard_of_is_the_documented_hash_and_spreads_keys(conn):
    keys = [str(i) for i in range(2000)] + ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "é€"]
    in_sql = dict(conn.execute("select k, autoembed.shard_of(k, 8) from unnest(%s::text[]) k", (keys,)).fetchall())
    assert all(in_sql[k] == shard_of(k, 8) for k in keys)
    counts = np.bincount([shard_of(k, 8) for k in keys[:2000]], minlength=8)
    assert counts.min() > 180 and counts.max() < 320  # ~250 each
    assert shard_keys(8) == [str(i) for i in range(8)] and shard_keys(12)[:3] == ["00", "01", "02"]


def test_shard_of_in_a_latin1_database_hashes_the_utf8_bytes_too(pg_server_url):
    name = f"latin1_{os.getpid()}"
    with psycopg.connect(pg_server_url, autocommit=True) as c:
        c.execute(f"create database {name} encoding 'LATIN1' locale 'C' template template0")
    try:
        with connect(with_database(pg_server_url, name)) as conn:
            init_db(conn)
            keys = ["1", "42", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "é", "ÿ"]
            in_sql = dict(conn.execute("select k, autoembed.shard_of(k, 8) from unnest(%s::text[]) k", (keys,)).fetchall())
            assert in_sql == {k: shard_of(k, 8) for k in keys}
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as c:
            c.execute(f"drop database if exists {name} with (force)")


def test_model_spec_is_a_valid_partition_key_and_round_trips():
    spec = ModelSpec("openai", "nomic-embed-text:v1.5", 768, "embedding_input")
    assert spec.key == "openai:nomic-embed-text:v1.5:768:embedding_input"
    assert ModelSpec.parse(spec.key) == spec and spec.identity_key == "openai:nomic-embed-text:v1.5:768"
    for bad in ("a|b", "a,b", "x[1]", "a...b"):
        with pytest.raises(ValueError):
            ModelSpec("openai", bad, 8, "fn")
    with pytest.raises(ValueError):
        ModelSpec("openai", "m", 8, "schema:fn")
    with pytest.raises(ValueError):
        ModelSpec("cohere", "m", 8, "fn")


# -- the whole path -----------------------------------------------------------------------------------
def test_dimension_change_1536_to_512_backfills_promotes_and_keeps_the_index(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    seed(conn, settings, 40)
    assert_all_current(conn, 1536)
    spec = resolve_spec(conn, DOCS_512)
    assert spec.key == "openai:text-embedding-3-small:512:embedding_input"

    shard_plan = plan(conn, DOCS_512, spec)
    init_db(conn)  # `autoembed db init` re-applies every SQL file, mid-migration too
    init_db(conn)
    result = run_backfill(conn, DOCS_512, spec)

    assert result.plan.mode == "migration" and result.total.embedded == 40 and result.plan.migration == shard_plan.migration
    assert result.coverage.complete and result.promotion is not None and result.promotion.indexes == ["documents_embedding_idx"]
    assert (result.promotion.live, result.promotion.old, result.promotion.already) == ("embedding", "embedding__old", False)
    assert column_type(conn) == "halfvec(512)" and column_type(conn, "embedding__old") == "halfvec(1536)"
    assert column_type(conn, "embedding__next") is None
    assert_all_current(conn, 512)
    assert_all_current(conn, 1536, column="embedding__old")  # rollback stays possible
    indexes = dict(conn.execute("select indexrelid::regclass::text, pg_get_indexdef(indexrelid) from pg_index "
                                "where indrelid = 'documents'::regclass").fetchall())
    assert "USING hnsw (embedding halfvec_cosine_ops)" in indexes["documents_embedding_idx"]
    assert "(embedding__old halfvec_cosine_ops)" in indexes["documents_embedding_idx__old"]
    models = dict(conn.execute("select embedding_column, string_agg(distinct model, ',') from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                               "group by 1").fetchall())
    assert models == {"embedding": "openai:text-embedding-3-small:512",
                      "embedding__old": "openai:text-embedding-3-small:1536"}

    # The incremental path now embeds with the new model (the resolver reads the migration).
    conn.execute("update documents set content = 'rewritten' where id = 3")
    conn.execute("insert into documents (title, content) values ('new', 'after promotion')")
    drain_all(conn, settings)
    assert_all_current(conn, 512)
    hit = search(conn, stored(conn)[41][1], table="documents")[0]  # the fake's vectors: exact text only
    assert hit.id == "41" and hit.distance < 1e-2

    finished = mig.drop_old(conn, result.promotion.migration)
    assert finished.status == "finished" and column_type(conn, "embedding__old") is None
    assert conn.execute("select count(*) from pg_trigger where tgname like 'autoembed_guard_%'").fetchone()[0] == 0
    # A second run finds nothing to do and calls the provider for nothing.
    before = fake_openai.request_count
    again = run_backfill(conn, DOCS_512, spec)
    assert again.plan.mode == "in_place" and again.total.embedded == 0 and fake_openai.request_count == before


def test_a_backfill_and_a_drain_refused_a_second_connection_work_on_one(supabase_docs, fake_openai, settings, db_url,
                                                                        caplog):
    """A shard reads its next page ahead, and a drain claims its next batch, on a second
    connection; a role allowed one connection gets the same result, one step after the other."""
    seed(supabase_docs, settings, 30)
    role = f"one_connection_{os.getpid()}"
    supabase_docs.execute(f"create role {role} login connection limit 1 in role postgres")
    try:
        with connect(db_url, user=role) as conn, caplog.at_level("WARNING"):
            result = run_backfill(conn, DOCS_512, resolve_spec(conn, DOCS_512))
        assert result.total.embedded == 30 and result.coverage.complete and result.promotion is not None
        assert "no second connection for the scans of shard" in caplog.text and "too many connections" in caplog.text
        assert_all_current(supabase_docs, 512)

        supabase_docs.execute("insert into documents (title, content) select 'new ' || i, 'later ' || i "
                              "from generate_series(1, 700) i")
        caplog.clear()
        with connect(db_url, user=role) as conn, caplog.at_level("WARNING"):
            stats = Drainer(conn, settings, pipeline=True).run()
        assert stats.embedded == 700 and queue_depth(supabase_docs) == 0
        assert "no second connection for the claims of the drain" in caplog.text
        assert_all_current(supabase_docs, 512)
    finally:
        supabase_docs.execute(f"reassign owned by {role} to postgres")
        supabase_docs.execute(f"drop owned by {role}")
        supabase_docs.execute(f"drop role {role}")


def test_writes_during_a_backfill_are_not_lost_or_overwritten_by_stale_vectors(supabase_docs, fake_openai, settings, db_url):
    conn = supabase_docs
    seed(conn, settings, 40)
    spec = resolve_spec(conn, DOCS_512)
    shard_plan = plan(conn, DOCS_512, spec)
    target = resolve(conn, shard_plan.target_key(DOCS_512))
    changed: list[int] = []

    def user_writes(texts):
        # A user edits a row of the batch being embedded, and adds one, before the batch is written.
        with connect(db_url) as other:
            doc_id = other.execute("select id from documents d where embedding_input(d) = %s", (texts[0],)).fetchone()[0]
            other.execute("update documents set content = 'edited during the backfill' where id = %s", (doc_id,))
            other.execute("insert into documents (title, content) values ('late', 'inserted during the backfill')")
        changed.append(doc_id)

    first = next(i for i in range(4) if conn.execute(
        "select count(*) from documents where autoembed.shard_of(id::text, 4) = %s", (i,)).fetchone()[0])
    wrapped = WritesDuring(embedder_for(DOCS_512, spec, target), user_writes)
    r = backfill_shard(conn, DOCS_512, spec, first, 4, shard_plan=shard_plan, embedder=wrapped)

    assert r.stats.stale == 1, "the edited row's vector was made from its old input: it must not be written"
    assert stored(conn, "embedding__next")[changed[0]][0] is None
    for i in range(4):
        backfill_shard(conn, DOCS_512, spec, i, 4, shard_plan=shard_plan)
    drain_all(conn, settings)  # the triggers queued both columns for the edited and the new row

    # Before promotion, search keeps using the old model, and it is current for every row too.
    assert_all_current(conn, 1536)
    assert_all_current(conn, 512, column="embedding__next")
    assert mig.promote(conn, shard_plan.migration).coverage.complete
    assert_all_current(conn, 512)
    assert conn.execute("select count(*) from autoembed.dead_letters").fetchone()[0] == 0


def test_concurrent_writers_drains_and_backfill_end_consistent(supabase_docs, fake_openai, settings, db_url):
    conn = supabase_docs
    seed(conn, settings, 60)
    spec = resolve_spec(conn, DOCS_512)
    plan(conn, DOCS_512, spec)  # start the migration: from here on, writes reach both columns
    fake_openai.delay(0.01)
    stop = threading.Event()
    failures: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)
        return run

    def writer():
        rng = np.random.default_rng(7)
        with connect(db_url) as c:
            for n in range(120):
                doc_id = int(rng.integers(1, 60))
                if n % 5 == 0:
                    c.execute("insert into documents (title, content) values ('w', %s)", (f"written {n}",))
                else:
                    c.execute("update documents set content = %s where id = %s", (f"version {n}", doc_id))
                time.sleep(0.01)

    def drainer():
        with connect(db_url) as c:
            while not stop.is_set():
                drain(c, settings)
                time.sleep(0.02)

    def backfiller():
        with connect(db_url) as c:
            run_backfill(c, DOCS_512, spec, promote_when_complete=False, batch_rows=8)

    threads = [threading.Thread(target=guarded(f)) for f in (writer, backfiller)]
    draining = threading.Thread(target=guarded(drainer))
    for t in threads + [draining]:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    draining.join(60)
    assert not failures, failures
    drain_all(conn, settings)

    result = mig.promote(conn, mig.get_migration(conn, "public", "documents", "embedding"))
    assert result.coverage.complete and result.coverage.embeddable > 60
    assert_all_current(conn, 512)
    assert_all_current(conn, 1536, column="embedding__old")


_KILLED_SHARD = textwrap.dedent("""
    from autoembed_dagster.core.migrate.backfill import backfill_shard, resolve_spec
    from autoembed_dagster.core.db.server import connect
    from autoembed_dagster.core.pipelines import Pipeline

    p = Pipeline(name="documents", schema="public", table="documents", dimensions=512, shards=1)
    with connect() as conn:
        backfill_shard(conn, p, resolve_spec(conn, p), 0, 1, batch_rows=5)
""")


def test_a_shard_killed_with_sigkill_resumes_without_re_embedding_finished_rows(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    seed(conn, settings, 60)
    p = replace(DOCS_512, shards=1)
    spec = resolve_spec(conn, p)
    plan(conn, p, spec)
    fake_openai.reset()
    fake_openai.delay(0.15)  # ~5 rows per 0.15 s: slow enough to kill it mid-way

    def shadow_rows() -> set[str]:
        return {r[0] for r in conn.execute("select row_id from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                                           "where embedding_column = 'embedding__next'")}

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SHARD], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while len(shadow_rows()) < 15:
            assert proc.poll() is None, "the shard finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    time.sleep(0.5)  # its server backend notices the closed socket and rolls back the open batch
    committed = shadow_rows()
    assert 15 <= len(committed) < 60
    killed_requests = fake_openai.request_count
    fake_openai.reset()

    r = backfill_shard(conn, p, spec, 0, 1, batch_rows=5)

    embedded_again = [t for req in fake_openai.requests for t in req["inputs"]]
    texts = {str(k): v[1] for k, v in stored(conn).items()}
    assert not {texts[k] for k in committed} & set(embedded_again), "finished rows were embedded again"
    assert len(embedded_again) == 60 - len(committed) == r.stats.embedded
    assert r.stats.current == len(committed) and r.complete
    assert killed_requests > 0
    assert_all_current(conn, 512, column="embedding__next")


def test_promotion_is_atomic_for_concurrent_readers(supabase_docs, fake_openai, settings, db_url):
    conn = supabase_docs
    seed(conn, settings, 60)
    spec = resolve_spec(conn, DOCS_512)
    result = run_backfill(conn, DOCS_512, spec, promote_when_complete=False)
    assert result.coverage.complete
    seen: list[tuple] = []
    vectors_seen: list[set[int]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader():
        try:
            # Statements computing on the column are prepared by psycopg after 5 runs: fine, their
            # result type does not change. A statement *returning* the column must not be a
            # server-side prepared one when the size changes (Postgres: "cached plan must not
            # change result type"), so that connection turns preparation off.
            with connect(db_url) as c, connect(db_url, prepare_threshold=None) as raw:
                while not stop.is_set():
                    seen.append(c.execute("select count(*), count(embedding), min(vector_dims(embedding)),"
                                          " max(vector_dims(embedding)) from documents").fetchone())
                    vectors_seen.append({len(v.to_list()) for (v,) in raw.execute("select embedding from documents")})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    promoted = mig.promote(conn, result.plan.migration)
    time.sleep(0.3)
    stop.set()
    t.join(30)

    assert not errors, errors
    assert promoted.migration.status == "promoted"
    assert {s[0] for s in seen} == {60} and all(s[1] == 60 for s in seen), "a read saw rows without a vector"
    dims = [s[2] for s in seen]
    assert all(s[2] == s[3] for s in seen), "a read saw a mix of old and new vectors"
    assert set(dims) == {1536, 512} and dims == sorted(dims, reverse=True), "not one switch from old to new"
    assert all(len(v) == 1 for v in vectors_seen) and {next(iter(v)) for v in vectors_seen} == {1536, 512}


def test_promotion_refuses_incomplete_coverage_and_rollback_restores_the_old_vectors(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    seed(conn, settings, 30)
    spec = resolve_spec(conn, DOCS_512)
    shard_plan = plan(conn, DOCS_512, spec)
    backfill_shard(conn, DOCS_512, spec, 0, 4, shard_plan=shard_plan)
    with pytest.raises(MigrationIncomplete):
        mig.promote(conn, shard_plan.migration)
    assert column_type(conn) == "halfvec(1536)"  # nothing changed

    run_backfill(conn, DOCS_512, spec, promote_when_complete=False)
    m = mig.promote(conn, shard_plan.migration).migration
    conn.execute("update documents set content = 'changed after promotion' where id = 5")

    back = mig.rollback(conn, m)

    assert back.status == "backfilling" and column_type(conn) == "halfvec(1536)"
    assert column_type(conn, "embedding__next") == "halfvec(512)"
    assert stored(conn)[5][0] is None, "the old vector of a row changed after promotion is stale: cleared"
    drain_all(conn, settings)
    assert_all_current(conn, 1536)
    assert_all_current(conn, 512, column="embedding__next")
    assert mig.promote(conn, back).coverage.complete
    assert_all_current(conn, 512)


def test_abort_drops_the_shadow_column_its_records_trigger_and_jobs(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    seed(conn, settings, 10)
    spec = resolve_spec(conn, DOCS_512)
    shard_plan = plan(conn, DOCS_512, spec)
    backfill_shard(conn, DOCS_512, spec, 0, 4, shard_plan=shard_plan)
    conn.execute("update documents set content = 'x' where id = 1")
    assert conn.execute("select count(*) from pgmq.q_embedding_jobs where message->>'embeddingColumn' = 'embedding__next'"
                        ).fetchone()[0] == 1
    shadow = conn.execute("select autoembed.state_target('public', 'documents', 'embedding__next')").fetchone()[0]

    aborted = mig.abort(conn, shard_plan.migration)

    assert aborted.status == "aborted" and column_type(conn, "embedding__next") is None
    assert conn.execute("select count(*) from autoembed.embedding_state where target_id = %s", (shadow,)).fetchone()[0] == 0
    assert conn.execute("select count(*) from pgmq.q_embedding_jobs where message->>'embeddingColumn' <> 'embedding'"
                        ).fetchone()[0] == 0
    # The migration's trigger is gone; the table keeps only the state cleanup the drain gave it (sql/013, and
    # the record's move on a key change: sql/022).
    assert [t for (t,) in conn.execute("select tgname from pg_trigger where tgname like 'autoembed_%%' order by 1")] == [
        "autoembed_forget_delete", "autoembed_forget_row", "autoembed_forget_truncate", "autoembed_state_key"]
    drain_all(conn, settings)
    assert_all_current(conn, 1536)


def test_the_resolver_and_the_guard_follow_the_migration(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    seed(conn, settings, 5)
    spec = resolve_spec(conn, DOCS_512)
    shard_plan = plan(conn, DOCS_512, spec)
    resolver = default_resolver()
    live = resolve(conn, TargetKey("public", "documents", "embedding_input", "embedding"))
    shadow = resolve(conn, TargetKey("public", "documents", "embedding_input", "embedding__next"))
    assert resolver(live).identity.key == "openai:text-embedding-3-small:1536"
    assert resolver(shadow).identity.key == "openai:text-embedding-3-small:512"
    with pytest.raises(psycopg.errors.SerializationFailure):
        conn.execute("insert into autoembed.embedding_state (target_id, row_id, content_hash, model)"
                     " values (autoembed.state_target('public', 'documents', 'embedding__next'), '1', '\\x00',"
                     " 'openai:text-embedding-3-small:1536')")

    run_backfill(conn, DOCS_512, spec)
    with pytest.raises(MigrationChanged):
        resolver(live)  # a drain that read the column before the promotion must not write into it
    with pytest.raises(MigrationChanged):
        resolver(shadow)
    promoted_live = resolve(conn, TargetKey("public", "documents", "embedding_input", "embedding"))
    assert resolver(promoted_live).identity.key == "openai:text-embedding-3-small:512"
    assert shard_plan.migration.id == mig.get_migration(conn, "public", "documents", "embedding").id


def test_a_drain_looks_migrations_up_in_the_database_it_drains(supabase_docs, fake_openai, settings,
                                                                pg_server_url, monkeypatch):
    conn = supabase_docs
    seed(conn, settings, 5)
    large = replace(DOCS_512, model="text-embedding-3-large")  # the environment still names -small
    plan(conn, large, resolve_spec(conn, large))
    # The configured database is another one (no autoembed schema, no migration in it).
    monkeypatch.setenv("AUTOEMBED_DATABASE_URL", pg_server_url)
    shadow = resolve(conn, TargetKey("public", "documents", "embedding_input", "embedding__next"))
    assert Drainer(conn, settings).resolver(shadow).identity.key == "openai:text-embedding-3-large:512"


def test_a_search_embeds_the_query_with_the_model_of_the_database_it_searches(supabase_docs, fake_openai, settings,
                                                                             pg_server_url, monkeypatch):
    conn = supabase_docs
    seed(conn, settings, 5)
    large = replace(DOCS_512, model="text-embedding-3-large")  # the environment still names -small
    assert run_backfill(conn, large, resolve_spec(conn, large)).promotion is not None
    monkeypatch.setenv("AUTOEMBED_DATABASE_URL", pg_server_url)  # another database, no migration in it
    text = stored(conn)[3][1]
    hits = search(conn, text, table="documents")
    assert fake_openai.requests[-1]["model"] == "text-embedding-3-large" and fake_openai.requests[-1]["dimensions"] == 512
    assert hits[0].id == "3" and hits[0].distance < 1e-2


def test_a_content_function_change_is_a_migration_that_retargets_the_triggers(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("""create function embedding_input_v2(doc documents) returns text language sql immutable
                    as $$ select upper(doc.title) || ': ' || doc.content $$""")
    seed(conn, settings, 12)
    p = replace(DOCS, content_function="embedding_input_v2")
    spec = resolve_spec(conn, p)
    assert spec.key == "openai:text-embedding-3-small:1536:embedding_input_v2"

    result = run_backfill(conn, p, spec)

    assert result.plan.mode == "migration" and result.plan.migration.old_content_function == "embedding_input"
    assert sorted(result.promotion.triggers) == ["embed_documents_on_insert", "embed_documents_on_update"]
    assert_all_current(conn, 1536, fn="embedding_input_v2")
    conn.execute("update documents set title = 'renamed' where id = 2")
    conn.execute("insert into documents (title, content) values ('fresh', 'row')")
    assert {r[0] for r in conn.execute("select message->>'contentFunction' from pgmq.q_embedding_jobs")} == {
        "embedding_input_v2"}
    drain_all(conn, settings)
    assert_all_current(conn, 1536, fn="embedding_input_v2")


def test_rolling_back_a_content_function_change_points_the_triggers_at_the_old_function(supabase_docs, fake_openai,
                                                                                        settings):
    conn = supabase_docs
    conn.execute("""create function embedding_input_v2(doc documents) returns text language sql immutable
                    as $$ select upper(doc.title) || ': ' || doc.content $$""")
    seed(conn, settings, 8)
    p = replace(DOCS, content_function="embedding_input_v2")
    result = run_backfill(conn, p, resolve_spec(conn, p))
    assert mig.trigger_content_functions(conn, "public", "documents", "embedding") == ["embedding_input_v2"]

    back = mig.rollback(conn, result.promotion.migration)

    assert back.status == "backfilling"
    assert mig.trigger_content_functions(conn, "public", "documents", "embedding") == ["embedding_input"]
    fns = {r[0] for r in conn.execute(
        """select encode(t.tgargs, 'escape') from pg_trigger t
           where t.tgrelid = 'documents'::regclass and not t.tgisinternal and t.tgname like 'embed_documents_%'""")}
    assert fns and all("embedding_input\\000" in f and "embedding_input_v2" not in f for f in fns), fns
    conn.execute("update documents set title = 'renamed' where id = 2")
    conn.execute("insert into documents (title, content) values ('fresh', 'row')")
    live_jobs = {r[0] for r in conn.execute(
        "select message->>'contentFunction' from pgmq.q_embedding_jobs where message->>'embeddingColumn' = 'embedding'")}
    assert live_jobs == {"embedding_input"}
    drain_all(conn, settings)
    assert_all_current(conn, 1536, fn="embedding_input")
    assert_all_current(conn, 1536, column="embedding__next", fn="embedding_input_v2")
