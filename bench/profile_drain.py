"""Where a drain's time goes, stage by stage: a non-pipelined drain of --rows queued rows (no
index) under cProfile, with the wall time of every SQL statement it sends summed by statement
(what the server spends, since the drain waits for each). A tool, not a benchmark: no baseline.

    python bench/profile_drain.py --rows 100000 [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import time
from collections import defaultdict

import psycopg

from bench_drain import load
from common import connect, create_docs, embedded_server, fake_provider, fresh_db, header, line

from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.drain import Drainer

SQL_TIME: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


def _label(query) -> str:
    text = query.as_string(None) if hasattr(query, "as_string") else str(query)
    text = re.sub(r"\s+", " ", text if isinstance(text, str) else text.decode())
    return text[:110]


def instrument() -> None:
    """Time every Cursor.execute / copy (the statement's round trip) by its text."""
    for cls, name in ((psycopg.Cursor, "execute"), (psycopg.Cursor, "copy")):
        orig = getattr(cls, name)
        if name == "copy":
            def wrapped(self, statement, *a, __orig=orig, **k):
                cm = __orig(self, statement, *a, **k)

                class Timed:
                    def __enter__(s):
                        s.t0 = time.perf_counter()
                        return cm.__enter__()

                    def __exit__(s, *exc):
                        try:
                            return cm.__exit__(*exc)
                        finally:
                            e = SQL_TIME["COPY " + _label(statement)]
                            e[0] += time.perf_counter() - s.t0
                            e[1] += 1
                return Timed()
        else:
            def wrapped(self, query, *a, __orig=orig, **k):
                t0 = time.perf_counter()
                try:
                    return __orig(self, query, *a, **k)
                finally:
                    e = SQL_TIME[_label(query)]
                    e[0] += time.perf_counter() - t0
                    e[1] += 1
        setattr(cls, name, wrapped)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--pipeline", action="store_true", help="profile the pipelined drain (the main thread only)")
    ap.add_argument("--sort", default="cumulative", help="pstats order: cumulative, tottime, ...")
    args = ap.parse_args(argv)
    header(f"profile: drain of {args.rows:,} queued rows, no index")
    settings = Settings.from_env()
    with embedded_server() as server, fake_provider():
        url = fresh_db(server)
        with connect(url) as conn:
            create_docs(conn)
            load(conn, args.rows)  # enrolled first: the insert's statement trigger queues the rows
        instrument()
        with connect(url) as conn:
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            stats = Drainer(conn, settings, pipeline=args.pipeline).run()
            prof.disable()
            wall = time.perf_counter() - t0
        line("embedded / wall", f"{stats.embedded:,} rows in {wall:.2f} s = {stats.embedded / wall:,.0f} rows/s")
        total_sql = sum(v[0] for v in SQL_TIME.values())
        line("SQL round trips (wall, summed)", f"{total_sql:.2f} s")
        for text, (secs, calls) in sorted(SQL_TIME.items(), key=lambda kv: -kv[1][0])[:20]:
            print(f"  {secs:7.2f} s {calls:6d}x  {text}")
        pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
