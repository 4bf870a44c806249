"""`autoembed db init`: install pgvector, pgmq and the project's SQL, idempotently.

The numbered files in `sql/` are all re-applied every time (each is idempotent: `if not exists`,
`create or replace`), under an advisory lock so concurrent inits do not interleave.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import errors

INIT_LOCK_KEY = 0x6175746F656D62  # "autoemb"


def sql_dir() -> Path:
    """The project's sql/ folder as the package carries it (autoembed_dagster/sql, a link to the
    checkout's sql/; a real folder in an installed wheel)."""
    override = os.environ.get("AUTOEMBED_SQL_DIR")
    if override:
        return Path(override)
    from autoembed_dagster.packaged import packaged

    return packaged("sql")


def sql_files() -> list[Path]:
    files = sorted(sql_dir().glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise FileNotFoundError(f"no migration files found in {sql_dir()}")
    return files


def _pgmq_wheel_sql() -> str:
    return resources.files("pgmq").joinpath("sql/pgmq.sql").read_text()


def install_pgmq(conn: psycopg.Connection) -> str:
    """Install pgmq: the server's extension when it has one, else the SQL the pgmq wheel ships.

    Returns how it was installed ("extension", "sql", or "present").
    """
    if conn.execute("select 1 from pg_namespace where nspname = 'pgmq'").fetchone():
        return "present"
    available = conn.execute("select 1 from pg_available_extensions where name = 'pgmq'").fetchone()
    if available:
        conn.execute("create extension if not exists pgmq")
        return "extension"
    # The wheel's SQL uses CREATE FUNCTION without OR REPLACE: apply it once, in one transaction.
    with conn.transaction():
        conn.execute(_pgmq_wheel_sql())
    return "sql"


def init_db(conn: psycopg.Connection) -> dict[str, str]:
    """Apply everything. `conn` must be in autocommit mode. Returns what was done, for display."""
    done: dict[str, str] = {}
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (INIT_LOCK_KEY,))
        try:
            with conn.transaction():
                conn.execute("create extension if not exists vector")
        except (errors.FeatureNotSupported, errors.UndefinedFile) as exc:
            raise RuntimeError(
                "the pgvector extension is not available on this server: install pgvector "
                f"(server said: {exc})"
            ) from exc
        done["pgmq"] = install_pgmq(conn)
        for path in sql_files():
            conn.execute(path.read_text())
            done[path.name] = "applied"
    return done
