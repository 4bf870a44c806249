"""The `autoembed` command, run as a user would: a subprocess against the real database."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from autoembed_dagster.core.db.server import connect


def run(args, env_extra=None, check=True, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"))}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoembed {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def server_dir():
    """A folder for an embedded server started by the CLI. Not under pytest's tmp_path: run as root,
    pgserver runs postgres as the `pgserver` user, and another pytest session starting meanwhile
    sets /tmp/pytest-of-root back to mode 0700 (postgres: "Permission denied")."""
    path = Path(tempfile.mkdtemp(prefix="autoembed-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_zero_config_embedded_server_lifecycle(server_dir):
    tmp_path = server_dir
    env = {"AUTOEMBED_HOME": str(tmp_path / "home"), "AUTOEMBED_DATABASE_URL": ""}
    url = run(["db", "url"], env).stdout.strip()
    assert url.startswith("postgresql://") and str(tmp_path) in url
    assert "ready" in run(["db", "init"], env).stdout
    assert "ready" in run(["db", "init"], env).stdout  # idempotent
    with psycopg.connect(url) as conn:  # the server outlives the command that started it
        assert conn.execute("select count(*) from pgmq.meta where queue_name = 'embedding_jobs'").fetchone()[0] == 1
    assert "stopped" in run(["db", "stop"], env).stdout
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    assert "not running" in run(["db", "stop"], env).stdout


def test_db_stop_after_a_crash_signals_no_process_that_reuses_the_servers_pid(server_dir):
    """A stale postmaster.pid (the server died; its PID now belongs to an unrelated process): `db
    stop` leaves that process alone, says why, removes the file; the server starts again after."""
    env = {"AUTOEMBED_HOME": str(server_dir / "home"), "AUTOEMBED_DATABASE_URL": ""}
    run(["db", "init"], env)
    pidfile = server_dir / "home" / "pgdata" / "postmaster.pid"
    crashed = pidfile.read_text().splitlines()
    assert "stopped" in run(["db", "stop"], env).stdout and not pidfile.exists()
    unrelated = subprocess.Popen(["sleep", "600"])
    try:
        pidfile.write_text("\n".join([str(unrelated.pid), *crashed[1:]]) + "\n")  # as a crash leaves it
        out = run(["db", "stop"], env).stdout
        assert unrelated.poll() is None, "db stop signalled an unrelated process"
        assert "not running" in out and "stale" in out and f"pid {unrelated.pid} is now 'sleep'" in out, out
        assert not pidfile.exists()

        pidfile.write_text("\n".join([str(unrelated.pid), *crashed[1:]]) + "\n")
        url = run(["db", "url"], env).stdout.strip()  # starts a server instead of "attaching" to sleep
        with psycopg.connect(url) as conn:
            assert conn.execute("select count(*) from pgmq.meta").fetchone()[0] >= 1
        assert "embedded server stopped" in run(["db", "stop"], env).stdout
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_subfolder_uses_the_projects_server_and_no_project_says_what_to_run(server_dir):
    tmp_path = server_dir
    home = tmp_path / "user"  # $HOME: the search for .autoembed stops below it
    project, other = home / "project", home / "elsewhere"
    subfolder = project / "src" / "deep"
    subfolder.mkdir(parents=True)
    other.mkdir()
    (tmp_path / ".autoembed").mkdir()  # above $HOME: never taken for a project
    env = {"HOME": str(home), "AUTOEMBED_HOME": "", "AUTOEMBED_DATABASE_URL": ""}
    run(["db", "init"], env, cwd=project)
    try:
        url = run(["db", "url"], env, cwd=subfolder).stdout.strip()
        assert f"host={project / '.autoembed' / 'pgdata'}" in url, url
        assert "embedding_jobs" in run(["status"], env, cwd=subfolder).stdout
        assert not (subfolder / ".autoembed").exists() and not (project / "src" / ".autoembed").exists()

        for args in (["status"], ["drain"], ["db", "url"], ["search", "cats", "--table", "documents"],
                     ["enroll", "documents"], ["db", "stop"]):
            proc = run(args, env, check=False, cwd=other)
            assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
            assert "no autoembed project here" in proc.stderr and "`autoembed db init`" in proc.stderr
            assert "AUTOEMBED_HOME" in proc.stderr and "AUTOEMBED_DATABASE_URL" in proc.stderr
        assert not (other / ".autoembed").exists(), "a command that needs data started an empty server"

        # AUTOEMBED_HOME wins over the folder found upwards.
        explicit = {**env, "AUTOEMBED_HOME": str(tmp_path / "explicit")}
        assert "not running" in run(["db", "stop"], explicit, cwd=subfolder).stdout
    finally:
        run(["db", "stop"], env, cwd=project)


CORPUS = [
    ("Cats", "The cat sat on the warm windowsill and purred."),
    ("Stocks", "Quarterly revenue grew five percent, beating analyst estimates."),
    ("Rain", "Heavy rain and thunderstorms are expected over the weekend."),
    ("Python", "Python lists are mutable sequences that can hold any object."),
]


def test_local_model_enroll_drain_status_search(db_url):
    """No API key anywhere: the local model is the default provider."""
    with connect(db_url) as conn:
        conn.execute("""
            create table articles (id int primary key, title text, body text, embedding vector(384));
            create function embedding_input(a articles) returns text language sql immutable
                as $$ select a.title || E'\n\n' || a.body $$;
        """)
        conn.cursor().executemany("insert into articles values (%s, %s, %s)",
                         [(i, t, b) for i, (t, b) in enumerate(CORPUS, 1)])
    out = run(["enroll", "articles"], {}).stdout
    assert "4 existing rows queued" in out
    status = run(["status"]).stdout
    assert "embedding_jobs" in status and " 4 " in status

    drained = run(["drain"])
    assert "4 embedded" in drained.stdout and "0 dead-lettered" in drained.stdout

    hits = run(["search", "a kitten resting in the sun", "--table", "articles", "-k", "2"]).stdout
    assert "id=1" in hits.splitlines()[0], hits
    hits = run(["search", "stock market earnings report", "--table", "articles", "-k", "1"]).stdout
    assert "id=2" in hits.splitlines()[0], hits


def test_cli_errors_name_the_offending_value(db_url):
    proc = run(["search", "x", "--table", "nope"], check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr
    proc = run(["drain"], {"AUTOEMBED_PROVIDER": "banana"}, check=False)
    assert proc.returncode == 2 and "banana" in proc.stderr
    proc = run(["status"], {"AUTOEMBED_MAX_ATTEMPTS": "lots"}, check=False)
    assert "lots" in proc.stderr


def test_dead_letters_command_lists_and_retries(db_url):
    with connect(db_url) as conn:
        conn.execute("select pgmq.send('embedding_jobs', '{\"id\": 1, \"schema\": \"public\", \"table\": \"ghost\", "
                     "\"contentFunction\": \"f\", \"embeddingColumn\": \"e\"}')")
    assert "1 dead-lettered" in run(["drain"]).stdout
    listed = run(["dead-letters"]).stdout
    assert "ghost" in listed and "does not exist" in listed
    assert "1 dead letter(s) put back" in run(["dead-letters", "--retry"]).stdout
    assert "ghost" not in run(["dead-letters"]).stdout


def test_enroll_refuses_a_column_the_model_cannot_fill(db_url):
    """The local model makes 384 dimensions: a vector(768) column would dead-letter every row."""
    with connect(db_url) as conn:
        conn.execute("""
            create table wide (id int primary key, body text, embedding vector(768));
            create function embedding_input(w wide) returns text language sql immutable as $$ select w.body $$;
            insert into wide values (1, 'hello');
        """)
    proc = run(["enroll", "wide"], check=False)
    assert proc.returncode == 2
    assert "vector(768)" in proc.stderr and "384" in proc.stderr and "--force" in proc.stderr
    with connect(db_url) as conn:
        assert conn.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0] == 0  # nothing enrolled
    assert "1 existing rows queued" in run(["enroll", "wide", "--force"]).stdout


def test_output_piped_into_head_exits_quietly(db_url):
    with connect(db_url) as conn:
        for i in range(300):  # more dead letters than a pipe buffer holds once listed
            conn.execute("insert into autoembed.dead_letters (queue_name, msg_id, message, error, attempts) "
                         "values ('embedding_jobs', %s, '{\"schema\": \"public\", \"table\": \"t\", \"id\": 1}', %s, 5)",
                         (i, "x" * 300))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for args in ("status", "dead-letters --limit 300"):
        proc = subprocess.run(f"{sys.executable} -m autoembed_dagster.cli {args} | head -1", shell=True,
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.stdout.count("\n") == 1, proc.stdout
        assert proc.stderr == "", f"autoembed {args} | head: {proc.stderr}"


def test_every_option_has_help():
    from autoembed_dagster.cli import build_parser

    parser = build_parser()
    missing = []
    for action in parser._subparsers._group_actions[0].choices.items():
        name, sub = action
        for opt in sub._actions:
            if opt.help is None and not isinstance(opt, argparse._HelpAction):
                missing.append(f"{name} {'/'.join(opt.option_strings) or opt.dest}")
    assert set(missing) <= {"db action"}, missing  # `db` belongs to another change


def test_status_shows_every_target_both_shapes_in_columns_that_line_up_with_long_names(db_url):
    """Every target's health, a vector column's as a chunk set's (a vector column's was shown by the
    Dagster checks only), one row each; a queue or target name longer than the old fixed widths
    pushed its row out of line."""
    long_queue = "embedding_jobs_of_the_customer_support_tickets"
    with connect(db_url) as conn:
        conn.execute("select pgmq.create(%s)", (long_queue,))
        conn.execute("""
            create table customer_support_ticket_threads_archive (id int primary key, body text);
            create function ticket_input(t customer_support_ticket_threads_archive) returns text
                language sql immutable as $$ select t.body $$;
            insert into customer_support_ticket_threads_archive values (1, 'printer on fire');
            select autoembed.enroll_chunks('customer_support_ticket_threads_archive'::regclass, 'ticket_input', 64, 8,
                                           'id', 'embedding_jobs', 'vector', 384, true);
            create table notes (id int primary key, body text, embedding vector(384));
            create function note_input(n notes) returns text language sql immutable as $$ select n.body $$;
            insert into notes values (1, 'one'), (2, 'two'), (3, null);
            select autoembed.enroll('notes', 'note_input', 'embedding');
        """)
    out = run(["status"]).stdout
    queues, targets = out.split("\n\n")[:2]
    lines = queues.splitlines()
    assert any(line.startswith(long_queue) for line in lines), out
    assert len({len(line) for line in lines}) == 1, out  # right-aligned last column: one edge
    header, *rows = targets.splitlines()
    assert [row.split()[:2] for row in rows] == [["public.customer_support_ticket_threads_archive", "->"],
                                                 ["public.notes.embedding", "-"]], out
    # the column target: 2 rows with input, none embedded yet (missing), model of the environment
    assert rows[1].split()[1:7] == ["-", "2", "0", "2", "0", "0"], out
    model = header.index("model")
    assert all(row[model - 2:model] == "  " and row[model] != " " for row in rows), out
    for column in ("tokens", "rows", "dead"):  # right edges line up
        end = header.index(column) + len(column)
        assert all(row[end - 1] != " " and row[end] == " " for row in rows), (column, out)
    as_json = json.loads(run(["status", "--json"]).stdout)
    assert [(t["table"], t["shape"], t["missing"]) for t in as_json["targets"]] == [
        ("public.customer_support_ticket_threads_archive -> customer_support_ticket_threads_archive_chunks", "chunks", 1),
        ("public.notes.embedding", "column", 2)]
    assert [t["shape"] for t in as_json["chunk_targets"]] == ["chunks"]
