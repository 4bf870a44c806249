"""`autoembed demo` and `autoembed dagster-env`.

The demo runs everything on this machine, offline and with no API key: the embedded Postgres,
`autoembed db init`, two tables of the Python standard library's docs (demo/corpus.py) enrolled for
embedding with the local model (384 dimensions): short docstrings, one vector per row
(`stdlib_docs`), and whole-module documents embedded as chunks (`stdlib_modules` ->
`stdlib_modules_chunks`); then `dagster-daemon` and `dagster-webserver` (the project's own instance,
DAGSTER_HOME=.autoembed/dagster_home; -w workspace.yaml) whose queue sensor starts the drain run. It shows the queue draining and semantic
searches answering (over the chunks: the passage that matched); Ctrl-C stops the processes it
started, by pid.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ..core.config import HOME_DIRNAME, ConfigError, Settings
from ..core.db.schema import init_db
from ..core.db.server import (connect, database_name, database_url, embedded_pgdata, embedded_running,
                              ensure_database, make_home, stop_embedded)
from ..core.pipelines import Pipeline
from ..core.queue import pgmq
from ..packaged import checkout, packaged
from ..processes import Children as Started
from ..processes import AlreadyRunning, hold_the_database, stop_on_signals
from .corpus import Doc, LongDoc, named_long_docs, stdlib_docs

DAGSTER_DATABASE = "dagster"  # Dagster's storage, on the data's server; AUTOEMBED_DAGSTER_DATABASE overrides
DEMO_SCHEMA = "autoembed_demo"
DEMO_TABLE = "stdlib_docs"
# Schema-qualified: the triggers and the drain resolve it whatever the search_path.
DEMO_FUNCTION = f"{DEMO_SCHEMA}.embedding_input"
MODULES_TABLE = "stdlib_modules"  # whole-module documents, embedded as chunks into stdlib_modules_chunks
MODULES_FUNCTION = f"{DEMO_SCHEMA}.module_input"
DEMO_PROJECT = "demo"  # the demo's Dagster project, in the checkout: demo/autoembed_demo_project/defs/*/defs.yaml
QUERIES = (
    "parse command-line options and arguments",
    "compress data with gzip",
    "read and write CSV files",
    "run functions in parallel on several processes",
    "send an email through an SMTP server",
)
# Whole modules (the demo loads the first --modules of them): well-known, one long document each
# (~300 chunks of at most 200 tokens for all 16: about 20 s of the local model on 2 cores).
DEMO_MODULES = (
    "shutil", "smtplib", "heapq", "functools", "json", "tempfile", "textwrap", "argparse", "tarfile",
    "urllib.parse", "uuid", "contextlib", "datetime", "csv", "gzip", "zipfile",
)
# A question answered by one passage of one module: search lands on that chunk.
CHUNK_QUERIES = (
    "recursively delete a directory tree",
    "log in to an SMTP server that requires authentication",
    "push an item on a heap and pop the smallest",
    "cache the results of a function call",
)


# -- locations -----------------------------------------------------------------------------------
INSTANCE_DIRNAME = "dagster_home"  # Dagster's instance, in the project's .autoembed folder
_WRITTEN = "# written by autoembed from its packaged dagster.yaml (sha256 {}); edited, it is kept as it is"


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_instance_config(home: Path) -> Path:
    """`home`/dagster.yaml from the packaged one. A copy autoembed wrote and nobody edited since
    (its first line records the hash of the rest) follows the package on an upgrade; an edited or
    a user's own file is left as it is."""
    template = (packaged("dagster_home") / "dagster.yaml").read_text()
    path = home / "dagster.yaml"
    if path.is_file():
        first, _, rest = path.read_text().partition("\n")
        if first != _WRITTEN.format(_sha(rest)) or rest == template:
            return path  # edited (or never ours), or current
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(_WRITTEN.format(_sha(template)) + "\n" + template)
    return path


def instance_home(settings: Settings | None = None) -> Path:
    """Dagster's instance directory (DAGSTER_HOME) of this project: `DAGSTER_HOME` when it is set
    (yours wins; given the packaged dagster.yaml if it has none), else dagster_home/ in the
    project's .autoembed folder, next to its embedded database: each project has an instance of
    its own (runs, sensors, storage settings), never another project's."""
    explicit = os.environ.get("DAGSTER_HOME")
    if explicit:
        home = Path(explicit).expanduser().resolve()
        if not (home / "dagster.yaml").exists():
            write_instance_config(home)
        return home
    settings = settings or Settings.from_env()
    home = make_home(settings.home.resolve()) / INSTANCE_DIRNAME
    write_instance_config(home)
    return home


