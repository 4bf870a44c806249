"""Chunked pipelines: the vector index of chunk tables (enrolment, shadow, promotion), their model
migration operations (CLI, Python and the Dagster `model_migration` job), pause/resume/window of
their backfill, and `autoembed status --json`. Real Postgres, fake OpenAI over HTTP, real Dagster."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timezone

import dagster as dg
import pytest

from autoembed_dagster import cli
from autoembed_dagster.core import api
from autoembed_dagster.core.migrate import backfill_control as bc
from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
from autoembed_dagster.core.migrate.chunk_migration import chunk_migration, chunk_migration_action
from autoembed_dagster.core.drain import drain, pipeline_resolver
from autoembed_dagster.core.migrate.migration import MigrationError
from autoembed_dagster.defs.autoembed import build_defs

from . import test_chunk_targets
from .test_chunk_targets import _doc, _pipeline, assert_current, chunk_rows

articles = test_chunk_targets.articles  # the fixture: a table of long articles enrolled as a chunk target

NEW = "openai:text-embedding-3-small:512"


def vector_indexes(conn, table: str) -> list[str]:
    """Definitions of the indexes on `table`'s embedding column."""
    return [d for (d,) in conn.execute(
        """select pg_get_indexdef(i.indexrelid) from pg_index i
           join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
           where i.indrelid = to_regclass(%s) and a.attname = 'embedding'""", (table,)).fetchall()]


def search_plan(conn, table: str, vtype: str) -> str:
    """The plan of search_chunks' inner query (the nearest chunks), as the function runs it."""
    with conn.transaction():
        conn.execute("set local enable_seqscan = off")
        query = "[" + ",".join(["0.1"] * int(vtype.split("(")[1].rstrip(")"))) + "]"
        rows = conn.execute(f"explain select c.* from {table} c order by c.embedding <=> %s::{vtype} limit 64",
                            (query,)).fetchall()
    return "\n".join(r[0] for r in rows)


def load(conn, n: int = 4) -> None:
    with conn.cursor() as cur:
        cur.executemany("insert into articles values (%s, %s, %s)", [(i, f"T{i}", _doc(8, 100 + i))
                                                                      for i in range(1, n + 1)])


# -- 1. the vector index ------------------------------------------------------------------------
def test_chunk_tables_get_an_hnsw_index_search_uses_and_the_promotion_keeps(articles, fake_openai, settings):
    conn = articles
    [ix] = vector_indexes(conn, "articles_chunks")
    assert "USING hnsw (embedding halfvec_cosine_ops)" in ix
    load(conn)
    drain(conn, settings)
    assert "Index Scan using articles_chunks_embedding_idx" in search_plan(conn, "articles_chunks", "halfvec(1536)")
    hit = api.search_chunks(chunk_rows(conn, 3)[1][1], table="articles", content_function="article_text",
                            url=conn.info.dsn)[0]
    assert (hit.id, hit.chunk_index) == ("3", 1) and hit.distance < 1e-3
    # A model change: the shadow has its own index at its own size before the promotion...
    p = _pipeline(dimensions=512)
    first = run_chunk_backfill(conn, p, only=[0], promote_when_complete=False)
    assert first.plan.mode == "shadow"
    [shadow_ix] = vector_indexes(conn, "articles_chunks__next")
    assert "USING hnsw (embedding halfvec_cosine_ops)" in shadow_ix
    # ...and after the promotion the live table (the former shadow) keeps it: search still uses an index.
    promotion = run_chunk_backfill(conn, p).promotion  # (migration.PromoteResult, as a column's)
    assert (promotion.live, promotion.old, promotion.already) == ("articles_chunks", "articles_chunks__old", False)
    [live_ix] = vector_indexes(conn, "articles_chunks")
    assert live_ix == shadow_ix.replace("ON public.articles_chunks__next ", "ON public.articles_chunks ")
    assert "Index Scan using articles_chunks__next_embedding_idx" in search_plan(conn, "articles_chunks", "halfvec(512)")
    assert len(vector_indexes(conn, "articles_chunks__old")) == 1  # the rollback's table keeps its own


