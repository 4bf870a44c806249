"""The drain's fast paths (issue 26) give what the general paths give: the whole-response base64
decode, the garbage collector kept quiet while a drain runs, the one-piece binary array of vectors,
the integer-key path of message keys. No timings: only results and rejections."""

from __future__ import annotations

import base64
import gc
import threading
from dataclasses import replace

import numpy as np
import pytest

from autoembed_dagster.core.config import EmbedderSettings
from autoembed_dagster.core.drain.loop import QUIET_GC_THRESHOLD, quiet_gc
from autoembed_dagster.core.embed.base import EmbeddingError
from autoembed_dagster.core.embed.openai_embedder import OpenAIEmbedder, _decode_all

try:
    from tests.fake_openai import fake_vector
except ModuleNotFoundError:  # tests/ itself on sys.path (rootdir-relative import mode)
    from fake_openai import fake_vector  # type: ignore[no-redef]


# -- the whole-response base64 decode ------------------------------------------------------------
def embedder(srv, dims: int = 1536) -> OpenAIEmbedder:
    s = EmbedderSettings(provider="openai", model="text-embedding-3-small", base_url=srv.base_url,
                         request_timeout=5, max_retries=0)
    return OpenAIEmbedder(replace(s, dimensions=dims))


def b64(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def response(vectors: list[np.ndarray], order: list[int] | None = None) -> dict:
    order = list(range(len(vectors))) if order is None else order
    return {"data": [{"index": i, "embedding": b64(vectors[i])} for i in order]}


def item_by_item(emb: OpenAIEmbedder, resp: dict, n: int):
    """What the general path makes of `resp` (the reference the fast path must equal)."""
    return emb._checked(*emb._decode_items(resp["data"], n, emb.identity.dimensions))


@pytest.mark.parametrize("dims", [3, 384, 1536, 3072])
def test_one_decode_equals_item_by_item(srv, dims):
    emb = embedder(srv, dims)
    texts = [f"text {i}" for i in range(7)]
    vecs = [fake_vector(t, dims) for t in texts]
    resp = response(vecs)
    assert _decode_all(resp["data"], 7, dims) is not None  # (the fast path is taken)
    got = emb.parse_response(resp, 7)
    ref, bad = item_by_item(emb, resp, 7)
    assert bad == {}
    for g, r, v in zip(got, ref, vecs):
        assert g.dtype == np.float32 and g.flags.writeable
        np.testing.assert_array_equal(g, r)
        np.testing.assert_array_equal(g, v)


def test_dimensions_that_need_padding_take_the_item_path(srv):
    emb = embedder(srv, 512)  # 2,048 bytes: each text ends in padding
    vecs = [fake_vector(str(i), 512) for i in range(3)]
    resp = response(vecs)
    assert _decode_all(resp["data"], 3, 512) is None
    for g, v in zip(emb.parse_response(resp, 3), vecs):
        np.testing.assert_array_equal(g, v)


def test_out_of_order_indexes_land_at_their_index(srv):
    emb = embedder(srv, 384)
    vecs = [fake_vector(str(i), 384) for i in range(4)]
    resp = response(vecs, order=[2, 0, 3, 1])
    assert _decode_all(resp["data"], 4, 384) is None
    for g, v in zip(emb.parse_response(resp, 4), vecs):
        np.testing.assert_array_equal(g, v)


@pytest.mark.parametrize("order", [[0, 1, 1], [0, 1, 3], [0, 1, -1], [0, 1, 2.0], [0, 1, None]])
def test_bad_indexes_fail_the_whole_response(srv, order):
    emb = embedder(srv, 384)
    vecs = [fake_vector(str(i), 384) for i in range(3)]
    resp = {"data": [{"index": i, "embedding": b64(vecs[k])} for k, i in enumerate(order)]}
    with pytest.raises(EmbeddingError, match="missing, duplicate or out-of-range index"):
        emb.parse_response(resp, 3)


def test_wrong_count_fails_the_whole_response(srv):
    emb = embedder(srv, 384)
    resp = response([fake_vector(str(i), 384) for i in range(2)])
    with pytest.raises(EmbeddingError, match="returned 2 embeddings for 3 inputs"):
        emb.parse_response(resp, 3)


def test_wrong_dimension_and_nan_fail_their_input_alone(srv):
    emb = embedder(srv, 384)
    vecs = [fake_vector(str(i), 384) for i in range(4)]
    vecs[1] = vecs[1][:381]  # still a whole number of base64 quanta: only the length tells
    vecs[2] = vecs[2].copy()
    vecs[2][5] = np.inf
    vecs[3] = vecs[3].copy()
    vecs[3][0] = np.nan
    resp = response(vecs)
    got, bad = emb._parse(resp, 4)
    assert sorted(bad) == [1, 2, 3] and got[1] is None and got[2] is None and got[3] is None
    assert "provider returned 381-dim vector, expected 384" in str(bad[1])
    assert "non-finite value (inf) at component 5" in str(bad[2])
    assert "non-finite value (nan) at component 0" in str(bad[3])
    np.testing.assert_array_equal(got[0], vecs[0])
    with pytest.raises(EmbeddingError, match="381-dim vector"):  # the first bad one's
        emb.parse_response(resp, 4)
    # All the right length, one with a NaN: the one-decode path, the same verdict.
    vecs[1] = fake_vector("1", 384)
    vecs[2] = fake_vector("2", 384)
    resp = response(vecs)
    assert _decode_all(resp["data"], 4, 384) is not None
    got, bad = emb._parse(resp, 4)
    assert list(bad) == [3] and "non-finite value (nan) at component 0" in str(bad[3])
    assert got[3] is None and all(g is not None for g in got[:3])


@pytest.mark.parametrize("garble", ["pad", "alphabet", "non_ascii", "number_list", "not_a_dict"])
def test_garbled_items_are_judged_item_by_item(srv, garble):
    emb = embedder(srv, 384)
    vecs = [fake_vector(str(i), 384) for i in range(3)]
    resp = response(vecs)
    text = resp["data"][1]["embedding"]
    if garble == "pad":
        resp["data"][1]["embedding"] = text[:-4] + "AA=="  # the right width, but padded: 383.5 floats
    elif garble == "alphabet":
        resp["data"][1]["embedding"] = text[:-1] + "*"
    elif garble == "non_ascii":
        resp["data"][1]["embedding"] = text[:-1] + "é"
    elif garble == "number_list":
        resp["data"][1]["embedding"] = vecs[1].tolist()
    else:
        resp["data"][1] = [1, text]
    assert _decode_all(resp["data"], 3, 384) is None
    try:
        ref = item_by_item(emb, resp, 3)
    except EmbeddingError as e:
        with pytest.raises(EmbeddingError) as raised:
            emb._parse(resp, 3)
        assert str(raised.value) == str(e)
        assert garble != "number_list"
        return
    got = emb._parse(resp, 3)
    assert got[1].keys() == ref[1].keys()
    for g, r in zip(got[0], ref[0]):
        assert (g is None and r is None) or np.array_equal(g, r)
    assert garble == "number_list" and got[1] == {}


def test_body_sent_by_orjson_through_the_client(srv):
    """The request still goes through the client (retries, headers) and reads as the same JSON."""
    emb = embedder(srv)
    texts = ["alpha", "é ünïcode \u2028 \"quoted\" \\", "gamma"]
    srv.fail_next(1, 500)
    emb = OpenAIEmbedder(replace(emb.settings, max_retries=1, dimensions=1536))
    out = emb.embed(texts)
    assert out.errors == [None] * 3
    for v, t in zip(out.vectors, texts):
        np.testing.assert_array_equal(v, fake_vector(t))
    assert srv.request_count == 2  # the client's own retry sent the same body again
    assert srv.requests[-1]["inputs"] == texts


# -- the garbage collector while draining -----------------------------------------------------
def test_quiet_gc_is_restored_after_the_last_drain():
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert frozen == 0
    with quiet_gc():
        assert gc.get_threshold() == QUIET_GC_THRESHOLD and gc.get_freeze_count() > 0
        with quiet_gc():  # a second drain in the same process
            pass
        assert gc.get_threshold() == QUIET_GC_THRESHOLD  # the first still runs
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with quiet_gc():
            raise RuntimeError("a failing drain")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_quiet_gc_across_threads():
    before = gc.get_threshold()
    inside, leave = threading.Event(), threading.Event()

    def drain():
        with quiet_gc():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=drain)
    t.start()
    inside.wait(10)
    with quiet_gc():
        pass
    assert gc.get_threshold() == QUIET_GC_THRESHOLD  # the thread's drain is still running
    leave.set()
    t.join()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_heap_frozen_before_stays_frozen():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with quiet_gc():
            pass
        assert gc.get_freeze_count() > count // 2  # (not unfrozen; a frozen object may be freed meanwhile)
    finally:
        gc.unfreeze()


