"""Shared plumbing for the benchmarks: an embedded Postgres in a temp dir, the lean fake
provider in its own process, tables, timing and printing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoembed_dagster.core.db.server import connect, ensure_database, throwaway_server  # noqa: E402
from autoembed_dagster.core.embed import clear_embedder_cache  # noqa: E402
from autoembed_dagster.core.db.schema import init_db  # noqa: E402


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """A fresh embedded Postgres in a temp dir (or AUTOEMBED_BENCH_DATABASE_URL); yields its URL."""
    with throwaway_server("autoembed-bench-", "AUTOEMBED_BENCH_DATABASE_URL") as url:
        yield url


_dbs = iter(range(10**6))


def fresh_db(server_url: str, prefix: str = "bench") -> str:
    """A new database with the project's schema installed."""
    name = f"{prefix}_{os.getpid()}_{next(_dbs)}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f"drop database if exists {name} with (force)")
    url = ensure_database(server_url, name)
    with connect(url) as c:
        init_db(c)
    return url


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop `proc` (started with start_new_session=True) and every process left in its process
    group: a dagster-daemon's code servers and run workers too, including one it started while
    it was being stopped. SIGTERM, then SIGKILL to whatever is still there after `grace` s."""
    import psutil

    pgid = proc.pid

    def members() -> list[int]:
        found = []
        for pid in psutil.pids():
            try:
                if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(min(1.0, max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is not None and not members():
            return
        if time.monotonic() > deadline + 10:
            raise RuntimeError(f"processes of group {pgid} survived SIGKILL: {members()}")
        if time.monotonic() > deadline:
            sig = signal.SIGKILL


TAG_VARIABLE = "AUTOEMBED_BENCH_PROCESS_TAG"


def tagged(tag: str) -> list[int]:
    """Processes whose environment carries `tag` (inherited by everything a process starts, also
    in a session of its own: `autoembed demo`'s daemon and webserver, their code servers)."""
    import psutil

    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            pass
    return [p for p in found if p != os.getpid()]


def stop_tagged(tag: str, grace: float = 20.0) -> None:
    """SIGTERM every process carrying `tag`, then SIGKILL what is left after `grace` s."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        left = tagged(tag)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        if time.monotonic() > deadline + 10:
            raise RuntimeError(f"processes tagged {tag} survived SIGKILL: {tagged(tag)}")
        if time.monotonic() > deadline:
            sig = signal.SIGKILL


@contextlib.contextmanager
def process_group(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """A subprocess in a process group of its own, stopped with everything it started when the
    block ends, however it ends: its process group (stop_group), then any process that inherited
    its environment's tag (those it started in sessions of their own, and their children)."""
    import uuid

    tag = uuid.uuid4().hex
    kwargs["env"] = {**(kwargs.get("env") or os.environ), TAG_VARIABLE: tag}
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        try:
            stop_group(proc)
        finally:
            stop_tagged(tag)


@contextlib.contextmanager
def fake_provider(dims: int = 1536) -> Iterator[str]:
    """The lean fake OpenAI server in a subprocess; points the openai client at it by env."""
    with process_group([sys.executable, str(ROOT / "bench" / "fake_server.py"), "--dims", str(dims)],
                       stdout=subprocess.PIPE, text=True) as proc:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake provider did not start: {line!r}")
        base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        old = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AUTOEMBED_PROVIDER", "AUTOEMBED_MODEL")}
        os.environ.update(OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-bench", AUTOEMBED_PROVIDER="openai",
                          AUTOEMBED_MODEL="text-embedding-3-small")
        clear_embedder_cache()
        try:
            yield base_url
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            clear_embedder_cache()


def create_docs(conn: psycopg.Connection, table: str = "docs", vector: str = "halfvec(1536)", hnsw: bool = False) -> None:
    conn.execute(f"""
        create table {table} (id bigint primary key, title text not null, body text not null, embedding {vector});
        create function {table}_input(d {table}) returns text language sql immutable
            as $$ select '# ' || d.title || E'\\n\\n' || d.body $$;
    """)
    if hnsw:
        ops = "halfvec_cosine_ops" if vector.startswith("halfvec") else "vector_cosine_ops"
        conn.execute(f"create index on {table} using hnsw (embedding {ops})")


def body_sql(n_words: int = 40) -> str:
    """SQL expression (of g) making a ~n_words-word text per row, distinct per g."""
    return f"'row ' || g || ' ' || repeat('lorem ipsum dolor sit amet ', {max(1, n_words // 5)})"


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def timed_threads(target, n: int) -> float:
    """Run `target` in `n` threads at once; seconds until all of them are done."""
    with Timer() as t:
        threads = [threading.Thread(target=target) for _ in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return t.seconds


def source_trees(arg: str | None) -> list[Path]:
    """The source trees of a `--trees a,b` option (the before and after of a change), this one
    when none is given."""
    if not arg:
        return [ROOT]
    return [Path(t.strip()).resolve() for t in arg.split(",") if t.strip()]


def header(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def line(label: str, value: str) -> None:
    print(f"  {label:<58} {value}", flush=True)
