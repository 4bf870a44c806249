"""Chunked embeddings through the real drain: throughput against the same tokens as a column
target, and what an edit costs.

1. Throughput. Whole-module stdlib documents (autoembed_dagster/demo/corpus.py stdlib_long_docs) are enrolled as a
   chunk target (autoembed.enroll_chunks: chunk table, triggers, backlog) and drained by the
   project's drain (Drainer.run: claim, read, split + plan, embed through the real openai client
   against the instant fake provider, swap chunk sets in the settle transaction). Baseline in the
   same run: the same chunk texts as rows of a column target, enrolled and drained by the same
   drain. Ratio = chunk drain chunks/s / column drain rows/s (same texts, same tokens).
2. Edit one paragraph. For each document of >= 40 chunks, one paragraph gets one more sentence,
   through the trigger and the drain: provider inputs (the drain's chunks_embedded) and their
   tokens, against re-embedding every chunk of the edited document (what pgai's vectorizer does).
   Ratio = whole / reuse.

    python bench/bench_chunks.py [--docs 200] [--max-tokens 256] [--overlap 32] [--edits 5]
"""

from __future__ import annotations

import argparse
import random
import statistics

from common import Timer, connect, embedded_server, fake_provider, fresh_db, header, line

from autoembed_dagster.core.targets import chunks
from autoembed_dagster.core.targets.splitter import splitter_for
from autoembed_dagster.core.config import EmbedderSettings, Settings
from autoembed_dagster.demo.corpus import stdlib_long_docs
from autoembed_dagster.core.drain import Drainer
from autoembed_dagster.core.embed import make_embedder

def load_docs(conn, docs: list[str], max_tokens: int, overlap: int) -> chunks.ChunkTarget:
    """The documents as a table, enrolled as a chunk target (every row queued)."""
    conn.execute("""create table docs (id integer primary key, body text);
                    create function docs_input(d docs) returns text language sql immutable as $$ select d.body $$""")
    with conn.cursor().copy("copy docs (id, body) from stdin") as cp:
        for i, text in enumerate(docs, 1):
            cp.write_row((i, text))
    conn.execute("select autoembed.enroll_chunks('docs', 'docs_input', %s, %s)", (max_tokens, overlap))
    # Enrolment builds an HNSW index; the column baseline has none: compare the drains, not index inserts.
    conn.execute("drop index docs_chunks_embedding_idx")
    return chunks.resolve_chunk_target(conn, "public", "docs", "docs_input")


def drain_all(url: str):
    """The project's drain until the queue is empty: (stats, seconds)."""
    with connect(url) as c, Timer() as t:
        stats = Drainer(c, Settings.from_env()).run()
    if stats.dead_lettered or stats.retried:
        raise RuntimeError(f"the drain did not embed everything: {stats.summary()}")
    return stats, t.seconds


def column_drain(conn, url: str, texts: list[str]) -> float:
    """Seconds for the project's drain to embed `texts` as rows of a column target."""
    conn.execute("""create table flat (id integer primary key, body text, embedding halfvec(1536));
                    create function flat_input(f flat) returns text language sql immutable as $$ select f.body $$""")
    with conn.cursor().copy("copy flat (id, body) from stdin") as cp:
        for i, text in enumerate(texts, 1):
            cp.write_row((i, text))
    conn.execute("select autoembed.enroll('flat', 'flat_input', 'embedding', enqueue_backlog => true)")
    with connect(url) as c, Timer() as t:
        Drainer(c, Settings.from_env()).run()
    done = conn.execute("select count(*) from flat where embedding is not null").fetchone()[0]
    if done < len(texts):
        raise RuntimeError(f"the column drain embedded {done} of {len(texts)} rows")
    return t.seconds


def edits(conn, url: str, target, all_keys: list[str], splitter, embedder, n_edits: int,
          min_chunks: int = 40) -> dict:
    """One-paragraph edits through the trigger and the drain (see module doc)."""
    rng = random.Random(7)
    keys = [k for k, (text, _) in chunks.read_documents(conn, target, all_keys).items()
            if len(splitter.split(text)) >= min_chunks]
    reuse_inputs = whole_inputs = reuse_tokens = whole_tokens = 0
    per_edit = []
    for key in sorted(keys, key=int):
        for _ in range(n_edits):
            text = chunks.read_documents(conn, target, [key])[key][0]
            known = {c for (c,) in conn.execute("select chunk from docs_chunks")}
            paras = text.split("\n\n")
            i = rng.randrange(len(paras))
            paras[i] += " This sentence was added by an edit."
            conn.execute("update docs set body = %s where id = %s", ("\n\n".join(paras), int(key)))
            stats, _ = drain_all(url)
            whole = [c for (c,) in conn.execute("select chunk from docs_chunks where id = %s order by chunk_index",
                                                (int(key),))]
            new = {c for c in whole if c not in known}  # what the provider was sent (reuse is by exact text)
            if len(new) != stats.chunks_embedded:
                raise RuntimeError(f"{len(new)} new chunk texts but the drain embedded {stats.chunks_embedded}")
            reuse_inputs += stats.chunks_embedded
            reuse_tokens += sum(embedder.count_tokens(x) for x in new)
            whole_inputs += len(whole)
            whole_tokens += sum(embedder.count_tokens(x) for x in whole)
            per_edit.append(stats.chunks_embedded)
    return {"documents": len(keys), "edits": len(per_edit), "reuse_inputs": reuse_inputs,
            "whole_inputs": whole_inputs, "reuse_tokens": reuse_tokens, "whole_tokens": whole_tokens,
            "max_inputs_per_edit": max(per_edit, default=0),
            "median_inputs_per_edit": statistics.median(per_edit) if per_edit else 0}


