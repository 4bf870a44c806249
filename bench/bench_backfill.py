"""Backfill: full re-embed of a table, shard by shard (core.migrate.backfill.backfill_shard), in one
process vs two processes (each taking half of the shards), against the instant fake provider.
The default row count finishes in about a minute; `--rows 1000000 --shards 8` is the full-size
run (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ROOT, Timer, body_sql, connect, create_docs, embedded_server, fake_provider, fresh_db, header, line

WORKER = r"""
import json, sys, time
from autoembed_dagster.core.migrate.backfill import backfill_shard, resolve_spec
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.pipelines import Pipeline
url, shards, mine = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
p = Pipeline(name="docs", schema="public", table="docs", content_function="docs_input",
             embedding_column="embedding", shards=shards)
with connect(url) as conn:
    spec = resolve_spec(conn, p)
    t = time.perf_counter()
    n = 0
    for s in mine:
        n += backfill_shard(conn, p, spec, s, shards).stats.embedded
    print(json.dumps({"embedded": n, "seconds": time.perf_counter() - t}))
"""


def setup(server: str, n: int) -> str:
    url = fresh_db(server)
    with connect(url) as c:
        create_docs(c)
        c.execute(f"insert into docs select g, 'title ' || g, {body_sql()} from generate_series(1, {n}) g")
        # Registered (the backfill writes through the target's write function), nothing queued.
        c.execute("select autoembed.enroll('docs', 'docs_input', 'embedding', enqueue_backlog => false)")
        c.execute("vacuum analyze docs")
    return url


def run(url: str, shards: int, groups: list[list[int]]) -> tuple[float, list[dict]]:
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": url}
    with Timer() as t:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(shards), ",".join(map(str, g))],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for g in groups]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return t.seconds, outs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args(argv)
    n, k = args.rows, args.shards
    header(f"backfill ({n:,} rows, {k} shards, halfvec(1536), no index)")
    results = {}
    with embedded_server() as server, fake_provider():
        for procs in (1, 2):
            url = setup(server, n)
            groups = [list(range(i, k, procs)) for i in range(procs)]
            secs, outs = run(url, k, groups)
            done = sum(o["embedded"] for o in outs)
            assert done == n, f"backfilled {done} of {n}"
            with connect(url) as c:
                missing = c.execute("select count(*) from docs where embedding is null").fetchone()[0]
            assert missing == 0
            per = [o["embedded"] / o["seconds"] for o in outs]
            results[procs] = n / secs
            line(f"{procs} process(es), wall clock", f"{n / secs:8,.0f} rows/s")
            line(f"{procs} process(es), per process", " ".join(f"{r:,.0f}" for r in per) + " rows/s")
        line("scaling 2 processes / 1", f"{results[2] / results[1]:8.2f}x")
    return results


if __name__ == "__main__":
    main()
