"""The embed stage: provider calls for a batch's work, and the binary COPY tuples of the vectors.

Touches no database connection, so a pipelined drain runs it in a worker thread while the
previous batch is written.
"""

from __future__ import annotations

import struct

import numpy as np

from ..embed.base import Embedder, EmbeddingError, EmbedOutcome
from ..targets.catalog import Target
from .jobs import Job
from .outcome import Outcome
from .read import Work
from .stats import DrainStats


def embed_work(work: Work, outcome: Outcome, stats: DrainStats, encoding: str) -> EmbeddingError | None:
    """Embed one Work item into `outcome`. Returns a configuration error that must stop the drain
    (its rows are then left out of `outcome`: they stay queued)."""
    target, rows, to_embed = work.target, work.rows, work.jobs
    result, fatal = provider_call(target, work.embedder, [rows[r].input for r in work.row_ids],
                                  [job for r in work.row_ids for job in to_embed[r]], outcome, stats)
    if result is None or fatal is not None:
        return fatal
    outcome.models[target] = work.embedder.identity.key
    embedded = [(rows[r].key, rows[r].hash, vector)
                for r, vector in zip(work.row_ids, result.vectors) if vector is not None]
    # Encoded here, in the pipelined run's worker: the writer only joins the tuples.
    records = copy_records(target, embedded, encoding)
    jobs_by_key = outcome.jobs.setdefault(target, {})
    for r, vector in zip(work.row_ids, result.vectors):
        if vector is not None:
            jobs_by_key.setdefault(rows[r].key, []).extend(to_embed[r])
    outcome.writes.setdefault(target, []).extend(
        (key, h, record, [j.msg_id for j in jobs_by_key[key]])
        for (key, h, _), record in zip(embedded, records))
    for r, error in zip(work.row_ids, result.errors):
        if error is None:
            continue
        text = f"{target.regclass} id={r!r}: {error}"
        stats.note_error(text)
        for job in to_embed[r]:
            (outcome.retry if error.retryable else outcome.dead).append((job, text))
    return None


def provider_call(target: Target, embedder: Embedder, texts: list[str], jobs: list[Job], outcome: Outcome,
                  stats: DrainStats) -> tuple[EmbedOutcome | None, EmbeddingError | None]:
    """embedder.embed(texts), its usage counted in `stats`. (None, None) when the call raised: the
    batch is not lost, `jobs` are put back for a later attempt. Else (the outcome, a configuration
    error that must stop the drain, or None)."""
    try:
        result = embedder.embed(texts)
    except Exception as exc:  # an embedder bug or outage must not lose the batch: retry later
        text = f"{target.regclass}: embedding failed: {type(exc).__name__}: {exc}"
        stats.note_error(text)
        outcome.retry.extend((job, text) for job in jobs)
        return None, None
    stats.tokens += result.tokens
    stats.requests += result.requests
    stats.truncated += result.truncated
    stats.limit_wait_seconds += result.limit_wait_seconds
    fatal = result.refusal
    if fatal is not None:
        stats.note_error(f"{target.regclass}: {fatal}")
    return result, fatal


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)


def copy_records(target: Target, rows: list[tuple[str, bytes, np.ndarray]], encoding: str) -> list[bytes]:
    """The binary COPY tuple of each (key text, content hash bytea, vector|halfvec) row.

    The vectors are converted to big-endian float32/float16 in one numpy call; each tuple is then
    three length-prefixed fields. pgvector's binary format: int16 dim, int16 unused, elements.
    """
    if not rows:
        return []
    dims = target.dimensions
    elem = np.dtype(">f2") if target.vector_type == "halfvec" else np.dtype(">f4")
    matrix = np.asarray(np.stack([r[2] for r in rows]), dtype=np.float32).astype(elem)
    if matrix.shape[1] != dims:
        raise ValueError(f"vectors have {matrix.shape[1]} dimensions, the column {dims}")
    vector_head = struct.pack(">ihh", 4 + dims * elem.itemsize, dims, 0)
    pack = struct.Struct(">hi").pack
    pack_length = struct.Struct(">i").pack
    records = []
    for (key, content_hash, _), vector in zip(rows, matrix):
        kb = key.encode(encoding)
        records.append(b"".join((pack(3, len(kb)), kb, pack_length(len(content_hash)), content_hash,
                                 vector_head, vector.tobytes())))
    return records
