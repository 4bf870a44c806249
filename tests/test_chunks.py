"""Chunked embeddings outside the drain: splitting, the chunk table, plan/write with chunk reuse,
search over chunks, shadow + promotion. Real Postgres, real HTTP (fake OpenAI server through the
real OpenAI embedder), the real local tokenizer."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import psycopg
import pytest

from autoembed_dagster.core.targets import chunks
from autoembed_dagster.core.targets.splitter import Splitter, chunk_hash, splitter_for
from autoembed_dagster.core.config import ConfigError, EmbedderSettings
from autoembed_dagster.demo.corpus import stdlib_long_docs
from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.embed import make_embedder
from autoembed_dagster.core.embed.local import LocalEmbedder
from autoembed_dagster.core.search import search_chunks
from autoembed_dagster.core.targets.shapes import ChunkSetShape
from autoembed_dagster.core.targets.catalog import TargetError

from .fake_openai import fake_vector

HOSTILE = {
    "one 20k-char word": "x" * 20_000,
    "20k mixed letters, no space": "".join(chr(97 + (i * 7) % 26) for i in range(20_000)),
    "CJK": "漢字かな交じり文。" * 2_000,
    "emoji ZWJ sequences": "👩‍👩‍👧‍👦🏳️‍🌈" * 1_500,
    "one grapheme of 3000 code points": "a" + "\u0301" * 3_000,
    "only newlines": "\n" * 5_000,
    "tokens that look special": "<|endoftext|> " * 2_000,
}


@pytest.fixture
def openai_embedder(fake_openai):
    return make_embedder(EmbedderSettings.from_env(), dimensions=1536)


def _paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(15, 60))) + "." for _ in range(n)]


# -- splitting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_chunk_fits_the_models_tokenizer_on_hostile_text(name, fake_openai, openai_embedder):
    text = HOSTILE[name]
    for embedder, max_tokens in ((openai_embedder, 100), (LocalEmbedder(), 64)):
        sp = splitter_for(embedder, max_tokens, overlap=16)
        pieces = sp.split(text)
        assert all(embedder.count_tokens(c) <= max_tokens for c in pieces), name
        if text.strip():
            assert pieces and all(c.strip() for c in pieces)
            # Nothing is lost or reordered: the chunks hold every non-space character of the text.
            plain = splitter_for(embedder, max_tokens).split(text)
            assert "".join("".join(c.split()) for c in plain) == "".join(text.split()), name
        else:
            assert pieces == []


def test_blank_and_null_give_no_chunks_and_splitting_is_deterministic(openai_embedder):
    sp = splitter_for(openai_embedder, 64, 8)
    assert sp.split(None) == [] and sp.split("") == [] and sp.split(" \n\t\n ") == []
    text = "\n\n".join(_paragraphs(60))
    assert sp.split(text) == sp.split(text) == splitter_for(openai_embedder, 64, 8).split(text)


def test_chunks_end_on_paragraph_boundaries_and_overlap_repeats_the_previous_tail(openai_embedder):
    paras = _paragraphs(40, seed=3)
    text = "\n\n".join(paras)
    plain = splitter_for(openai_embedder, 200).split(text)
    # Every paragraph fits: each chunk is whole paragraphs.
    assert all(c.split("\n\n")[0] in paras and c.split("\n\n")[-1] in paras for c in plain)
    assert "\n\n".join(plain) == text
    sp = splitter_for(openai_embedder, 200, overlap=40)
    spans = sp.spans(text)
    tails = [text[cur.start : prev.end] for prev, cur in zip(spans, spans[1:]) if cur.start < prev.end]
    assert len(tails) >= len(spans) // 2  # most chunks start with the end of the previous one
    assert all(0 < openai_embedder.count_tokens(t) <= 40 for t in tails)
    assert all(openai_embedder.count_tokens(text[s.start : s.end]) <= 200 for s in spans)


def test_bad_settings_are_refused_with_the_fix(openai_embedder):
    with pytest.raises(ConfigError, match="at least 8"):
        splitter_for(openai_embedder, 4)
    with pytest.raises(ConfigError, match="more than half"):
        splitter_for(openai_embedder, 100, overlap=60)
    with pytest.raises(ConfigError, match="use chunk tokens 254 or less"):
        splitter_for(LocalEmbedder(), 300)


def test_editing_one_paragraph_changes_at_most_three_chunks():
    """Content-defined boundaries: a grown paragraph does not shift every later chunk (greedy
    packing of equal paragraphs would: the parity of every later pair changes)."""
    sp = Splitter(lambda t: len(t.split()), "words", 120, 16)
    paras = [f"p{i} " + " ".join(["w"] * 39) for i in range(160)]  # equal paragraphs
    old = set(sp.split("\n\n".join(paras)))
    assert len(old) >= 40
    for i in (5, 40, 81, 120, 150):
        edited = list(paras)
        edited[i] += " grown by a sentence of ten more words right here."
        new = sp.split("\n\n".join(edited))
        assert 1 <= sum(1 for c in new if c not in old) <= 3, i


# -- chunk table ---------------------------------------------------------------------------------
def _docs_table(conn, name='"My Docs"', key='"Doc Id"', key_type="bigint"):
    conn.execute(f"""
        create table {name} ({key} {key_type} primary key, body text);
        create function body_of(d {name}) returns text language sql immutable as $$ select d.body $$;
    """)


def test_create_chunk_table_quotes_names_checks_shape_and_cascades(conn):
    _docs_table(conn)
    made = chunks.create_chunk_table(conn, "public", "My Docs", key_column="Doc Id", dimensions=8)
    assert made == '"My Docs_chunks"'
    assert chunks.create_chunk_table(conn, "public", "My Docs", key_column="Doc Id", dimensions=8) == made  # idempotent
    with pytest.raises(psycopg.errors.RaiseException, match=r"exists as .*halfvec\(8\).*not .*halfvec\(16\)"):
        chunks.create_chunk_table(conn, "public", "My Docs", key_column="Doc Id", dimensions=16)
    with pytest.raises(psycopg.errors.RaiseException, match="not its primary key"):
        chunks.create_chunk_table(conn, "public", "My Docs", key_column="body", dimensions=8, chunk_table="x")
    with pytest.raises(psycopg.errors.RaiseException, match="longer than 63 bytes"):
        conn.execute("select autoembed.create_chunk_table('\"My Docs\"', 'Doc Id', 'halfvec', 8, %s)", ("c" * 64,))
    target = chunks.resolve_chunk_target(conn, "public", "My Docs", "body_of", key_column="Doc Id")
    assert (target.vector_type, target.dimensions, target.key_type) == ("halfvec", 8, "bigint")
    conn.execute("""insert into "My Docs" values (1, 'x');
                    insert into "My Docs_chunks" values (1, 0, 'x', '[1,0,0,0,0,0,0,0]', '\\x00', '\\x00', 'm', 's')""")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("""insert into "My Docs_chunks" values (1, 0, 'y', '[1,0,0,0,0,0,0,0]', '\\x00', '\\x00', 'm', 's')""")
    conn.execute('delete from "My Docs"')
    assert conn.execute('select count(*) from "My Docs_chunks"').fetchone()[0] == 0
    with pytest.raises(TargetError, match="chunk table 'public'.'nope' does not exist"):
        chunks.resolve_chunk_target(conn, "public", "My Docs", "body_of", key_column="Doc Id", chunk_table="nope")


# -- plan + write --------------------------------------------------------------------------------
def _setup(conn, texts: dict[int, str | None], dims: int = 1536):
    _docs_table(conn, "docs", "id", "integer")
    chunks.create_chunk_table(conn, "public", "docs", dimensions=dims)
    for k, t in texts.items():
        conn.execute("insert into docs values (%s, %s)", (k, t))
    return chunks.resolve_chunk_target(conn, "public", "docs", "body_of")


def _run(conn, target, keys, splitter, embedder):
    """What the drain will do: read, plan, embed only what the plan asks for, write."""
    done = chunks.sync(conn, target, [str(k) for k in keys], splitter, embedder)
    return done.plan, done.stats


def _stored(conn, key) -> list[str]:
    return [r[0] for r in conn.execute("select chunk from docs_chunks where id = %s order by chunk_index", (key,))]


def test_edit_one_paragraph_of_a_40_chunk_document_embeds_at_most_three(conn, fake_openai, openai_embedder):
    text = "\n\n".join(_paragraphs(170, seed=7))
    target = _setup(conn, {1: text})
    sp = splitter_for(openai_embedder, 120, overlap=20)
    p, stats = _run(conn, target, [1], sp, openai_embedder)
    n = len(sp.split(text))
    assert n >= 40 and stats.written == ["1"] and stats.chunks_embedded == n
    assert sum(len(r["inputs"]) for r in fake_openai.requests) == len(set(sp.split(text)))
    assert _stored(conn, 1) == sp.split(text)
    # Every stored vector is the provider's vector of that exact chunk text.
    for chunk, vec in conn.execute("select chunk, embedding::vector from docs_chunks where id = 1 limit 3"):
        assert abs(float(vec.to_numpy() @ fake_vector(chunk))) > 0.999

    paras = text.split("\n\n")
    paras[85] = paras[85].replace(".", ", and a clause that was added in an edit.")
    conn.execute("update docs set body = %s where id = 1", ("\n\n".join(paras),))
    fake_openai.reset()
    p, stats = _run(conn, target, [1], sp, openai_embedder)
    sent = [t for r in fake_openai.requests for t in r["inputs"]]
    assert 1 <= len(sent) <= 3 and all(t in p.texts for t in sent)
    assert stats.chunks_embedded == len(sent) and stats.chunks_reused == len(sp.split("\n\n".join(paras))) - len(sent)
    assert _stored(conn, 1) == sp.split("\n\n".join(paras))
    # Nothing changed: the document is unchanged, nothing is embedded or written.
    fake_openai.reset()
    p, stats = _run(conn, target, [1], sp, openai_embedder)
    assert p.unchanged == ["1"] and not p.texts and not stats.written and fake_openai.request_count == 0


def test_write_skips_stale_busy_and_gone_rows_and_clears_blank_ones(conn, db_url, fake_openai, openai_embedder):
    target = _setup(conn, {1: "one\n\ntwo", 2: "three", 3: "four", 4: "five"})
    sp = splitter_for(openai_embedder, 50)
    _run(conn, target, [1, 2, 3, 4], sp, openai_embedder)
    assert _stored(conn, 1) == ["one\n\ntwo"] and _stored(conn, 4) == ["five"]
    conn.execute("update docs set body = 'one changed' where id = 1")
    conn.execute("update docs set body = 'three changed' where id = 2")
    conn.execute("update docs set body = '   ' where id = 4")
    docs = chunks.read_documents(conn, target, ["1", "2", "3", "4"])
    conn.execute("update docs set body = 'four changed' where id = 3")
    p = chunks.plan(conn, target, docs, sp, openai_embedder.identity.key)
    out = openai_embedder.embed(p.texts)
    conn.execute("update docs set body = 'one changed again' where id = 1")  # after the read: stale
    with connect(db_url, autocommit=False) as other:
        other.execute("select 1 from docs where id = 2 for update")  # an application transaction
        with conn.transaction():
            conn.execute("set local lock_timeout = '20s'")  # a wait would fail the test, not hang it
            stats = chunks.write(conn, target, p, dict(zip(p.hashes, out.vectors)), openai_embedder.identity.key)
        other.rollback()
    # 3 was read as it was stored (nothing to do; its own change has a job of its own); 1 changed
    # after it was read; 2 is locked by the application; 4 became blank.
    assert p.unchanged == ["3"] and stats.stale == ["1"] and stats.busy == ["2"] and stats.written == ["4"]
    assert _stored(conn, 1) == ["one\n\ntwo"] and _stored(conn, 2) == ["three"] and _stored(conn, 3) == ["four"]
    assert _stored(conn, 4) == []
    conn.execute("delete from docs where id = 3")
    assert _stored(conn, 3) == []
    with conn.transaction():
        gone = chunks.write(conn, target, chunks.plan(conn, target, {"3": ("x", chunk_hash("x"))}, sp,
                                                      openai_embedder.identity.key), {}, openai_embedder.identity.key)
    assert gone.gone == ["3"] and not gone.written


def test_a_failed_embedding_leaves_the_document_as_it_was(conn, fake_openai, openai_embedder):
    target = _setup(conn, {1: "kept"})
    sp = splitter_for(openai_embedder, 50)
    _run(conn, target, [1], sp, openai_embedder)
    conn.execute("update docs set body = 'kept\n\nnew paragraph' where id = 1")
    docs = chunks.read_documents(conn, target, ["1"])
    p = chunks.plan(conn, target, docs, sp, openai_embedder.identity.key)
    with conn.transaction():
        stats = chunks.write(conn, target, p, {h: None for h in p.hashes}, openai_embedder.identity.key)
    assert stats.missing == ["1"] and _stored(conn, 1) == ["kept"]


def test_other_transactions_never_see_a_half_replaced_chunk_set(conn, db_url, fake_openai, openai_embedder):
    text = "\n\n".join(_paragraphs(30, seed=1))
    target = _setup(conn, {1: text})
    sp = splitter_for(openai_embedder, 60)
    _run(conn, target, [1], sp, openai_embedder)
    before = _stored(conn, 1)
    conn.execute("update docs set body = %s where id = 1", ("\n\n".join(_paragraphs(30, seed=2)),))
    docs = chunks.read_documents(conn, target, ["1"])
    p = chunks.plan(conn, target, docs, sp, openai_embedder.identity.key)
    out = openai_embedder.embed(p.texts)
    with connect(db_url) as reader:
        with conn.transaction():
            chunks.write(conn, target, p, dict(zip(p.hashes, out.vectors)), openai_embedder.identity.key)
            seen = [r[0] for r in reader.execute("select chunk from docs_chunks where id = 1 order by chunk_index")]
            assert seen == before
        seen = [r[0] for r in reader.execute("select chunk from docs_chunks where id = 1 order by chunk_index")]
    assert seen == sp.split(docs["1"][0]) != before


# -- search --------------------------------------------------------------------------------------
def test_search_ranks_parents_by_their_best_chunk_and_skips_stale_sets(conn, fake_openai, openai_embedder):
    bodies = {i: "\n\n".join(_paragraphs(12, seed=10 + i)) for i in range(1, 6)}
    target = _setup(conn, bodies)
    sp = splitter_for(openai_embedder, 60)
    _run(conn, target, list(bodies), sp, openai_embedder)
    wanted = sp.split(bodies[3])[2]
    hits = search_chunks(conn, wanted, openai_embedder, table="docs", content_function="body_of", k=3)
    assert [h.id for h in hits][0] == "3" and hits[0].chunk == wanted and hits[0].distance < 1e-3
    assert len({h.id for h in hits}) == 3 and [h.distance for h in hits] == sorted(h.distance for h in hits)
    # k larger than the nearest batch's parents: every parent, once each.
    assert sorted(h.id for h in search_chunks(conn, wanted, openai_embedder, table="docs",
                                              content_function="body_of", k=50)) == ["1", "2", "3", "4", "5"]
    conn.execute("update docs set body = 'rewritten' where id = 3")  # its chunks are now stale
    hits = search_chunks(conn, wanted, openai_embedder, table="docs", content_function="body_of", k=3)
    assert "3" not in [h.id for h in hits]


# -- shadow + promotion --------------------------------------------------------------------------
def test_backfill_into_a_shadow_chunk_table_then_promote_atomically(conn, db_url, fake_openai, openai_embedder,
                                                                     monkeypatch):
    bodies = {1: "\n\n".join(_paragraphs(20, seed=1)), 2: "short", 3: None}
    target = _setup(conn, bodies)
    sp = splitter_for(openai_embedder, 60)
    _run(conn, target, [1, 2, 3], sp, openai_embedder)
    old_model = openai_embedder.identity.key
    assert chunks.coverage(conn, target, old_model, sp.key).complete
    monkeypatch.setenv("AUTOEMBED_DIMENSIONS", "256")
    new = make_embedder(EmbedderSettings.from_env(), dimensions=256)
    shadow = chunks.create_shadow(conn, target, dimensions=256)
    assert shadow.chunk_table == "docs_chunks__next" and shadow.dimensions == 256
    _run(conn, shadow, [1], sp, new)
    cov = chunks.coverage(conn, shadow, new.identity.key, sp.key)
    assert (cov.rows, cov.embeddable, cov.current) == (3, 2, 1)
    # (a promotion below 100% is refused by the flow's one coverage check: test_chunk_migration's
    # test_promote_rollback_drop_old_and_a_second_model_change)
    _run(conn, shadow, [2, 3], sp, new)
    old = chunks.promote(conn, target, shadow)
    assert old == "docs_chunks__old"
    live = chunks.resolve_chunk_target(conn, "public", "docs", "body_of")
    assert live.dimensions == 256
    assert {m for (m,) in conn.execute("select distinct model from docs_chunks")} == {new.identity.key}
    assert chunks.coverage(conn, live, new.identity.key, sp.key).complete
    # A later migration can create its shadow again (no name left behind by the first one).
    chunks.create_shadow(conn, live)
    hits = search_chunks(conn, "short", new, table="docs", content_function="body_of", k=1)
    assert hits[0].id == "2" and hits[0].chunk == "short"
    conn.execute("delete from docs where id = 2")
    assert conn.execute("select count(*) from docs_chunks where id = 2").fetchone()[0] == 0


def test_stdlib_long_documents_are_long_and_deterministic():
    docs = stdlib_long_docs(20)
    assert len(docs) == 20 and all(len(d.content) >= 2000 for d in docs)
    assert [d.module for d in docs] == [d.module for d in stdlib_long_docs(20)]
    assert all(d.content.startswith(f"# {d.module}\n\n") for d in docs)


def test_a_reused_vector_that_vanished_before_the_write_defers_the_document(conn, fake_openai, openai_embedder):
    target = _setup(conn, {1: "shared boilerplate paragraph", 2: None})
    sp = splitter_for(openai_embedder, 50)
    _run(conn, target, [1], sp, openai_embedder)
    conn.execute("update docs set body = 'shared boilerplate paragraph' where id = 2")
    fake_openai.reset()
    p = chunks.plan(conn, target, chunks.read_documents(conn, target, ["2"]), sp, openai_embedder.identity.key)
    assert p.texts == [] and p.reused == {chunk_hash("shared boilerplate paragraph")}  # reused across documents
    conn.execute("delete from docs where id = 1")  # the only vector of that text goes with it
    with conn.transaction():
        stats = chunks.write(conn, target, p, {}, openai_embedder.identity.key)
    assert stats.missing == ["2"] and not stats.written and _stored(conn, 2) == []
    _, stats = _run(conn, target, [2], sp, openai_embedder)  # the next round embeds it
    assert stats.written == ["2"] and stats.chunks_embedded == 1 and fake_openai.request_count == 1


def test_search_looks_past_a_parent_that_fills_the_first_batch_of_nearest_chunks(conn):
    """k parents are found even when one parent holds the 100 nearest chunks (the SQL function
    widens its batch of nearest chunks until it names k parents)."""
    target = _setup(conn, {1: "many", 2: "one", 3: "other"}, dims=8)
    near, far, farther = [1.0] + [0.0] * 7, [0.6, 0.8] + [0.0] * 6, [0.0, 1.0] + [0.0] * 6
    rows = [(1, i, f"chunk {i}", near) for i in range(100)] + [(2, 0, "two", far), (3, 0, "three", farther)]
    for key, i, text, vec in rows:
        conn.execute("""insert into docs_chunks select %s, %s, %s, %s::vector::halfvec, '\\x00',
                        autoembed.content_hash(body), 'm', 's' from docs where id = %s""",
                     (key, i, text, str(vec), key))
    hits = ChunkSetShape(target).nearest(conn, np.array(near, dtype=np.float32), 2)
    assert [(h.id, h.chunk) for h in hits] == [("1", "chunk 0"), ("2", "two")]
    assert [h.id for h in ChunkSetShape(target).nearest(conn, np.array(near, dtype=np.float32), 3)] == ["1", "2", "3"]


def test_a_document_rechunked_under_another_model_reuses_none_of_the_old_models_vectors(conn, fake_openai,
                                                                                         openai_embedder):
    """Chunk reuse is per model: a chunk text with a vector under the old model only is embedded
    again under the new one (same size, so the old vectors would fit the column)."""
    text = "\n\n".join(_paragraphs(30, seed=3))
    target = _setup(conn, {1: text, 2: None})
    sp = splitter_for(openai_embedder, 120, overlap=20)
    _run(conn, target, [1], sp, openai_embedder)
    other = make_embedder(replace(EmbedderSettings.from_env(), model="text-embedding-3-large"),
                          dimensions=1536)
    assert other.identity.key != openai_embedder.identity.key
    conn.execute("update docs set body = %s where id = 2", (text,))  # the same chunk texts in a second document
    fake_openai.reset()
    p, stats = _run(conn, target, [1, 2], sp, other)
    pieces = sp.split(text)
    assert p.reused == set() and sorted(stats.written) == ["1", "2"]
    assert stats.chunks_embedded == 2 * len(pieces) and stats.chunks_reused == 0
    assert sorted({t for r in fake_openai.requests for t in r["inputs"]}) == sorted(set(pieces))
    assert {r["model"] for r in fake_openai.requests} == {"text-embedding-3-large"}
    assert {m for (m,) in conn.execute("select distinct model from docs_chunks")} == {other.identity.key}
    # Under the new model, its own vectors are reused again.
    conn.execute("update docs set body = body || ' (edited)' where id = 2")
    fake_openai.reset()
    _, stats = _run(conn, target, [2], sp, other)
    assert stats.written == ["2"] and stats.chunks_reused >= len(pieces) - 1 and stats.chunks_embedded <= 1
