"""Operations: test databases that belong to nobody else, promotion results and atomicity, and a
drain lane that frees itself when its run dies or hangs (real Postgres, real Dagster)."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import psutil
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test
from dagster._daemon.monitoring.run_monitoring import monitor_started_run
from psycopg import sql

from autoembed_dagster.core.migrate import migration as mig
from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
from autoembed_dagster.defs.assets import LANE_TAG
from autoembed_dagster.defs.drain import DEFAULT_IDLE_TIMEOUT, DEFAULT_TIME_BUDGET, build_drain_job
from autoembed_dagster.defs.sensors import _blocking_runs

from .test_dagster_e2e import ROOT, daemon_running, dagster_home  # noqa: F401 - dagster_home is a fixture
from .test_migration import DOCS_512, column_type, seed

WAIT_SECONDS = 180


# -- the test server's other databases ---------------------------------------------------------------
def _oid(conn, name: str) -> int | None:
    row = conn.execute("select oid from pg_database where datname = %s", (name,)).fetchone()
    return row[0] if row else None


def test_tests_leave_the_servers_dagster_and_template_databases_alone(pg_server_url, tmp_path):
    """A test session pointed at a server (AUTOEMBED_TEST_DATABASE_URL) that already has a `dagster`
    database (`autoembed dagster-env`'s name) and an `autoembed_template`: a test that makes Dagster
    storage there (`autoembed dagster-env`) runs, and both databases are still the same ones."""
    created = []
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        for name in ("dagster", "autoembed_template"):
            if _oid(conn, name) is None:  # on a shared server they may exist: then they are not ours
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
                created.append(name)
        before = {name: _oid(conn, name) for name in ("dagster", "autoembed_template")}
    try:
        env = {**os.environ, "AUTOEMBED_TEST_DATABASE_URL": pg_server_url}
        env.pop("AUTOEMBED_DAGSTER_DATABASE", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_dagster_e2e.py::test_dagster_env_prints_what_dagster_dev_needs"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            after = {name: _oid(conn, name) for name in ("dagster", "autoembed_template")}
            # The session's own databases (template, per-test, Dagster's) carry its pid: all dropped.
            leftovers = [r[0] for r in conn.execute("select datname from pg_database where datname like %s",
                                                    (f"%\\_{proc.pid}\\_%",))]
        assert after == before, "a test dropped (or re-created) a database it did not create"
        assert leftovers == [], f"the test session left its databases behind: {leftovers}"
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            for name in created:
                conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


# -- promotion ----------------------------------------------------------------------------------------
SHADOW_JOB = ('{"id": 1, "schema": "public", "table": "documents", "contentFunction": "embedding_input", '
              '"embeddingColumn": "embedding__next"}')


def _complete_migration(conn, settings):
    seed(conn, settings, 12)
    spec = resolve_spec(conn, DOCS_512)
    result = run_backfill(conn, DOCS_512, spec, promote_when_complete=False)
    assert result.coverage.complete
    return result.plan.migration


def test_a_promotion_that_purged_shadow_jobs_reports_itself_promoted(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    m = _complete_migration(conn, settings)
    conn.execute("select pgmq.send('embedding_jobs', %s::jsonb)", (SHADOW_JOB,))  # a late duplicate job

    result = mig.promote(conn, m)

    assert result.migration.status == "promoted" and result.already is False
    assert result.purged_jobs == 1
    again = mig.promote(conn, result.migration)
    assert again.already is True and again.purged_jobs == 0


def _snapshot(conn) -> dict:
    """Everything a promotion changes: the table's columns, indexes and triggers, and every row of
    every table of the autoembed and pgmq schemas (registry, state, migrations, queues)."""
    table = "'public.documents'::regclass"
    snap = {
        "columns": conn.execute(f"select attname, format_type(atttypid, atttypmod) from pg_attribute "
                                f"where attrelid = {table} and attnum > 0 and not attisdropped order by 1").fetchall(),
        "indexes": conn.execute(f"select indexrelid::regclass::text, pg_get_indexdef(indexrelid) from pg_index "
                                f"where indrelid = {table} order by 1").fetchall(),
        "triggers": conn.execute(f"select tgname, pg_get_triggerdef(oid) from pg_trigger "
                                 f"where tgrelid = {table} and not tgisinternal order by 1").fetchall(),
    }
    for schema, name in conn.execute("select schemaname, tablename from pg_tables "
                                     "where schemaname in ('autoembed', 'pgmq') order by 1, 2").fetchall():
        snap[f"{schema}.{name}"] = conn.execute(sql.SQL("select t::text from {} t order by 1").format(
            sql.Identifier(schema, name))).fetchall()
    return snap


def test_promotion_is_one_transaction(supabase_docs, fake_openai, settings):
    """The promotion's last step fails (a trigger refuses the status update to 'promoted'): none
    of the steps before it (column and index renames, state, triggers, purged jobs) is visible."""
    conn = supabase_docs
    m = _complete_migration(conn, settings)
    conn.execute("select pgmq.send('embedding_jobs', %s::jsonb)", (SHADOW_JOB,))
    mig.prepare_indexes(conn, m)  # built concurrently before the transaction, on purpose
    conn.execute("""
        create function public.refuse_promotion() returns trigger language plpgsql as $$
        begin
          if new.status = 'promoted' then raise exception 'promotion refused by the test'; end if;
          return new;
        end $$;
        create trigger refuse_promotion before update on autoembed.model_migrations
          for each row execute function public.refuse_promotion();
    """)
    before = _snapshot(conn)

    with pytest.raises(psycopg.errors.RaiseException, match="refused by the test"):
        mig.promote(conn, m)

    assert _snapshot(conn) == before
    assert column_type(conn) == "halfvec(1536)" and column_type(conn, "embedding__next") == "halfvec(512)"
    # The snapshot does see a promotion: without the trigger the same call changes it.
    conn.execute("drop trigger refuse_promotion on autoembed.model_migrations")
    conn.execute("drop function public.refuse_promotion()")
    unrefused = _snapshot(conn)
    assert mig.promote(conn, m).migration.status == "promoted"
    promoted = _snapshot(conn)
    changed = {k for k in unrefused if unrefused[k] != promoted.get(k)}
    assert {"columns", "indexes", "triggers", "autoembed.model_migrations", "autoembed.embedding_state"} <= changed
    assert column_type(conn) == "halfvec(512)"


# -- the drain lane -----------------------------------------------------------------------------------
@pytest.fixture
def instance(dagster_home, monkeypatch):
    home, storage = dagster_home
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", storage)
    with DagsterInstance.from_config(str(home)) as inst:
        yield inst


def _run(instance, job_name: str, tags: dict, status: DagsterRunStatus):
    """A run of the project's code location, as the sensor would create it (without launching it)."""
    origin = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("autoembed"), "__repository__").get_job_origin(job_name)
    return create_run_for_test(instance, job_name=job_name, tags=tags, status=status, remote_job_origin=origin)


