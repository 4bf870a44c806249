"""A real, local OpenAI-compatible embeddings server for tests and benchmarks (stdlib + numpy).

It speaks HTTP on 127.0.0.1 so the real `openai` client is exercised end to end (retries,
timeouts, parsing); nothing is mocked. Faults are injected per request, thread-safely.

It also speaks the Batch API (`/v1/files`, `/v1/batches`): a batch moves validating ->
in_progress -> completed one step per `GET /v1/batches/{id}` (or by `advance_batches()` when
held with `hold_batches()`), so tests control its clock; faults: `expire_next_batch`,
`fail_next_batch`, `drop_from_next_batch`, and `poison` substrings fail their lines into the
error file. `calls` counts requests per endpoint (`calls["POST /v1/embeddings"]`).
"""

from __future__ import annotations

import base64
import collections
import email
import email.policy
import hashlib
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

BAD_PAYLOAD_KINDS = ("malformed_json", "wrong_count", "wrong_dimension", "nan", "invalid_utf8")
# One vector of a response made bad (the rest of the response is good): corrupt() / corrupt_next().
BAD_VECTOR_KINDS = ("huge", "nan", "short")
HUGE_COMPONENT = 1_000_000.0  # past halfvec's range (65504), inside float4's


def bad_vector(v: np.ndarray, kind: str) -> np.ndarray:
    """`v` made bad: a component of 1e6 ("huge", component 1), NaN (component 0), one dimension short."""
    if kind == "short":
        return v[:-1].copy()
    v = v.copy()
    if kind == "huge":
        v[1] = HUGE_COMPONENT
    else:
        v[0] = np.nan
    return v


