"""The `autoembed` command, run as a user would: a subprocess against the real database."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import psycopg
import pytest

from autoembed_dagster.core.database import connect


def run(args, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL"))}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "autoembed_dagster.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoembed {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_zero_config_embedded_server_lifecycle(tmp_path):
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
