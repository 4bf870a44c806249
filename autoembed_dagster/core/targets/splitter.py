"""Token-aware splitting of long text into chunks, with boundaries that survive edits.

A document is cut into paragraphs (blank lines); a paragraph longer than a chunk is cut further
by `semchunk` (sentences, then clauses, words, characters), counting tokens with the pipeline
model's own tokenizer. Paragraphs are then grouped into chunks by *content-defined* boundaries:
a chunk ends after a paragraph whose hash marks it as an anchor when the run since the previous
anchor is long enough, and must end when the next paragraph would not fit. Plain greedy packing shifts every later
boundary when one paragraph grows (all chunks after an edit change); anchors tie boundaries to
content, so an edit changes the chunks around it and the rest keep their exact text (and so their
vectors: see core/targets/chunks.py). Each chunk is an exact slice of the document; with `overlap`, a
chunk starts with up to `overlap` tokens from the end of the previous chunk's last paragraph.

Deterministic: the same text, tokenizer and settings give the same chunks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import semchunk

from ..config import ConfigError

ALGORITHM = "para-cdc-v1"  # part of the splitter key: a change here makes stored chunk sets stale
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_WORD_START = re.compile(r"(?<=\s)\S")
_SENTENCE_START = re.compile(r"[.!?:;] ")
# A paragraph is an anchor with probability 1/3 (by its hash); a boundary follows an anchor whose
# run since the previous anchor holds >= 1/4 of a chunk's body. Chosen on the stdlib corpus
# (bench/bench_chunks.py): appending a sentence to one paragraph changed <= 3 chunks in 220 edits
# of 30-80-chunk documents, chunks 57% full on average.
_ANCHOR_ONE_IN = 3
MIN_NUM, MIN_DEN = 1, 4
_TAIL_CHARS_PER_TOKEN = 6  # the overlap is looked for in the last overlap*6 characters of a unit
_CACHE_SIZE = 20_000  # token counts memoized per splitter (bounded: drains run for hours)


@dataclass(frozen=True)
class SizeNames:
    """How the caller spelled the two sizes, so that an error names what they typed: a Python
    caller's keyword, a CLI flag, a defs.yaml key (each a format with one `{}` for the value)."""

    tokens: str = "chunk tokens {}"
    overlap: str = "chunk overlap {}"


PYTHON_NAMES = SizeNames("chunk_tokens={}", "chunk_overlap={}")
CLI_NAMES = SizeNames("--chunk-tokens {}", "--chunk-overlap {}")
YAML_NAMES = SizeNames("`tokens: {}`", "`overlap: {}`")  # under `chunking:` in defs.yaml


