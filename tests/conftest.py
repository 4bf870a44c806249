"""Fixtures: one real embedded Postgres per test session, a fresh database per test (cloned from
an initialised template), and a real OpenAI-compatible HTTP server."""

from __future__ import annotations

import itertools
import os
import secrets

import psycopg
import pytest
from psycopg import sql

from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.db.server import connect, throwaway_server, with_database
from autoembed_dagster.core.embed import clear_embedder_cache
from autoembed_dagster.core.db.schema import init_db

from .fake_openai import FakeOpenAI

# Every database a test session creates has a name of its own (pid + random): a server named by
# AUTOEMBED_TEST_DATABASE_URL may hold other databases (`dagster`, another session's template),
# and tests create and drop only their own.
# A queue sensor waits up to 3.5 s on LISTEN when its queue is empty (defs/sensors.py): tests tick
# it directly many times and turn the wait off; test_dagster_layer turns it on where it is tested.
os.environ.setdefault("AUTOEMBED_SENSOR_WAIT", "0")

SESSION_TAG = f"{os.getpid()}_{secrets.token_hex(3)}"
TEMPLATE = f"autoembed_template_{SESSION_TAG}"
_counter = itertools.count()


def unique_database_name(prefix: str) -> str:
    return f"{prefix}_{SESSION_TAG}_{next(_counter)}"


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_server_url():
    """URL of the server the tests use: AUTOEMBED_TEST_DATABASE_URL, or an embedded one."""
    with throwaway_server("autoembed-test-", "AUTOEMBED_TEST_DATABASE_URL") as url:
        yield url


@pytest.fixture(scope="session")
def template_url(pg_server_url):
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(TEMPLATE)))
    url = with_database(pg_server_url, TEMPLATE)
    with connect(url) as conn:
        init_db(conn)
    yield url
    drop_database(pg_server_url, TEMPLATE)


@pytest.fixture
def db_url(pg_server_url, template_url, monkeypatch):
    """A fresh, initialised database for one test; AUTOEMBED_DATABASE_URL points at it."""
    name = unique_database_name("t")
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {} template {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
    url = with_database(pg_server_url, name)
    monkeypatch.setenv("AUTOEMBED_DATABASE_URL", url)
    yield url
    drop_database(pg_server_url, name)


@pytest.fixture
def dagster_database(pg_server_url, monkeypatch):
    """A name of its own for the database `autoembed dagster-env` / `demo` give Dagster's storage
    (AUTOEMBED_DAGSTER_DATABASE, default `dagster`), dropped after the test."""
    name = unique_database_name("dagster")
    monkeypatch.setenv("AUTOEMBED_DAGSTER_DATABASE", name)
    yield name
    drop_database(pg_server_url, name)


@pytest.fixture
def conn(db_url):
    with connect(db_url) as c:
        yield c


@pytest.fixture(scope="module")
def provider_server():
    """One fake provider for a module whose tests configure the client themselves (see `srv`)."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def srv(provider_server, monkeypatch):
    """The module's fake provider, reset, with no provider settings left in the environment."""
    provider_server.reset()
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL", "AUTOEMBED_DIMENSIONS"):
        monkeypatch.delenv(name, raising=False)
    clear_embedder_cache()
    return provider_server


@pytest.fixture
def fake_openai(monkeypatch):
    """A local OpenAI-compatible server; the real openai client is pointed at it by env."""
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.setenv("AUTOEMBED_PROVIDER", "openai")
        monkeypatch.setenv("AUTOEMBED_MODEL", "text-embedding-3-small")
        monkeypatch.setenv("AUTOEMBED_MAX_RETRIES", "2")
        monkeypatch.setenv("AUTOEMBED_REQUEST_TIMEOUT", "5")
        clear_embedder_cache()
        yield server
        clear_embedder_cache()


@pytest.fixture
def settings(monkeypatch) -> Settings:
    monkeypatch.setenv("AUTOEMBED_RETRY_DELAY", "0")
    return Settings.from_env()


SUPABASE_SQL = """
create table documents (
  id integer primary key generated always as identity,
  title text not null,
  content text not null,
  embedding halfvec(1536),
  created_at timestamp with time zone default now()
);

create index on documents using hnsw (embedding halfvec_cosine_ops);

create or replace function embedding_input(doc documents)
returns text
language plpgsql
immutable
as $$
begin
  return '# ' || doc.title || E'\\n\\n' || doc.content;
end;
$$;

create trigger embed_documents_on_insert
  after insert
  on documents
  for each row
  execute function util.queue_embeddings('embedding_input', 'embedding');

create trigger embed_documents_on_update
  after update of title, content -- must match the columns in embedding_input()
  on documents
  for each row
  execute function util.queue_embeddings('embedding_input', 'embedding');
"""


@pytest.fixture
def supabase_docs(conn):
    """The table, content function and triggers of Supabase's Automatic Embeddings guide, verbatim."""
    conn.execute(SUPABASE_SQL)
    return conn
