"""`autoembed dev` and `autoembed demo` stop everything they started when SIGTERM is sent to their
pid alone (not to the terminal's process group): `dagster dev` / the webserver and the daemon, the
code servers those start in process groups of their own, and the embedded Postgres they started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_lists(port: int, asset: str) -> bool:
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return asset in resp.read().decode()
    except OSError:
        return False


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def workdir():
    """Not under pytest's tmp_path (see tests/test_cli.py's server_dir: pgserver as root)."""
    path = Path(tempfile.mkdtemp(prefix="autoembed-proc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", ["dev", "demo"])
def test_sigterm_to_the_pid_stops_every_child_and_the_postgres_it_started(workdir, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOEMBED_", "OPENAI_", "DAGSTER_"))}
    env.update(AUTOEMBED_HOME=str(workdir / "home"), PYTHONUNBUFFERED="1", PATH=f"{BIN}:{env['PATH']}",
               PYTHONPATH=str(ROOT))
    port = free_port()
    if command == "dev":
        cwd = workdir / "demo"
        shutil.copytree(ROOT / "demo", cwd, ignore=shutil.ignore_patterns("__pycache__", ".autoembed"))
        argv = [str(BIN / "autoembed"), "dev", "--port", str(port)]
    else:
        cwd = workdir
        argv = [str(BIN / "autoembed"), "demo", "--rows", "10", "--modules", "1",
                "--dagster-home", str(workdir / "dagster_home"), "--port", str(port)]
    log = open(workdir / "out.log", "wb")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: the test signals the pid, never the group
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            text = (workdir / "out.log").read_text(errors="replace")
            ready = ("Dagster UI:" in text) if command == "demo" else ui_lists(port, "stdlib_docs_embeddings")
            if not ready:
                time.sleep(1)
        assert ready, f"exit {proc.poll()}:\n{(workdir / 'out.log').read_text(errors='replace')[-3000:]}"
        tree = psutil.Process(proc.pid).children(recursive=True)
        pg = postmaster_pid(workdir / "home" / "pgdata")
        assert pg is not None
        tree.append(psutil.Process(pg))
        names = " ".join(" ".join(p.cmdline()[:3]) for p in tree)
        assert "dagster" in names and "postgres" in names, names

        # A second copy of the same project says what runs, and starts nothing.
        second = subprocess.run([*argv[:-1], str(free_port())], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, (second.stdout, second.stderr)
        assert f"`autoembed {command} port {port} pid {proc.pid}`" in second.stderr, second.stderr
        assert "already runs Dagster on this database" in second.stderr

        os.kill(proc.pid, signal.SIGTERM)  # the pid only
        proc.wait(timeout=180)
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert postmaster_pid(workdir / "home" / "pgdata") is None  # the server it started: stopped
        assert "stopping" in (workdir / "out.log").read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        subprocess.run([str(BIN / "autoembed"), "db", "stop"], cwd=cwd, env=env, capture_output=True, timeout=120)
        log.close()


def _start_dev(project: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([str(BIN / "autoembed"), "dev", "--port", str(port)], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _db_url(project: Path, env: dict[str, str]) -> str:
    out = subprocess.run([str(BIN / "autoembed"), "db", "url"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_two_projects_side_by_side_each_have_their_own_instance_and_database(workdir):
    """`autoembed dev` in two projects at once, nothing configured: each project's .autoembed holds
    its own embedded Postgres and its own Dagster instance (DAGSTER_HOME), each UI lists its own
    project's assets only, a table made in one database is not in the other, and each storage
    database is on its own project's server."""
    import psycopg

    from autoembed_dagster.core.db.server import with_database

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOEMBED_", "OPENAI_", "DAGSTER_"))}
    env.update(PYTHONUNBUFFERED="1", PATH=f"{BIN}:{env['PATH']}", PYTHONPATH=str(ROOT))
    a, b = workdir / "a", workdir / "b"
    for project in (a, b):
        shutil.copytree(ROOT / "demo", project, ignore=shutil.ignore_patterns("__pycache__", ".autoembed"))
    shutil.rmtree(b / "autoembed_demo_project" / "defs" / "stdlib_modules")  # b: one pipeline, a: two
    ports = {a: free_port(), b: free_port()}
    procs = {p: _start_dev(p, ports[p], env, workdir / f"{p.name}.log") for p in (a, b)}
    trees: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
            trees += [c for proc in procs.values() for c in psutil.Process(proc.pid).children(recursive=True)
                      if c not in trees]  # recorded while they run: the cleanup below needs them
            if ui_lists(ports[a], "stdlib_modules_chunks") and ui_lists(ports[b], "stdlib_docs_embeddings"):
                break
            time.sleep(2)
        logs = {p: (workdir / f"{p.name}.log").read_text(errors="replace") for p in (a, b)}
        assert all(p.poll() is None for p in procs.values()), logs
        assert ui_lists(ports[a], "stdlib_modules_chunks") and ui_lists(ports[b], "stdlib_docs_embeddings"), logs

        for project in (a, b):
            home = project / ".autoembed"
            assert f"DAGSTER_HOME={home / 'dagster_home'};" in logs[project], logs[project]
            assert (home / "dagster_home" / "dagster.yaml").is_file()
            assert (home / ".gitignore").read_text().strip().endswith("*")  # never committed
            assert postmaster_pid(home / "pgdata") is not None
        assert postmaster_pid(a / ".autoembed" / "pgdata") != postmaster_pid(b / ".autoembed" / "pgdata")
        assert not ui_lists(ports[b], "stdlib_modules_chunks")  # b's UI: b's defs.yaml files only

        urls = {p: _db_url(p, env) for p in (a, b)}
        assert urls[a] != urls[b]
        with psycopg.connect(urls[a], autocommit=True) as conn:
            conn.execute("create table only_in_a (id int)")
        with psycopg.connect(urls[b], autocommit=True) as conn:
            assert conn.execute("select to_regclass('only_in_a')").fetchone()[0] is None
        for project in (a, b):  # each storage on its own server, with its own daemon's heartbeats
            with psycopg.connect(with_database(urls[project], "dagster"), autocommit=True) as conn:
                assert conn.execute("select count(*) from daemon_heartbeats").fetchone()[0] > 0

        trees = [c for proc in procs.values() for c in psutil.Process(proc.pid).children(recursive=True)]
        trees += [psutil.Process(postmaster_pid(p / ".autoembed" / "pgdata")) for p in (a, b)]
        for proc in procs.values():
            os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=180)
        _, alive = psutil.wait_procs(trees, timeout=60)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)  # stops its children too
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for p in trees:
            try:
                p.kill()
            except psutil.Error:
                pass
        for project in (a, b):
            subprocess.run([str(BIN / "autoembed"), "db", "stop"], cwd=project, env=env, capture_output=True,
                           timeout=120)