def fake_vector(text: str, dims: int = 1536) -> np.ndarray:
    """Deterministic unit float32 vector for (text, dims); numpy only, so ~µs per text."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dims, dtype=np.float32)
    v /= np.float32(np.linalg.norm(v))
    return v


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class FakeOpenAI:
    """`with FakeOpenAI() as srv: OpenAI(base_url=srv.base_url, api_key="x")`."""

    def __init__(self, default_dims: int = 1536, host: str = "127.0.0.1", batch_api: bool = True) -> None:
        self.default_dims = default_dims
        self.batch_api = batch_api  # False: /v1/batches and /v1/files answer 404, like a server without them
        self._lock = threading.RLock()  # re-entrant: a batch completing runs _respond, which takes it too
        self._corrupt_lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        # Called (no arguments, in the handler's thread) after each embeddings request is recorded:
        # a test makes something happen "while the provider works" (e.g. a window closes).
        self.on_request: Any = None
        self._ids = itertools.count(1)
        self.reset()
        self._server = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._server.daemon_threads = True  # a sleeping "timeout" handler must not block stop()
        self.port = self._server.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection ---------------------------------------------------------------------
    def reset(self) -> None:
        """Clear faults and the request log."""
        with self._lock:
            self._fail: list[tuple[int, float | None, Any]] = []
            self._timeouts: list[float] = []
            self._bad: list[str] = []
            self._poison: list[tuple[str, int, str]] = []
            self._corrupt: list[tuple[str, str]] = []  # (substring, bad vector kind)
            self._corrupt_next: list[tuple[str, int]] = []  # (bad vector kind, input index) per request
            self._delay = 0.0
            self._rate: tuple[int, float] | None = None
            self._accepted: collections.deque[float] = collections.deque()
            self._requests.clear()
            self.calls: collections.Counter[str] = collections.Counter()
            self.files: dict[str, dict[str, Any]] = {}
            self.batches: dict[str, dict[str, Any]] = {}
            self._held = False
            self._batch_faults: list[tuple[str, Any]] = []  # ("expire", lines kept) / ("fail", msg) / ("drop", n)
            # The provider's limits per batch (OpenAI: 50,000 requests and inputs, 200 MB per file).
            self.max_batch_requests, self.max_batch_inputs, self.max_file_bytes = 50_000, 50_000, 200 * 1024 * 1024

    # -- the Batch API's clock and faults -------------------------------------------------------
    def hold_batches(self, held: bool = True) -> None:
        """Held: batches do not move on when polled, only through advance_batches()."""
        with self._lock:
            self._held = held

    def advance_batches(self, steps: int = 1) -> None:
        """Move every open batch `steps` states on (validating -> in_progress -> completed)."""
        with self._lock:
            for b in list(self.batches.values()):
                for _ in range(steps):
                    self._step(b)

    def expire_next_batch(self, keep_lines: int = 0) -> None:
        """The next batch to finish expires instead: only its first `keep_lines` results are returned."""
        with self._lock:
            self._batch_faults.append(("expire", keep_lines))

    def fail_next_batch(self, message: str = "the input file failed validation") -> None:
        """The next batch to be validated fails (status `failed`, no output)."""
        with self._lock:
            self._batch_faults.append(("fail", message))

    def drop_from_next_batch(self, n: int) -> None:
        """The next batch to complete leaves its last `n` lines out of both output and error files."""
        with self._lock:
            self._batch_faults.append(("drop", n))

    @property
    def batch_creations(self) -> int:
        with self._lock:
            return self.calls["POST /v1/batches"]

    @property
    def embedding_calls(self) -> int:
        """POST /v1/embeddings requests received (direct calls, not batch lines)."""
        with self._lock:
            return self.calls["POST /v1/embeddings"]

    def fail_next(self, n: int, status: int = 500, retry_after: float | None = None, body: Any = None) -> None:
        """The next `n` requests get `status` (optionally with a Retry-After header, in seconds)."""
        with self._lock:
            self._fail.extend([(status, retry_after, body)] * n)

    def timeout_next(self, n: int, seconds: float) -> None:
        """The next `n` requests sleep `seconds` before answering (longer than the client waits)."""
        with self._lock:
            self._timeouts.extend([seconds] * n)

    def bad_payload_next(self, n: int, kind: str) -> None:
        if kind not in BAD_PAYLOAD_KINDS:
            raise ValueError(f"unknown bad payload kind {kind!r}; one of {BAD_PAYLOAD_KINDS}")
        with self._lock:
            self._bad.extend([kind] * n)

    def poison(self, substring: str, status: int = 400, message: str | None = None) -> None:
        """Any request with an input containing `substring` fails with `status`."""
        with self._lock:
            self._poison.append((substring, status, message or f"input contains forbidden text {substring!r}"))

    def corrupt(self, substring: str, kind: str) -> None:
        """Every input containing `substring` gets a bad vector of `kind` (BAD_VECTOR_KINDS) in an
        otherwise good response, whatever request it is in."""
        if kind not in BAD_VECTOR_KINDS:
            raise ValueError(f"unknown bad vector kind {kind!r}; one of {BAD_VECTOR_KINDS}")
        with self._corrupt_lock:
            self._corrupt.append((substring, kind))

    def corrupt_next(self, kind: str, index: int) -> None:
        """The next successful response gets a bad vector of `kind` at input `index` (ignored when
        the request has fewer inputs)."""
        if kind not in BAD_VECTOR_KINDS:
            raise ValueError(f"unknown bad vector kind {kind!r}; one of {BAD_VECTOR_KINDS}")
        with self._corrupt_lock:
            self._corrupt_next.append((kind, index))

    def delay(self, seconds: float) -> None:
        """Every request waits `seconds` (simulates network/provider latency)."""
        with self._lock:
            self._delay = seconds

    def limit_per_minute(self, n: int | None, window_seconds: float = 60.0) -> None:
        """Answer 429 (with Retry-After) to a request past `n` per minute: at most
        n * window_seconds / 60 accepted requests in any sliding window of `window_seconds` (a
        provider enforces its per-minute limit over shorter periods too). None: no limit."""
        with self._lock:
            self._rate = (max(1, round(n * window_seconds / 60.0)), window_seconds) if n else None
            self._accepted.clear()

    def _over_limit(self) -> float | None:
        """Seconds until a request would be accepted, or None (and counted) if it is now."""
        with self._lock:
            if self._rate is None:
                return None
            allowed, window = self._rate
            now = time.monotonic()
            while self._accepted and self._accepted[0] <= now - window:
                self._accepted.popleft()
            if len(self._accepted) >= allowed:
                return self._accepted[0] + window - now
            self._accepted.append(now)
            return None

    @property
    def throttled_count(self) -> int:
        """Requests answered 429."""
        with self._lock:
            return sum(1 for r in self._requests if r["status"] == 429)

    # -- observation -------------------------------------------------------------------------
    @property
    def requests(self) -> list[dict[str, Any]]:
        """Snapshot of received embedding requests: inputs, model, dimensions, status."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    # -- request handling (called from handler threads) ---------------------------------------
    def _take(self, inputs: list[str]) -> tuple[tuple[int, float | None, Any] | None, float, str | None, tuple[str, int, str] | None, float]:
        with self._lock:
            fail = self._fail.pop(0) if self._fail else None
            sleep = self._timeouts.pop(0) if (fail is None and self._timeouts) else 0.0
            bad = self._bad.pop(0) if (fail is None and not sleep and self._bad) else None
            hit = next((p for p in self._poison for t in inputs if p[0] in t), None)
            return fail, sleep, bad, hit, self._delay

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)
        hook = self.on_request
        if hook is not None:
            hook()

    def handle(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Returns (status, extra headers, body bytes) for one POST /embeddings."""
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _json(400, _error_body("request body is not valid JSON", 400))
        raw = req.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        dims = req.get("dimensions") or self.default_dims
        entry: dict[str, Any] = {
            "inputs": inputs,
            "model": req.get("model"),
            "dimensions": req.get("dimensions"),
            "encoding_format": req.get("encoding_format"),
            "status": None,
        }
        self._record(entry)  # before any sleep, so a client that gave up is still counted
        wait = self._over_limit()
        if wait is not None:
            entry["status"] = 429
            status, _, payload = _json(429, {"error": {"message": "rate limit reached (fake provider)",
                                                       "type": "requests", "param": None, "code": "rate_limit_exceeded"}})
            return status, {"Retry-After": f"{max(wait, 0.001):.3f}"}, payload
        fail, sleep, bad, hit, delay = self._take(inputs if isinstance(inputs, list) else [])
        if delay:
            time.sleep(delay)
        if sleep:
            time.sleep(sleep)
        status, headers, payload = self._respond(req, inputs, dims, fail, bad, hit)
        entry["status"] = status
        return status, headers, payload

    def _respond(self, req: dict[str, Any], inputs: Any, dims: int, fail: Any, bad: str | None, hit: Any) -> tuple[int, dict[str, str], bytes]:
        if fail is not None:
            status, retry_after, body = fail
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            if body is None:
                body = _error_body(f"fake server error {status}", status)
            data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
            return status, headers, data
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _json(400, _error_body("'input' must be a string or a non-empty list of strings", 400))
        if any(t == "" for t in inputs):
            return _json(400, _error_body("'$.input' is invalid: input cannot be an empty string", 400))
        if hit is not None:
            return _json(hit[1], _error_body(hit[2], hit[1]))
        if not isinstance(dims, int) or dims < 1:
            return _json(400, _error_body(f"invalid dimensions {dims!r}", 400))

        b64 = req.get("encoding_format") == "base64"
        vecs = [fake_vector(t, dims) for t in inputs]
        if bad == "wrong_dimension":
            wrong = 1024 if dims != 1024 else 512
            vecs = [fake_vector(t, wrong) for t in inputs]
        elif bad == "nan":
            vecs[0] = vecs[0].copy()
            vecs[0][0] = np.nan
        with self._corrupt_lock:  # (not self._lock: a batch's lines are answered with it held)
            corrupt = list(self._corrupt)
            once = self._corrupt_next.pop(0) if self._corrupt_next else None
        for i, t in enumerate(inputs):
            kind = next((k for sub, k in corrupt if sub in t), None)
            if once is not None and once[1] == i:
                kind = once[0]
            if kind is not None:
                vecs[i] = bad_vector(vecs[i], kind)
        items = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()}
            for i, v in enumerate(vecs)
        ]
        if bad == "wrong_count":
            items = items[:-1] if len(items) > 1 else items + [dict(items[0], index=1)]
        tokens = sum(max(1, len(t.split())) for t in inputs)
        resp = {"object": "list", "data": items, "model": req.get("model"), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        status, headers, data = _json(200, resp)
        if bad == "malformed_json":
            data = data[: max(1, len(data) // 2)]  # cut mid-document
        elif bad == "invalid_utf8":
            data = b'{"object": "list", "model": "\xff\xfe\xfd", "data": []}'
        return status, headers, data

    # -- the Batch API (called from handler threads) -----------------------------------------
    def count(self, what: str) -> None:
        with self._lock:
            self.calls[what] += 1

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    def handle_batch_api(self, method: str, path: str, body: bytes, content_type: str):
        parts = [x for x in path.split("/") if x]
        if parts[:1] == ["v1"]:
            parts = parts[1:]
        route = f"{method} /v1/{parts[0] if parts else ''}"
        if len(parts) == 2:
            route += "/{id}"
        elif len(parts) == 3:
            route += "/{id}/" + parts[2]
        self.count(route)
        if not self.batch_api or not parts or parts[0] not in ("files", "batches"):
            return _json(404, _error_body(f"no route {method} {path}", 404))
        try:
            if route == "POST /v1/files":
                return self._upload(body, content_type)
            if route == "GET /v1/files/{id}/content":
                with self._lock:
                    f = self.files.get(parts[1])
                if f is None:
                    return _json(404, _error_body(f"no file {parts[1]}", 404))
                return 200, {}, (f["data"],)
            if route == "GET /v1/files/{id}":
                with self._lock:
                    f = self.files.get(parts[1])
                return _json(200, f["object"]) if f else _json(404, _error_body(f"no file {parts[1]}", 404))
            if route == "POST /v1/batches":
                return self._create_batch(json.loads(body))
            if route == "GET /v1/batches":
                with self._lock:
                    data = [dict(b["object"]) for b in self.batches.values()]
                return _json(200, {"object": "list", "data": data[::-1], "has_more": False,
                                   "first_id": data[-1]["id"] if data else None,
                                   "last_id": data[0]["id"] if data else None})
            if route == "GET /v1/batches/{id}":
                with self._lock:
                    b = self.batches.get(parts[1])
                    if b is None:
                        return _json(404, _error_body(f"no batch {parts[1]}", 404))
                    if not self._held:
                        self._step(b)
                    return _json(200, dict(b["object"]))
            if route == "POST /v1/batches/{id}/cancel":
                with self._lock:
                    b = self.batches.get(parts[1])
                    if b is None:
                        return _json(404, _error_body(f"no batch {parts[1]}", 404))
                    if b["object"]["status"] in ("validating", "in_progress", "finalizing"):
                        self._finish(b, "cancelled", keep=0)
                    return _json(200, dict(b["object"]))
        except (ValueError, KeyError) as exc:
            return _json(400, _error_body(f"bad request: {exc}", 400))
        return _json(404, _error_body(f"no route {method} {path}", 404))

    def _upload(self, body: bytes, content_type: str):
        msg = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
                                       policy=email.policy.HTTP)
        fields: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return _json(400, _error_body("multipart upload needs `file` and `purpose`", 400))
        purpose = fields["purpose"][1].decode()
        filename, data = fields["file"]
        if purpose != "batch":
            return _json(400, _error_body(f"purpose {purpose!r}: this server takes only `batch` files", 400))
        if len(data) > self.max_file_bytes:
            return _json(413, _error_body(f"file of {len(data)} bytes is over the {self.max_file_bytes} byte limit", 413))
        return _json(200, self._store_file(data, filename or "upload.jsonl", purpose))

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        fid = self._new_id("file")
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed"}
        with self._lock:
            self.files[fid] = {"data": data, "object": obj}
        return obj

    def _create_batch(self, req: dict[str, Any]):
        with self._lock:
            f = self.files.get(req.get("input_file_id"))
        if f is None:
            return _json(400, _error_body(f"no input file {req.get('input_file_id')!r}", 400))
        if req.get("endpoint") != "/v1/embeddings" or req.get("completion_window") != "24h":
            return _json(400, _error_body("endpoint must be /v1/embeddings and completion_window 24h", 400))
        bid = self._new_id("batch")
        now = int(time.time())
        obj = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None,
               "input_file_id": req["input_file_id"], "completion_window": "24h", "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": now, "expires_at": now + 86400,
               "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.get("metadata")}
        with self._lock:
            self.batches[bid] = {"object": obj, "input": f["data"]}
        return _json(200, obj)

    def _step(self, b: dict[str, Any]) -> None:
        """One tick of a batch's clock (lock held)."""
        obj = b["object"]
        if obj["status"] == "validating":
            lines = [json.loads(x) for x in b["input"].splitlines() if x.strip()]
            inputs = sum(len(x["body"]["input"]) if isinstance(x["body"]["input"], list) else 1 for x in lines)
            fault = self._take_fault("fail")
            problem = (fault[1] if fault else
                       f"{len(lines)} requests is over the limit of {self.max_batch_requests}"
                       if len(lines) > self.max_batch_requests else
                       f"{inputs} embedding inputs is over the limit of {self.max_batch_inputs}"
                       if inputs > self.max_batch_inputs else None)
            if problem:
                obj.update(status="failed", failed_at=int(time.time()),
                           errors={"object": "list", "data": [{"code": "invalid_file", "message": problem,
                                                                "line": None, "param": None}]})
                return
            b["lines"] = lines
            obj["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
            obj.update(status="in_progress", in_progress_at=int(time.time()))
        elif obj["status"] == "in_progress":
            fault = self._take_fault("expire")
            if fault:
                self._finish(b, "expired", keep=fault[1])
            else:
                drop = self._take_fault("drop")
                self._finish(b, "completed", keep=len(b["lines"]) - (drop[1] if drop else 0))

    def _take_fault(self, kind: str):
        for i, f in enumerate(self._batch_faults):
            if f[0] == kind:
                return self._batch_faults.pop(i)
        return None

    def _finish(self, b: dict[str, Any], status: str, keep: int) -> None:
        """Run the first `keep` lines of the batch; write output and error files (lock held)."""
        obj, out, err = b["object"], [], []
        for line in b.get("lines", [])[:keep]:
            req = line["body"]
            raw = req.get("input")
            inputs = [raw] if isinstance(raw, str) else raw
            hit = next((p for p in self._poison for t in inputs if p[0] in t), None)
            code, _, payload = self._respond(req, inputs, req.get("dimensions") or self.default_dims, None, None, hit)
            result = {"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                      "response": {"status_code": code, "request_id": self._new_id("req"),
                                   "body": json.loads(payload)}, "error": None}
            (out if code == 200 else err).append(json.dumps(result))
        self._lock.release()  # _store_file takes the lock
        try:
            if out:
                obj["output_file_id"] = self._store_file(("\n".join(out) + "\n").encode(), f"{obj['id']}_output.jsonl",
                                                         "batch_output")["id"]
            if err:
                obj["error_file_id"] = self._store_file(("\n".join(err) + "\n").encode(), f"{obj['id']}_error.jsonl",
                                                        "batch_output")["id"]
        finally:
            self._lock.acquire()
        obj["request_counts"] = {"total": len(b.get("lines", [])), "completed": len(out), "failed": len(err)}
        obj.update(status=status, **{f"{status}_at": int(time.time())})



def _json(status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {}, json.dumps(obj).encode()


class OneWriteHandler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 (like a real provider) that answers in one write, with TCP_NODELAY.
    http.server writes the headers and the body separately: the body then waits for the client's
    delayed ACK of the headers (Nagle), ~40 ms per request, which a fast fake must not add."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def send_whole(self, status: int, data: bytes, content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> None:
        lines = [f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}",
                 f"Content-Type: {content_type}", f"Content-Length: {len(data)}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)


def _make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(OneWriteHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/embeddings", "/embeddings"):
                fake.count("POST /v1/embeddings")
                self._send(*fake.handle(body))
                return
            self._send(*fake.handle_batch_api("POST", path, body, self.headers.get("Content-Type") or ""))

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            status, headers, data = fake.handle_batch_api("GET", path, b"", "")
            if isinstance(data, tuple):  # file content: not JSON
                self._send(status, headers, data[0], content_type="application/octet-stream")
            else:
                self._send(status, headers, data)

        def _send(self, status: int, headers: dict[str, str], data: bytes,
                  content_type: str = "application/json") -> None:
            try:
                self.send_whole(status, data, content_type, headers)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client timed out and hung up

    return Handler
