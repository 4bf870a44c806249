"""The provider's Batch API (OpenAI's shape: JSONL file of `/v1/embeddings` requests, `/v1/batches`)
through the official client: upload, create, retrieve, cancel, read results. Requests are built
by the direct path's own embedder (`OpenAIEmbedder.prepare_input` truncates exactly as a direct
call does, `request_body` is the body a direct call sends) and results are checked by its parser.

Limits (OpenAI): at most 50,000 requests and 50,000 embedding inputs per batch, 200 MB per input
file, completion window 24 h. One request carries one row (its `custom_id` names the row), so
rows per batch = requests = inputs.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import orjson

from ..config import ConfigError
from .base import Embedder

if TYPE_CHECKING:  # openai is imported where it is called: the code location loads this module
    import openai

MAX_REQUESTS = 50_000
MAX_INPUTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
COMPLETION_WINDOW = "24h"
PROBE_TIMEOUT = 5.0  # seconds
ENDPOINT = "/v1/embeddings"
# Statuses of a batch at the provider.
OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
FINISHED_STATUSES = ("completed", "failed", "expired", "cancelled")


class BatchUnsupported(ConfigError):
    """The provider has no Batch API (the local model; a compatible server answering 404)."""


@dataclass(frozen=True)
class BatchLimits:
    requests: int = MAX_REQUESTS
    file_bytes: int = MAX_FILE_BYTES

    @classmethod
    def from_env(cls) -> "BatchLimits":
        """The provider's limits, lowered by AUTOEMBED_BATCH_MAX_REQUESTS / AUTOEMBED_BATCH_MAX_BYTES
        (smaller batches come back sooner; never above the provider's)."""
        def read(name: str, ceiling: int) -> int:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return ceiling
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not an integer") from None
            if not 1 <= value <= ceiling:
                raise ConfigError(f"{name}={value} must be between 1 and the provider's limit {ceiling}")
            return value

        # One input per request: the inputs limit is the requests limit.
        return cls(read("AUTOEMBED_BATCH_MAX_REQUESTS", min(MAX_REQUESTS, MAX_INPUTS)),
                   read("AUTOEMBED_BATCH_MAX_BYTES", MAX_FILE_BYTES))


@dataclass
class Result:
    """One line of a batch's output or error file."""

    custom_id: str
    status: int | None  # the request's HTTP status; None when the line carries only an `error`
    body: dict[str, Any] | None
    error: str | None  # the provider's reason when it failed


class BatchClient:
    """The Batch API of the provider an OpenAI embedder talks to (same key, URL, retries)."""

    def __init__(self, embedder: Embedder, what: str = "this pipeline"):
        if embedder.identity.provider != "openai" or not hasattr(embedder, "request_body"):
            raise BatchUnsupported(f"{what}: the {embedder.identity.provider} provider has no Batch API: "
                                   "re-embed with --via direct (or `backfill: {via: direct}` in its defs.yaml)")
        self.embedder = embedder
        self.client: openai.OpenAI = embedder.client  # type: ignore[attr-defined]
        self.what = what

    # -- requests -------------------------------------------------------------------------------
    def request_line(self, custom_id: str, text: str) -> tuple[bytes, bool]:
        """One JSONL line (with its newline) asking for `text`'s embedding; whether it was cut."""
        cut, truncated = self.embedder.prepare_input(text)  # type: ignore[attr-defined]
        line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                "body": self.embedder.request_body([cut])}  # type: ignore[attr-defined]
        return orjson.dumps(line) + b"\n", truncated

    # -- the API ------------------------------------------------------------------------------------
    def probe(self) -> None:
        """Raise BatchUnsupported when the provider answers 404 on /v1/batches. Other failures
        (no connection, a 5xx) say nothing about support and are raised as they are."""
        import openai  # here, not at module level: see the imports

        try:
            # Bounded: it runs when the code location loads (`dg check defs`, every run's load).
            self.client.with_options(timeout=PROBE_TIMEOUT, max_retries=0).batches.list(limit=1)
        except openai.NotFoundError:
            raise BatchUnsupported(
                f"{self.what}: the provider at {self.client.base_url} has no Batch API (404 on /v1/batches): "
                "re-embed with --via direct (or `backfill: {via: direct}` in its defs.yaml)") from None

    def upload(self, data: bytes, filename: str) -> str:
        return self.client.files.create(file=(filename, io.BytesIO(data)), purpose="batch").id

    def create(self, input_file_id: str, metadata: dict[str, str]):
        return self.client.batches.create(input_file_id=input_file_id, endpoint=ENDPOINT,
                                          completion_window=COMPLETION_WINDOW, metadata=metadata)

    def retrieve(self, batch_id: str):
        return self.client.batches.retrieve(batch_id)

    def cancel(self, batch_id: str):
        return self.client.batches.cancel(batch_id)

    def find(self, key: str, value: str):
        """The batch created with metadata {key: value} (a submission that crashed before it
        recorded the batch's id), or None. Looks at the most recent batches only."""
        for b in self.client.batches.list(limit=100):
            if (b.metadata or {}).get(key) == value:
                return b
        return None

    def results(self, file_id: str | None) -> Iterator[Result]:
        """The lines of an output or error file."""
        if not file_id:
            return
        # Streamed: the first lines are written while the rest of the file (up to ~1 GB of
        # base64 vectors for 50,000 rows) is still arriving.
        with self.client.files.with_streaming_response.content(file_id) as response:
            for raw in response.iter_lines():
                if raw.strip():
                    yield self._result(orjson.loads(raw))

    @staticmethod
    def _result(line: dict[str, Any]) -> Result:
        response = line.get("response") or {}
        body = response.get("body") if isinstance(response, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        error = None
        if line.get("error"):
            e = line["error"]
            error = f"{e.get('code') or 'error'}: {e.get('message')}" if isinstance(e, dict) else str(e)
        elif status != 200:
            err = body.get("error") if isinstance(body, dict) else None
            msg = err.get("message") if isinstance(err, dict) else None
            error = f"provider rejected input (HTTP {status}): {msg or body}"
        return Result(line.get("custom_id", ""), status, body if isinstance(body, dict) else None, error)
