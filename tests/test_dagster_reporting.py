"""Per-table drain numbers (DrainStats.by_table), the drain cut into pieces (core/drain/report.py),
health and queue metrics, and the drain run reporting while it is still running, against real
Postgres and the fake OpenAI server."""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest

from autoembed_dagster.core import health
from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.drain import Drainer, DrainStats, pipeline_resolver
from autoembed_dagster.core.drain.report import run_in_chunks
from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.core.targets.catalog import TargetKey
from autoembed_dagster.defs.assets import embeddings_key
from autoembed_dagster.defs.autoembed import build_defs

DOCS = Pipeline(name="documents", schema="public", table="documents")
NOTES = Pipeline(name="notes", schema="public", table="notes", content_function="notes_input")

NOTES_SQL = """
create table notes (id int primary key, body text, embedding vector(1536));
create function notes_input(n notes) returns text language sql immutable as $$ select n.body $$;
select autoembed.enroll('notes', 'notes_input', 'embedding');
"""


@pytest.fixture
def two_tables(supabase_docs):
    supabase_docs.execute(NOTES_SQL)
    return supabase_docs


def test_per_table_numbers_add_up_to_the_drain_totals(two_tables, fake_openai, settings):
    conn = two_tables
    conn.execute("insert into documents (title, content) select 'd' || i, 'doc ' || i from generate_series(1, 12) i")
    conn.execute("insert into notes select i, 'note ' || i from generate_series(1, 7) i")
    conn.execute("insert into notes values (100, ''), (101, 'poison pill')")  # empty input; dead letter
    conn.execute("select pgmq.send('embedding_jobs', '{\"bad\": true}')")  # malformed message
    fake_openai.poison("poison pill", status=400)
    total = Drainer(conn, settings, pipeline_resolver([DOCS, NOTES])).run()

    assert mismatches(total) == []
    docs = total.by_table[("public", "documents", "embedding")]
    notes = total.by_table[("public", "notes", "embedding")]
    assert (docs.messages, docs.embedded, docs.skipped, docs.dead_lettered) == (12, 12, 0, 0)
    # notes: two statements, two messages (7 rows, 2 rows); documents: Supabase's row triggers.
    assert (notes.messages, notes.rows, notes.embedded, notes.skipped, notes.empty_input,
            notes.dead_lettered) == (2, 9, 7, 1, 1, 1)
    assert docs.rows == 12
    assert docs.tokens > 0 and notes.tokens > 0 and docs.tokens + notes.tokens == total.tokens
    assert docs.embed_calls >= 1 and docs.embed_seconds > 0 and docs.texts == 12
    assert total.by_table[("?", "?", "?")].dead_lettered == 1

    # Re-saving rows costs nothing and is reported as skipped, not embedded.
    conn.execute("update notes set body = body || ' changed' where id <= 2")
    conn.execute("update documents set title = title")  # input unchanged: no job at all
    total = Drainer(conn, settings, pipeline_resolver([DOCS, NOTES])).run()
    assert mismatches(total) == []
    assert total.by_table[("public", "notes", "embedding")].embedded == 2
    assert ("public", "documents", "embedding") not in total.by_table


def mismatches(total: DrainStats) -> list[str]:
    """Where the per-table numbers do not add up to the drain's totals (must be none)."""
    out = []
    for name in ("messages", "rows", "embedded", "unchanged", "deleted_rows", "empty_input", "stale", "retried",
                 "dead_lettered", "tokens", "requests", "truncated"):
        mine = sum(getattr(t, name) for t in total.by_table.values())
        if mine != getattr(total, name):
            out.append(f"{name}: per-table sum {mine} != drain total {getattr(total, name)}")
    return out


def test_per_table_numbers_survive_merging_and_a_pipelined_drain(supabase_docs, fake_openai, monkeypatch):
    conn = supabase_docs
    monkeypatch.setenv("AUTOEMBED_READ_BATCH", "5")  # several batches: the pipelined path
    from autoembed_dagster.core.config import Settings

    conn.execute("insert into documents (title, content) select 'd' || i, 'doc ' || i from generate_series(1, 23) i")
    conn.execute("update documents set content = content || ' again' where id <= 3")  # a second job per row
    total = Drainer(conn, Settings.from_env(), pipeline_resolver([DOCS])).run()
    assert total.batches >= 5 and mismatches(total) == []
    docs = total.by_table[("public", "documents", "embedding")]
    assert docs.messages == 26 and docs.embedded == 23 and docs.embedded + docs.unchanged + docs.stale == 26
    merged = DrainStats()
    merged.add(total)
    merged.add(total)
    assert merged.by_table[("public", "documents", "embedding")].messages == 52 and mismatches(merged) == []