def bulk_update(conn, rows: int = 20_000) -> dict:
    """Seconds of one UPDATE of every row (a real change, then a re-save) on a table with no
    trigger, enrolled as a column target, and enrolled as a chunk target."""
    out = {}
    for name, enrol in (("none", None), ("column", "select autoembed.enroll('{t}', '{t}_in', 'embedding')"),
                        ("chunks", "select autoembed.enroll_chunks('{t}', '{t}_in', 256)")):
        t = f"bulk_{name}"
        conn.execute(f"create table {t} (id integer primary key, body text, embedding halfvec(8))")
        conn.execute(f"create function {t}_in(d {t}) returns text language sql immutable as $$ select d.body $$")
        conn.execute(f"insert into {t} select g, 'body ' || g from generate_series(1, %s) g", (rows,))
        if enrol:
            conn.execute(enrol.format(t=t))
        with Timer() as change:
            conn.execute(f"update {t} set body = body || ' x'")
        with Timer() as resave:
            conn.execute(f"update {t} set body = body")
        out[name] = (change.seconds, resave.seconds)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--edits", type=int, default=5, help="edits per document of >= 40 chunks")
    args = ap.parse_args(argv)
    corpus = [d.content for d in stdlib_long_docs(args.docs, min_chars=0)]
    header(f"chunks: {len(corpus)} stdlib module documents, {sum(map(len, corpus)):,} chars, "
           f"{args.max_tokens} tokens per chunk, overlap {args.overlap}")
    with embedded_server() as server, fake_provider():
        embedder = make_embedder(EmbedderSettings.from_env(), dimensions=1536)
        splitter = splitter_for(embedder, args.max_tokens, args.overlap)
        url = fresh_db(server)
        with connect(url) as conn:
            target = load_docs(conn, corpus, args.max_tokens, args.overlap)
            keys = [str(i) for i in range(1, len(corpus) + 1)]
            stats, drain_s = drain_all(url)
            texts = [r[0] for r in conn.execute("select chunk from docs_chunks order by id, chunk_index")]
            written, embedded = len(texts), stats.chunks_embedded
            tokens = sum(embedder.count_tokens(x) for x in texts)
            with Timer() as st:
                for text in corpus:
                    splitter.split(text)
            split_s = st.seconds
            chunk_rate = written / drain_s
            col_s = column_drain(conn, url, texts)
            col_rate = len(texts) / col_s
            line("chunk drain: documents / chunks written / embedded (the rest reused across documents)",
                 f"{stats.embedded:,} / {written:,} / {embedded:,}")
            line("chunk drain: total", f"{drain_s:.2f} s")
            line("splitting alone, every document once", f"{split_s:.2f} s")
            line("chunk drain: chunks/s, tokens/s", f"{chunk_rate:,.0f}, {tokens / drain_s:,.0f}")
            line("column drain of the same chunk texts: rows/s", f"{col_rate:,.0f}")
            line("chunk drain / column drain (same texts)", f"{chunk_rate / col_rate:.0%}")
            e = edits(conn, url, target, keys, splitter, embedder, args.edits)
            line(f"edit one paragraph (trigger + drain): {e['edits']} edits of {e['documents']} documents "
                 "with >= 40 chunks", "")
            line("  provider inputs: reuse / whole document",
                 f"{e['reuse_inputs']:,} / {e['whole_inputs']:,} ({e['whole_inputs'] / max(1, e['reuse_inputs']):.1f}x fewer)")
            line("  tokens: reuse / whole document",
                 f"{e['reuse_tokens']:,} / {e['whole_tokens']:,} ({e['whole_tokens'] / max(1, e['reuse_tokens']):.1f}x fewer)")
            line("  inputs per edit: median / max", f"{e['median_inputs_per_edit']} / {e['max_inputs_per_edit']}")
            b = bulk_update(conn)
            base_change, base_resave = b["none"]
            for name in ("column", "chunks"):
                line(f"bulk UPDATE of 20,000 rows, {name} target vs no trigger: real change / re-save",
                     f"{b[name][0] / base_change:.1f}x / {b[name][1] / base_resave:.1f}x")
    return {"chunk_rate": chunk_rate, "column_rate": col_rate, "ratio": chunk_rate / col_rate, "split_s": split_s,
            "total_s": drain_s, **e}


if __name__ == "__main__":
    main()