def test_a_drain_run_past_its_maximum_runtime_is_failed_and_frees_its_slot(instance):
    """Unit level, through the instance of the project's dagster.yaml: run monitoring fails a
    drain run older than its `dagster/max_runtime`, so it holds no slot of its queue's pool (the
    pool itself is tested in test_scaling.py), and the queue sensor stops counting it at once."""
    job = build_drain_job("embedding_jobs", [])
    max_runtime = float(job.tags[dg.MAX_RUNTIME_SECONDS_TAG])
    assert max_runtime > DEFAULT_TIME_BUDGET + DEFAULT_IDLE_TIMEOUT
    assert instance.run_monitoring_enabled and instance.run_monitoring_poll_interval_seconds <= 10
    assert instance.run_monitoring_max_resume_run_attempts == 0

    hung = _run(instance, job.name, dict(job.tags), DagsterRunStatus.STARTING)
    started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=max_runtime + 30)
    instance.handle_run_event(hung.run_id, DagsterEvent(DagsterEventType.RUN_START.value, job_name=job.name),
                              update_timestamp=started)
    assert instance.get_run_by_id(hung.run_id).status == DagsterRunStatus.STARTED
    assert [r.dagster_run.run_id for r in _blocking_runs(instance, job.name, "embedding_jobs")] == [hung.run_id]

    # A run within its maximum runtime is left alone.
    young = _run(instance, "drain_young", {**job.tags, LANE_TAG: "young"}, DagsterRunStatus.STARTING)
    instance.handle_run_event(young.run_id, DagsterEvent(DagsterEventType.RUN_START.value, job_name="drain_young"))
    logger = logging.getLogger("run_monitoring_test")
    for run in (hung, young):
        monitor_started_run(instance, None, instance.get_run_record_by_id(run.run_id), logger)

    assert instance.get_run_by_id(hung.run_id).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(young.run_id).status == DagsterRunStatus.STARTED
    assert _blocking_runs(instance, job.name, "embedding_jobs") == [], "a failed run holds nothing"


def _worker_pid(instance, run_id: str) -> int | None:
    """The pid of the process that ran the drain op (its step events carry it)."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START):
        if entry.dagster_event is not None and entry.dagster_event.pid:
            return entry.dagster_event.pid
    return None


def test_a_drain_run_killed_with_sigkill_frees_its_lane_and_the_next_drain_embeds(
        supabase_docs, fake_openai, db_url, dagster_home, instance, tmp_path):
    conn = supabase_docs

    def wait_for(what: str, condition):
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            assert daemon.poll() is None, f"dagster-daemon exited:\n{log.read_text()[-3000:]}"
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        pytest.fail(f"{what}: not within {WAIT_SECONDS} s\n{log.read_text()[-3000:]}")

    def embedded() -> int:
        return conn.execute("select count(embedding) from documents").fetchone()[0]

    with daemon_running(dagster_home, tmp_path) as (daemon, log):
        conn.execute("insert into documents (title, content) select 'doc ' || i, 'text ' || i "
                     "from generate_series(1, 10) i")
        wait_for("the first drain embeds 10 rows", lambda: embedded() == 10)
        # The drain run now waits on LISTEN for more work (idle timeout 30 s): alive, holding the lane.
        running = instance.get_run_records(RunsFilter(job_name="drain_embedding_jobs",
                                                      statuses=[DagsterRunStatus.STARTED]))
        assert len(running) == 1, [r.dagster_run.status for r in running]
        run_id = running[0].dagster_run.run_id
        pid = wait_for("the run's worker pid", lambda: _worker_pid(instance, run_id))
        assert "python" in psutil.Process(pid).name().lower()

        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        conn.execute("insert into documents (title, content) select 'late ' || i, 'more ' || i "
                     "from generate_series(1, 10) i")

        wait_for("the killed run is failed", lambda: instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE)
        failed_after = time.monotonic() - killed
        wait_for("a new drain embeds the rows written after the kill", lambda: embedded() == 20)
        drained_after = time.monotonic() - killed

        others = [r.dagster_run for r in instance.get_run_records(RunsFilter(job_name="drain_embedding_jobs"))
                  if r.dagster_run.run_id != run_id]
        assert any(r.status in (DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS) for r in others), others
        print(f"killed drain run failed after {failed_after:.1f} s; new rows embedded {drained_after:.1f} s after the kill")