def test_the_shadow_rebuilds_the_live_tables_own_index_settings(articles, fake_openai, settings):
    conn = articles
    conn.execute("drop index articles_chunks_embedding_idx")
    conn.execute("create index tuned on articles_chunks using hnsw (embedding halfvec_cosine_ops) with (m = 8)")
    load(conn)
    drain(conn, settings)
    assert run_chunk_backfill(conn, _pipeline(dimensions=512)).promotion.old == "articles_chunks__old"
    [ix] = vector_indexes(conn, "articles_chunks")  # the former shadow: the tuned index, not the default
    assert "USING hnsw (embedding halfvec_cosine_ops) WITH (m='8')" in ix
    assert "halfvec(512)" in conn.execute("select format_type(atttypid, atttypmod) from pg_attribute "
                                          "where attrelid = 'articles_chunks'::regclass and attname = 'embedding'"
                                          ).fetchone()[0]


def test_the_index_follows_the_vector_type_and_skips_sizes_past_hnsw(conn):
    conn.execute("create table notes (id int primary key, body text)")
    for name, vtype, dims in (("v3", "vector", 3), ("h3000", "halfvec", 3000), ("v3000", "vector", 3000)):
        conn.execute("select autoembed.create_chunk_table('notes', 'id', %s, %s, %s)", (vtype, dims, name))
    assert "USING hnsw (embedding vector_cosine_ops)" in vector_indexes(conn, "v3")[0]
    assert "USING hnsw (embedding halfvec_cosine_ops)" in vector_indexes(conn, "h3000")[0]
    assert vector_indexes(conn, "v3000") == []  # vector(3000): past HNSW's 2000, search stays exact
    # A chunk table made before tables had one gets it when enrolment checks it again.
    conn.execute("drop index v3_embedding_idx")
    conn.execute("select autoembed.create_chunk_table('notes', 'id', 'vector', 3, 'v3')")
    assert len(vector_indexes(conn, "v3")) == 1


# -- 2. migrations of chunked pipelines ---------------------------------------------------------
def test_promote_rollback_drop_old_and_a_second_model_change(articles, fake_openai, settings):
    conn = articles
    load(conn)
    drain(conn, settings)
    p = _pipeline(dimensions=512)
    assert chunk_migration(conn, p).status == "none"
    run_chunk_backfill(conn, p, only=[0], promote_when_complete=False)
    m = chunk_migration(conn, p)
    assert (m.status, m.shadow.chunk_table, m.model) == ("backfilling", "articles_chunks__next", NEW)
    assert not m.coverage.complete
    # The flow's one coverage check (chunks.promote only swaps): it counts the documents the shadow lacks.
    cov = m.coverage
    with pytest.raises(MigrationError, match=re.escape(
            f"{cov.current} of {cov.embeddable} documents with input hold the {NEW} vectors of their current "
            f"input in articles_chunks__next") + r".*finish the backfill or pass --force"):
        chunk_migration_action(conn, p, "promote")
    assert 0 < cov.current < cov.embeddable
    run_chunk_backfill(conn, p, promote_when_complete=False)
    m = chunk_migration_action(conn, p, "promote")
    assert (m.status, m.old_table, m.coverage.ratio) == ("promoted", "articles_chunks__old", 1.0)
    for i in (1, 2, 3, 4):
        assert_current(conn, i, model=NEW, dims=512)
    # rollback: the old table is live again (registry too), the promoted one the shadow again.
    m = chunk_migration_action(conn, p, "rollback")
    assert (m.status, m.old_table, m.shadow.chunk_table) == ("backfilling", None, "articles_chunks__next")
    assert m.coverage.complete  # the shadow is still whole: promote again at once
    for i in (1, 2, 3, 4):
        assert_current(conn, i)  # the 1536 chunk sets
    assert conn.execute("select chunk_table::regclass::text from autoembed.targets where chunk_table is not null"
                        ).fetchone()[0] == "articles_chunks"
    conn.execute("update articles set body = body || E'\\n\\nWhile rolled back.' where id = 2")
    assert drain(conn, settings, pipeline_resolver([p])).embedded == 1  # the drain follows the shadow again
    assert_current(conn, 2, table="articles_chunks__next", model=NEW, dims=512)
    assert chunk_migration_action(conn, p, "promote").status == "promoted"
    assert_current(conn, 2, model=NEW, dims=512)
    # A second model change while the old table is kept: refused up front, naming the command.
    p256 = _pipeline(dimensions=256)
    with pytest.raises(MigrationError, match="autoembed migrate articles drop-old"):
        run_chunk_backfill(conn, p256)
    assert conn.execute("select to_regclass('articles_chunks__next')").fetchone()[0] is None  # nothing made
    m = chunk_migration_action(conn, p, "drop_old")
    assert (m.status, m.old_table) == ("none", None)
    assert conn.execute("select to_regclass('articles_chunks__old')").fetchone()[0] is None
    with pytest.raises(MigrationError, match="no old chunk table"):
        chunk_migration_action(conn, p, "rollback")
    assert run_chunk_backfill(conn, p256).promotion.old == "articles_chunks__old"  # now it goes through