def check_chunk_sizes(max_tokens: object, overlap: object, window: int | None = None,
                      names: SizeNames = SizeNames()) -> None:
    """The sizes every splitter needs (checked again where a pipeline is declared, before any
    drain runs); `window`: the most tokens one input of the model may have; `names`: how the
    caller spelled them."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 8:
        raise ConfigError(f"{names.tokens.format(repr(max_tokens))}: chunk tokens must be an integer of at least 8")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ConfigError(f"{names.overlap.format(repr(overlap))}: chunk overlap must be a non-negative integer")
    if overlap > max_tokens // 2:
        raise ConfigError(f"{names.overlap.format(overlap)} is more than half of {names.tokens.format(max_tokens)}: "
                          f"use {names.overlap.format(max_tokens // 2)} or less")
    if window is not None and max_tokens > window:
        raise ConfigError(f"{names.tokens.format(max_tokens)} is more than the model embeds ({window} tokens): "
                          f"use {names.tokens.format(window)} or less")


class TokenCounting(Protocol):
    """What a splitter needs from an embedder (both embedders implement it)."""

    def count_tokens(self, text: str) -> int: ...


@dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclass
class Splitter:
    """Splits text into chunks of at most `max_tokens` tokens by `count_tokens`.

    `tokenizer` names the tokenizer (part of `key`, which records what made a chunk set)."""

    count_tokens: Callable[[str], int]
    tokenizer: str
    max_tokens: int
    overlap: int = 0
    _pieces: semchunk.Chunker = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_chunk_sizes(self.max_tokens, self.overlap)
        self._pieces = semchunk.chunkerify(self.count_tokens, self.body_tokens, cache_maxsize=_CACHE_SIZE)

    @property
    def body_tokens(self) -> int:
        """Tokens of a chunk's own paragraphs (the rest is room for the overlap)."""
        return self.max_tokens - self.overlap

    @property
    def key(self) -> str:
        """What made a chunk set: stored with it, so a change of tokenizer or sizes is seen as stale."""
        return f"{self.tokenizer}:{self.max_tokens}:{self.overlap}:{ALGORITHM}"

    # -- splitting --------------------------------------------------------------------------
    def split(self, text: str | None) -> list[str]:
        """The chunks of `text` (none for NULL or blank text)."""
        if text is None:
            return []
        return [text[s.start : s.end] for s in self.spans(text)]

    def spans(self, text: str) -> list[Span]:
        units = [u for p in _paragraphs(text) for u in self._fit(text, p)]
        groups = [g for group in self._group(text, units) for g in self._exact(text, group)]
        spans: list[Span] = []
        for i, group in enumerate(groups):
            start = self._tail_start(text, groups[i - 1][-1][0], group[0][0].start, group[-1][0].end) if i \
                else group[0][0].start
            spans.append(Span(start, group[-1][0].end))
        return spans

    def _fit(self, text: str, para: Span) -> list[tuple[Span, int]]:
        """(unit, its tokens): the paragraph itself, or pieces of it that fit the body (semchunk)."""
        n = self.count_tokens(text[para.start : para.end])
        if n <= self.body_tokens:
            return [(para, n)]
        _, offsets = self._pieces(text[para.start : para.end], offsets=True)
        pieces: list[tuple[Span, int]] = []
        for s, e in offsets:
            pieces.extend(self._hard_split(text, Span(para.start + s, para.start + e)))
        return pieces

    def _hard_split(self, text: str, span: Span) -> list[tuple[Span, int]]:
        """A span that still does not fit (one grapheme of thousands of code points): cut at the
        longest prefix that fits, by code points. semchunk never leaves one, but the limit is a
        promise to the provider, so it is enforced here whatever the library does."""
        out: list[tuple[Span, int]] = []
        start = span.start
        while start < span.end:
            n = self.count_tokens(text[start : span.end])
            if n <= self.body_tokens:
                out.append((Span(start, span.end), n))
                break
            lo, hi = start + 1, span.end  # lo always fits (one code point is a few tokens at most)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.count_tokens(text[start:mid]) <= self.body_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((Span(start, lo), self.count_tokens(text[start:lo])))
            start = lo
        return [u for u in out if text[u[0].start : u[0].end].strip()]

    def _group(self, text: str, units: list[tuple[Span, int]]) -> list[list[tuple[Span, int]]]:
        """Consecutive units per chunk. A boundary follows an anchor unit whose run since the previous
        anchor holds at least a quarter of a chunk: it depends only on the text between two anchors,
        never on where the chunk started, so an edit moves no boundary outside its own run and the
        next. Between two boundaries units are packed greedily up to the body size. Sizes here are
        the units' own counts plus one token per join (an estimate: _exact() checks the result)."""
        groups: list[list[tuple[Span, int]]] = []
        cur: list[tuple[Span, int]] = []
        size = run = 0
        for unit, n in units:
            if cur and size + 1 + n > self.body_tokens:
                groups.append(cur)
                cur, size = [], 0
            size += n + (1 if cur else 0)
            run += n + 1
            cur.append((unit, n))
            if _is_anchor(text[unit.start : unit.end]):
                if run * MIN_DEN >= self.body_tokens * MIN_NUM:
                    groups.append(cur)
                    cur, size = [], 0
                run = 0
        if cur:
            groups.append(cur)
        return groups

    def _exact(self, text: str, group: list[tuple[Span, int]]) -> list[list[tuple[Span, int]]]:
        """The group, counted exactly on its joined slice (token counts do not add up exactly);
        split greedily by exact counts in the rare case the estimate let it grow too large."""
        if len(group) == 1 or self.count_tokens(text[group[0][0].start : group[-1][0].end]) <= self.body_tokens:
            return [group]
        out: list[list[tuple[Span, int]]] = []
        cur: list[tuple[Span, int]] = []
        for unit in group:
            if cur and self.count_tokens(text[cur[0][0].start : unit[0].end]) > self.body_tokens:
                out.append(cur)
                cur = []
            cur.append(unit)
        out.append(cur)
        return out

    def _tail_start(self, text: str, last: Span, body_start: int, end: int) -> int:
        """Where the chunk starts: with overlap, at the start of the longest run of whole words at
        the end of the previous chunk's last unit that holds at most `overlap` tokens (a sentence
        start when the run has one), keeping the chunk within max_tokens; else at its own units."""
        if not self.overlap:
            return body_start
        # Only a unit's end can become the tail: look in a window of it, not all of it.
        window = max(last.start, last.end - self.overlap * _TAIL_CHARS_PER_TOKEN)
        starts = [m.start() for m in _WORD_START.finditer(text, window, last.end)]
        # Tokens of text[start:last.end] shrink as start moves right: the first start that fits.
        lo, hi = 0, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.count_tokens(text[starts[mid] : last.end]) <= self.overlap:
                hi = mid
            else:
                lo = mid + 1
        fitting = starts[lo:]
        sentence = [p for p in fitting if _SENTENCE_START.match(text, p - 2 if p >= 2 else 0) or text[p - 1] == "\n"]
        for start in (sentence[:1] + [p for p in fitting if not sentence or p > sentence[0]]):
            if self.count_tokens(text[start:end]) <= self.max_tokens:
                return start
        return body_start