# -- the binary array of vectors ------------------------------------------------------------------
def pgvector_array_bytes(conn, vector_type: str, matrix: np.ndarray) -> bytes:
    """The binary array psycopg's list dumper makes of pgvector's own element dumpers."""
    from pgvector import HalfVector, Vector
    from pgvector.psycopg import register_vector
    from psycopg.adapt import PyFormat, Transformer

    register_vector(conn)
    cls = HalfVector if vector_type == "halfvec" else Vector
    items = [cls(row) for row in matrix]
    return bytes(Transformer(conn).get_dumper(items, PyFormat.BINARY).dump(items))


@pytest.mark.parametrize("vector_type", ["vector", "halfvec"])
@pytest.mark.parametrize("dims", [1, 2, 3, 1536, 16000])
def test_array_dumper_bytes_equal_pgvector(conn, vector_type, dims):
    from types import SimpleNamespace

    from psycopg.adapt import PyFormat, Transformer

    from autoembed_dagster.core.targets.vectors import encode_vectors, vector_array

    rng = np.random.default_rng(dims)
    matrix = rng.standard_normal((5, dims)).astype(np.float32)
    matrix[0, 0] = 65504.0 if vector_type == "halfvec" else 3.0e38  # the type's edge
    matrix[1, -1] = -0.0
    target = SimpleNamespace(vector_type=vector_type, dimensions=dims)
    ours = vector_array(conn, vector_type, encode_vectors(target, list(matrix)))
    assert ours.type_name == vector_type
    dumped = Transformer(conn).get_dumper(ours, PyFormat.BINARY).dump(ours)
    assert bytes(dumped) == pgvector_array_bytes(conn, vector_type, matrix)
    # And the server reads it back as the same vectors.
    back = conn.execute(f"select v::text from unnest(%b::{vector_type}[]) v", (ours,)).fetchall()
    assert len(back) == 5
    want = conn.execute(f"select v::text from unnest(%s::{vector_type}[]) v",
                        ([f"[{','.join(repr(float(x)) for x in row)}]" for row in matrix],)).fetchall()
    assert back == want