def test_abort_drops_the_shadow_and_requeues_documents_the_drain_wrote_only_there(articles, fake_openai, settings):
    conn = articles
    load(conn)
    drain(conn, settings)
    p = _pipeline(dimensions=512)
    run_chunk_backfill(conn, p, promote_when_complete=False)
    conn.execute("update articles set body = body || E'\\n\\nDuring the change.' where id = 4")
    drain(conn, settings, pipeline_resolver([p]))  # into the shadow only: the live set of 4 is stale
    m = chunk_migration_action(conn, p, "abort")
    assert m.status == "none" and conn.execute("select to_regclass('articles_chunks__next')").fetchone()[0] is None
    with pytest.raises(MigrationError, match="no model change in progress"):
        chunk_migration_action(conn, p, "abort")
    # Back on the live table's own model (the declaration reverted), the queued job fixes document 4.
    assert drain(conn, settings).embedded == 1
    for i in (1, 2, 3, 4):
        assert_current(conn, i)


def test_the_cli_and_the_dagster_job_act_on_a_chunked_pipelines_migration(articles, db_url, fake_openai, settings,
                                                                           capsys):
    conn = articles
    load(conn)
    drain(conn, settings)
    # Discovered (enrolled in SQL only): the CLI finds the pipeline, nothing in flight.
    assert cli.main(["migrate", "articles", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "none"
    assert cli.main(["migrate", "articles", "promote"]) == 1
    assert "no shadow chunk table articles_chunks__next" in capsys.readouterr().err
    p = _pipeline(dimensions=512)
    run_chunk_backfill(conn, p, only=[0], promote_when_complete=False)
    defs = build_defs([p])
    with dg.instance_for_test() as instance:
        def act(action: str, force: bool = False):
            return defs.resolve_job_def("model_migration").execute_in_process(
                instance=instance, raise_on_error=False, run_config={"ops": {"model_migration_action": {"config": {
                    "pipeline": "articles", "action": action, "force": force}}}})

        status = act("status")
        assert status.success
        [out] = [e for e in status.events_for_node("model_migration_action") if e.event_type_value == "STEP_OUTPUT"]
        meta = out.event_specific_data.metadata
        assert meta["status"].value == "backfilling" and meta["shadow_table"].value == "articles_chunks__next"
        assert 0 < meta["coverage"].value < 1 and meta["missing_documents"].value > 0
        refused = act("promote")
        assert not refused.success and "finish the backfill or pass --force" in str(refused.failure_data_for_node(
            "model_migration_action").error.message)
        assert act("promote", force=True).success
        assert chunk_migration(conn, p).status == "promoted"
        assert act("drop_old").success and chunk_migration(conn, p).old_table is None


# -- 3. pause, resume, window ---------------------------------------------------------------------
def test_a_paused_chunk_backfill_stops_between_pages_and_resumes_where_it_stopped(articles, fake_openai, monkeypatch):
    conn = articles
    conn.execute("alter table articles disable trigger user")  # no jobs: only the backfill fills them
    load(conn, 12)
    conn.execute("alter table articles enable trigger user")
    p = replace(_pipeline(), shards=1)
    pages = []

    def pause_after_two_pages(stats, documents):
        pages.append(documents)
        if len(pages) == 2:
            bc.pause(conn, "articles")

    first = run_chunk_backfill(conn, p, page_documents=3, on_page=pause_after_two_pages)
    assert "paused" in first.total.stopped and "stopped: " in first.total.summary()
    assert first.total.written == 6 and not first.coverage.complete  # two pages of three, then the stop
    bc.resume(conn, "articles")
    later = (datetime.now(timezone.utc).hour + 2) % 24  # a window that is not now: stop at once
    monkeypatch.setenv("AUTOEMBED_BACKFILL_WINDOW_ARTICLES", f"{later:02d}:00-{(later + 1) % 24:02d}:00")
    with pytest.raises(bc.BackfillHeld, match="waiting for its window"):  # refused before it starts
        run_chunk_backfill(conn, p, page_documents=3)
    monkeypatch.delenv("AUTOEMBED_BACKFILL_WINDOW_ARTICLES")
    fake_openai.reset()
    rest = run_chunk_backfill(conn, p, page_documents=3)
    assert rest.total.stopped is None and rest.coverage.complete
    assert (rest.total.current, rest.total.written) == (6, 6)  # nothing embedded twice
    sent = {t for r in fake_openai.requests if r["status"] == 200 for t in r["inputs"]}
    assert sent == {row[1] for i in range(7, 13) for row in chunk_rows(conn, i)}
    for i in range(1, 13):
        assert_current(conn, i)


# -- 4. status --json ------------------------------------------------------------------------------
def test_status_json_lists_queues_chunk_targets_and_dead_letters(articles, db_url, fake_openai, settings, capsys):
    conn = articles
    load(conn)
    drain(conn, settings)
    conn.execute("update articles set body = body || ' edited' where id = 1")  # stale until drained
    assert cli.main(["status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [q["queue_name"] for q in out["queues"]] == ["embedding_jobs"] and out["queues"][0]["depth"] == 1
    [target] = out["chunk_targets"]
    assert target["table"] == "public.articles -> articles_chunks" and target["chunk_table"] == "articles_chunks"
    assert (target["chunk_tokens"], target["chunk_overlap"]) == (64, 8)
    assert (target["embeddable"], target["current"], target["stale"], target["coverage"]) == (4, 3, 1, 0.75)
    assert out["dead_letters"] == []


def test_search_through_the_index_still_finds_k_parents_past_hnsws_candidate_list(conn):
    """HNSW returns at most hnsw.ef_search (40) rows per scan unless it scans iteratively: one
    document whose 100 chunks are all nearer than any other's must not hide the others."""
    conn.execute("create table notes (id int primary key, body text)")
    conn.execute("insert into notes select i, 'n' from generate_series(1, 5) i")
    conn.execute("select autoembed.create_chunk_table('notes', 'id', 'vector', 3)")
    assert vector_indexes(conn, "notes_chunks")
    rows = [(1, i, f"[1,{0.001 * i},0]") for i in range(100)] + [(n, 0, f"[1,{n},0]") for n in (2, 3, 4, 5)]
    with conn.cursor() as cur:
        cur.executemany("insert into notes_chunks values (%s, %s, 'c', %s::vector, '\\x00', '\\x00', 'm', 's')", rows)
    conn.execute("set enable_seqscan = off")  # the plan of a big table: the index serves the nearest chunks
    hits = conn.execute("select parent_key, chunk_index from autoembed.search_chunks('notes_chunks', '[1,0,0]', 3)"
                        ).fetchall()
    assert hits == [("1", 0), ("2", 0), ("3", 0)]
    assert conn.execute("select current_setting('hnsw.iterative_scan', true)").fetchone()[0] in (None, "off")


# -- 5. a chunk-size change keeps its model partition -------------------------------------------------
def test_a_chunk_size_change_rechunks_in_place_under_the_same_model_partition(articles, fake_openai, settings):
    """The sizes are in the code version (partitions go stale) but not in the partition key: a
    size change re-chunks in place, each document's set swapped whole, no shadow needed."""
    from autoembed_dagster.core.targets.splitter import splitter_for

    conn = articles
    load(conn)
    drain(conn, settings)
    before = run_chunk_backfill(conn, _pipeline()).plan.spec.key
    api.enroll("articles", "article_text", chunk_tokens=96, chunk_overlap=8, url=conn.info.dsn)
    result = run_chunk_backfill(conn, replace(_pipeline(), chunk_tokens=96))
    assert (result.plan.mode, result.plan.spec.key) == ("in_place", before)
    assert result.total.written == 4 and result.coverage.complete
    splitter = splitter_for(test_chunk_targets._embedder(), 96, 8)
    for i in range(1, 5):
        text = conn.execute("select article_text(a) from articles a where id = %s", (i,)).fetchone()[0]
        assert [r[1] for r in chunk_rows(conn, i)] == splitter.split(text)


def test_only_the_tables_owner_swaps_its_chunk_tables(articles, fake_openai):
    """swap_chunk_target is SECURITY DEFINER (it writes the registry): a role that may write the
    table but does not own it can neither promote nor roll back its chunk tables."""
    import psycopg

    from .test_least_privilege import acting_as

    conn = articles
    conn.execute("select autoembed.create_chunk_table('articles', 'id', 'halfvec', 512, 'articles_chunks__next')")
    role = f"app_{conn.info.backend_pid}"
    conn.execute(f"create role {role} nologin")
    try:
        conn.execute(f"grant select, insert, update, delete on articles, articles_chunks to {role}")
        with acting_as(conn, role):
            for call in ("select autoembed.promote_chunk_target('articles_chunks', 'articles_chunks__next')",
                         "select autoembed.swap_chunk_target('articles_chunks', 'articles_chunks__next', 'x')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(call)
        assert conn.execute("select to_regclass('articles_chunks__old')").fetchone()[0] is None
        assert conn.execute("select to_regclass('x')").fetchone()[0] is None
    finally:
        conn.execute(f"drop owned by {role} cascade")
        conn.execute(f"drop role {role}")


# -- 3. one flow for both shapes ------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_both_shapes_model_changes_walk_the_same_states_through_the_one_flow(supabase_docs, articles, fake_openai,
                                                                             settings, shape):
    """core.migrate.migration.step is the one state machine of a model change: a shadow column and a
    shadow chunk table go backfilling -> promoted -> (rollback) backfilling -> promoted -> (drop_old)
    none alike, a second promotion is a no-op for both, and each action a state does not allow is
    refused alike, naming the shape's shadow."""
    from autoembed_dagster.core.migrate import migration as mig
    from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
    from autoembed_dagster.core.migrate.chunk_migration import chunk_change

    from .test_migration import DOCS_512, seed

    conn = articles
    if shape == "column":
        seed(conn, settings, 3)
        m = run_backfill(conn, DOCS_512, resolve_spec(conn, DOCS_512), promote_when_complete=False).plan.migration
        change, noun, shadow = (lambda: mig.ColumnChange(m, "documents")), "column", "embedding__next"
    else:
        load(conn)
        drain(conn, settings)
        p = _pipeline(dimensions=512)
        run_chunk_backfill(conn, p, promote_when_complete=False)
        change, noun, shadow = (lambda: chunk_change(conn, p)), "chunk table", "articles_chunks__next"

    def act(action: str) -> str:
        return mig.step(conn, change(), action).state.status

    assert act("status") == "backfilling"
    for action, why in (("rollback", f"no old {noun} to roll back to"), ("drop_old", f"no old {noun} to drop")):
        with pytest.raises(MigrationError, match=why):
            act(action)
    assert act("promote") == "promoted"
    assert mig.step(conn, change(), "promote").already  # idempotent
    with pytest.raises(MigrationError, match=f"no model change in progress to abort \\(no {shadow}\\)"):
        act("abort")
    assert act("rollback") == "backfilling"
    assert act("promote") == "promoted"
    assert act("drop_old") == "none"
    with pytest.raises(MigrationError, match=f"no shadow {noun} {shadow} to promote"):
        act("promote")
    for action in ("rollback", "drop_old", "abort"):
        with pytest.raises(MigrationError):
            act(action)


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_both_shapes_migration_actions_report_the_same_keys(supabase_docs, articles, fake_openai, settings, shape):
    """The `model_migration` job's metadata and `autoembed migrate --json` of either shape carry the
    same keys, meaning the same (core.migrate.reembed.action_result), beside each shape's own."""
    from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
    from autoembed_dagster.core.migrate.reembed import reembed_of

    from .test_migration import DOCS_512, seed

    conn = articles
    if shape == "column":
        seed(conn, settings, 3)
        p, unit, shadow, old = DOCS_512, "rows", "embedding__next", "embedding__old"
        run_backfill(conn, p, resolve_spec(conn, p), promote_when_complete=False)
    else:
        load(conn)
        drain(conn, settings)
        p, unit, shadow, old = _pipeline(dimensions=512), "documents", "articles_chunks__next", "articles_chunks__old"
        run_chunk_backfill(conn, p, promote_when_complete=False)
    with_input = 3 if shape == "column" else conn.execute("select count(*) from articles").fetchone()[0]
    shared = ("status", "model", "unit", "shadow", "old", "coverage", "current", "with_input", "missing")
    for action, status, where, kept in (("status", "backfilling", shadow, ""), ("promote", "promoted", "", old)):
        r = reembed_of(p).migration_action(conn, action, False)
        for got in (r.metadata, r.info):
            assert {k: got[k] for k in shared if k != "model"} == {
                "status": status, "unit": unit, "shadow": where, "old": kept, "coverage": 1.0,
                "current": with_input, "with_input": with_input, "missing": 0}, got
            assert got["model"] and "None" not in str(got["model"])


@pytest.mark.parametrize("shape", ["column", "chunks"])
def test_both_shapes_refuse_to_make_a_shadow_while_the_previous_change_is_kept(supabase_docs, articles, fake_openai,
                                                                              settings, shape):
    """core.migrate.migration.make_shadow is the one 'make' step: with the previous change's vectors
    kept (promoted, not dropped) a new model change is refused alike for both shapes, naming
    drop-old and rollback, and nothing is made."""
    from autoembed_dagster.core.migrate import migration as mig
    from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
    from autoembed_dagster.core.targets.catalog import TargetKey
    from autoembed_dagster.core.targets.models import ModelSpec

    from .test_migration import DOCS_512, seed

    conn = articles
    if shape == "column":
        seed(conn, settings, 3)
        assert run_backfill(conn, DOCS_512, resolve_spec(conn, DOCS_512)).promotion is not None
        label, old, shadow = "public.documents.embedding", "embedding__old", "embedding__next"

        def make():
            # (a column's backfill plan skips a model neither configured nor migrated to: the record's
            # entry point is where its make is refused)
            mig.start_migration(conn, TargetKey("public", "documents", "embedding_input", "embedding"),
                                ModelSpec("openai", "text-embedding-3-small", 256, "embedding_input"),
                                pipeline="documents")
    else:
        load(conn)
        drain(conn, settings)
        assert run_chunk_backfill(conn, _pipeline(dimensions=512)).promotion.old == "articles_chunks__old"
        label, old, shadow = "public.articles -> articles_chunks", "articles_chunks__old", "articles_chunks__next"

        def make():
            run_chunk_backfill(conn, _pipeline(dimensions=256))
    pipeline = "documents" if shape == "column" else "articles"
    with pytest.raises(MigrationError, match=re.escape(
            f"{old} holds the vectors of the previous model change: `autoembed migrate {pipeline} drop-old` first "
            f"(or roll that change back: `autoembed migrate {pipeline} rollback`)")) as refused:
        make()
    assert str(refused.value).startswith(f"{label}: {old} ")
    if shape == "column":  # nothing made: no shadow column, no second record
        assert conn.execute("select count(*) from information_schema.columns where table_name = 'documents' "
                            "and column_name = %s", (shadow,)).fetchone()[0] == 0
        assert conn.execute("select count(*) from autoembed.model_migrations").fetchone()[0] == 1
    else:
        assert conn.execute("select to_regclass(%s)", (shadow,)).fetchone()[0] is None


def test_two_runs_planning_a_chunk_model_change_at_once_make_one_shadow(articles, db_url, fake_openai):
    """Two shard runs plan the same model change at once; both find no shadow yet. The gate (an
    EXCLUSIVE lock on the parent, which making a chunk table's triggers waits for) holds whichever
    gets to make the shadow, until both runs wait; then both go on. Without the change's advisory
    lock around read-then-make, the second makes the same table again (duplicate key in pg_type)."""
    import threading

    import psycopg

    from autoembed_dagster.core.migrate.chunk_backfill import ChunkSetBackfill

    p = _pipeline(dimensions=512)
    plans: dict = {}
    planners = [psycopg.connect(db_url, autocommit=True) for _ in range(2)]
    gate = psycopg.connect(db_url)  # (a transaction holding the lock until rollback)
    try:
        gate.execute("lock table articles in exclusive mode")

        def planned(i: int) -> None:
            try:
                plans[i] = ChunkSetBackfill(p).plan(planners[i])
            except Exception as exc:  # noqa: BLE001 - the test reports it
                plans[i] = exc

        threads = [threading.Thread(target=planned, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        pids = [c.info.backend_pid for c in planners]
        # Wait (on a condition) until both planners wait for a lock (the gate's, or each other's).
        for _ in range(1200):
            waiting = articles.execute("select count(distinct pid) from pg_locks where pid = any(%s) and not granted",
                                       (pids,)).fetchone()[0]
            if waiting == 2 or plans:
                break
            threads[0].join(0.1)
        assert not plans, plans  # neither finished while the parent was locked: both reached the make
    finally:
        gate.rollback()
        gate.close()
    for t in threads:
        t.join(120)
    for c in planners:
        c.close()
    errors = [r for r in plans.values() if isinstance(r, Exception)]
    assert not errors, errors
    assert sorted((r.mode, r.write_to.chunk_table) for r in plans.values()) == [("shadow", "articles_chunks__next")] * 2
    assert [t for (t,) in articles.execute("select relname::text from pg_class where relname like 'articles_chunks%%'"
                                           " and relkind = 'r' order by 1")] == ["articles_chunks",
                                                                                 "articles_chunks__next"]


def test_a_chunk_sets_needs_backfill_plans_without_making_the_shadow(articles, fake_openai, settings):
    """needs_backfill (the stale-pipeline sensor's question) plans the configured model with
    chunk_plan(start=False), as a column's plans with backfill.plan(start=False): it says why and
    makes nothing."""
    from autoembed_dagster.core.migrate.reembed import ChunkSetReembed

    conn = articles
    load(conn)
    drain(conn, settings)
    assert ChunkSetReembed(_pipeline()).needs_backfill(conn) is None
    p = _pipeline(dimensions=512)
    why = ChunkSetReembed(p).needs_backfill(conn)
    assert why.startswith("articles_chunks holds openai:text-embedding-3-small:1536: "), why
    assert "needs a model change" in why, why
    assert conn.execute("select to_regclass('articles_chunks__next')").fetchone()[0] is None
    run_chunk_backfill(conn, p, only=[0], promote_when_complete=False)
    assert "model change in progress: new chunk sets go to articles_chunks__next" in ChunkSetReembed(p).needs_backfill(conn)