def _paragraphs(text: str) -> list[Span]:
    """Non-blank paragraphs, trimmed, as spans of `text`."""
    spans: list[Span] = []
    pos = 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        spans.extend(_trimmed(text, pos, m.start()))
        pos = m.end()
    spans.extend(_trimmed(text, pos, len(text)))
    return spans


def _trimmed(text: str, start: int, end: int) -> list[Span]:
    piece = text[start:end]
    stripped = piece.strip()
    if not stripped:
        return []
    s = start + (len(piece) - len(piece.lstrip()))
    return [Span(s, s + len(stripped))]


def _is_anchor(unit: str) -> bool:
    return hashlib.sha256(unit.encode("utf-8", "surrogatepass")).digest()[0] % _ANCHOR_ONE_IN == 0


def chunk_hash(text: str) -> bytes:
    """sha256 of the chunk's UTF-8 bytes: the same as autoembed.content_hash(chunk) in SQL."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def model_window(embedder: object) -> int:
    """How many tokens one input of this embedder may have (beyond it the embedder truncates)."""
    identity = getattr(embedder, "identity", None)
    settings = getattr(embedder, "settings", None)
    return provider_window(getattr(identity, "provider", None), int(getattr(settings, "max_input_tokens", 8191)))


def provider_window(provider: str | None, max_input_tokens: int = 8191) -> int:
    """The same from settings alone (no embedder, no model loaded: what a declaration is checked with)."""
    if provider == "local":
        from ..embed.local import MAX_TOKENS

        return MAX_TOKENS - 2  # [CLS] and [SEP] are added to every input
    return max_input_tokens


def tokenizer_name(embedder: object) -> str:
    identity = getattr(embedder, "identity", None)
    if getattr(identity, "provider", None) == "local":
        return f"local:{identity.model}"
    return "cl100k_base"  # what OpenAIEmbedder.count_tokens uses for every model


def splitter_for(embedder: TokenCounting, max_tokens: int, overlap: int = 0,
                 names: SizeNames = SizeNames()) -> Splitter:
    """A splitter counting tokens with `embedder`'s own tokenizer, checked against its window
    (errors name the sizes as the caller spelled them: `names`)."""
    check_chunk_sizes(max_tokens, overlap, model_window(embedder), names)
    return Splitter(embedder.count_tokens, tokenizer_name(embedder), max_tokens, overlap)
