"""The Dagster layer against real Postgres and a real Dagster instance: the queue sensor, the drain
job (executed in process with an instance), and the asset checks on real data."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster import DagsterEvent, DagsterEventType, DagsterRunStatus
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test

from autoembed_dagster.core.pipelines import Pipeline
from autoembed_dagster.defs.assets import CONFIG_ERROR_TAG, LANE_TAG, embeddings_key, index_key, queue_key
from autoembed_dagster.defs.autoembed import build_defs
from autoembed_dagster.defs.resources import AutoembedResource

from .dg_project import load_project_defs, make_project
from .test_incremental import queue_depth

ROOT = Path(__file__).resolve().parents[1]
DOCS = Pipeline(name="documents", schema="public", table="documents")
QUICK = {"ops": {"drain_queue_embedding_jobs": {"config": {"idle_timeout": 0.0, "time_budget": 60.0}}}}


@pytest.fixture
def defs(db_url):
    return build_defs([DOCS])


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def tick(defs, instance, cursor=None):
    sensor = defs.resolve_sensor_def("embedding_jobs_sensor")
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources)
    return sensor.evaluate_tick(ctx)


def make_run(instance, status, job_name="drain_embedding_jobs", lane="embedding_jobs"):
    """A run record of the lane in `status`, as the daemon would leave it."""
    origin = RemoteJobOrigin(
        repository_origin=RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("autoembed"), "__repository__"),
        job_name=job_name,
    )
    run = create_run_for_test(instance, job_name=job_name, tags={LANE_TAG: lane}, remote_job_origin=origin)
    event_type = {
        DagsterRunStatus.QUEUED: DagsterEventType.RUN_ENQUEUED,
        DagsterRunStatus.STARTING: DagsterEventType.RUN_STARTING,
        DagsterRunStatus.STARTED: DagsterEventType.RUN_START,
        DagsterRunStatus.SUCCESS: DagsterEventType.RUN_SUCCESS,
    }.get(status)
    if event_type is not None:
        instance.run_storage.handle_run_event(run.run_id, DagsterEvent(event_type.value, job_name=job_name))
    assert instance.get_run_by_id(run.run_id).status == status
    return run


def insert_docs(conn, n, prefix="doc"):
    conn.execute(
        "insert into documents (title, content) select %s || i, 'content of ' || %s || i from generate_series(1, %s) i",
        (prefix, prefix, n),
    )


def run_drain(defs, instance, run_config=QUICK, raise_on_error=True):
    job = defs.resolve_job_def("drain_embedding_jobs")
    return job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=raise_on_error)


def check_results(instance, run_id):
    evals = [e.get_dagster_event().event_specific_data
             for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
    # the pipelines' own four checks (a drain also reports the re-embed shards it keeps current)
    return {e.check_name: e for e in evals if e.asset_key.path[0] != "reembed"}


# -- definitions -----------------------------------------------------------------------------------
def test_definitions_load_from_a_projects_components(tmp_path, monkeypatch):
    make_project(tmp_path, {"documents": {"table": "public.documents"},
                            "notes": {"table": "notes", "queue": "notes_q", "provider": "local"}})
    monkeypatch.delenv("AUTOEMBED_DATABASE_URL", raising=False)  # loads without touching a database
    repo = load_project_defs(tmp_path).get_repository_def()
    jobs = {j.name for j in repo.get_all_jobs()}
    assert {"drain_embedding_jobs", "drain_notes_q", "health_checks", "backfill", "model_migration",
            "reembed_documents", "reembed_notes"} <= jobs
    assert {"embedding_jobs_sensor", "notes_q_sensor"} <= {s.name for s in repo.sensor_defs}
    for name in ("embedding_jobs_sensor", "notes_q_sensor"):
        sensor = repo.get_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        assert sensor.minimum_interval_seconds <= 10
    graph = repo.asset_graph
    # lineage: source table + queue -> embeddings -> vector index
    assert graph.get(embeddings_key(DOCS)).parent_keys == {dg.AssetKey(["postgres", "public", "documents"]),
                                                          queue_key("embedding_jobs")}
    assert graph.get(index_key(DOCS)).parent_keys == {embeddings_key(DOCS)}
    assert {k.name for k in graph.asset_check_keys if k.asset_key == embeddings_key(DOCS)} == {
        "coverage", "staleness", "dead_letters", "dimensions"}
    assert repo.get_job("drain_notes_q").tags[LANE_TAG] == "notes_q"
    # every node of the lineage has its own name (the UI shows the last part alone)
    names = [k.path[-1] for k in graph.get_all_asset_keys()]
    assert len(names) == len(set(names)), sorted(names)


def test_dagster_yaml_is_valid_postgres_config(monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://postgres@/dagster?host=/tmp")
    config, _ = dagster_instance_config(str(ROOT / "dagster_home"))
    assert config["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_POSTGRES_URL"}
    # Drains per queue are capped by the drain op's pool (tests/test_scaling.py), not a lane tag.
    assert config["concurrency"]["pools"] == {"granularity": "run", "default_limit": 2}
    assert config["run_retries"]["enabled"] is True


# -- sensor ----------------------------------------------------------------------------------------
def test_sensor_requests_nothing_when_the_queue_is_empty(supabase_docs, defs, instance):
    result = tick(defs, instance)
    assert not result.run_requests
    assert "no claimable job" in result.skip_message
    # the queue is still observed, so the UI plots its depth
    obs = [e for e in result.asset_events if isinstance(e, dg.AssetObservation)]
    assert obs and obs[0].asset_key == queue_key("embedding_jobs")
    assert obs[0].metadata["depth"].value == 0


def test_sensor_requests_one_drain_when_work_waits_and_none_while_one_is_active(supabase_docs, defs, instance):
    insert_docs(supabase_docs, 3)
    first = tick(defs, instance)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert request.tags[LANE_TAG] == "embedding_jobs"
    obs = [e for e in first.asset_events if isinstance(e, dg.AssetObservation)]
    assert obs[0].metadata["depth"].value == 3 and obs[0].metadata["claimable"].value == 3
    assert obs[0].metadata["rows"].value == 3
    cursor = json.loads(first.cursor)
    assert cursor["tick"] == 1

    # Nothing runs the requested run here: a new tick asks again, with another run key.
    second = tick(defs, instance, cursor=first.cursor)
    assert len(second.run_requests) == 1
    assert second.run_requests[0].run_key != request.run_key
    assert not second.asset_events, "unchanged numbers are not observed again within a minute"

    for status in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
                   DagsterRunStatus.STARTED):
        run = make_run(instance, status)
        blocked = tick(defs, instance, cursor=second.cursor)
        assert not blocked.run_requests, status
        assert "is " + status.value in blocked.skip_message
        instance.delete_run(run.run_id)

    # A finished drain does not block; a drain of another lane does not block either.
    make_run(instance, DagsterRunStatus.SUCCESS)
    make_run(instance, DagsterRunStatus.STARTED, job_name="drain_other", lane="other")
    assert len(tick(defs, instance, cursor=second.cursor).run_requests) == 1


def test_an_idle_sensor_listens_and_requests_a_drain_the_moment_a_row_is_written(supabase_docs, defs, instance,
                                                                                 monkeypatch, db_url):
    """No drain alive, empty queue: the tick waits on LISTEN and requests the drain as soon as a
    send is notified, not at the daemon's next sensor loop. The wait is long here (60 s): a tick
    that returns a run request was woken by the write (after its timeout it would skip)."""
    monkeypatch.setenv("AUTOEMBED_SENSOR_WAIT", "60")
    from autoembed_dagster.core.db.server import connect

    def listening() -> bool:  # the tick's session listens and has read the (empty) queue
        return supabase_docs.execute(
            "select exists (select 1 from pg_stat_activity where datname = current_database() and state = 'idle' "
            "and pid <> pg_backend_pid() and query like '%%pgmq.metrics%%')").fetchone()[0]

    ticked = threading.Event()

    def write():
        while not listening():
            if ticked.is_set():
                return  # the tick did not wait
            time.sleep(0.05)
        with connect(db_url) as other:
            insert_docs(other, 1)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = tick(defs, instance)
    finally:
        ticked.set()
        writer.join()
    assert len(result.run_requests) == 1, result.skip_message
    obs = [e for e in result.asset_events if isinstance(e, dg.AssetObservation)]
    assert obs[0].metadata["claimable"].value == 1


def test_a_sensor_does_not_wait_while_a_drain_of_its_lane_is_alive(supabase_docs, defs, instance, monkeypatch):
    """A live drain run listens itself: the tick returns at once, and requests no second run
    when a write lands."""
    monkeypatch.setenv("AUTOEMBED_SENSOR_WAIT", "60")
    make_run(instance, DagsterRunStatus.STARTED)
    assert "no claimable job" in tick(defs, instance).skip_message  # would have waited 60 s
    insert_docs(supabase_docs, 2)
    result = tick(defs, instance)
    assert not result.run_requests and "is STARTED" in result.skip_message


def test_sensor_ignores_jobs_that_are_not_claimable_yet(supabase_docs, defs, instance):
    insert_docs(supabase_docs, 2)
    supabase_docs.execute("select pgmq.set_vt('embedding_jobs', msg_id, 300) from pgmq.q_embedding_jobs")
    result = tick(defs, instance)
    assert not result.run_requests
    assert result.asset_events[0].metadata["in_flight_or_retrying"].value == 2


# -- drain job -------------------------------------------------------------------------------------
def test_drain_job_embeds_rows_and_reports_per_pipeline(supabase_docs, fake_openai, defs, instance):
    conn = supabase_docs
    insert_docs(conn, 25)
    result = run_drain(defs, instance)
    assert result.success

    assert conn.execute("select count(*) from documents where embedding is not null").fetchone()[0] == 25
    assert conn.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0] == 0

    mats = result.asset_materializations_for_node("drain_queue_embedding_jobs")
    by_key = {m.asset_key: m for m in mats}
    meta = by_key[embeddings_key(DOCS)].metadata
    assert meta["rows_embedded"].value == 25
    assert meta["rows_dead_lettered"].value == 0 and meta["rows_skipped"].value == 0
    assert meta["tokens"].value > 0
    assert meta["estimated_cost_usd"].value == pytest.approx(meta["tokens"].value * 0.02 / 1e6)
    assert meta["rows_per_second"].value > 0
    assert meta["embed_latency_ms_per_batch"].value > 0
    assert meta["model"].value == "openai:text-embedding-3-small:1536"
    assert "hnsw" in by_key[index_key(DOCS)].metadata["indexes"].value

    checks = check_results(instance, result.run_id)
    assert set(checks) == {"coverage", "staleness", "dead_letters", "dimensions"}
    assert all(c.passed for c in checks.values()), checks

    # materializations and check results are stored on the instance, for the UI
    assert instance.get_latest_materialization_event(embeddings_key(DOCS)) is not None
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(embeddings_key(DOCS), "coverage"), limit=1)
    assert history and history[0].run_id == result.run_id

    # A re-save changes nothing: nothing enqueued, nothing re-embedded.
    conn.execute("update documents set title = title")
    again = run_drain(defs, instance)
    assert again.success
    assert not again.asset_materializations_for_node("drain_queue_embedding_jobs")


def test_drain_job_drains_sql_enrolled_tables_with_the_default_model(supabase_docs, fake_openai, db_url, instance):
    defs = build_defs([])  # no declared pipeline: Supabase's triggers alone
    insert_docs(supabase_docs, 4)
    result = run_drain(defs, instance)
    assert result.success
    assert supabase_docs.execute("select count(*) from documents where embedding is not null").fetchone()[0] == 4
    output = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_OUTPUT][0]
    meta = output.event_specific_data.metadata
    assert meta["rows_embedded"].value == 4
    assert "(SQL-enrolled)" in meta["tables"].value


def test_drain_job_reports_dead_letters_and_failing_checks(supabase_docs, fake_openai, defs, instance):
    conn = supabase_docs
    insert_docs(conn, 3)
    conn.execute("insert into documents (title, content) values ('bad', 'poison pill')")
    fake_openai.poison("poison pill", status=400)
    result = run_drain(defs, instance)
    assert result.success
    meta = {m.asset_key: m for m in result.asset_materializations_for_node("drain_queue_embedding_jobs")}[
        embeddings_key(DOCS)].metadata
    assert meta["rows_embedded"].value == 3
    assert meta["rows_dead_lettered"].value == 1
    checks = check_results(instance, result.run_id)
    assert not checks["dead_letters"].passed and checks["dead_letters"].metadata["dead_letters"].value == 1
    assert not checks["coverage"].passed
    assert checks["coverage"].metadata["coverage"].value == pytest.approx(0.75)
    assert checks["staleness"].passed and checks["dimensions"].passed


# -- checks on real data ---------------------------------------------------------------------------
def run_checks(defs, instance):
    job = defs.resolve_job_def("health_checks")
    result = job.execute_in_process(instance=instance)
    assert result.success
    return check_results(instance, result.run_id)


def test_checks_detect_stale_vectors_and_a_model_change(supabase_docs, fake_openai, defs, instance, monkeypatch):
    conn = supabase_docs
    insert_docs(conn, 5)
    assert run_drain(defs, instance).success
    checks = run_checks(defs, instance)
    assert all(c.passed for c in checks.values()), checks

    # A vector written behind the drain's back (no trigger fires when only the vector changes):
    # the stored hash no longer matches the row's input.
    conn.execute("alter table documents disable trigger user")
    conn.execute("update documents set content = 'changed behind our back' where id = 1")
    conn.execute("alter table documents enable trigger user")
    checks = run_checks(defs, instance)
    assert not checks["staleness"].passed
    assert checks["staleness"].metadata["stale_rows"].value == 1
    assert checks["coverage"].metadata["current_rows"].value == 4

    # Another model for the pipeline: every stored vector is stale for it.
    monkeypatch.setenv("AUTOEMBED_MODEL", "text-embedding-3-large")
    checks = run_checks(defs, instance)
    assert checks["staleness"].metadata["stale_rows"].value == 5
    assert checks["coverage"].metadata["coverage"].value == 0.0


def test_dimension_check_fails_when_the_column_does_not_fit_the_model(conn, db_url, instance, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_PROVIDER", "local")
    conn.execute("create table notes (id int primary key, body text, embedding vector(768))")
    conn.execute("create function embedding_input(n notes) returns text language sql immutable as $$ select n.body $$")
    conn.execute("insert into notes values (1, 'hello')")
    defs = build_defs([Pipeline(name="notes", schema="public", table="notes", provider="local")])
    checks = run_checks(defs, instance)
    assert not checks["dimensions"].passed
    assert "384" in checks["dimensions"].description and "768" in checks["dimensions"].description
    assert checks["coverage"].metadata["missing_rows"].value == 1


def test_checks_fail_clearly_when_the_table_is_missing(db_url, instance):
    defs = build_defs([Pipeline(name="ghost", schema="public", table="ghost")])
    checks = run_checks(defs, instance)
    assert not any(c.passed for c in checks.values())
    assert "does not exist" in checks["coverage"].description


def test_resource_reads_the_url_through_envvar(db_url):
    defs = build_defs([])
    resource = defs.resources["autoembed"]
    assert isinstance(resource, AutoembedResource)
    # the URL is an EnvVar reference, not a value baked into the definitions / UI
    assert "AUTOEMBED_DATABASE_URL" in repr(resource.database_url)


def test_a_rejected_key_fails_the_drain_run_once_and_the_sensor_holds_back(supabase_docs, fake_openai, defs,
                                                                          instance):
    """A 401 is a configuration error: the drain run fails with the reason (no run retry), the jobs
    stay queued, and the queue sensor does not start drain after drain that would fail alike."""
    insert_docs(supabase_docs, 3)
    fake_openai.fail_next(50, status=401)

    result = run_drain(defs, instance, raise_on_error=False)

    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    assert run.tags[CONFIG_ERROR_TAG] == "true" and run.tags["dagster/retry_on_asset_or_op_failure"] == "false"
    failure = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE][0]
    assert "check OPENAI_API_KEY" in failure.step_failure_data.error.message
    assert queue_depth(supabase_docs) == 3
    held = tick(defs, instance)
    assert not held.run_requests and "failed on the provider's configuration" in held.skip_message
    # Once a drain of the lane succeeded again (the configuration was fixed), drains start as usual.
    fake_openai.reset()
    assert run_drain(defs, instance).success
    insert_docs(supabase_docs, 1, prefix="later")
    assert len(tick(defs, instance).run_requests) == 1


def test_the_queue_asset_plots_rows_as_well_as_messages(conn, defs, instance):
    conn.execute("""
        create table notes (id bigint primary key, body text, embedding vector(8));
        create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
        select autoembed.enroll('notes', 'note_input', 'embedding');
        insert into notes select g, 'note ' || g from generate_series(1, 300) g;
    """)
    obs = [e for e in tick(defs, instance).asset_events if isinstance(e, dg.AssetObservation)]
    assert (obs[0].metadata["depth"].value, obs[0].metadata["rows"].value) == (2, 300)  # 200 + 100 rows