# What `autoembed dagster-env` exports: each names the project it was run in (its .autoembed folder).
PROJECT_VARIABLES = ("DAGSTER_HOME", "AUTOEMBED_DATABASE_URL", "DAGSTER_POSTGRES_URL")


def _project_folder_of(variable: str, value: str) -> Path | None:
    """The `.autoembed` folder a variable's value lies in (DAGSTER_HOME: the path; a database URL
    or conninfo string: the unix socket directory of the embedded server), None for anything else."""
    if variable == "DAGSTER_HOME":
        path = value
    else:
        from urllib.parse import parse_qs

        parsed = urlparse(value)
        if parsed.scheme:
            path = (parse_qs(parsed.query).get("host") or [parsed.hostname or ""])[0]
        else:
            from psycopg.conninfo import conninfo_to_dict

            try:
                path = str(conninfo_to_dict(value).get("host") or "")
            except Exception:  # noqa: BLE001 - not a conninfo string: nothing to say about it
                return None
    if not path.startswith(("/", "~")):
        return None
    absolute = Path(os.path.abspath(Path(path).expanduser()))  # as named (a symlinked socket dir too)
    folder = next((f for f in (absolute, *absolute.parents) if f.name == HOME_DIRNAME), None)
    return folder.resolve() if folder is not None else None


def other_projects_env(settings: Settings) -> str | None:
    """A note when this shell's settings are another project's (an earlier `eval "$(autoembed
    dagster-env)"` there): DAGSTER_HOME, AUTOEMBED_DATABASE_URL or DAGSTER_POSTGRES_URL in another
    project's .autoembed folder. They win, as any explicit setting, so say how to drop them. One
    note for every command that reads them (dev, demo, dagster-env, status, search)."""
    ours = settings.home.resolve()
    theirs = {}
    for variable in PROJECT_VARIABLES:
        value = os.environ.get(variable)
        folder = _project_folder_of(variable, value) if value else None
        if folder is not None and folder != ours:
            theirs.setdefault(folder, []).append(variable)
    if not theirs:
        return None
    named = "; ".join(f"{' and '.join(names)} {'are' if len(names) > 1 else 'is'} set to the project in {folder.parent}"
                      for folder, names in theirs.items())
    return (f"note: {named} (by an `eval \"$(autoembed dagster-env)\"` there?), not to this folder's project "
            f"({ours.parent}): used as set. For this project's own instance and database: "
            "unset DAGSTER_HOME DAGSTER_POSTGRES_URL AUTOEMBED_DATABASE_URL")


def warn_if_other_projects_env(settings: Settings | None = None) -> None:
    """other_projects_env's note on stderr (commands whose output is data: status, search)."""
    note = other_projects_env(settings or Settings.from_env())
    if note:
        print(note, file=sys.stderr)


def _project_demo_copy() -> Path | None:
    """The Dagster project at or above the current folder when it is (a copy of) the demo project:
    its defs.yaml files are the ones to run, not those of the package's own copy."""
    from ..core.config import find_dagster_project

    home = os.environ.get("HOME")
    project = find_dagster_project(Path.cwd(), Path(home) if home else None)
    if project is None:
        return None
    try:
        return project if _root_module(project) == "autoembed_demo_project" else None
    except (KeyError, OSError, ValueError):
        return None


