"""The drain's stages for chunk targets (a registered table whose documents are embedded as chunks
into its chunk table, sql/012): read + plan, embed the new chunk texts, and the settle's write.

Same claims, batching, rate limit, retries and dead letters as column targets; what differs:

- read: a job's document is read (core.targets.chunks.read_documents) and planned (core.targets.chunks.plan):
  only chunk texts with no vector under the model anywhere in the chunk table go to the provider;
- embed: one provider call for the batch's new chunk texts; a document with a failed chunk is
  retried or dead-lettered whole (a document's chunk set is never written in part);
- settle: core.targets.chunks.write swaps each document's chunk set inside the settle's one transaction,
  with the message deletes (SKIP LOCKED on the parent row: the drain gives way to the application).

The chunk table written is the registered one (Target.chunk_table, resolved by target id from
autoembed.targets), never one a message names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg

from ..embed.base import Embedder, EmbeddingError
from ..targets import chunks
from ..targets.catalog import Target
from ..targets.splitter import Splitter
from ..targets.badrows import check_vectors
from ..targets.shapes import chunk_shadow_of as shadow_of, chunk_target_of  # noqa: F401 (callers import it here)
from .embed import provider_call
from .jobs import Job
from ..targets.writes import ChunkWrite, still_target, write_target  # noqa: F401 (the settle's write, shared)
from .outcome import Outcome
from .read import read_rows_or_isolate
from .stats import DrainStats


@dataclass
class ChunkWork:
    """The provider call of one chunk target's documents in a batch."""

    target: Target
    chunk_target: chunks.ChunkTarget
    embedder: Embedder
    plan: chunks.ChunkPlan
    jobs: dict[str, list[Job]]  # by document key

    @property
    def text_count(self) -> int:
        return len(self.plan.to_embed)


def read_chunk_jobs(conn: psycopg.Connection, target: Target, embedder: Embedder, splitter: Splitter,
                    jobs: list[Job], outcome: Outcome, stats: DrainStats) -> list[ChunkWork]:
    """Settle what needs no write (deleted row, unchanged chunk set) and plan the rest."""
    ct = chunk_target_of(target)
    by_key: dict[str, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(job.row_id, []).append(job)
    docs, unreadable = read_rows_or_isolate(conn, target, list(by_key), _read_documents)
    docs = {k: v for k, v in docs.items() if k in by_key}  # (a key not in its canonical text: as gone)
    for key, key_jobs in by_key.items():
        if key in unreadable:
            outcome.dead += [(job, unreadable[key]) for job in key_jobs]
        elif key not in docs:
            # Deleted: its chunks went with it (the chunk table's foreign key cascades).
            stats.deleted_rows += len(key_jobs)
            outcome.done += [job.msg_id for job in key_jobs]
    plan = chunks.plan(conn, ct, docs, splitter, embedder.identity.key)
    for key in plan.unchanged:
        blank = not (docs[key][0] or "").strip()
        if blank:
            stats.empty_input += len(by_key[key])
        else:
            stats.unchanged += len(by_key[key])
        outcome.done += [job.msg_id for job in by_key[key]]
    for key, doc in plan.documents.items():
        if not doc.chunks:
            stats.empty_input += len(by_key[key])  # its old chunks are deleted by the write
    if not plan.documents:
        return []
    return [ChunkWork(target, ct, embedder, plan, {k: by_key[k] for k in plan.documents})]


def _read_documents(conn: psycopg.Connection, target: Target,
                    keys: list[str]) -> dict[str, tuple[str | None, bytes | None]]:
    return chunks.read_documents(conn, chunk_target_of(target), keys)


def embed_chunk_work(work: ChunkWork, outcome: Outcome, stats: DrainStats) -> EmbeddingError | None:
    """Embed the new chunk texts of `work` into `outcome.chunk_writes`. Returns a configuration
    error that must stop the drain (its documents then stay queued)."""
    target, plan = work.target, work.plan
    vectors: dict[bytes, np.ndarray] = {}
    if plan.to_embed:
        result, fatal = provider_call(target, work.embedder, plan.texts,
                                      [job for key_jobs in work.jobs.values() for job in key_jobs], outcome, stats)
        if result is None or fatal is not None:
            return fatal
        failed, vectors = chunk_vectors(target, plan.hashes, result.vectors, result.errors)
        for key in [k for k, doc in plan.documents.items() if any(c.hash in failed for c in doc.chunks)]:
            chunk, error = next((c, failed[c.hash]) for c in plan.documents[key].chunks if c.hash in failed)
            text = (f"{target.regclass} key {key} chunk {chunk.index}: {error}" if isinstance(error, str)
                    else f"{target.regclass} id={key!r}: a chunk failed: {error}")
            stats.note_error(text)
            for job in work.jobs.pop(key):
                (outcome.retry if getattr(error, "retryable", False) else outcome.dead).append((job, text))
            del plan.documents[key]  # never written in part: the old chunk set stays whole
    if plan.documents:
        outcome.chunk_writes.append(ChunkWrite(target, work.chunk_target, plan, vectors, work.jobs))
    return None


def chunk_vectors(target: Target, hashes: list[bytes], vectors: list, errors: list
                  ) -> tuple[dict[bytes, object], dict[bytes, np.ndarray]]:
    """(failed chunk hash -> the provider's EmbeddingError or why the column cannot hold its
    vector, good chunk hash -> vector): each chunk's vector checked on its own (badrows)."""
    failed: dict[bytes, object] = {h: e for h, e in zip(hashes, errors) if e is not None}
    for h, problem in zip(hashes, check_vectors(target.vector_type, target.dimensions, vectors)):
        if problem is not None:
            failed[h] = problem
    return failed, {h: v for h, v in zip(hashes, vectors) if v is not None and h not in failed}
