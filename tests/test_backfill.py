"""Re-embed backfills through Dagster: the partitioned asset (model × shard), staleness from the
code version, the `backfill` job's fan-out, the `model_migration` job, the CLI. Real Postgres, the
real OpenAI client against the local HTTP fake, Dagster runs executed in process with an instance."""

from __future__ import annotations

import json
from dataclasses import replace

import dagster as dg
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from autoembed_dagster import cli
from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.defs.autoembed import build_defs
from autoembed_dagster.core.targets.models import ModelSpec
from autoembed_dagster.defs.assets import model_partition_key
from autoembed_dagster.defs.backfill import PROMOTE_TAG, models_partitions_name, shards_key

from . import test_chunk_targets
from .dg_project import load_project_defs, make_project
from .test_migration import DOCS, assert_all_current, column_type, seed, stored

A = "openai:text-embedding-3-small:1536:embedding_input"  # what the column holds at first
B = "openai:text-embedding-3-small:512:embedding_input"  # the model change
KA, KB = (model_partition_key(ModelSpec.parse(m)) for m in (A, B))  # their model partitions
DOCS_512 = replace(DOCS, dimensions=512)
QUICK = {"ops": {"drain_queue_embedding_jobs": {"config": {"idle_timeout": 0.0, "time_budget": 60.0}}}}


articles = test_chunk_targets.articles  # the fixture: a table of long articles enrolled as a chunk target
SHARD_NODE = "__".join(shards_key(DOCS).path)  # the op of the re-embed asset


def definitions(p: Pipeline) -> dg.Definitions:
    """What the code location serves for this pipeline declaration: the drain layer plus backfills."""
    return build_defs([p])


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def register_models(defs: dg.Definitions, instance) -> list[str]:
    """One tick of the model-partitions sensor, its requests applied as the daemon would."""
    sensor = defs.resolve_sensor_def("autoembed_model_partitions")
    result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources))
    added = []
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        added.extend(request.partition_keys)
    return added


def run_shard(defs: dg.Definitions, instance, p: Pipeline, partition: str, run_config=None, tags=None):
    job = defs.resolve_job_def(f"reembed_{p.name}")
    return job.execute_in_process(instance=instance, partition_key=partition, run_config=run_config, tags=tags)


def stale_status(defs: dg.Definitions, instance, partition: str) -> StaleStatus:
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(shards_key(DOCS), partition)


def materialization(result):
    mats = result.asset_materializations_for_node(SHARD_NODE)
    return mats[0] if mats else None


def output_metadata(result, node: str) -> dict:
    [event] = [e for e in result.events_for_node(node) if e.event_type_value == "STEP_OUTPUT"]
    return event.event_specific_data.metadata


def check_evaluation(result):
    evals = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(evals) == 1
    return evals[0]


def test_the_code_location_serves_the_backfill_objects(tmp_path, monkeypatch):
    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512, "shards": 4,
                                          "provider": "openai"}})
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)  # no database: no content-function digest
    repo = load_project_defs(tmp_path).get_repository_def()
    assert {"backfill", "model_migration", "reembed_documents", "drain_embedding_jobs"} <= {j.name for j in repo.get_all_jobs()}
    assert "autoembed_model_partitions" in {s.name for s in repo.sensor_defs}
    node = repo.asset_graph.get(shards_key(DOCS))
    assert node.code_version == "openai:text-embedding-3-small:512:embedding_input"
    assert node.partitions_def.partition_dimension_names == ["model", "shard"]
    assert node.partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys() == ["0", "1", "2", "3"]
    assert dg.AssetKey(["postgres", "public", "documents"]) in node.parent_keys