def demo_project(settings: Settings | None = None) -> Path:
    """The demo's Dagster project: the one the current folder is in when it is a copy of the demo
    (a clone's demo/); else demo/ of the checkout the package runs from; with an installed wheel,
    a copy of the packaged one in the project's .autoembed folder (made once: edits stay)."""
    here = _project_demo_copy()
    if here is not None:
        return here
    root = checkout()
    if root is not None:
        return root / DEMO_PROJECT
    project = (settings or Settings.from_env()).home.resolve() / "demo" / "project"
    if not (project / "pyproject.toml").is_file():
        shutil.copytree(packaged("demo_project"), project, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return project


def demo_pipelines() -> tuple[Pipeline, Pipeline]:
    """The demo's two pipelines (docstrings: a vector column; modules: chunks), read from their
    defs.yaml like any declared pipeline."""
    from ..components.declarations import declared_pipelines

    pipelines = declared_pipelines(demo_project())
    columns = [p for p in pipelines if p.table == DEMO_TABLE and not p.chunked]
    chunked = [p for p in pipelines if p.table == MODULES_TABLE and p.chunked]
    if len(columns) != 1 or len(chunked) != 1:
        raise ConfigError(f"the demo project {demo_project()} must declare one pipeline of {DEMO_SCHEMA}.{DEMO_TABLE} "
                          f"and one chunked pipeline of {DEMO_SCHEMA}.{MODULES_TABLE}, found "
                          f"{', '.join(p.name for p in pipelines) or 'none'}")
    return columns[0], chunked[0]


def demo_pipeline() -> Pipeline:
    """The demo's docstring pipeline (one vector per row)."""
    return demo_pipelines()[0]


def as_url(conninfo: str) -> str:
    """A libpq key=value conninfo string (`host=... dbname=...`) as the equivalent postgresql://
    URL: SQLAlchemy and the URL helpers read URLs only. A URL is returned unchanged."""
    if "://" in conninfo:
        return conninfo
    from urllib.parse import quote, urlencode

    from psycopg.conninfo import conninfo_to_dict

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    except Exception as exc:  # psycopg.ProgrammingError: not a conninfo either
        raise ConfigError(f"AUTOEMBED_DATABASE_URL is neither a postgresql:// URL nor a key=value conninfo "
                          f"string ({exc})") from None
    user, password = params.pop("user", ""), params.pop("password", "")
    host, port, dbname = params.pop("host", ""), params.pop("port", ""), params.pop("dbname", "")
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + ("@" if user else "")
    if host.startswith("/"):  # a unix socket directory goes in the query
        params["host"], host = host, ""
    netloc = auth + host + (f":{port}" if port else "")
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def sqlalchemy_url(libpq_url: str) -> str:
    """The same URL (or conninfo string) in the form Dagster's Postgres storage needs (psycopg2
    driver; an empty password dropped, so `postgres:@` becomes `postgres@`)."""
    parsed = urlparse(as_url(libpq_url))
    netloc = parsed.netloc
    if parsed.password == "" and "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}@{host}"
    return parsed._replace(scheme="postgresql+psycopg2", netloc=netloc).geturl()


def dagster_database() -> str:
    """The name of Dagster's database (tests give each run its own, so that they never touch a
    `dagster` database that is someone else's)."""
    name = os.environ.get("AUTOEMBED_DAGSTER_DATABASE") or DAGSTER_DATABASE
    try:
        return database_name(name)
    except ValueError as exc:
        raise ConfigError(f"AUTOEMBED_DAGSTER_DATABASE: {exc}") from None


# One process at a time prepares a storage database (advisory lock on it): 'dags', 'tore'.
_STORAGE_LOCK = (0x64616773, 0x746F7265)


def dagster_storage_url(data_url: str, database: str | None = None) -> str:
    """Create Dagster's own database on the data's server (if missing), with Dagster's tables in
    it (prepare_dagster_storage); its SQLAlchemy URL."""
    url = sqlalchemy_url(ensure_database(data_url, database or dagster_database()))
    prepare_dagster_storage(url)
    return url


def prepare_dagster_storage(storage_url: str) -> None:
    """What `dagster instance migrate` does, done by the tool wherever it makes or names a storage
    database: Dagster's tables created, or an older Dagster's schema migrated, by one process at a
    time (an advisory lock). Left to the processes that use it, a daemon and a `dagster job launch`
    started together on an empty database both create the tables, and the loser exits ("type
    event_logs already exists")."""
    import psycopg
    from dagster_postgres import DagsterPostgresStorage

    libpq = urlparse(storage_url)._replace(scheme="postgresql").geturl()
    with psycopg.connect(libpq, autocommit=True) as lock:
        lock.execute("select pg_advisory_lock(%s, %s)", _STORAGE_LOCK)
        storage = DagsterPostgresStorage(storage_url)  # creates missing tables, at this Dagster's schema
        try:
            parts = (storage.run_storage, storage.event_log_storage, storage.schedule_storage)
            if any(current != head for current, head in (part.alembic_version() for part in parts)):
                # An instance made by an older Dagster: Dagster's own upgrade, as `instance migrate` runs it.
                storage.run_storage.upgrade()
                storage.run_storage.migrate()
                storage.event_log_storage.upgrade()
                storage.event_log_storage.reindex_assets()
                storage.schedule_storage.upgrade()
                storage.schedule_storage.migrate()
        finally:
            for part in (storage.run_storage, storage.event_log_storage, storage.schedule_storage):
                part.dispose()
        # the lock goes with the connection


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dagster_env(settings: Settings | None = None) -> dict[str, str]:
    """The environment `dagster dev` / `dagster-daemon` need for this project (its own instance,
    its own database), after making sure the data database is initialised and Dagster's database
    exists with its tables. A DAGSTER_POSTGRES_URL set in the environment names the storage, as
    DAGSTER_HOME the instance (prepared all the same)."""
    settings = settings or Settings.from_env()
    home = instance_home(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        url = as_url(database_url(settings))  # key=value conninfo too
    with connect(url) as conn:
        init_db(conn)
    return {"DAGSTER_HOME": str(home), "AUTOEMBED_DATABASE_URL": url, "DAGSTER_POSTGRES_URL": storage_url(url)}


def storage_url(data_url: str) -> str:
    """Dagster's storage, prepared: DAGSTER_POSTGRES_URL when it is set, else the database
    `dagster` (AUTOEMBED_DAGSTER_DATABASE) on the data's server."""
    explicit = os.environ.get("DAGSTER_POSTGRES_URL")
    if explicit:
        prepare_dagster_storage(explicit)
        return explicit
    return dagster_storage_url(data_url)


def print_dagster_env(settings: Settings | None = None) -> int:
    settings = settings or Settings.from_env()
    warn_if_other_projects_env(settings)
    env = dagster_env(settings)
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def run_dagster_dev(port: int = 3000, workspace: str | None = None, keep_db: bool = False) -> int:
    """`autoembed dev`: `dagster dev` with the environment `autoembed dagster-env` prints (Postgres
    started, schema initialised, Dagster's storage ready), on the project in the current directory
    (its workspace.yaml, else its definitions module), else this checkout's own project. Ctrl-C,
    SIGTERM or SIGHUP to this process stop `dagster dev` with everything it started, and the
    embedded Postgres when this command started it (unless `keep_db`)."""
    from ..components.declarations import project_root as dg_project_root

    _executable("dagster-webserver")  # `dagster dev` needs it: say so before anything starts
    stop_on_signals()
    settings = Settings.from_env()
    embedded = not settings.database_url
    was_running = embedded and embedded_running(settings)
    started = Started()
    held = None
    try:
        note = other_projects_env(settings)
        if note:
            say(note)
        env = {**os.environ, **dagster_env(settings)}
        held = hold_the_database(env["AUTOEMBED_DATABASE_URL"], f"dev port {port}")
        if workspace is None:
            project = dg_project_root()
            target = (["-w", str(project / "workspace.yaml")] if (project / "workspace.yaml").is_file()
                      else ["-m", f"{_root_module(project)}.definitions"])
        else:
            project, target = Path.cwd(), ["-w", workspace]
        argv = [_executable("dagster"), "dev", *target, "-p", str(port)]
        say(f"DAGSTER_HOME={env['DAGSTER_HOME']}; data: {_masked(env['AUTOEMBED_DATABASE_URL'])}")
        say("$ " + " ".join(shlex.quote(a) for a in argv))
        # SIGINT first: `dagster dev` shuts its webserver, daemon and code servers down on it (Ctrl-C).
        dev = started.start("dagster dev", argv, cwd=project, env=env, first_signal=signal.SIGINT)
        started.wait()
        return dev.returncode
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 130
    finally:
        left = started.stop(timeout=30)
        if left:
            say(f"still running after SIGKILL: pid {', '.join(map(str, left))}")
        if held is not None:
            held.close()
        if embedded and not was_running and not keep_db and embedded_running(settings):
            stop_embedded(settings)
            say("embedded Postgres stopped (it was started by this command; --keep-db leaves it running)")


def _root_module(project: Path) -> str:
    import tomllib

    data = tomllib.loads((project / "pyproject.toml").read_text())
    return data["tool"]["dg"]["project"]["root_module"]


# -- the demo table ------------------------------------------------------------------------------
def create_demo_table(conn) -> None:
    """(Re)create the demo's own schema, tables, content functions and triggers."""
    conn.execute(f"drop schema if exists {DEMO_SCHEMA} cascade")
    for sql in (
        # Leftovers of an earlier demo run: queued jobs, dead letters (stored hashes went with the
        # dropped table's targets: embedding_state is keyed by target).
        f"delete from pgmq.q_embedding_jobs where message ->> 'schema' = '{DEMO_SCHEMA}'",
        f"delete from autoembed.dead_letters where message ->> 'schema' = '{DEMO_SCHEMA}'",
        f"create schema {DEMO_SCHEMA}",
        f"""create table {DEMO_SCHEMA}.{DEMO_TABLE} (
                id bigint primary key generated always as identity,
                module text not null,
                name text not null,
                kind text not null,
                content text not null,
                embedding vector(384)
            )""",
        f"create index on {DEMO_SCHEMA}.{DEMO_TABLE} using hnsw (embedding vector_cosine_ops)",
        f"""create function {DEMO_FUNCTION}(doc {DEMO_SCHEMA}.{DEMO_TABLE})
            returns text language sql immutable
            as $$ select doc.name || E'\\n\\n' || doc.content $$""",
        f"""create table {DEMO_SCHEMA}.{MODULES_TABLE} (
                id bigint primary key generated always as identity,
                module text not null unique,
                content text not null
            )""",
        f"""create function {MODULES_FUNCTION}(m {DEMO_SCHEMA}.{MODULES_TABLE})
            returns text language sql immutable
            as $$ select m.content $$""",
    ):
        conn.execute(sql)
    conn.execute(
        "select autoembed.enroll(%s::regclass, %s, 'embedding', 'id', 'embedding_jobs', true)",
        (f"{DEMO_SCHEMA}.{DEMO_TABLE}", DEMO_FUNCTION),
    )
    enroll_modules(conn)


def enroll_modules(conn) -> None:
    """The chunked pipeline's table, enrolled with the sizes its defs.yaml declares (enrolment
    gives its chunk table its HNSW index)."""
    p = demo_pipelines()[1]
    conn.execute("select autoembed.enroll_chunks(%s::regclass, %s, %s, %s, %s, %s, 'vector', 384, true)",
                 (p.qualified_table, p.content_function, p.chunk_tokens, p.chunk_overlap, p.key_column, p.queue))


def insert_docs(conn, docs: list[Doc]) -> None:
    """One COPY: the statement trigger enqueues every row with one pgmq.send_batch."""
    with conn.cursor() as cur:
        with cur.copy(f"copy {DEMO_SCHEMA}.{DEMO_TABLE} (module, name, kind, content) from stdin") as copy:
            for d in docs:
                copy.write_row((d.module, d.name, d.kind, d.content.replace("\x00", "")))


def insert_modules(conn, docs: list[LongDoc]) -> None:
    with conn.cursor() as cur:
        with cur.copy(f"copy {DEMO_SCHEMA}.{MODULES_TABLE} (module, content) from stdin") as copy:
            for d in docs:
                copy.write_row((d.module, d.content.replace("\x00", "")))


def queue_corpus(conn, docs: list[Doc], long_docs: list[LongDoc]) -> None:
    """Insert the corpus. The first rows go in a statement of their own: a bulk statement queues
    one message per 200 rows and a message is settled whole, so the drain's first batch (and the
    first vectors on screen) would otherwise wait for 200 rows of the local model."""
    first = first_rows()
    for part in (docs[:first], docs[first:]) if first else (docs,):
        insert_docs(conn, part)
    insert_modules(conn, long_docs)


@dataclass(frozen=True)
class Progress:
    queue: pgmq.QueueStatus | None
    rows: int  # docstrings
    embedded: int  # docstrings with a vector
    modules: int  # module documents
    chunked: int  # module documents with their chunk set
    chunks: int  # chunk rows
    dead: int  # dead letters of the demo's tables

    @property
    def settled(self) -> int:
        return self.embedded + self.chunked + self.dead


def progress(conn) -> Progress:
    """Where the demo's tables stand (the docstrings' vectors, the modules' chunk sets)."""
    status = next(iter(pgmq.status(conn, "embedding_jobs")), None)
    rows, embedded = conn.execute(
        f"select count(*), count(embedding) from {DEMO_SCHEMA}.{DEMO_TABLE}").fetchone()
    modules, chunked, chunk_rows = conn.execute(
        f"""select (select count(*) from {DEMO_SCHEMA}.{MODULES_TABLE}),
                   (select count(distinct id) from {DEMO_SCHEMA}.{MODULES_TABLE}_chunks),
                   (select count(*) from {DEMO_SCHEMA}.{MODULES_TABLE}_chunks)""").fetchone()
    dead = conn.execute(
        "select count(*) from autoembed.dead_letters where message ->> 'schema' = %s", (DEMO_SCHEMA,)
    ).fetchone()[0]
    return Progress(status, rows, embedded, modules, chunked, chunk_rows, dead)


# -- processes -----------------------------------------------------------------------------------
def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        hint = (" (Dagster's web UI: `pip install 'autoembed-dagster[standalone]'`)" if name == "dagster-webserver"
                else "")
        raise ConfigError(f"{name} not found next to {sys.executable} or on PATH{hint}")
    return found


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def fail_orphaned_drain_runs(dagster_home: Path, env: dict[str, str]) -> int:
    """Drain runs left STARTING/STARTED by the processes just stopped: mark them canceled, so the
    lane is free for the next `autoembed demo` / `dagster dev` at once."""
    from dagster import DagsterRunStatus, DagsterInstance, RunsFilter

    n = 0
    with _env(env), DagsterInstance.from_config(str(dagster_home)) as instance:
        records = instance.get_run_records(RunsFilter(
            statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]))
        for record in records:
            run = record.dagster_run
            if run.job_name.startswith("drain_"):
                instance.report_run_canceled(run, message="stopped with `autoembed demo`")
                n += 1
    return n


# -- the demo ------------------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


FIRST_ROWS = 16  # written (and so queued, claimed and embedded) first, alone


def first_rows() -> int:
    """FIRST_ROWS, or AUTOEMBED_DEMO_FIRST_ROWS (0: every row in one statement; bench/bench_demo.py
    measures both)."""
    try:
        return max(0, int(os.environ.get("AUTOEMBED_DEMO_FIRST_ROWS", FIRST_ROWS)))
    except ValueError:
        return FIRST_ROWS


def run_demo(rows: int = 1200, ui: bool = True, port: int = 3000, timeout: float = 900.0,
             keep_db: bool = False, dagster_home: Path | None = None,
             queries: tuple[str, ...] = QUERIES, modules: int = len(DEMO_MODULES)) -> int:
    settings = Settings.from_env()
    if dagster_home is None:
        note = other_projects_env(settings)
        if note:
            say(note)
        dagster_home = instance_home(settings)
    else:  # another instance directory (tests): the packaged dagster.yaml unless it has one
        dagster_home = Path(dagster_home).resolve()
        if not (dagster_home / "dagster.yaml").exists():
            write_instance_config(dagster_home)
    stop_on_signals()  # `kill <pid>` tidies up like Ctrl-C, even when started in the background
    if ui:
        _executable("dagster-webserver")  # the standalone extra: say so before anything starts
    if ui and not port_free(port):
        raise ConfigError(f"port {port} is in use: pass --port")

    embedded = not settings.database_url
    was_running = embedded and embedded_running(settings)
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver's note about XDG_RUNTIME_DIR on headless machines
        url = as_url(database_url(settings))  # key=value conninfo too
    with connect(url) as conn:
        init_db(conn)
    try:
        held = hold_the_database(url, f"demo port {port}")  # before the demo's tables are re-created
    except AlreadyRunning:
        if embedded and not was_running and not keep_db:
            stop_embedded(settings)
        raise
    where = f"embedded, data in {embedded_pgdata(settings)}" if embedded else "AUTOEMBED_DATABASE_URL"
    say(f"Postgres ready ({where}); `autoembed db init` done in {time.monotonic() - t0:.1f} s")

    t = time.monotonic()
    docs = stdlib_docs(rows)
    long_docs = named_long_docs(DEMO_MODULES[:max(modules, 0)])
    say(f"corpus: {len(docs)} docstrings and {len(long_docs)} whole-module documents "
        f"({sum(len(d.content) for d in long_docs) // 1000} k characters) of the Python "
        f"{sys.version_info.major}.{sys.version_info.minor} standard library (read with ast, nothing imported) "
        f"in {time.monotonic() - t:.1f} s")

    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "AUTOEMBED_DATABASE_URL": url,
        "DAGSTER_POSTGRES_URL": storage_url(url),
        "AUTOEMBED_HOME": str(settings.home),
        "PYTHONUNBUFFERED": "1",
        # Claim 64 jobs per batch (default 500) so the progress below moves every second or two.
        "AUTOEMBED_READ_BATCH": os.environ.get("AUTOEMBED_READ_BATCH", "64"),
    }
    dagster_env_only = {k: env[k] for k in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL")}
    say(f"Dagster instance: {dagster_home} (storage: Postgres database "
        f"{urlparse(env['DAGSTER_POSTGRES_URL']).path[1:]})")

    with connect(url) as conn:
        create_demo_table(conn)

    logs = settings.home / "demo" / "logs"
    started = Started()
    project = demo_project()
    workspace = str(project / "workspace.yaml")
    folders = ", ".join(str(project / "autoembed_demo_project" / "defs" / p.name / "defs.yaml") for p in demo_pipelines())
    say(f"the demo's Dagster project: {project} (its pipelines: {folders})")
    try:
        daemon = started.start("dagster-daemon", [_executable("dagster-daemon"), "run", "-w", workspace],
                               cwd=project, env=env, log=logs / "dagster-daemon.log")
        say(f"dagster-daemon started (pid {daemon.pid}; log {logs / 'dagster-daemon.log'})")
        ui_url = f"http://127.0.0.1:{port}"
        if ui:
            web = started.start("dagster-webserver",
                                [_executable("dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
                                cwd=project, env=env, log=logs / "dagster-webserver.log")
            say(f"dagster-webserver started (pid {web.pid}) on {ui_url}")

        with connect(url) as conn:
            t = time.monotonic()
            queue_corpus(conn, docs, long_docs)
            status = progress(conn).queue
            say(f"inserted {len(docs)} rows into {DEMO_SCHEMA}.{DEMO_TABLE} and {len(long_docs)} into "
                f"{DEMO_SCHEMA}.{MODULES_TABLE}: the triggers queued {status.depth if status else '?'} jobs in "
                f"{time.monotonic() - t:.2f} s")
            say("the queue sensor starts a drain run once the daemon is up (typically 10-30 s) ...")
            ok = _watch(conn, started, len(docs) + len(long_docs), timeout)
        if not ok:
            say(f"not finished after {timeout:.0f} s: see {logs} and the Dagster UI")
            return 1

        _search(url, queries)
        _search_chunks(url, CHUNK_QUERIES if long_docs else ())
        if ui:
            if not wait_http(f"{ui_url}/server_info", 60):
                say(f"the webserver did not answer yet: see {logs / 'dagster-webserver.log'}")
            say("")
            say(f"Dagster UI: {ui_url}  (Assets: lineage, drain materializations and checks; "
                "Runs: the drain runs)")
            say(f"Add rows and watch them embed within seconds, e.g.\n  psql '{_masked(url)}' -c "
                f"\"insert into {DEMO_SCHEMA}.{DEMO_TABLE} (module, name, kind, content) "
                "values ('demo', 'demo.hello', 'note', 'Vector search in Postgres')\"")
            say("Ctrl-C stops the daemon and the webserver.")
            say(f"{started.wait()} exited: see {logs}")
            return 1
        return 0
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 130
    finally:
        left = started.stop()
        if left:
            say(f"still running after SIGKILL: pid {', '.join(map(str, left))}")
        held.close()
        try:
            n = fail_orphaned_drain_runs(dagster_home, dagster_env_only)
            if n:
                say(f"marked {n} drain run(s) still running (or waiting for work) as canceled")
        except Exception as exc:  # reporting only: never mask the real outcome
            say(f"could not tidy Dagster's run records: {exc}")
        say(f"stopped: {', '.join(f'{n} (pid {p.pid})' for n, p in started.procs.items()) or 'nothing'}")
        if embedded and not was_running and not keep_db:
            stop_embedded(settings)
            say("embedded Postgres stopped (it was started by this demo; --keep-db leaves it running)")


def _masked(url: str) -> str:
    """The URL or key=value conninfo with its password replaced by ***, for printing."""
    if "://" not in url:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            params = conninfo_to_dict(url)
        except Exception:  # noqa: BLE001 - not parseable: print nothing of it
            return "(AUTOEMBED_DATABASE_URL)"
        return make_conninfo(**{**params, "password": "***"}) if "password" in params else url
    parsed = urlparse(url)
    if parsed.password:
        return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()
    return url


def _watch(conn, started: Started, total: int, timeout: float) -> bool:
    """Print the queue draining until every row has a vector (or is dead-lettered)."""
    tty = sys.stdout.isatty()
    t0 = time.monotonic()
    first_vector = None
    last_print = 0.0
    while True:
        elapsed = time.monotonic() - t0
        now = progress(conn)
        status = now.queue
        if (now.embedded or now.chunked) and first_vector is None:
            first_vector = elapsed
        line = (f"[{elapsed:6.1f} s] queue {status.depth if status else 0:>5} "
                f"(in flight {status.in_flight if status else 0:>4}) | embedded {now.embedded:>5}/{now.rows}"
                + (f" | modules {now.chunked:>3}/{now.modules} ({now.chunks} chunks)" if now.modules else "")
                + (f" | dead letters {now.dead}" if now.dead else ""))
        done = now.settled >= total
        if tty:
            print("\r" + line, end="\n" if done else "", flush=True)
        elif done or elapsed - last_print >= 5:
            print(line, flush=True)
            last_print = elapsed
        if done:
            # Polled every few seconds: a small corpus can go from 0 to done between two polls.
            draining = elapsed - first_vector if first_vector is not None else 0
            rate = (f"; {now.embedded / draining:.0f} rows/s, {now.chunks / draining:.0f} chunks/s while draining"
                    if draining >= 1 else "")
            say(f"all {total} rows settled in {elapsed:.1f} s (first vector after "
                f"{first_vector or 0:.1f} s{rate})")
            return True
        started.record()  # the run workers the daemon starts meanwhile
        dead_procs = started.dead()
        if dead_procs:
            if tty:
                print()
            say(f"{', '.join(dead_procs)} exited early")
            return False
        if elapsed > timeout:
            if tty:
                print()
            return False
        time.sleep(0.5)


def _search(url: str, queries: tuple[str, ...]) -> None:
    from ..core.drain import pipeline_resolver
    from ..core.search import search

    resolver = pipeline_resolver([demo_pipeline()])
    say("")
    say("semantic search (local all-MiniLM-L6-v2, cosine distance):")
    with connect(url) as conn:
        for query in queries:
            t = time.monotonic()
            hits = search(conn, query, table=DEMO_TABLE, schema=DEMO_SCHEMA, content_function=DEMO_FUNCTION,
                          k=3, resolver=resolver)
            say(f'  "{query}"  ({(time.monotonic() - t) * 1000:.0f} ms)')
            for rank, hit in enumerate(hits, 1):
                title, _, rest = hit.input.partition("\n\n")
                first = " ".join(rest.split())[:70]
                say(f"    {rank}. [{hit.distance:.3f}] {title}: {first}")


def search_modules(conn, query: str, k: int = 3):
    """The modules whose best chunk is nearest to `query`: [(module, ChunkHit)]."""
    from ..core.embed import make_embedder
    from ..core.search import search_chunks

    p = demo_pipelines()[1]
    hits = search_chunks(conn, query, make_embedder(p.embedder_settings()), table=p.table, schema=p.schema,
                         content_function=p.content_function, key_column=p.key_column, k=k)
    names = dict(conn.execute(f"select id::text, module from {DEMO_SCHEMA}.{MODULES_TABLE} where id::text = any(%s)",
                              ([h.id for h in hits],)).fetchall())
    return [(names.get(h.id, "?"), h) for h in hits]


def _search_chunks(url: str, queries: tuple[str, ...]) -> None:
    if not queries:
        return
    say("")
    say("semantic search over the modules' chunks (the passage that matched):")
    with connect(url) as conn:
        for query in queries:
            t = time.monotonic()
            hits = search_modules(conn, query)
            say(f'  "{query}"  ({(time.monotonic() - t) * 1000:.0f} ms)')
            for rank, (module, hit) in enumerate(hits, 1):
                say(f"    {rank}. [{hit.distance:.3f}] {module} chunk {hit.chunk_index}: {' '.join(hit.chunk.split())[:70]}")
