"""Re-embed through the Batch API vs direct calls (core.migrate.batch_backfill vs core.migrate.backfill).

Both run in this process against the same in-suite OpenAI-compatible server (tests/fake_openai.py,
in a thread here: it has the Batch API the lean bench server lacks), on fresh databases with the
same `docs` table (halfvec(1536), no vector index). Figures:

- rows/s of the direct backfill (embed + write, end to end), against that server and against the
  lean instant provider in a process of its own (the direct path at its best: the in-process
  server's vector making competes with the backfill for this process's GIL);
- rows/s of collecting completed batches (download the output file, parse, write under the
  stale-write guard): the provider's 24 h are not ours, so the clock starts when the batches are
  done (the server makes their output when they are polled to completion, untimed);
- provider requests each way, counted by the server at this size and extrapolated to 100k rows
  (direct: one request per 256 rows; batch: per batch of <= 50,000 rows one upload, one create,
  the polls, one or two downloads; polls depend on the poll interval and the provider's speed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from common import (ROOT, Timer, body_sql, connect, create_docs, embedded_server, fake_provider, fresh_db, header,
                    line)

sys.path.insert(0, str(ROOT))

from autoembed_dagster.core.migrate import batch_backfill as bb  # noqa: E402
from autoembed_dagster.core.migrate.backfill import run_backfill  # noqa: E402
from autoembed_dagster.core.embed import clear_embedder_cache  # noqa: E402
from autoembed_dagster.core.pipelines import Pipeline  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

P = Pipeline(name="docs", schema="public", table="docs", content_function="docs_input", embedding_column="embedding",
             shards=1, provider="openai", model="text-embedding-3-small")


def setup(server: str, n: int) -> str:
    url = fresh_db(server)
    with connect(url) as c:
        create_docs(c)
        c.execute(f"insert into docs select g, 'title ' || g, {body_sql()} from generate_series(1, {n}) g")
        # Registered, as a pipeline's table is (vectors are written for registered targets only); no jobs queued.
        c.execute("select autoembed.enroll('docs', 'docs_input', 'embedding', enqueue_backlog => false)")
        c.execute("vacuum analyze docs")
    return url


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args(argv)
    n = args.rows
    header(f"batch API re-embed vs direct ({n:,} rows, halfvec(1536), no index)")
    out: dict = {}
    with embedded_server() as server:
        # The direct path at its best: the lean instant provider in a process of its own.
        with fake_provider():
            url = setup(server, n)
            with connect(url) as conn, Timer() as t:
                r = run_backfill(conn, P, P.spec(column_dimensions=1536))
            assert r.total.embedded == n, r.total.summary()
            out["direct_lean_rows_per_s"] = n / t.seconds
            line("direct backfill, lean provider in its own process, rows/s", f"{n / t.seconds:10,.0f}")
    saved = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "AUTOEMBED_PROVIDER",
                                            "AUTOEMBED_MODEL", "AUTOEMBED_BATCH_POLL_SECONDS")}
    try:
        return _batch_run(n, out)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_embedder_cache()


def _batch_run(n: int, out: dict) -> dict:
    with embedded_server() as server, FakeOpenAI() as fake:
        os.environ.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="sk-bench", AUTOEMBED_PROVIDER="openai",
                          AUTOEMBED_MODEL="text-embedding-3-small", AUTOEMBED_BATCH_POLL_SECONDS="0")
        clear_embedder_cache()
        spec = P.spec(column_dimensions=1536)
        url = setup(server, n)
        with connect(url) as conn, Timer() as t:
            r = run_backfill(conn, P, spec)
        assert r.total.embedded == n, r.total.summary()
        direct_requests = fake.embedding_calls
        out["direct_rows_per_s"] = n / t.seconds
        line("direct backfill, same in-process server, rows/s", f"{n / t.seconds:10,.0f}")

        fake.reset()
        url = setup(server, n)
        fake.hold_batches()
        with connect(url) as conn:
            with Timer() as ts:
                sub = bb.run_batch_backfill(conn, P, spec, wait=False)
            fake.advance_batches(2)  # the provider's work: untimed
            for b in bb.batches(conn):
                assert bb.refresh(conn, bb.batch_client(P, spec), b).status == "completed"
            with Timer() as tc:
                done = bb.run_batch_backfill(conn, P, spec)
        collected = sum(c.written for c in done.collected)
        assert collected == n and done.coverage.complete, done.summary()
        out["batch_submit_rows_per_s"] = n / ts.seconds
        out["batch_collect_rows_per_s"] = n / tc.seconds
        calls = dict(fake.calls)
        batch_requests = sum(calls.values())
        line("batch: submit (scan, JSONL, upload, create), rows/s", f"{n / ts.seconds:10,.0f}")
        line("batch: collect completed batches (download, parse, write), rows/s", f"{n / tc.seconds:10,.0f}")
        line("collect / direct (same in-process server)",
             f"{out['batch_collect_rows_per_s'] / out['direct_rows_per_s']:10.2f}x")
        line("collect / direct (lean provider in its own process)",
             f"{out['batch_collect_rows_per_s'] / out['direct_lean_rows_per_s']:10.2f}x")
        line(f"provider requests at {n:,} rows: direct /v1/embeddings", f"{direct_requests:10,}")
        line(f"provider requests at {n:,} rows: batch (all endpoints)",
             f"{batch_requests:10,}  {', '.join(f'{k}: {v}' for k, v in sorted(calls.items()))}")
        assert fake.embedding_calls == 0 and len(sub.submitted.batches) == math.ceil(n / 50_000)
        batches_100k = math.ceil(100_000 / 50_000)
        line("extrapolated to 100k rows: direct requests (256 rows each)", f"{math.ceil(100_000 / 256):10,}")
        line("extrapolated to 100k rows: batch requests (+1 per poll per open batch)",
             f"{batches_100k * 4 + 1:10,}  (per batch: upload, create, output + error download; 1 list probe)")
        out.update(direct_requests=direct_requests, batch_requests=batch_requests)
    return out


if __name__ == "__main__":
    main()
