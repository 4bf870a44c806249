"""Scaling out: 1, 2 and 4 drain processes on one queue, and the shared provider rate limit.

1. Drains 1/2/4 (each its own process, as each would be its own run pod), on a plain table and on
   an HNSW-indexed one, against the instant fake provider: rows/s and the factor over 1 drain.
   Processes are started and connected first and released together: start-up is not measured.
2. 4 drain processes against a provider that answers 429 past its per-minute limit (tests/
   fake_openai.py, the window of its limit a tenth of a minute), with the project's limit
   (AUTOEMBED_REQUESTS_PER_MINUTE) set to the provider's and without: achieved requests/min
   against the limit, and the provider's 429 count.

    python bench/bench_scale.py [--rows 20000] [--hnsw-rows 3000] [--limit 600] [--limited-rows 300]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from unittest import mock

from bench_drain import load, requeue
from common import ROOT, Timer, connect, create_docs, embedded_server, fake_provider, fresh_db, header, line

from autoembed_dagster.core.config import Settings


def _drain_process(url: str, ready, go, results) -> None:
    """One drain in its own process: connect, say ready, wait for the start, drain, report."""
    from autoembed_dagster.core.drain import Drainer

    with connect(url) as conn:
        drainer = Drainer(conn, Settings.from_env())
        ready.put(os.getpid())
        go.wait()
        results.put(drainer.run().embedded)


def drain_processes(url: str, n: int, env: dict[str, str] | None = None) -> tuple[float, int]:
    """`n` drain processes released at once; (seconds until all are done, rows embedded)."""
    ctx = mp.get_context("spawn")  # nothing inherited: no shared sockets, clients or connections
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    with mock.patch.dict(os.environ, env or {}):  # the children's environment
        procs = [ctx.Process(target=_drain_process, args=(url, ready, go, results)) for _ in range(n)]
        for p in procs:
            p.start()
    for _ in procs:
        ready.get(timeout=120)
    with Timer() as t:
        go.set()
        done = sum(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(30)
    return t.seconds, done


def scaling(server: str, rows: int, hnsw: bool, counts=(1, 2, 4)) -> dict[int, float]:
    label = "HNSW" if hnsw else "no index"
    url = fresh_db(server, "scale")
    out: dict[int, float] = {}
    with connect(url) as conn:
        create_docs(conn, hnsw=hnsw)
        load(conn, rows)
        for i, n in enumerate(counts):
            if i:
                requeue(conn)
            seconds, done = drain_processes(url, n)
            assert done == rows, f"{n} drains embedded {done} of {rows}"
            out[n] = rows / seconds
            line(f"[{label}] {n} drain process(es), {rows:,} rows",
                 f"{out[n]:8,.0f} rows/s  ({out[n] / out[counts[0]]:.2f}x of 1)")
    return out


def rate_limited(server: str, rows: int, limit: int) -> dict[str, dict[str, float]]:
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.fake_openai import FakeOpenAI

    out: dict[str, dict[str, float]] = {}
    with FakeOpenAI() as provider:
        for case, project_limit in (("limited", limit), ("unlimited", None)):
            url = fresh_db(server, "ratelimit")
            with connect(url) as conn:
                create_docs(conn)
                load(conn, rows)
            provider.reset()
            provider.limit_per_minute(limit, window_seconds=6.0)
            # The limit's state lives in the configured database: this one.
            env = {"AUTOEMBED_DATABASE_URL": url, "OPENAI_BASE_URL": provider.base_url, "AUTOEMBED_EMBED_BATCH": "1", "AUTOEMBED_READ_BATCH": "20",
                   "AUTOEMBED_MAX_RETRIES": "10", "AUTOEMBED_RETRY_DELAY": "0"}
            if project_limit:
                env["AUTOEMBED_REQUESTS_PER_MINUTE"] = str(project_limit)
            else:
                env["AUTOEMBED_REQUESTS_PER_MINUTE"] = ""  # unset for the children
            seconds, done = drain_processes(url, 4, env)
            accepted = sum(1 for r in provider.requests if r["status"] == 200)
            achieved = accepted / seconds * 60
            out[case] = {"rows": done, "achieved_rpm": achieved, "throttled": provider.throttled_count,
                         "seconds": seconds}
            line(f"4 drains, provider limit {limit}/min, project limit {project_limit or 'none'}",
                 f"{achieved:6,.0f} requests/min ({achieved / limit:.0%} of the limit), "
                 f"{provider.throttled_count} x 429, {done}/{rows} rows")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--hnsw-rows", type=int, default=3000)
    ap.add_argument("--limit", type=int, default=600, help="the provider's requests/min (and the project's)")
    ap.add_argument("--limited-rows", type=int, default=300, help="rows (= requests) of the rate-limited runs")
    args = ap.parse_args(argv)
    header("scaling out: drain processes per queue, one provider rate limit (halfvec(1536))")
    results: dict = {}
    with embedded_server() as server, fake_provider():
        results["plain"] = scaling(server, args.rows, hnsw=False)
        results["hnsw"] = scaling(server, args.hnsw_rows, hnsw=True)
        results["rate"] = rate_limited(server, args.limited_rows, args.limit)
    results["limit"] = args.limit
    return results


if __name__ == "__main__":
    main()