def test_array_dumper_empty_and_one(conn):
    from autoembed_dagster.core.targets.vectors import vector_array

    for vector_type in ("vector", "halfvec"):
        empty = vector_array(conn, vector_type, [])
        assert conn.execute(f"select cardinality(%b::{vector_type}[]), pg_typeof(%b)::text",
                            (empty, empty)).fetchone() == (0, f"{vector_type}[]")
        one = vector_array(conn, vector_type, [np.array([1.5, -2], ">f4" if vector_type == "vector" else ">f2")
                                               .tobytes().join([b"\x00\x02\x00\x00", b""])])
        assert conn.execute(f"select (%b::{vector_type}[])[1]::text", (one,)).fetchone() == ("[1.5,-2]",)


# -- integer keys --------------------------------------------------------------------------------
KEYS = [1, -7, 0, 2**31 - 1, -2**31, 2**31, -2**31 - 1, 2**63, True, False, 1.0, None, "12", "0012", "-3",
        "1e3", " 4", "x", [1], {"id": 1}]


@pytest.mark.parametrize("key_type", ["smallint", "integer", "bigint", "text"])
def test_integer_key_path_equals_the_general_checks(key_type):
    from types import SimpleNamespace

    from autoembed_dagster.core.drain.jobs import row_jobs
    from autoembed_dagster.core.queue.pgmq import Message
    from autoembed_dagster.core.targets.badrows import key_problem
    from autoembed_dagster.core.targets.catalog import INTEGER_KEY_TYPES, TargetError, key_text

    target = SimpleNamespace(key_type=key_type, regclass="public.items", key=SimpleNamespace(key_column="id"))
    message = Message(msg_id=5, read_ct=1, enqueued_at=None, body={"ids": KEYS})
    bad: list = []
    jobs = row_jobs(message, target, KEYS, 2, bad)
    want_ok, want_bad = [], []
    for raw in KEYS:  # what key_text and key_problem say of each key on its own
        try:
            text = key_text(raw, target)
        except TargetError:
            want_bad.append(str(raw))
            continue
        if key_problem(text, key_type) is not None:
            want_bad.append(str(raw))
        else:
            want_ok.append((text, int(text) if key_type in INTEGER_KEY_TYPES else text))
    assert [(j.row_id, j.key) for j in jobs] == want_ok
    assert [type(j.key) for j in jobs] == [type(k) for _, k in want_ok]
    assert [j.row_id for j, _ in bad] == want_bad
    assert all(j.msg_id == 5 and j.failures == 2 and j.message_rows == len(KEYS) for j in jobs)
    if key_type == "integer":
        assert "True" in want_bad and "2147483648" in want_bad and "1.0" in want_bad


def test_integer_ids_are_deduplicated_by_value_and_type():
    from autoembed_dagster.core.targets.catalog import _row_ids

    assert _row_ids({"ids": [3, 1, 3, 2, 1]}) == [3, 1, 2]
    assert _row_ids({"ids": [1, True, 1.0, "1", 1]}) == [1, True, 1.0, "1"]  # never merged across types


def test_forged_keys_of_an_integer_table_fail_alone(supabase_docs, fake_openai, settings):
    from autoembed_dagster.core.drain import drain
    from autoembed_dagster.core.queue import pgmq

    from .test_incremental import assert_current, queue_depth

    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('a', 'one'), ('b', 'two'), ('c', 'three')")
    forged = [1, 2, "3", True, 2**31, -2**31 - 1, 1.5, "x", None, -1]
    pgmq.send_batch(conn, "embedding_jobs", [{"id": 1, "ids": forged, "schema": "public", "table": "documents",
                                              "contentFunction": "embedding_input", "embeddingColumn": "embedding"}])
    drain(conn, settings)
    assert queue_depth(conn) == 0
    for doc_id in (1, 2, 3):
        assert_current(conn, doc_id)
    assert conn.execute("select count(*) from documents where embedding is not null").fetchone()[0] == 3
    dead = {d["row_id"]: d["error"] for d in pgmq.dead_letters(conn)}
    assert set(dead) == {"true", "2147483648", "-2147483649", "1.5", "x", None}, dead  # (as JSON gave them)
    assert "out of integer's range" in dead["2147483648"] and "out of integer's range" in dead["-2147483649"]
