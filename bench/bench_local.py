"""Local model: the drain's rows/s with the in-process ONNX model (all-MiniLM-L6-v2, 384 dims)
against the model's own encode rate over the same texts (LocalEmbedder.embed called directly, in
batches of the drain's read batch). Target: >= 90%.
"""

from __future__ import annotations

import argparse
import os

from common import Timer, connect, embedded_server, fresh_db, header, line

from autoembed_dagster.core.config import EmbedderSettings, Settings
from autoembed_dagster.core.drain import Drainer
from autoembed_dagster.core.embed.local import LocalEmbedder

WORDS = ("postgres vector search embedding model queue trigger drain batch index latency throughput "
         "document title content shard backfill migration column table dagster sensor asset").split()


def texts(n: int, words: int) -> list[str]:
    out = []
    for i in range(n):
        body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))
        out.append(f"# doc {i}\n\n{body} ({i})")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--words", type=int, default=40)
    args = ap.parse_args(argv)
    header(f"local model: drain vs raw encode ({args.rows:,} texts of ~{args.words} words)")
    os.environ["AUTOEMBED_PROVIDER"] = "local"
    os.environ.pop("AUTOEMBED_MODEL", None)
    settings = Settings.from_env()
    corpus = texts(args.rows, args.words)
    embedder = LocalEmbedder(EmbedderSettings.from_env())
    embedder.load()
    embedder.embed(corpus[:64])  # warm-up: session, tokenizer, first allocations
    results = {}
    with embedded_server() as server:
        raw_runs, drain_runs = [], []
        for _ in range(2):  # interleaved, best of 2 each: the machine is noisy
            with Timer() as t:
                for s in range(0, len(corpus), settings.read_batch):
                    out = embedder.embed(corpus[s:s + settings.read_batch])
                    assert not out.failed_indexes
            raw_runs.append(args.rows / t.seconds)
            url = fresh_db(server)
            with connect(url) as c:
                c.execute("""
                    create table notes (id bigint primary key, body text not null, embedding vector(384));
                    create function notes_input(n notes) returns text language sql immutable as $$ select n.body $$;
                """)
                c.execute("select autoembed.enroll('notes', 'notes_input', 'embedding')")
                with c.cursor().copy("copy notes (id, body) from stdin") as cp:
                    for i, text in enumerate(corpus):
                        cp.write_row((i + 1, text))
                c.execute("vacuum analyze notes")
                with Timer() as t:
                    stats = Drainer(c, settings).run()
                assert stats.embedded == args.rows, stats.summary()
                drain_runs.append(args.rows / t.seconds)
        raw, drained = max(raw_runs), max(drain_runs)
        line("LocalEmbedder.embed directly", f"{raw:8,.0f} rows/s")
        line("drain (queue -> model -> vector column)", f"{drained:8,.0f} rows/s")
        line("drain / raw encode", f"{drained / raw:8.0%}")
        line("target >= 90%", "met" if drained / raw >= 0.9 else "MISSED")
        results = {"raw": raw, "drain": drained, "ratio": drained / raw}
    return results


if __name__ == "__main__":
    main()
