"""A lean OpenAI-compatible embeddings server for benchmarks: answers instantly.

Vectors come from a pre-computed pool (numpy, base64 float32, as the openai client asks by
default); a text always maps to the same pool vector (crc32), so the work per request is a JSON
parse and a string join. Run it in its own process so it never shares the drain's GIL:

    python bench/fake_server.py [--port N] [--dims 1536]   # prints "PORT <n>" when ready
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import zlib
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fake_openai import OneWriteHandler  # noqa: E402 - one write per response, TCP_NODELAY

POOL = 2048


class Pool:
    def __init__(self) -> None:
        self._by_dims: dict[int, list[str]] = {}

    def get(self, dims: int) -> list[str]:
        pool = self._by_dims.get(dims)
        if pool is None:
            rng = np.random.default_rng(dims)
            v = rng.standard_normal((POOL, dims), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            pool = [json.dumps(base64.b64encode(row.astype("<f4").tobytes()).decode()) for row in v]
            self._by_dims[dims] = pool
        return pool


def pool_vector(text: str, dims: int) -> np.ndarray:
    """The vector the server returns for `text` (for checks in benchmarks)."""
    rng = np.random.default_rng(dims)
    v = rng.standard_normal((POOL, dims), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v[zlib.crc32(text.encode("utf-8", "surrogatepass")) % POOL]


def make_handler(pool: Pool, default_dims: int):
    class Handler(OneWriteHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            req = json.loads(body)
            inputs = req["input"]
            if isinstance(inputs, str):
                inputs = [inputs]
            dims = req.get("dimensions") or default_dims
            vecs = pool.get(dims)
            items = ",".join(
                '{"object":"embedding","index":%d,"embedding":%s}' % (i, vecs[zlib.crc32(t.encode("utf-8", "surrogatepass")) % POOL])
                for i, t in enumerate(inputs)
            )
            n = sum(len(t) for t in inputs) // 4 + 1
            data = ('{"object":"list","model":%s,"data":[%s],"usage":{"prompt_tokens":%d,"total_tokens":%d}}'
                    % (json.dumps(req.get("model")), items, n, n)).encode()
            self.send_whole(200, data)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--dims", type=int, default=1536)
    args = ap.parse_args()
    pool = Pool()
    pool.get(args.dims)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(pool, args.dims))
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
