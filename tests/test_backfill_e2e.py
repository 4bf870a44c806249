"""The README's model change, end to end through real Dagster processes: a user's Dagster project
whose pipeline (defs/documents/defs.yaml) is embedded with one model, the model changed in that
file (1536 -> 512 dimensions), then exactly the documented `dagster job launch -w workspace.yaml
-j backfill` (no config: one pipeline is stale) with `dagster-daemon run -w
workspace.yaml` running (temporary DAGSTER_HOME with the project's dagster.yaml, Postgres storage on
the test server). The daemon dequeues the `backfill` run, its backfill daemon launches one run per
shard, and the last shard promotes the migration: every row then holds the new model's vector of its
current input in the live column."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus

from autoembed_dagster.core.migrate import migration as mig
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.targets.models import ModelSpec
from autoembed_dagster.defs.assets import model_partition_key
from autoembed_dagster.defs.backfill import PIPELINE_TAG, PROMOTE_TAG, models_partitions_name, shards_key

from .dg_project import make_project, write_pipeline
from .fake_openai import fake_vector
from .test_backfill import A, B, DOCS
from .test_dagster_e2e import BIN, dagster_home, stop_group  # noqa: F401 - dagster_home is a fixture
from .test_migration import assert_all_current, column_type, seed

ROWS = 36
SHARDS = 4
WAIT_SECONDS = 180


def declaration(dimensions: int) -> dict:
    return {"table": "public.documents", "dimensions": dimensions, "shards": SHARDS}


def state(db_url: str) -> tuple[str | None, str | None, int]:
    """(live column type, migration status, rows holding the 512-dim vector of their current input).
    A fresh connection each time: a prepared plan would break when the promotion changes the type."""
    with connect(db_url) as conn:
        m = mig.get_migration(conn, "public", "documents", "embedding")
        rows = conn.execute("select embedding, embedding_input(d) from documents d").fetchall()
        current = sum(1 for v, text in rows if v is not None and len(v.to_list()) == 512
                      and np.allclose(np.array(v.to_list(), dtype=np.float32), fake_vector(text, 512), atol=2e-3))
        return column_type(conn), m.status if m else None, current


def test_readme_backfill_command_migrates_through_the_daemon(supabase_docs, fake_openai, settings, db_url,
                                                             dagster_home, tmp_path):
    home, storage = dagster_home
    conn = supabase_docs
    project = make_project(tmp_path / "project", {"documents": declaration(1536)})
    seed(conn, settings, ROWS)  # embedded with the first model (the drain, in process)
    assert_all_current(conn, 1536)

    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": storage,
           "PYTHONUNBUFFERED": "1"}
    assert env["AUTOEMBED_DATABASE_URL"] == db_url and env["OPENAI_BASE_URL"] == fake_openai.base_url
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                                  cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # The model changes in the code (defs.yaml) while the daemon runs; then the documented command.
        write_pipeline(project, "documents", declaration(512))
        fake_openai.reset()
        launch = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", "backfill"],
                                cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert launch.returncode == 0, f"{launch.stdout}\n{launch.stderr}"

        launched = time.monotonic()
        deadline = launched + WAIT_SECONDS
        last = None
        while time.monotonic() < deadline:
            assert daemon.poll() is None, f"dagster-daemon exited:\n{log.read_text()[-3000:]}"
            last = state(db_url)
            if last == ("halfvec(512)", "promoted", ROWS):
                print(f"launch command {launched - started:.1f} s, promoted {time.monotonic() - launched:.1f} s later")
                break
            time.sleep(1)
        assert last == ("halfvec(512)", "promoted", ROWS), (
            f"after {WAIT_SECONDS} s: (column, migration, rows current at 512) = {last}\n{log.read_text()[-4000:]}")
        with connect(db_url) as fresh:
            assert_all_current(fresh, 512)
            assert column_type(fresh, "embedding__old") == "halfvec(1536)"  # kept until drop_old
            assert column_type(fresh, "embedding__next") is None
        assert {r["model"] for r in fake_openai.requests} == {"text-embedding-3-small"}
        texts = [t for r in fake_openai.requests for t in r["inputs"]]
        assert texts.count(mig.PROBE_TEXT) == 1  # the target was proven once, before the migration began
        assert len(texts) - 1 == ROWS  # each row embedded once

        # It went through the daemon: the queued `backfill` run, then the backfill's shard runs.
        os.environ["DAGSTER_POSTGRES_URL"] = storage
        try:
            with DagsterInstance.from_config(str(home)) as instance:
                assert type(instance.run_storage).__name__ == "PostgresRunStorage"
                [launcher] = instance.get_run_records(RunsFilter(job_name="backfill"))
                assert launcher.dagster_run.status == DagsterRunStatus.SUCCESS
                [backfill] = instance.get_backfills()
                assert backfill.tags[PROMOTE_TAG] == "true" and backfill.tags[PIPELINE_TAG] == "documents"
                expected = {f"{model_partition_key(ModelSpec.parse(B))}|{s}" for s in map(str, range(SHARDS))}
                target = backfill.asset_backfill_data.target_subset.get_partitions_subset(shards_key(DOCS))
                assert set(target.get_partition_keys()) == expected
                assert A != B and model_partition_key(ModelSpec.parse(B)) in instance.get_dynamic_partitions(
                    models_partitions_name(DOCS))

                shard_deadline = time.monotonic() + 60  # the backfill daemon records completion on its next tick
                while True:
                    backfill = instance.get_backfill(backfill.backfill_id)
                    runs = instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill.backfill_id}))
                    if backfill.status == BulkActionStatus.COMPLETED_SUCCESS or time.monotonic() > shard_deadline:
                        break
                    time.sleep(1)
                assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, backfill.status
                assert sorted(r.dagster_run.tags["dagster/partition"] for r in runs) == sorted(expected)
                for r in runs:
                    run = r.dagster_run
                    assert run.asset_selection == {shards_key(DOCS)} and run.status == DagsterRunStatus.SUCCESS
                    assert run.tags.get("dagster/sensor_name") is None  # the backfill daemon's, not a sensor's
                    assert run.tags[PROMOTE_TAG] == "true" and run.tags[PIPELINE_TAG] == "documents"
                    assert run.parent_run_id is None and run.root_run_id is None  # first attempts, no retries
                mats = [r.asset_materialization for r in
                        instance.fetch_materializations(shards_key(DOCS), limit=100).records]
                assert sorted(m.partition for m in mats) == sorted(expected)
                assert [m.metadata["promoted"].value for m in mats].count(True) == 1  # the last shard promoted
                assert all(m.metadata["mode"].value == "migration" for m in mats)
                assert sum(m.metadata["rows_embedded"].value for m in mats) == ROWS
        finally:
            del os.environ["DAGSTER_POSTGRES_URL"]
    finally:
        stop_group(daemon)
        print(f"model change migrated through dagster-daemon in {time.monotonic() - started:.1f} s")
