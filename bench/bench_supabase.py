"""The same work drained the way Supabase's Automatic Embeddings guide does it, at its defaults,
against this project.

Supabase: pg_cron runs util.process_embeddings() every 10 s; it reads up to batch_size (10) x
max_requests (10) = 100 messages per tick and posts 10 requests to an edge function, which for
each job reads the row's input, calls the provider with ONE input, updates the row and deletes
the message, each as its own statement. Two figures:
  - the schedule bound: at most 100 rows per 10 s tick = 10 rows/s, however fast the rest is;
  - the per-row request pattern run for real (10 concurrent workers, one HTTP request and three
    statements per row, same fake provider, same table), with no schedule gaps: its ceiling.
The project: Drainer.run() at its defaults over the same queued rows of the same table.
"""

from __future__ import annotations

import argparse
import math
import queue as queue_mod
import threading

import openai

from common import Timer, connect, embedded_server, fake_provider, fresh_db, header, line, timed_threads

from autoembed_dagster.core.config import EmbedderSettings, Settings
from autoembed_dagster.core.embed import make_embedder
from autoembed_dagster.core.drain import Drainer

SUPABASE_TABLE = """
create table documents (
  id integer primary key generated always as identity,
  title text not null,
  content text not null,
  embedding halfvec(1536),
  created_at timestamp with time zone default now()
);
{index}
create or replace function embedding_input(doc documents) returns text language plpgsql immutable as $$
begin
  return '# ' || doc.title || E'\\n\\n' || doc.content;
end;
$$;
create trigger embed_documents_on_insert after insert on documents for each row
  execute function util.queue_embeddings('embedding_input', 'embedding');
create trigger embed_documents_on_update after update of title, content on documents for each row
  execute function util.queue_embeddings('embedding_input', 'embedding');
"""
HNSW = "create index on documents using hnsw (embedding halfvec_cosine_ops);"

BATCH_SIZE, MAX_REQUESTS, TICK_SECONDS = 10, 10, 10.0


def setup(server: str, n: int, hnsw: bool) -> str:
    url = fresh_db(server)
    with connect(url) as c:
        c.execute(SUPABASE_TABLE.format(index=HNSW if hnsw else ""))
        c.execute("insert into documents (title, content) select 'title ' || g, 'row ' || g || ' ' || "
                  "repeat('lorem ipsum dolor sit amet ', 8) from generate_series(1, %s) g", (n,))
    return url


def supabase_pattern(url: str, base_url: str, workers: int = BATCH_SIZE) -> tuple[float, int]:
    """One request per row, as the edge function does; `workers` jobs in flight at a time."""
    with connect(url) as c:
        jobs = c.execute("select msg_id, message from pgmq.read('embedding_jobs', 300, 1000000)").fetchall()
    todo: queue_mod.Queue = queue_mod.Queue()
    for j in jobs:
        todo.put(j)
    done = [0]
    lock = threading.Lock()

    def worker():
        client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        with connect(url) as c:
            while True:
                try:
                    msg_id, m = todo.get_nowait()
                except queue_mod.Empty:
                    return
                text = c.execute(f"select {m['contentFunction']}(t) from {m['schema']}.{m['table']} t where id = %s",
                                 (m["id"],)).fetchone()[0]
                emb = client.embeddings.create(model="text-embedding-3-small", input=text).data[0].embedding
                c.execute(f"update {m['schema']}.{m['table']} set {m['embeddingColumn']} = %s::halfvec where id = %s",
                          (str(list(emb)) if not isinstance(emb, str) else emb, m["id"]))
                c.execute("select pgmq.delete('embedding_jobs', %s::bigint)", (msg_id,))
                with lock:
                    done[0] += 1

    return timed_threads(worker, workers), done[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args(argv)
    n = args.rows
    header(f"Supabase's defaults vs this project ({n:,} rows, the guide's documents table)")
    per_tick = BATCH_SIZE * MAX_REQUESTS
    schedule_seconds = math.ceil(n / per_tick) * TICK_SECONDS
    schedule_rate = n / schedule_seconds
    line(f"Supabase schedule bound ({per_tick} rows per {TICK_SECONDS:.0f} s tick)",
         f"{schedule_rate:8,.1f} rows/s  ({schedule_seconds:,.0f} s for {n:,} rows)")
    results = {}
    settings = Settings.from_env()
    with embedded_server() as server, fake_provider() as base_url:
        for hnsw in (False, True):
            label = "HNSW" if hnsw else "no index"
            url = setup(server, n, hnsw)
            secs, done = supabase_pattern(url, base_url)
            assert done == n, f"{done} of {n}"
            pattern = n / secs
            effective = min(pattern, schedule_rate)
            line(f"[{label}] Supabase per-row pattern, no schedule gaps", f"{pattern:8,.0f} rows/s")
            url = setup(server, n, hnsw)
            make_embedder(EmbedderSettings.from_env(), 1536).embed(["warm up"])  # imports, tokenizer
            with connect(url) as c, Timer() as t:
                stats = Drainer(c, settings).run()
            assert stats.embedded == n, stats.summary()
            ours = n / t.seconds
            line(f"[{label}] this project, defaults", f"{ours:8,.0f} rows/s")
            line(f"[{label}] ratio vs Supabase per-row pattern", f"{ours / pattern:8,.1f}x")
            line(f"[{label}] ratio vs Supabase at its schedule", f"{ours / effective:8,.0f}x")
            results[label] = {"supabase_pattern": pattern, "supabase_effective": effective, "ours": ours}
    return results


if __name__ == "__main__":
    main()
