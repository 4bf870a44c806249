"""CPU per row of reading a provider's embeddings answer, three ways, against the instant fake
provider (1536 dims, base64, batches of --batch): the embedder's own path (client.post with
cast_to=bytes, orjson, its _parse: count/index/size/finite checks, pybase64 into one array),
the client's public raw-response API (`embeddings.with_raw_response.create` + the same parse)
and the client's parsed models (`embeddings.create`, pydantic; no checks at all). What the drain's
embed thread holds the GIL for per row, since the provider answers at once.

    python bench/bench_embed_decode.py [--batch 500] [--rounds 20]
"""

from __future__ import annotations

import argparse
import time

import orjson

from common import fake_provider, header, line

from autoembed_dagster.core.config import EmbedderSettings
from autoembed_dagster.core.embed.openai_embedder import OpenAIEmbedder


def cpu_per_row(fn, rounds: int, n: int) -> float:
    fn()  # warm: connection, caches
    t = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - t) / rounds / n * 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args(argv)
    header(f"reading the embeddings answer: CPU per row (batch {a.batch}, 1536 dims, base64)")
    with fake_provider():
        e = OpenAIEmbedder(EmbedderSettings.from_env())
        texts = [f"# title {i}\n\nbody text number {i}" for i in range(a.batch)]
        body = e.request_body(texts)
        client, n = e.client, a.batch

        def raw_response():
            e._parse(orjson.loads(client.embeddings.with_raw_response.create(**body).content), n)

        ways = {
            "embed() (client.post bytes + orjson + checks)": lambda: e.embed(texts),
            "  of which client.post only (HTTP, no decode)": lambda: client.post("/embeddings", cast_to=bytes, body=body),
            "with_raw_response.create + orjson + checks": raw_response,
            "embeddings.create (pydantic models, no checks)": lambda: client.embeddings.create(**body),
        }
        out = {label: cpu_per_row(fn, a.rounds, n) for label, fn in ways.items()}
    base = out["embed() (client.post bytes + orjson + checks)"]
    for label, us in out.items():
        line(label, f"{us:6.1f} us/row  ({us / base:.2f}x embed())")
    return out


if __name__ == "__main__":
    main()