def test_model_change_stales_partitions_and_the_backfill_job_migrates_every_shard(
        supabase_docs, fake_openai, settings, instance):
    conn = supabase_docs
    seed(conn, settings, 40)
    defs_a = definitions(DOCS)
    assert register_models(defs_a, instance) == [KA]
    for shard in "0123":
        result = run_shard(defs_a, instance, DOCS, f"{KA}|{shard}")
        assert result.success
        meta = materialization(result).metadata
        assert meta["mode"].value == "in_place" and meta["rows_embedded"].value == 0  # the drain did it all
        assert check_evaluation(result).passed
    assert stale_status(defs_a, instance, f"{KA}|0") == StaleStatus.FRESH

    # The model changes in code (1536 -> 512 dimensions): every materialized partition is stale.
    defs_b = definitions(DOCS_512)
    assert all(stale_status(defs_b, instance, f"{KA}|{s}") == StaleStatus.STALE for s in "0123")
    assert register_models(defs_b, instance) == [KB]
    assert stale_status(defs_b, instance, f"{KB}|0") == StaleStatus.MISSING

    launched = defs_b.resolve_job_def("backfill").execute_in_process(instance=instance)  # one pipeline: no config needed
    assert launched.success
    launch = output_metadata(launched, "launch_backfill")
    assert launch["mode"].value == "migration" and launch["partitions"].value == 4 and launch["model"].value == B
    [backfill] = instance.get_backfills()
    assert backfill.tags[PROMOTE_TAG] == "true"
    assert set(backfill.asset_backfill_data.target_subset.get_partitions_subset(shards_key(DOCS)).get_partition_keys()) == {
        f"{KB}|{s}" for s in "0123"}
    assert column_type(conn, "embedding__next") == "halfvec(512)"

    # Writes while the shards run: reach both columns through the triggers and the drain lane.
    conn.execute("update documents set content = 'edited while migrating' where id = 7")
    conn.execute("insert into documents (title, content) values ('late', 'inserted while migrating')")
    assert defs_b.resolve_job_def("drain_embedding_jobs").execute_in_process(instance=instance, run_config=QUICK).success
    assert_all_current(conn, 1536)  # search keeps the old model meanwhile

    metas = []
    for shard in "0123":  # what the backfill daemon runs: one run per partition, with the backfill's tags
        result = run_shard(defs_b, instance, DOCS_512, f"{KB}|{shard}", tags=dict(backfill.tags))
        assert result.success and check_evaluation(result).passed
        metas.append(materialization(result).metadata)
    assert [m["promoted"].value for m in metas] == [False, False, False, True]  # the last shard completes it
    assert sum(m["rows_embedded"].value for m in metas) + sum(m["rows_already_current"].value for m in metas) == 41
    assert all(m["mode"].value == "migration" and m["tokens"].value > 0 for m in metas)
    assert all(m["rows_per_second"].value > 0 and m["estimated_cost_usd"].value >= 0 for m in metas)
    assert column_type(conn) == "halfvec(512)"
    assert_all_current(conn, 512)
    assert all(stale_status(defs_b, instance, f"{KB}|{s}") == StaleStatus.FRESH for s in "0123")
    # After the promotion every check is green with the code's model (never a red 0%).
    checks = defs_b.resolve_job_def("health_checks").execute_in_process(instance=instance)
    evaluations = [e.event_specific_data for e in checks.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(evaluations) == 4 and all(e.passed for e in evaluations), evaluations

    # `--all` would also run the retired model's partitions: they are skipped, not re-materialized.
    skipped = run_shard(defs_b, instance, DOCS_512, f"{KA}|1")
    assert skipped.success and materialization(skipped) is None and not check_evaluation(skipped).passed
    assert stale_status(defs_b, instance, f"{KA}|1") == StaleStatus.STALE

    done = defs_b.resolve_job_def("model_migration").execute_in_process(
        instance=instance, run_config={"ops": {"model_migration_action": {"config": {"pipeline": "documents",
                                                                                     "action": "drop_old"}}}})
    assert done.success and column_type(conn, "embedding__old") is None
    assert instance.get_dynamic_partitions(models_partitions_name(DOCS)) == [KB]


def test_a_shard_stopped_after_n_rows_resumes_without_re_embedding(supabase_docs, fake_openai, settings, instance):
    conn = supabase_docs
    seed(conn, settings, 30)
    p = replace(DOCS_512, shards=1)
    defs = definitions(p)
    register_models(defs, instance)
    key = f"{KB}|0"
    fake_openai.reset()
    first = run_shard(defs, instance, p, key, run_config={"ops": {SHARD_NODE: {
        "config": {"max_rows": 10, "batch_rows": 5}}}})
    assert first.success and materialization(first).metadata["rows_embedded"].value == 10
    assert not check_evaluation(first).passed  # 10 of 30: the shard is not complete yet
    first_inputs = {t for r in fake_openai.requests for t in r["inputs"]}
    fake_openai.reset()

    second = run_shard(defs, instance, p, key)

    second_inputs = [t for r in fake_openai.requests for t in r["inputs"]]
    assert len(second_inputs) == 20 and not first_inputs & set(second_inputs)
    meta = materialization(second).metadata
    assert meta["rows_already_current"].value == 10 and meta["promoted"].value is True
    assert_all_current(conn, 512)


def test_backfill_job_migrates_to_the_code_model_and_waits_to_promote(supabase_docs, fake_openai, settings, instance):
    conn = supabase_docs
    seed(conn, settings, 12)
    large_docs = replace(DOCS, shards=2, model="text-embedding-3-large", dimensions=256)
    defs = definitions(large_docs)  # the code names -large:256; the column holds -small:1536
    # The model comes from the code only: run config naming another one is refused by Dagster.
    with pytest.raises(dg.DagsterInvalidConfigError):
        defs.resolve_job_def("backfill").execute_in_process(
            instance=instance, run_config={"ops": {"launch_backfill": {"config": {"model": "text-embedding-3-small"}}}})
    config = {"ops": {"launch_backfill": {"config": {"promote": False}}}}
    assert defs.resolve_job_def("backfill").execute_in_process(instance=instance, run_config=config).success
    large = "openai:text-embedding-3-large:256:embedding_input"
    KL = model_partition_key(ModelSpec.parse(large))
    assert instance.get_dynamic_partitions(models_partitions_name(DOCS)) == [KL]
    [backfill] = instance.get_backfills()
    for shard in "01":
        assert run_shard(defs, instance, large_docs, f"{KL}|{shard}", tags=dict(backfill.tags)).success
    assert column_type(conn) == "halfvec(1536)"  # promote: false

    status = defs.resolve_job_def("model_migration").execute_in_process(instance=instance)
    meta = output_metadata(status, "model_migration_action")
    assert meta["status"].value == "backfilling" and meta["coverage"].value == 1.0 and meta["model"].value == large
    promote = {"ops": {"model_migration_action": {"config": {"pipeline": "documents", "action": "promote"}}}}
    assert defs.resolve_job_def("model_migration").execute_in_process(instance=instance, run_config=promote).success
    assert column_type(conn) == "halfvec(256)"
    assert {r["model"] for r in fake_openai.requests[-2:]} == {"text-embedding-3-large"}
    assert_all_current(conn, 256)
    # The code was reverted to the old model meanwhile: dropping the old vectors must wait.
    reverted = definitions(replace(DOCS, shards=2))
    drop = {"ops": {"model_migration_action": {"config": {"pipeline": "documents", "action": "drop_old"}}}}
    assert not reverted.resolve_job_def("model_migration").execute_in_process(
        instance=instance, run_config=drop, raise_on_error=False).success
    assert column_type(conn, "embedding__old") == "halfvec(1536)"


def test_cli_backfill_and_migrate(supabase_docs, fake_openai, settings, tmp_path, monkeypatch, capsys):
    conn = supabase_docs
    seed(conn, settings, 25)
    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512, "shards": 3}})
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))

    assert cli.main(["backfill", "documents", "--no-promote", "-q"]) == 0
    out = capsys.readouterr().out
    assert "25 embedded" in out and "migration" in out and "coverage of openai:text-embedding-3-small:512 in embedding__next: 100% (25/25)" in out
    assert cli.main(["migrate", "documents", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "backfilling" and status["coverage"] == 1.0
    assert cli.main(["migrate", "documents", "promote"]) == 0
    assert ("promoted: embedding now holds model openai:text-embedding-3-small:1536 -> "
            "openai:text-embedding-3-small:512 (old vectors in embedding__old") in capsys.readouterr().out
    assert_all_current(conn, 512)
    capsys.readouterr()
    assert cli.main(["migrate", "documents", "drop-old"]) == 0
    # The live column holds the new model of the new input: all of it (it read 0.0% (0/25)).
    assert "is finished; coverage 100% (25/25)" in capsys.readouterr().out
    assert cli.main(["backfill", "documents", "-q"]) == 0  # nothing left to do
    assert "0 embedded" in capsys.readouterr().out
    assert stored(conn)[1][0].shape == (512,)


def test_a_paused_or_closed_backfill_launches_nothing_and_a_stopped_shard_run_is_not_a_success(
        supabase_docs, fake_openai, settings, instance, monkeypatch):
    """In Dagster: the `backfill` job refuses a held pipeline before a migration exists; a shard run
    stopped by a pause fails (without retry) with the command that lifts it, and its partition is
    not materialized; after --resume it completes."""
    from autoembed_dagster.core.migrate import backfill_control as bc

    conn = supabase_docs
    seed(conn, settings, 12)
    defs = definitions(replace(DOCS_512, shards=2))
    window = f"{(dg_now_hour() + 2) % 24:02d}:00-{(dg_now_hour() + 3) % 24:02d}:00"
    monkeypatch.setenv("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS", window)
    launch = defs.resolve_job_def("backfill").execute_in_process(instance=instance, raise_on_error=False)
    assert not launch.success
    failure = launch.failure_data_for_node("launch_backfill").error.message
    assert f"waiting for its window (opens {window[:5]} UTC)" in failure and "nothing launched" in failure
    assert conn.execute("select count(*) from autoembed.model_migrations").fetchone()[0] == 0
    assert column_type(conn, "embedding__next") is None
    monkeypatch.delenv("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS")

    register_models(defs, instance)
    bc.pause(conn, "documents")
    stopped = run_shard_unchecked(defs, instance, DOCS_512, f"{KB}|0")
    assert not stopped.success and materialization(stopped) is None
    message = stopped.failure_data_for_node(SHARD_NODE).error.message
    assert "is paused (since" in message and "autoembed backfill documents --resume" in message, message
    assert instance.get_run_by_id(stopped.run_id).tags["dagster/retry_on_asset_or_op_failure"] == "false"
    [observed] = instance.fetch_observations(shards_key(DOCS_512), limit=1).records
    assert observed.partition_key == f"{KB}|0"
    assert observed.asset_observation.metadata["backfill"].value.startswith("paused (since")
    bc.resume(conn, "documents")
    done = run_shard(defs, instance, DOCS_512, f"{KB}|0")
    assert done.success and materialization(done) is not None


def dg_now_hour() -> int:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).hour


def run_shard_unchecked(defs: dg.Definitions, instance, p: Pipeline, partition: str):
    job = defs.resolve_job_def(f"reembed_{p.name}")
    return job.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)