def test_the_storage_database_the_tool_names_has_dagsters_tables_at_the_current_schema(pg_server_url):
    """What `dagster instance migrate` did in the tests' fixtures, the tool does: the storage
    database it creates (dagster-env, dev, demo) has Dagster's tables at this Dagster's schema
    before any daemon or `dagster job launch` starts (on an empty one they race: "type event_logs
    already exists" and the daemon exits), also when several processes prepare it at once."""
    import psycopg
    from dagster_postgres import DagsterPostgresStorage

    from autoembed_dagster.core.db.server import with_database
    from autoembed_dagster.demo.runner import dagster_storage_url

    from .conftest import drop_database, unique_database_name

    name = unique_database_name("dagster_prep")
    code = ("import sys; from autoembed_dagster.demo.runner import dagster_storage_url; "
            "print(dagster_storage_url(sys.argv[1], sys.argv[2]))")
    try:
        together = [subprocess.Popen([sys.executable, "-c", code, pg_server_url, name], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                    for _ in range(3)]
        results = [(p.wait(timeout=300), *p.communicate()) for p in together]
        assert all(rc == 0 for rc, _, _ in results), [err[-800:] for _, _, err in results]
        with psycopg.connect(with_database(pg_server_url, name)) as conn:
            tables = {r[0] for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")}
        assert {"runs", "event_logs", "jobs", "alembic_version", "asset_keys"} <= tables
        storage = DagsterPostgresStorage(dagster_storage_url(pg_server_url, name), should_autocreate_tables=False)
        try:
            for part in (storage.run_storage, storage.event_log_storage, storage.schedule_storage):
                current, head = part.alembic_version()
                assert current == head
        finally:
            for part in (storage.run_storage, storage.event_log_storage, storage.schedule_storage):
                part.dispose()
    finally:
        drop_database(pg_server_url, name)


def test_the_instance_config_follows_the_package_until_it_is_edited(tmp_path, monkeypatch):
    """A project's .autoembed/dagster_home/dagster.yaml is the packaged one; a copy nobody edited
    follows the package (an upgrade), an edited one is kept; an explicit DAGSTER_HOME wins."""
    from autoembed_dagster.core.config import Settings
    from autoembed_dagster.demo.runner import _WRITTEN, _sha, instance_home

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = Settings(home=tmp_path / "project" / ".autoembed")
    home = instance_home(settings)
    assert home == tmp_path / "project" / ".autoembed" / "dagster_home"
    template = (ROOT / "dagster_home" / "dagster.yaml").read_text()
    written = (home / "dagster.yaml").read_text()
    assert written.endswith(template) and (tmp_path / "project" / ".autoembed" / ".gitignore").is_file()

    older = "telemetry:\n  enabled: false\n"  # as an older package wrote it ...
    (home / "dagster.yaml").write_text(_WRITTEN.format(_sha(older)) + "\n" + older)
    instance_home(settings)
    assert (home / "dagster.yaml").read_text() == written  # ... follows the package

    (home / "dagster.yaml").write_text(written + "# mine\n")
    instance_home(settings)
    assert (home / "dagster.yaml").read_text() == written + "# mine\n"  # edited: kept

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    assert instance_home(settings) == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / "dagster.yaml").read_text().endswith(template)


def test_another_projects_dagster_home_in_the_shell_is_named_with_how_to_drop_it(tmp_path, monkeypatch):
    """After `eval "$(autoembed dagster-env)"` in project A, `autoembed dev` in project B uses A's
    instance as set (an explicit DAGSTER_HOME wins) and says so, with the variables to unset."""
    from autoembed_dagster.core.config import Settings
    from autoembed_dagster.demo.runner import other_projects_env

    b = Settings(home=tmp_path / "b" / ".autoembed")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "a" / ".autoembed" / "dagster_home"))
    note = other_projects_env(b)
    assert note and f"project in {tmp_path / 'a'}" in note and "unset DAGSTER_HOME DAGSTER_POSTGRES_URL" in note
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "b" / ".autoembed" / "dagster_home"))
    assert other_projects_env(b) is None  # its own
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "ops" / "dagster"))
    assert other_projects_env(b) is None  # a DAGSTER_HOME of the user's own: nothing to say


