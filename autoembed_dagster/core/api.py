"""The Python API: the operations of the CLI as functions (the CLI is a thin shell over these)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import psycopg

from .queue import pgmq
from .targets.splitter import PYTHON_NAMES, SizeNames, splitter_for
from .config import ConfigError, EmbedderSettings, Settings
from .db.server import connect, database_url
from .drain import DrainStats, EmbedderResolver, drain as _drain
from .embed import make_embedder
from .db.schema import init_db
from .search import ChunkHit, Hit, search as _search, search_chunks as _search_chunks


@contextmanager
def session(url: str | None = None, settings: Settings | None = None, *,
            create: bool = False) -> Iterator[psycopg.Connection]:
    """A connection to the project's database; only `create` starts an embedded server where no
    project exists yet (see database.require_project)."""
    settings = settings or Settings.from_env()
    conn = connect(url or database_url(settings, create=create))
    try:
        yield conn
    finally:
        conn.close()


def init(url: str | None = None) -> dict[str, str]:
    """Install pgvector, pgmq and the project's schema (idempotent)."""
    with session(url, create=True) as conn:
        return init_db(conn)


def enroll(
    table: str,
    content_function: str,
    embedding_column: str = "embedding",
    *,
    key_column: str = "id",
    queue: str = "embedding_jobs",
    backlog: bool = True,
    url: str | None = None,
    chunk_tokens: int | None = None,
    chunk_overlap: int = 0,
    embedder_settings: EmbedderSettings | None = None,
    dimensions: int | None = None,
    vector_type: str | None = None,
    size_names: SizeNames = PYTHON_NAMES,
) -> int:
    """Install the project's triggers on `table` (a name, optionally schema-qualified) and enqueue
    every row that has no vector yet. Returns the number of jobs enqueued.

    With `chunk_tokens`: a chunk target (long documents). Its chunk table `<table>_chunks` is
    created with `vector_type`(`dimensions`, default: the model's size; the type defaults to that of an
    existing chunk table, else halfvec); chunks hold at most
    `chunk_tokens` tokens of the model (`embedder_settings`, default: the environment's), with
    `chunk_overlap` tokens repeated from the previous chunk. `embedding_column` is not used then.
    Sizes the model cannot take are refused naming them as `size_names` spells them (the Python
    keywords; the CLI passes its flags)."""
    shape: tuple = (embedding_column, None, None, None, None)  # a vector column
    with session(url) as conn:
        if chunk_tokens is not None:
            embedder = make_embedder(embedder_settings or EmbedderSettings.from_env(), dimensions)
            splitter_for(embedder, chunk_tokens, chunk_overlap, size_names)  # refuses sizes beyond the model's window
            shape = (None, chunk_tokens, chunk_overlap, vector_type or _chunk_table_vector_type(conn, table) or "halfvec",
                     dimensions or embedder.identity.dimensions)
        # One enrolment path for both shapes (sql/005 enroll_target).
        return conn.execute(
            "select autoembed.enroll_target(%s::regclass, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (table, content_function, key_column, queue, backlog, *shape),
        ).fetchone()[0]


def _chunk_table_vector_type(conn: psycopg.Connection, table: str) -> str | None:
    """`vector` or `halfvec`: the type of the vector column of `table`'s existing chunk table (enrolling
    it again keeps it), None when there is none."""
    row = conn.execute(
        """select t.typname from pg_class p
           join pg_class c on c.relnamespace = p.relnamespace and c.relname = p.relname || '_chunks'
           join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
           join pg_type t on t.oid = a.atttypid and t.typname in ('vector', 'halfvec')
           where p.oid = %s::regclass""", (table,)).fetchone()
    return row[0] if row else None


def drain(
    url: str | None = None,
    settings: Settings | None = None,
    resolver: EmbedderResolver | None = None,
    *,
    idle_timeout: float = 0.0,
    time_budget: float | None = None,
    on_batch: Callable[[DrainStats, DrainStats], None] | None = None,
) -> DrainStats:
    """Embed every queued job; see core.drain.Drainer.run."""
    settings = settings or Settings.from_env()
    with session(url, settings) as conn:
        return _drain(conn, settings, resolver, idle_timeout=idle_timeout, time_budget=time_budget,
                      on_batch=on_batch)


