"""A drain that spans a model-migration promotion: the Drainer resolved its targets (column name,
vector type, size) before the promotion renamed and resized the column. It must notice, resolve
again and retry the batch, losing nothing and writing no vector of the old model into the new
column. Real Postgres, the real OpenAI client against the local HTTP fake."""

from __future__ import annotations

import pytest

from autoembed_dagster.core.migrate import migration as mig
from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer, default_resolver

from .test_migration import DOCS_512, assert_all_current, column_type, queue_depth, seed

DOCS_TABLE = ("public", "documents", "embedding")


def dead_letters(conn) -> list[str]:
    return [r[0] for r in conn.execute("select error from autoembed.dead_letters")]


@pytest.mark.parametrize("migrations", [True, False], ids=["migration-aware", "plain-resolver"])
def test_a_drainer_created_before_a_promotion_drains_after_it(supabase_docs, fake_openai, settings, migrations):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) select 'doc' || i, 'content ' || i from generate_series(1, 10) i")
    drainer = Drainer(conn, settings, default_resolver(migrations=migrations))
    assert drainer.run().embedded == 10  # the drainer now holds documents.embedding as halfvec(1536)

    result = run_backfill(conn, DOCS_512, resolve_spec(conn, DOCS_512))
    assert result.promotion is not None and column_type(conn) == "halfvec(512)"

    conn.execute("update documents set content = 'rewritten after the promotion' where id in (3, 4)")
    conn.execute("insert into documents (title, content) values ('new', 'after the promotion')")
    total = drainer.run()

    assert (total.embedded, total.dead_lettered, total.retried) == (3, 0, 0), total.summary()
    assert total.by_table[DOCS_TABLE].embedded == 3
    assert queue_depth(conn) == 0 and dead_letters(conn) == []
    assert_all_current(conn, 512)
    assert {r[0] for r in conn.execute("select model from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id where embedding_column = 'embedding'")} \
        == {"openai:text-embedding-3-small:512"}


class PromotesDuringEmbed:
    """The real embedder; the first call promotes the migration (on a connection of its own) once
    the provider has answered: a promotion landing between a batch's embedding and its write."""

    promoted = False

    def __init__(self, inner, promote):
        self.inner, self.promote = inner, promote
        self.identity = inner.identity

    def embed(self, texts):
        out = self.inner.embed(texts)
        if not PromotesDuringEmbed.promoted:
            PromotesDuringEmbed.promoted = True
            self.promote()
        return out


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "serial"])
def test_a_promotion_between_embedding_and_write_retries_the_batch(supabase_docs, fake_openai, settings, db_url,
                                                                   monkeypatch, pipeline):
    conn = supabase_docs
    seed(conn, settings, 10)
    # Jobs for the live column, queued before the migration: the drain embeds them with the old model.
    conn.execute("update documents set content = 'edited' || id where id in (2, 5)")
    conn.execute("insert into documents (title, content) select 'late' || i, 'late ' || i from generate_series(1, 3) i")
    spec = resolve_spec(conn, DOCS_512)
    backfill = run_backfill(conn, DOCS_512, spec, promote_when_complete=False)  # covers the edits too
    assert backfill.coverage.complete and column_type(conn, "embedding__next") == "halfvec(512)"

    def promote():
        with connect(db_url) as other:
            assert mig.promote(other, backfill.plan.migration).coverage.complete

    base = default_resolver()
    monkeypatch.setattr(PromotesDuringEmbed, "promoted", False)
    drainer = Drainer(conn, settings, lambda target: PromotesDuringEmbed(base(target), promote), pipeline=pipeline)
    before = fake_openai.request_count
    total = drainer.run()

    assert PromotesDuringEmbed.promoted and column_type(conn) == "halfvec(512)"
    # The old-model vectors were not written: the retried batch found the new column current.
    assert (total.embedded, total.unchanged, total.dead_lettered, total.retried) == (0, 5, 0, 0), total.summary()
    assert total.requests == fake_openai.request_count - before >= 1  # the first attempt's call is counted
    assert total.by_table[DOCS_TABLE].tokens == total.tokens > 0
    assert queue_depth(conn) == 0 and dead_letters(conn) == []
    assert_all_current(conn, 512)

    # The same Drainer goes on embedding new work with the new model.
    conn.execute("update documents set content = 'after' where id = 7")
    assert drainer.run().embedded == 1
    assert_all_current(conn, 512)


def test_jobs_of_the_shadow_column_purged_by_the_promotion_are_not_dead_lettered(supabase_docs, fake_openai,
                                                                                  settings, db_url, monkeypatch):
    conn = supabase_docs
    seed(conn, settings, 8)
    spec = resolve_spec(conn, DOCS_512)
    backfill = run_backfill(conn, DOCS_512, spec, promote_when_complete=False)
    # An edit during the migration queues a job for each column; the drain claims both, then the
    # promotion (forced: the shadow vector of the edited row is not there yet) purges the shadow
    # column's job, renames the columns and leaves the live column's job to the drain.
    conn.execute("update documents set content = 'edited during the migration' where id = 6")
    assert {r[0] for r in conn.execute("select message->>'embeddingColumn' from pgmq.q_embedding_jobs")} == {
        "embedding", "embedding__next"}

    def promote():
        with connect(db_url) as other:
            mig.promote(other, backfill.plan.migration, force=True)

    base = default_resolver()
    monkeypatch.setattr(PromotesDuringEmbed, "promoted", False)
    drainer = Drainer(conn, settings, lambda target: PromotesDuringEmbed(base(target), promote), pipeline=False)
    total = drainer.run()

    assert PromotesDuringEmbed.promoted and column_type(conn) == "halfvec(512)"
    assert (total.embedded, total.dead_lettered) == (1, 0), total.summary()
    assert queue_depth(conn) == 0 and dead_letters(conn) == []
    assert_all_current(conn, 512)