def test_a_shard_run_fails_once_on_a_configuration_error_and_stays_retried_on_an_outage(
        supabase_docs, fake_openai, settings, monkeypatch):
    """Run retries are on (as in dagster_home/dagster.yaml): a rejected key fails the shard run for good
    (it would fail the same on every retry); a provider outage leaves it to the run retry."""
    monkeypatch.setenv("AUTOEMBED_MAX_RETRIES", "0")
    conn = supabase_docs
    seed(conn, settings, 12)
    p = replace(DOCS_512, shards=1)
    defs = definitions(p)
    key = f"{KB}|0"
    with dg.instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 2}}) as instance:
        register_models(defs, instance)
        started = run_shard(defs, instance, p, key, run_config={"ops": {SHARD_NODE: {"config": {"max_rows": 4, "batch_rows": 2}}}})
        assert started.success  # the migration exists; 8 rows are left

        def failed_run(status: int):
            fake_openai.reset()
            fake_openai.fail_next(1000, status)
            job = defs.resolve_job_def(f"reembed_{p.name}")
            result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
            assert not result.success
            return instance.get_run_by_id(result.run_id)

        rejected = failed_run(401)
        assert rejected.tags["dagster/will_retry"] == "false"
        assert rejected.tags["dagster/retry_on_asset_or_op_failure"] == "false"
        outage = failed_run(500)
        assert outage.tags["dagster/will_retry"] == "true"
        assert "dagster/retry_on_asset_or_op_failure" not in outage.tags


