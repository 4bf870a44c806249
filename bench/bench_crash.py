"""Crash recovery (issue 15): the drain of a backlog whose claims were held by drains killed -9,
against the drain of the same backlog without a crash.

Each round loads the same rows into two fresh databases. In one, drain processes are killed -9
while they hold claims (with a short visibility timeout, as an operator would set), until every
message has been claimed at least twice; the backlog left there is then drained by a clean drain
and timed. In the other, a clean drain of the same number of rows is timed. A provider with real
latency (40 ms per request) makes a drain that embeds each reclaimed row in a request of its own
(the old rule: attempts = claims) plainly visible. Target: ratio <= 1.5, no dead letters.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from common import ROOT, Timer, body_sql, connect, create_docs, embedded_server, fresh_db, header, line

from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.drain import Drainer
from autoembed_dagster.core.embed import clear_embedder_cache, make_embedder

sys.path.insert(0, str(ROOT))
from tests.fake_openai import FakeOpenAI  # noqa: E402 - the fault-injecting provider of the tests

DRAIN = r"""
from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer
with connect() as conn:
    print("READY", flush=True)
    Drainer(conn, Settings.from_env()).run(idle_timeout=30)
"""


def load(url: str, rows: int) -> None:
    with connect(url) as c:
        create_docs(c)
        # Supabase's row trigger: one message per row, the shape that isolation used to hit.
        c.execute("create trigger q after insert on docs for each row "
                  "execute function util.queue_embeddings('docs_input', 'embedding')")
        c.execute(f"insert into docs select g, 'title ' || g, {body_sql(20)} from generate_series(1, {rows}) g")


def held(c) -> int:
    return c.execute("select count(*) from pgmq.q_embedding_jobs where vt > clock_timestamp()").fetchone()[0]


def wait(cond, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def crash(url: str, vt: int, kills: int) -> int:
    """Kill -9 drains while they hold claims; returns how many messages were claimed twice or more."""
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": url, "AUTOEMBED_VISIBILITY_TIMEOUT": str(vt),
           "PYTHONPATH": str(ROOT)}
    with connect(url) as c:
        for _ in range(kills):
            proc = subprocess.Popen([sys.executable, "-c", DRAIN], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout.readline().strip() == "READY"
            wait(lambda: held(c) > 0)
            time.sleep(0.3)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            wait(lambda: held(c) == 0, timeout=vt + 60)
        return c.execute("select count(*) from pgmq.q_embedding_jobs where read_ct >= 2").fetchone()[0]


def timed_drain(url: str, settings: Settings) -> tuple[float, int, int]:
    with connect(url) as c:
        rows = c.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0]
        with Timer() as t:
            stats = Drainer(c, settings).run()
    return t.seconds, stats.embedded, stats.dead_lettered + rows - stats.embedded - stats.skipped


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--vt", type=int, default=3, help="visibility timeout of the killed drains (s)")
    ap.add_argument("--latency", type=float, default=0.04, help="provider latency per request (s)")
    args = ap.parse_args(argv)
    header(f"crash recovery: {args.rows} rows, {args.kills} drains killed -9 holding claims, "
           f"{args.latency * 1000:.0f} ms provider")
    settings = Settings(visibility_timeout=args.vt, max_attempts=5)
    with embedded_server() as server, FakeOpenAI() as provider:
        os.environ.update(OPENAI_BASE_URL=provider.base_url, OPENAI_API_KEY="sk-bench", AUTOEMBED_PROVIDER="openai",
                          AUTOEMBED_MODEL="text-embedding-3-small")
        clear_embedder_cache()
        make_embedder(dimensions=1536).embed(["warm up the client and the tokenizer before timing"])
        provider.delay(args.latency)
        crashed, clean = fresh_db(server, "crash"), fresh_db(server, "clean")
        load(crashed, args.rows)
        load(clean, args.rows)
        reclaimed = crash(crashed, args.vt, args.kills)
        with connect(crashed) as c:
            left = c.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0]
        # The clean baseline drains exactly as many rows as the crash left.
        with connect(clean) as c:
            c.execute("select pgmq.delete('embedding_jobs', array(select msg_id from pgmq.q_embedding_jobs "
                      "order by msg_id limit %s))", (args.rows - left,))
        # The clean drain first: whatever warms up in the first drain of a process counts against it.
        before = provider.request_count
        t_clean, n_clean, _ = timed_drain(clean, settings)
        req_clean = provider.request_count - before
        before = provider.request_count
        t_crash, n_crash, lost = timed_drain(crashed, settings)
        req_crash = provider.request_count - before
    line("messages claimed twice or more by killed drains", f"{reclaimed} of {left} left")
    line("drain after the crash", f"{n_crash / t_crash:,.0f} rows/s ({n_crash} rows, {req_crash} requests)")
    line("drain of the same backlog, no crash", f"{n_clean / t_clean:,.0f} rows/s ({n_clean} rows, {req_clean} requests)")
    ratio = t_crash / t_clean
    line("time after crash / time without (target <= 1.5)", f"{ratio:.2f}x")
    line("rows dead-lettered or left", str(lost))
    return {"ratio": ratio, "after_crash": n_crash / t_crash, "clean": n_clean / t_clean, "lost": lost,
            "reclaimed": reclaimed}


if __name__ == "__main__":
    main()
