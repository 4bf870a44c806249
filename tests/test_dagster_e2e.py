"""End to end through real Dagster processes: `dagster-daemon run -w workspace.yaml` with a temporary
DAGSTER_HOME whose dagster.yaml is the project's own (Postgres storage on the test server), and
`autoembed demo --no-ui` (the local model, the stdlib corpus, search)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from autoembed_dagster.core.db.server import with_database
from autoembed_dagster.defs.assets import LANE_TAG, queue_key
from autoembed_dagster.demo.runner import dagster_storage_url, sqlalchemy_url

from .conftest import drop_database, unique_database_name

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WAIT_SECONDS = 120


@pytest.fixture
def dagster_home(tmp_path, pg_server_url):
    """A temporary DAGSTER_HOME: the project's dagster.yaml, storage in a fresh database."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    name = unique_database_name("dagster_e2e")
    storage = dagster_storage_url(pg_server_url, name)  # with Dagster's tables, as `autoembed dagster-env` makes it
    yield home, storage
    drop_database(pg_server_url, name)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its children (code server, runs)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (a run worker)
    except ProcessLookupError:
        pass


@contextmanager
def daemon_running(dagster_home, tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`dagster-daemon run -w workspace.yaml` on the temporary DAGSTER_HOME, with the pipeline
    `documents`; yields (the process, its log); stops it and its children after."""
    home, storage = dagster_home
    # The repository's own project: its example pipeline defs/documents/defs.yaml is this table.
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": storage, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield daemon, log
    finally:
        stop_group(daemon)


def test_daemon_sensor_launches_a_drain_that_embeds_new_rows(supabase_docs, fake_openai, db_url, dagster_home, tmp_path):
    home, storage = dagster_home
    conn = supabase_docs
    with daemon_running(dagster_home, tmp_path) as (daemon, log):
        conn.execute("insert into documents (title, content) select 'doc ' || i, 'text ' || i "
                     "from generate_series(1, 20) i")
        deadline = time.monotonic() + WAIT_SECONDS
        embedded = 0
        while time.monotonic() < deadline:
            assert daemon.poll() is None, f"dagster-daemon exited:\n{log.read_text()[-3000:]}"
            embedded = conn.execute("select count(embedding) from documents").fetchone()[0]
            if embedded == 20:
                break
            time.sleep(0.5)
        assert embedded == 20, f"{embedded}/20 rows embedded after {WAIT_SECONDS} s:\n{log.read_text()[-3000:]}"

        # It went through Dagster: a sensor-launched run of the lane, recorded in Postgres storage,
        # and the queue observed by the sensor.
        os.environ["DAGSTER_POSTGRES_URL"] = storage
        try:
            with DagsterInstance.from_config(str(home)) as instance:
                assert type(instance.run_storage).__name__ == "PostgresRunStorage"
                runs = instance.get_run_records(RunsFilter(job_name="drain_embedding_jobs"))
                assert runs, "no drain run recorded"
                run = runs[-1].dagster_run
                assert run.tags[LANE_TAG] == "embedding_jobs"
                assert run.tags.get("dagster/sensor_name") == "embedding_jobs_sensor"
                assert run.status in (DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS)
                observed = instance.fetch_observations(queue_key("embedding_jobs"), limit=1).records
                assert observed and "depth" in observed[0].asset_observation.metadata
        finally:
            del os.environ["DAGSTER_POSTGRES_URL"]


def test_autoembed_demo_without_ui(db_url, tmp_path, monkeypatch, dagster_database):
    """`autoembed demo --no-ui`: local model (no API key), corpus, Dagster daemon, drain, search."""
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "dagster_home"
    env = {**os.environ, "AUTOEMBED_HOME": str(tmp_path / "autoembed")}
    proc = subprocess.Popen(
        [str(BIN / "autoembed"), "demo", "--no-ui", "--rows", "40", "--modules", "2", "--timeout", str(WAIT_SECONDS),
         "--dagster-home", str(home)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=WAIT_SECONDS + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the demo stops its daemon on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"demo did not finish:\n{out}")
    assert proc.returncode == 0, out
    assert "all 42 rows settled" in out, out  # 40 docstrings, 2 module documents (shutil, smtplib) as chunks
    assert "argparse" in out.split("parse command-line options")[1].splitlines()[1], out
    # over the chunks: the module, and the passage that matched
    assert "shutil chunk" in out.split("recursively delete a directory tree")[1].splitlines()[1], out
    assert "stopped: dagster-daemon (pid" in out
    with psycopg.connect(db_url) as conn:
        rows, embedded = conn.execute(
            "select count(*), count(embedding) from autoembed_demo.stdlib_docs").fetchone()
        assert rows == embedded == 40
        model = conn.execute("select distinct model from autoembed.embedding_state s join autoembed.target_catalog c on c.id = s.target_id "
                             "where schema_name = 'autoembed_demo'").fetchall()
        assert model == [("local:all-MiniLM-L6-v2:384",)]
        documents, chunk_models = conn.execute(
            "select count(distinct id), array_agg(distinct model) from autoembed_demo.stdlib_modules_chunks").fetchone()
        assert documents == 2 and chunk_models == ["local:all-MiniLM-L6-v2:384"]


def test_storage_url_forms():
    # key=value conninfo (what libpq accepts too) becomes a URL: SQLAlchemy parses nothing else
    assert sqlalchemy_url("host=/tmp/x/pgdata dbname=dagster user=postgres") == \
        "postgresql+psycopg2://postgres@/dagster?host=%2Ftmp%2Fx%2Fpgdata"
    assert sqlalchemy_url("host=db.example port=5433 dbname=d user=u password=p@ss sslmode=require") == \
        "postgresql+psycopg2://u:p%40ss@db.example:5433/d?sslmode=require"
    assert sqlalchemy_url("postgresql://postgres:@/dagster?host=/tmp/x/pgdata") == \
        "postgresql+psycopg2://postgres@/dagster?host=/tmp/x/pgdata"
    assert sqlalchemy_url("postgresql://u:p%40ss@db.example:5433/dagster?sslmode=require") == \
        "postgresql+psycopg2://u:p%40ss@db.example:5433/dagster?sslmode=require"


def test_dagster_env_prints_what_dagster_dev_needs(db_url, pg_server_url, dagster_database, tmp_path):
    """`eval "$(autoembed dagster-env)"`: Dagster's database exists with its tables, and the
    project's own instance (its .autoembed/dagster_home, the packaged dagster.yaml) opens a
    Postgres-backed instance from the printed variables."""
    home = tmp_path / ".autoembed"
    environ = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL")}
    out = subprocess.run([str(BIN / "autoembed"), "dagster-env"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True, env={**environ, "AUTOEMBED_HOME": str(home)}).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.strip().splitlines())
    env = {k: v.strip("'") for k, v in env.items()}
    assert set(env) == {"DAGSTER_HOME", "AUTOEMBED_DATABASE_URL", "DAGSTER_POSTGRES_URL"}
    assert env["AUTOEMBED_DATABASE_URL"] == db_url
    assert env["DAGSTER_HOME"] == str(home / "dagster_home")
    assert (home / "dagster_home" / "dagster.yaml").read_text().endswith((ROOT / "dagster_home" / "dagster.yaml").read_text())
    assert env["DAGSTER_POSTGRES_URL"].startswith("postgresql+psycopg2://")
    with psycopg.connect(with_database(pg_server_url, dagster_database)) as conn:
        tables = {r[0] for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")}
    assert {"runs", "event_logs", "jobs"} <= tables


def test_dagster_env_accepts_a_key_value_conninfo(db_url, pg_server_url, dagster_database):
    """AUTOEMBED_DATABASE_URL="host=... dbname=..." (libpq's other form): the printed variables
    open a Postgres-backed Dagster instance (SQLAlchemy could not parse it before)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    conninfo = make_conninfo(**conninfo_to_dict(db_url))
    assert "://" not in conninfo
    out = subprocess.run([str(BIN / "autoembed"), "dagster-env"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "AUTOEMBED_DATABASE_URL": conninfo})
    assert out.returncode == 0, out.stderr
    env = {k: v.strip("'") for k, v in (line.removeprefix("export ").split("=", 1)
                                        for line in out.stdout.strip().splitlines())}
    assert env["DAGSTER_POSTGRES_URL"].startswith("postgresql+psycopg2://")
    with psycopg.connect(env["AUTOEMBED_DATABASE_URL"]) as conn:  # the same database, as a URL
        assert conn.info.dbname == conninfo_to_dict(db_url)["dbname"]
    os.environ["DAGSTER_POSTGRES_URL"] = env["DAGSTER_POSTGRES_URL"]
    try:
        with DagsterInstance.from_config(str(ROOT / "dagster_home")) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            instance.get_run_records(limit=1)
    finally:
        del os.environ["DAGSTER_POSTGRES_URL"]