def test_run_in_chunks_yields_while_the_drain_waits_for_more_work(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || i, 'doc ' || i from generate_series(1, 5) i")
    drainer = Drainer(conn, settings, pipeline_resolver([DOCS]))

    def later():
        time.sleep(1.0)
        from autoembed_dagster.core.db.server import connect

        with connect(conn.info.dsn) as other:
            other.execute("insert into documents (title, content) values ('late', 'arrives during the drain')")

    writer = threading.Thread(target=later)
    writer.start()
    started = time.monotonic()
    pieces = list(run_in_chunks(drainer, idle_timeout=2.5, time_budget=30, chunk_seconds=10))
    elapsed = time.monotonic() - started
    writer.join()

    assert sum(p.stats.embedded for p in pieces) == 6
    assert [p.stats.embedded for p in pieces] == [5, 1], "each burst is its own piece, reported at once"
    assert all(p.settled for p in pieces)
    assert 3.0 < elapsed < 10, f"stops {2.5} s after the last job, not at the chunk or budget ({elapsed:.1f} s)"


def test_run_in_chunks_with_no_idle_timeout_stops_when_empty(supabase_docs, fake_openai, settings):
    drainer = Drainer(supabase_docs, settings, pipeline_resolver([DOCS]))
    started = time.monotonic()
    assert [p.stats.messages for p in run_in_chunks(drainer, idle_timeout=0, time_budget=30)] == [0]
    assert time.monotonic() - started < 2


def test_run_in_chunks_reports_a_long_backlog_per_chunk(supabase_docs, fake_openai, settings, monkeypatch):
    conn = supabase_docs
    monkeypatch.setenv("AUTOEMBED_READ_BATCH", "10")
    fake_openai.delay(0.3)  # ~0.3 s per batch of 10
    conn.execute("insert into documents (title, content) select 'd' || i, 'doc ' || i from generate_series(1, 60) i")
    from autoembed_dagster.core.config import Settings

    drainer = Drainer(conn, Settings.from_env(), pipeline_resolver([DOCS]))
    pieces = list(run_in_chunks(drainer, idle_timeout=0, time_budget=60, chunk_seconds=0.5))
    assert sum(p.stats.embedded for p in pieces) == 60
    assert len(pieces) >= 3 and not pieces[0].settled and pieces[-1].settled


def test_drain_run_reports_each_burst_while_it_runs(supabase_docs, fake_openai, db_url):
    conn = supabase_docs
    defs = build_defs([DOCS])
    conn.execute("insert into documents (title, content) select 'd' || i, 'doc ' || i from generate_series(1, 4) i")
    first_reported = threading.Event()

    def later(instance):
        # The second burst comes once the run has reported the first one (however long Dagster
        # took to start), so the two cannot be claimed together. The run waits 5 s idle for it.
        from autoembed_dagster.core.db.server import connect

        end = time.monotonic() + 60
        while time.monotonic() < end:
            if instance.get_latest_materialization_event(embeddings_key(DOCS)) is not None:
                first_reported.set()
                break
            time.sleep(0.05)
        with connect(db_url) as other:
            other.execute("insert into documents (title, content) values ('late', 'second burst')")

    with dg.instance_for_test() as instance:
        writer = threading.Thread(target=later, args=(instance,))
        writer.start()
        config = {"ops": {"drain_queue_embedding_jobs": {"config": {"idle_timeout": 5.0, "report_every": 1.0}}}}
        try:
            result = defs.resolve_job_def("drain_embedding_jobs").execute_in_process(
                instance=instance, run_config=config)
        finally:
            writer.join()
        assert first_reported.is_set(), "the first burst was not reported while the run was alive"
        assert result.success
        mats = [m for m in result.asset_materializations_for_node("drain_queue_embedding_jobs")
                if m.asset_key == embeddings_key(DOCS)]
        assert [m.metadata["rows_embedded"].value for m in mats] == [4, 1]
        # checks ran once for the burst and again at the end
        evals = [e.get_dagster_event().event_specific_data
                 for e in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
        assert len([e for e in evals if e.asset_key == embeddings_key(DOCS)]) == 8
        # the shards the drain keeps current are reported once (the asset's default 8 shards)
        assert len([e for e in evals if e.asset_key.path[0] == "reembed"]) == 8


def test_health_metrics_on_real_data(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'd' || i, 'doc ' || i from generate_series(1, 4) i")
    key = TargetKey("public", "documents", "embedding_input", "embedding")
    target, why = health.resolve_target(conn, key)
    assert why is None
    model = "openai:text-embedding-3-small:1536"
    before = health.target_health(conn, target, model)
    assert (before.rows, before.embeddable, before.current, before.missing, before.coverage) == (4, 4, 0, 4, 0.0)
    Drainer(conn, settings, pipeline_resolver([DOCS])).run()
    after = health.target_health(conn, target, model)
    assert (after.current, after.missing, after.stale, after.coverage) == (4, 0, 0, 1.0)
    assert [i.method for i in health.vector_indexes(conn, target)] == ["hnsw"]
    m = pgmq.metrics(conn, "embedding_jobs")
    assert (m.depth, m.visible) == (0, 0) and m.total_sent >= 4
    assert pgmq.metrics(conn, "no_such_queue") is None
    assert health.resolve_target(conn, TargetKey("public", "nope", "f", "embedding"))[0] is None
    assert health.price_per_million_tokens("local", "all-MiniLM-L6-v2") == 0.0
    assert health.estimated_cost(1_000_000, "openai", "text-embedding-3-small") == pytest.approx(0.02)