def test_a_chunk_shard_stopped_after_n_documents_resumes_where_it_stopped(articles, fake_openai, settings):
    """`max_rows` time-boxes a chunk set's shard run as it does a column's (it was ignored: the first
    run wrote every document of the shard)."""
    from autoembed_dagster.core.migrate.reembed import reembed_of

    from .test_chunk_targets import _doc, _pipeline

    conn = articles
    conn.execute("alter table articles disable trigger user")  # no jobs queued: only the backfill writes
    with conn.cursor() as cur:
        cur.executemany("insert into articles values (%s, %s, %s)", [(i, f"T{i}", _doc(4, i)) for i in range(1, 9)])
    conn.execute("alter table articles enable trigger user")
    r = reembed_of(replace(_pipeline(), shards=1))
    spec = r.configured_spec(conn)

    def documents() -> int:
        return conn.execute("select count(distinct id) from articles_chunks").fetchone()[0]

    first = r.run_shard(conn, spec, 0, promote=True, batch_rows=None, max_rows=3, log=lambda line: None)
    assert first.metadata["documents_written"] == 3 and documents() == 3, first.metadata
    assert not first.check_passed
    fake_openai.reset()
    second = r.run_shard(conn, spec, 0, promote=True, batch_rows=None, max_rows=None, log=lambda line: None)
    assert second.metadata["documents_written"] == 5 and second.metadata["documents_already_current"] == 3
    assert second.check_passed and documents() == 8
