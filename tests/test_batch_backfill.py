"""Re-embeds through the provider's Batch API: real Postgres, the real `openai` client against the
in-suite server's /v1/files and /v1/batches (its clock moves one step per poll, or is held)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from autoembed_dagster import cli
from autoembed_dagster.core.migrate import batch_backfill as bb
from autoembed_dagster.core.migrate.backfill import plan
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import drain
from autoembed_dagster.core.embed.batch_api import BatchUnsupported
from autoembed_dagster.core.migrate.migration import get_migration

from .dg_project import make_project
from .fake_openai import FakeOpenAI
from .test_migration import DOCS, assert_all_current, column_type

DOCS_512 = replace(DOCS, dimensions=512)  # the model change: 1536 -> 512 dimensions


@pytest.fixture
def batch_env(monkeypatch):
    monkeypatch.setenv("AUTOEMBED_BATCH_POLL_SECONDS", "0.01")
    # The poll that completes a batch makes its whole output (up to 1,000 vectors here): on a loaded
    # machine that takes longer than the 5 s the fake_openai fixture gives a request.
    monkeypatch.setenv("AUTOEMBED_REQUEST_TIMEOUT", "120")
    bb._PROBED.clear()


def load(conn, n: int) -> None:
    """n documents whose live vectors are not made yet (their queued jobs are dropped: this is
    about the re-embed, not the drain)."""
    conn.execute("insert into documents (title, content) select 'doc' || i, 'content of doc ' || i "
                 "from generate_series(1, %s) i", (n,))
    conn.execute("delete from pgmq.q_embedding_jobs")


def spec_of(conn, p=DOCS_512):
    return p.spec(column_dimensions=1536)


def input_lines(fake: FakeOpenAI) -> list[list[dict]]:
    """The JSONL files the server received, parsed."""
    return [[json.loads(x) for x in f["data"].splitlines()] for f in fake.files.values()
            if f["object"]["purpose"] == "batch"]


def test_a_backfill_made_only_of_batch_calls(supabase_docs, fake_openai, settings, batch_env, monkeypatch):
    conn = supabase_docs
    monkeypatch.setenv("AUTOEMBED_BATCH_MAX_REQUESTS", "1000")
    load(conn, 2500)
    fake_openai.reset()
    progress = []
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), on_progress=lambda pr: progress.append(
        (pr.submitted, dict(pr.by_status), pr.collected_rows)))
    # One /v1/embeddings call: the migration's probe. Everything else went through batches.
    assert fake_openai.embedding_calls == 1
    assert fake_openai.batch_creations == 3  # 2500 rows at most 1000 per batch
    files = input_lines(fake_openai)
    assert sorted(len(f) for f in files) == [500, 1000, 1000]
    line = files[0][0]
    assert line["url"] == "/v1/embeddings" and line["body"]["dimensions"] == 512
    assert line["custom_id"].startswith("public.documents.embedding__next/")
    assert result.promotion is not None and result.coverage.complete
    assert sum(c.written for c in result.collected) == 2500
    assert column_type(conn) == "halfvec(512)"
    assert_all_current(conn, 512)
    # The record of every batch: provider ids, rows, tokens, times.
    rows = conn.execute("select status, row_count, batch_id is not null, input_file_id is not null, tokens > 0, "
                        "submitted_at is not null, collected_at is not null from autoembed.embedding_batches").fetchall()
    assert len(rows) == 3 and all(r[0] == "collected" and all(r[2:]) for r in rows)
    # Promoted: the per-row records are dropped, the batches' records stay.
    assert conn.execute("select count(*) from autoembed.embedding_batch_rows").fetchone()[0] == 0
    assert progress[-1][2] == 2500 and any(s.get("in_progress") or s.get("validating") for _, s, _ in progress)


def test_rows_edited_during_the_batch_end_current(supabase_docs, fake_openai, settings, batch_env):
    conn = supabase_docs
    load(conn, 300)
    fake_openai.hold_batches()
    first = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), wait=False)
    assert first.submitted.rows == 300 and not first.collected and first.open_batches
    # The application edits rows while the batch runs: the incremental path embeds them directly,
    # into the live column and the shadow column.
    calls = fake_openai.embedding_calls
    conn.execute("update documents set content = content || ' (edited)' where id <= 20")
    drain(conn, settings)
    assert fake_openai.embedding_calls > calls
    fake_openai.advance_batches(2)
    done = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn))
    [c] = done.collected
    assert c.stale == 20 and c.written == 280  # the batch's results for the old inputs were dropped
    assert done.submitted.rows == 0 and fake_openai.batch_creations == 1
    assert done.promotion is not None
    assert_all_current(conn, 512)  # the edited rows hold the vector of their edited content


def test_a_crash_between_submit_and_collect_resumes_without_a_second_submission(
        supabase_docs, fake_openai, settings, batch_env, db_url):
    conn = supabase_docs
    load(conn, 200)
    fake_openai.hold_batches()
    bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), wait=False)
    [record] = bb.batches(conn)
    # The worst moment: the batch was created at the provider but the process died before it
    # recorded the batch's id (the record says `preparing`).
    conn.execute("update autoembed.embedding_batches set status = 'preparing', batch_id = null")
    conn.close()
    fake_openai.advance_batches(2)
    with connect(db_url) as again:  # another process
        result = bb.run_batch_backfill(again, DOCS_512, spec_of(again))
        assert fake_openai.batch_creations == 1 and fake_openai.calls["POST /v1/files"] == 1
        assert result.submitted.rows == 0 and sum(c.written for c in result.collected) == 200
        assert result.promotion is not None
        assert bb.get_batch(again, record.id).batch_id == record.batch_id
        assert_all_current(again, 512)


def test_an_expired_batch_finishes_the_rest_and_bad_rows_are_dead_letters(
        supabase_docs, fake_openai, settings, batch_env):
    conn = supabase_docs
    load(conn, 400)
    conn.execute("update documents set content = 'FORBIDDEN words' where id = 7")
    conn.execute("delete from pgmq.q_embedding_jobs")
    fake_openai.poison("FORBIDDEN", 400, "this input is not allowed")
    fake_openai.expire_next_batch(keep_lines=150)  # 150 results, the other 250 never run
    fake_openai.drop_from_next_batch(5)  # the resubmission loses 5 lines: submitted a third time
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), promote_when_complete=False)
    first, second, third = result.collected
    assert first.status == "expired" and first.resubmit == 250 and first.written + first.dead == 150
    assert second.status == "completed" and second.resubmit == 5
    assert third.written == 5 and fake_openai.batch_creations == 3
    assert fake_openai.embedding_calls == 1  # the probe: the rest was resubmitted, not embedded directly
    dead = conn.execute("select message, error from autoembed.dead_letters").fetchall()
    assert len(dead) == 1 and dead[0][0]["id"] == 7 and dead[0][0]["embeddingColumn"] == "embedding__next"
    assert "this input is not allowed" in dead[0][1]
    assert result.coverage.missing == 1  # the dead letter; everything else current
    # A second run does not offer the dead row again.
    again = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), promote_when_complete=False)
    assert again.submitted.rows == 0 and fake_openai.batch_creations == 3


def test_fallback_direct_embeds_what_a_failed_batch_left(supabase_docs, fake_openai, settings, batch_env):
    conn = supabase_docs
    load(conn, 120)
    fake_openai.fail_next_batch("the input file failed validation")
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), fallback="direct")
    [c] = result.collected
    assert c.status == "failed" and c.direct == 120 and c.resubmit == 0
    assert fake_openai.batch_creations == 1 and fake_openai.embedding_calls > 1
    assert result.promotion is not None
    assert_all_current(conn, 512)


def test_two_collectors_of_one_batch_write_each_row_once(supabase_docs, fake_openai, settings, batch_env, db_url):
    conn = supabase_docs
    load(conn, 500)
    fake_openai.hold_batches()
    bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), wait=False)
    fake_openai.advance_batches(2)
    [record] = bb.batches(conn)
    shard_plan = plan(conn, DOCS_512, spec_of(conn))
    results, barrier = [], threading.Barrier(2)

    def collector():
        with connect(db_url) as c:
            client = bb.batch_client(DOCS_512, spec_of(c))
            barrier.wait()
            results.append(bb.collect(c, DOCS_512, record.id, client))

    threads = [threading.Thread(target=collector) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [r for r in results if r is not None]
    assert len(got) == 1 and got[0].written == 500  # the other found it claimed or collected
    assert shard_plan.mode == "migration"
    states = conn.execute("select count(*), count(distinct row_id) from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                          "where embedding_column = 'embedding__next'").fetchone()
    assert states == (500, 500)


def test_a_provider_without_a_batch_api_is_refused(supabase_docs, settings, batch_env, monkeypatch, tmp_path, capsys):
    conn = supabase_docs
    load(conn, 5)
    local = replace(DOCS, provider="local", dimensions=None)
    with pytest.raises(BatchUnsupported, match="pipeline documents.*--via direct"):
        bb.check_batch_support(local)
    with FakeOpenAI(batch_api=False) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("AUTOEMBED_PROVIDER", "openai")
        with pytest.raises(BatchUnsupported, match="pipeline documents.*404 on /v1/batches.*--via direct"):
            bb.run_batch_backfill(conn, DOCS_512, spec_of(conn))
        assert get_migration(conn, "public", "documents", "embedding") is None  # refused before anything started
        make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512}})
        monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))
        assert cli.main(["backfill", "documents", "--via", "batch", "-q"]) == 2
        err = capsys.readouterr().err
        assert "pipeline documents" in err and "--via direct" in err


def test_cli_via_batch_submits_collects_and_promotes(supabase_docs, fake_openai, settings, batch_env, monkeypatch,
                                                     tmp_path, capsys):
    conn = supabase_docs
    load(conn, 60)
    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512, "shards": 2}})
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))
    fake_openai.reset()
    assert cli.main(["backfill", "documents", "--via", "batch", "-q"]) == 0
    out = capsys.readouterr().out
    assert "through the Batch API" in out and "60 written" in out and "100% (60/60)" in out and "promoted" in out
    assert fake_openai.embedding_calls == 1 and fake_openai.batch_creations == 1
    assert_all_current(conn, 512)
    assert cli.main(["backfill", "documents", "--via", "batch", "-q"]) == 0  # nothing left: no new batch
    assert fake_openai.batch_creations == 1


# -- Dagster ----------------------------------------------------------------------------------------------------
def test_dagster_shard_runs_submit_and_the_sensor_launches_a_collect_run_per_batch(
        supabase_docs, fake_openai, settings, batch_env):
    import dagster as dg

    from autoembed_dagster.defs.autoembed import build_defs
    from autoembed_dagster.defs.backfill import models_partitions_name, reembed_job_name

    conn = supabase_docs
    load(conn, 200)
    p = replace(DOCS_512, backfill_via="batch", shards=2)
    spec = spec_of(conn, p)
    defs = build_defs([p])
    fake_openai.hold_batches()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(models_partitions_name(p), [spec.key])
        submitted = 0
        for shard in ("0", "1"):
            run = defs.resolve_job_def(reembed_job_name(p)).execute_in_process(
                instance=instance, partition_key=f"{spec.key}|{shard}")
            [mat] = run.asset_materializations_for_node(run.dagster_run.step_keys_to_execute[0])
            submitted += mat.metadata["rows_submitted"].value
        assert submitted == 200 and fake_openai.batch_creations == 2  # each shard run returned at once
        assert get_migration(conn, "public", "documents", "embedding").status == "backfilling"

        sensor = defs.resolve_sensor_def("autoembed_batches")
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources))
        assert not tick.run_requests and "validating" in tick.skip_message  # nothing finished: no run
        fake_openai.advance_batches(2)
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources))
        assert len(tick.run_requests) == 2
        job = defs.resolve_job_def("collect_batches")
        metas = []
        for request in tick.run_requests:
            run = job.execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags)
            [out] = [e for e in run.events_for_node("collect_batch") if e.event_type_value == "STEP_OUTPUT"]
            metas.append(out.event_specific_data.metadata)
        assert sum(m["rows_written"].value for m in metas) == 200
        assert all(m["batch_id"].value.startswith("batch-") and m["tokens"].value > 0 for m in metas)
        assert all(m["estimated_cost_usd"].value == m["saving_vs_direct_usd"].value for m in metas)  # half off
        assert [m["promoted"].value for m in metas] == [False, True]
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources))
        assert not tick.run_requests
        # Plotted on the re-embed asset: one observation per collected batch.
        from autoembed_dagster.defs.backfill import shards_key

        observed = instance.fetch_observations(shards_key(p), limit=10).records
        assert len(observed) == 2
        assert all("estimated_cost_usd" in r.asset_observation.metadata for r in observed)
    assert column_type(conn) == "halfvec(512)"
    assert_all_current(conn, 512)
    assert fake_openai.embedding_calls == 1


def test_dg_check_defs_refuses_batch_for_a_provider_without_one(tmp_path, monkeypatch, batch_env):
    from .dg_project import load_project_defs
    from .test_chunk_dagster import chain_text, dg_run

    # (a module name of its own: the project's modules stay imported for the rest of the session)
    make_project(tmp_path, {"documents": {"table": "public.documents", "provider": "local",
                                          "backfill": {"via": "batch"}}}, module="local_batch_project")
    with pytest.raises(Exception) as info:
        load_project_defs(tmp_path, module="local_batch_project")
    assert "pipeline documents: the local provider has no Batch API" in chain_text(info.value)
    assert "--via direct" in chain_text(info.value)
    with FakeOpenAI(batch_api=False) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        other = make_project(tmp_path / "other", {"documents": {"table": "public.documents", "provider": "openai",
                                                                "backfill": {"via": "batch"}}}, module="no_batch_api")
        checked = dg_run(["check", "defs"], other)
        out = checked.stdout + checked.stderr
        assert checked.returncode != 0 and "pipeline documents" in out and "404 on /v1/batches" in out, out
        assert "--via direct" in out and server.calls["GET /v1/batches"] >= 1


def test_requests_are_cut_like_direct_calls_and_files_stay_under_the_byte_limit(
        supabase_docs, fake_openai, settings, batch_env, monkeypatch):
    conn = supabase_docs
    monkeypatch.setenv("AUTOEMBED_MAX_INPUT_TOKENS", "30")
    monkeypatch.setenv("AUTOEMBED_BATCH_MAX_BYTES", "6000")
    load(conn, 60)
    conn.execute("update documents set content = repeat('many words here ', 200) where id = 1")
    conn.execute("delete from pgmq.q_embedding_jobs")
    fake_openai.hold_batches()
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), wait=False)
    files = [f["data"] for f in fake_openai.files.values() if f["object"]["purpose"] == "batch"]
    assert len(files) == len(result.submitted.batches) > 1 and all(len(f) <= 6000 for f in files)
    assert sum(len(f.splitlines()) for f in files) == 60
    [long_line] = [json.loads(x) for f in files for x in f.splitlines() if json.loads(x)["custom_id"].endswith("/1")]
    # The direct path's cut of the same text, sent to /v1/embeddings by the same embedder:
    client = bb.batch_client(DOCS_512, spec_of(conn))
    text = conn.execute("select embedding_input(d) from documents d where id = 1").fetchone()[0]
    client.embedder.embed([text])
    assert long_line["body"]["input"] == fake_openai.requests[-1]["inputs"]
    assert client.embedder.count_tokens(long_line["body"]["input"][0]) <= 30 < client.embedder.count_tokens(text)
    assert result.submitted.truncated == 1


def test_ctrl_c_leaves_the_batches_running_and_the_same_command_collects_them(
        supabase_docs, fake_openai, settings, batch_env, monkeypatch, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    conn = supabase_docs
    load(conn, 80)
    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512,
                                          "backfill": {"via": "batch"}}}, module="ctrl_c_project")  # declared: batch
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))
    fake_openai.hold_batches()
    proc = subprocess.Popen([sys.executable, "-m", "autoembed_dagster.cli", "backfill", "documents", "-q"],
                            env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not conn.execute("select 1 from autoembed.embedding_batches where batch_id is not null").fetchone():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "left running at the provider" in err and "--via batch" in err
    [batch] = fake_openai.batches.values()
    assert batch["object"]["status"] == "validating"  # not cancelled
    assert fake_openai.calls["POST /v1/batches/{id}/cancel"] == 0
    fake_openai.hold_batches(False)
    assert cli.main(["backfill", "documents", "-q"]) == 0
    assert "80 written" in capsys.readouterr().out and fake_openai.batch_creations == 1
    assert_all_current(conn, 512)


def test_a_declared_batch_pipeline_loads_with_the_collect_job_and_sensor(tmp_path, fake_openai, batch_env,
                                                                          monkeypatch):
    from .dg_project import load_project_defs

    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)
    make_project(tmp_path, {"documents": {"table": "public.documents", "provider": "openai",
                                          "backfill": {"via": "batch", "fallback": "direct"}}}, module="batch_project")
    defs = load_project_defs(tmp_path, module="batch_project")
    assert defs.resolve_sensor_def("autoembed_batches") and defs.resolve_job_def("collect_batches")
    assert fake_openai.calls["GET /v1/batches"] == 1  # the probe at load


def test_resubmission_is_bounded_then_the_rows_are_dead_letters(supabase_docs, fake_openai, settings, batch_env):
    conn = supabase_docs
    load(conn, 10)
    fake_openai.expire_next_batch(keep_lines=0)
    fake_openai.expire_next_batch(keep_lines=0)
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), max_attempts=2)
    assert [c.status for c in result.collected] == ["expired", "expired"]
    assert fake_openai.batch_creations == 2 and result.submitted.dead == 10
    errors = [e for (e,) in conn.execute("select error from autoembed.dead_letters")]
    assert len(errors) == 10 and all("gave up after 2 batch(es)" in e and "expired" in e for e in errors)
    assert result.promotion is None and result.coverage.missing == 10


def test_a_cancelled_batch_is_submitted_again_and_chunked_pipelines_are_refused(
        supabase_docs, fake_openai, settings, batch_env):
    from autoembed_dagster.core.pipelines import make_pipeline

    conn = supabase_docs
    load(conn, 10)
    fake_openai.hold_batches()
    bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), wait=False)
    [record] = bb.batches(conn)
    bb.batch_client(DOCS_512, spec_of(conn)).cancel(record.batch_id)  # e.g. from the provider's dashboard
    fake_openai.hold_batches(False)
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn))
    assert [(c.status, c.resubmit) for c in result.collected] == [("cancelled", 10), ("completed", 0)]
    assert result.promotion is not None and fake_openai.batch_creations == 2
    chunked = make_pipeline("articles", table="articles", chunk_tokens=200)
    with pytest.raises(BatchUnsupported, match="pipeline articles is chunked.*--via direct"):
        bb.run_batch_backfill(conn, chunked, spec_of(conn))


def test_a_batch_submitted_without_promotion_is_collected_without_promoting(
        supabase_docs, fake_openai, settings, batch_env):
    conn = supabase_docs
    load(conn, 10)
    p = replace(DOCS_512, backfill_via="batch", shards=1)
    fake_openai.hold_batches()
    shard_plan, sub = bb.submit_shard(conn, p, spec_of(conn, p), 0, 1, promote_when_complete=False)
    fake_openai.advance_batches(2)
    done = bb.collect_and_continue(conn, p, sub.batches[0])
    assert done.stats.written == 10 and done.coverage.complete and done.promotion is None
    assert get_migration(conn, "public", "documents", "embedding").status == "backfilling"


def test_a_key_matching_several_rows_is_a_dead_letter_not_a_write(supabase_docs, fake_openai, settings, batch_env):
    conn = supabase_docs
    load(conn, 20)
    fake_openai.hold_batches()
    bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), wait=False)
    # While the batch runs, the key stops being unique and a second row takes key 5.
    conn.execute("alter table documents drop constraint documents_pkey")
    conn.execute("alter table documents alter column id drop identity")
    conn.execute("insert into documents (id, title, content) select id, title, content from documents where id = 5")
    conn.execute("delete from pgmq.q_embedding_jobs")
    fake_openai.advance_batches(2)
    result = bb.run_batch_backfill(conn, DOCS_512, spec_of(conn), promote_when_complete=False)
    [c] = result.collected
    assert c.dead == 1 and c.written == 19
    [(error,)] = conn.execute("select error from autoembed.dead_letters").fetchall()
    assert "matches 2 rows" in error
    assert conn.execute("select count(*) from documents where id = 5 and embedding__next is not null").fetchone()[0] == 0