def status(url: str | None = None, queue: str | None = None) -> list[pgmq.QueueStatus]:
    with session(url) as conn:
        return pgmq.status(conn, queue)


def schema_problems(url: str | None = None):
    """(broken targets, latest repairs): what the schema broke and what was repaired (core.health)."""
    from .health import broken_targets, repairs

    with session(url) as conn:
        return broken_targets(conn), repairs(conn)


def dead_letters(url: str | None = None, queue: str | None = None, limit: int = 50) -> list[dict]:
    with session(url) as conn:
        return pgmq.dead_letters(conn, queue, limit)


def retry_dead_letters(url: str | None = None, queue: str = "embedding_jobs", ids: list[int] | None = None) -> int:
    with session(url) as conn:
        return conn.execute("select autoembed.retry_dead_letters(%s, %s)", (queue, ids)).fetchone()[0]


def search(query: str, *, table: str, url: str | None = None, **kwargs) -> list[Hit]:
    with session(url) as conn:
        return _search(conn, query, table=table, **kwargs)


def search_chunks(query: str, *, table: str, schema: str = "public", content_function: str = "embedding_input",
                  key_column: str = "id", k: int = 5, embedder_settings: EmbedderSettings | None = None,
                  url: str | None = None) -> list[ChunkHit]:
    """The `k` rows of a chunk target whose best chunk is nearest to `query`, with that chunk's
    text, searched with the model (`embedder_settings`, default: the environment's) that filled it."""
    from .targets.chunks import resolve_chunk_target

    with session(url) as conn:
        target = resolve_chunk_target(conn, schema, table, content_function, key_column=key_column)
        embedder = make_embedder(embedder_settings or EmbedderSettings.from_env(), target.dimensions)
        return _search_chunks(conn, query, embedder, table=table, schema=schema, content_function=content_function,
                              key_column=key_column, k=k)


def targets_health(url: str | None = None, embedder_settings: EmbedderSettings | None = None,
                   not_shown: list | None = None):
    """(target, health) of every registered target, vector columns and chunk sets alike
    (core.health.registered_targets, one path: core.health.target_health), under the model of
    `embedder_settings` (default: the environment's) sized to the target. A vector column that
    model cannot fill counts every vector as another model's. Left out, with why appended to
    `not_shown` as (label, reason): a chunk set when that model cannot be made (which chunk sets
    are current needs the model's tokenizer), a target whose table the session's role may not read."""
    from .health import registered_targets, target_health
    from .targets.shapes import shape_of

    settings = embedder_settings or EmbedderSettings.from_env()
    skipped = not_shown if not_shown is not None else []
    out = []
    with session(url) as conn:
        role = conn.execute("select current_user").fetchone()[0]
        for t in registered_targets(conn):
            label = shape_of(t).label
            try:
                embedder = make_embedder(settings, t.dimensions)
            except ConfigError as e:
                if t.chunked:
                    skipped.append((label, f"its model cannot be made here ({e}); its chunk sets are"
                                           " counted with the model's tokenizer"))
                    continue
                embedder = None
            try:
                with conn.transaction():
                    out.append((t, target_health(conn, t, embedder)))
            except psycopg.errors.InsufficientPrivilege as e:
                # A table this role may not read (README's dashboard role): its queues still show.
                skipped.append((label, f"role {role} may not read it ({e.diag.message_primary}); grant it"
                                       f" select on {t.key.schema}.{t.key.table} to see its health"))
    return out


def chunk_targets_health(url: str | None = None, embedder_settings: EmbedderSettings | None = None):
    """(target, health) of every registered chunk target (targets_health's chunk sets)."""
    return [(t, h) for t, h in targets_health(url, embedder_settings) if t.chunked]
