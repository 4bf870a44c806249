"""Fixtures: one real embedded Postgres per test session, a fresh database per test (cloned from
an initialised template), and a real OpenAI-compatible HTTP server."""

from __future__ import annotations

import itertools
import os

import psycopg
import pytest

from autoembed_dagster.core.config import EmbedderSettings, Settings
from autoembed_dagster.core.database import connect, throwaway_server, with_database
from autoembed_dagster.core.embedders import clear_embedder_cache
from autoembed_dagster.core.migrations import init_db

from .fake_openai import FakeOpenAI

TEMPLATE = "autoembed_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server_url():
    """URL of the server the tests use: AUTOEMBED_TEST_DATABASE_URL, or an embedded one."""
    with throwaway_server("autoembed-test-", "AUTOEMBED_TEST_DATABASE_URL") as url:
        yield url


@pytest.fixture(scope="session")
def template_url(pg_server_url):
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {TEMPLATE}")
        conn.execute(f"create database {TEMPLATE}")
    url = with_database(pg_server_url, TEMPLATE)
    with connect(url) as conn:
        init_db(conn)
    return url


@pytest.fixture
def db_url(pg_server_url, template_url, monkeypatch):
    """A fresh, initialised database for one test; AUTOEMBED_DATABASE_URL points at it."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"create database {name} template {TEMPLATE}")
    url = with_database(pg_server_url, name)
    monkeypatch.setenv("AUTOEMBED_DATABASE_URL", url)
    yield url
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {name} with (force)")


@pytest.fixture
def conn(db_url):
    with connect(db_url) as c:
        yield c


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