def test_status_and_search_name_another_projects_exported_settings(supabase_docs, fake_openai, db_url, tmp_path,
                                                                   monkeypatch, capsys):
    """`eval "$(autoembed dagster-env)"` in project A, then `autoembed status` / `search` in project
    B: they work on A's database (an explicit URL wins) and say so on stderr, as dev/demo do."""
    from urllib.parse import parse_qs, urlparse

    from autoembed_dagster import cli

    socket_dir = (parse_qs(urlparse(db_url).query).get("host") or [""])[0]
    if not socket_dir.startswith("/"):
        pytest.skip("the test server is not on a unix socket")
    (tmp_path / "a" / ".autoembed").mkdir(parents=True)
    (tmp_path / "a" / ".autoembed" / "pgdata").symlink_to(socket_dir)  # A's embedded server, as dagster-env names it
    (tmp_path / "b" / ".autoembed").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.delenv("AUTOEMBED_HOME", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("AUTOEMBED_DATABASE_URL", db_url.replace(socket_dir, str(tmp_path / "a" / ".autoembed" / "pgdata")))
    for args in (["status"], ["search", "cats", "--table", "documents"]):
        assert cli.main(args) == 0
        err = capsys.readouterr().err
        assert f"AUTOEMBED_DATABASE_URL is set to the project in {tmp_path / 'a'}" in err, (args, err)
        assert "unset DAGSTER_HOME DAGSTER_POSTGRES_URL AUTOEMBED_DATABASE_URL" in err
    monkeypatch.chdir(tmp_path / "a")  # in A itself: nothing to say
    assert cli.main(["status"]) == 0
    assert "note:" not in capsys.readouterr().err


LATE_SPAWNER = r"""
import os, signal, subprocess, sys, time
STUBBORN = ("import os, signal, sys, time; os.setpgrp(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); print(os.getpid(), flush=True); time.sleep(600)")
def stop(signum, frame):
    # what `dagster dev` / the daemon may do while shutting down: start a code server, in a group of
    # its own, that outlives its parent (re-parented to init: no longer under the child)
    late = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=open(sys.argv[1], "w"))
    while not open(sys.argv[1]).read().strip():
        time.sleep(0.05)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_stop_kills_a_process_a_child_started_after_the_last_poll(tmp_path):
    """`autoembed demo` left `dagster api grpc` code servers running: one started after the
    watcher's last poll was never recorded. Stop finds every process of the children's sessions."""
    from autoembed_dagster.processes import Children

    started = Children()
    pid_file = tmp_path / "late.pid"
    pid_file.write_text("")
    child = started.start("spawner", [sys.executable, "-c", LATE_SPAWNER, str(pid_file)], cwd=tmp_path,
                          env=dict(os.environ), log=tmp_path / "out.log")
    late = None
    try:
        deadline = time.monotonic() + 60
        while "ready" not in (tmp_path / "out.log").read_text() and time.monotonic() < deadline:
            assert child.poll() is None, (tmp_path / "out.log").read_text()
            time.sleep(0.1)
        assert started.stop(timeout=30) == []
        pid = int(pid_file.read_text())  # it did start, after the last look at the tree
        try:
            late = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return  # gone: what stop is for
        # (init reaps it at once; give it a moment, not a chance to survive)
        assert not late.is_running() or late.status() == psutil.STATUS_ZOMBIE or late.wait(10) is None, \
            late.cmdline()
    finally:
        if late is not None and late.is_running():
            late.kill()
