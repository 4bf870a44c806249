"""The embed stage: provider calls for a batch's work, and the binary values of the vectors
(core.targets.vectors).

Touches no database connection, so a pipelined drain runs it in a worker thread while the
previous batch is written.
"""

from __future__ import annotations

from ..embed.base import Embedder, EmbeddingError, EmbedOutcome
from ..targets.catalog import Target
from ..targets.vectors import encode_vectors
from ..targets.badrows import check_vectors
from .jobs import Job
from .outcome import Outcome
from .read import Work
from .stats import DrainStats


def embed_work(work: Work, outcome: Outcome, stats: DrainStats) -> EmbeddingError | None:
    """Embed one Work item into `outcome`. Returns a configuration error that must stop the drain
    (its rows are then left out of `outcome`: they stay queued)."""
    target, rows, to_embed = work.target, work.rows, work.jobs
    result, fatal = provider_call(target, work.embedder, [rows[r].input for r in work.row_ids],
                                  [job for r in work.row_ids for job in to_embed[r]], outcome, stats)
    if result is None or fatal is not None:
        return fatal
    outcome.models[target] = work.embedder.identity.key
    vectors = list(result.vectors)
    errors: list[object] = list(result.errors)
    # Each vector on its own: one the column cannot hold fails its row alone.
    for i, problem in enumerate(check_vectors(target.vector_type, target.dimensions, vectors)):
        if problem is not None:
            vectors[i] = None
            errors[i] = f"key {work.row_ids[i]}: {problem}"
    embedded = [(rows[r].key, rows[r].hash, vector)
                for r, vector in zip(work.row_ids, vectors) if vector is not None]
    versions = [rows[r].version for r, vector in zip(work.row_ids, vectors) if vector is not None]
    # Encoded here, in the pipelined run's worker: the writer only joins the values.
    records = encode_vectors(target, [v for _, _, v in embedded])
    jobs_by_key = outcome.jobs.setdefault(target, {})
    for r, vector in zip(work.row_ids, vectors):
        if vector is not None:
            jobs_by_key.setdefault(rows[r].key, []).extend(to_embed[r])
    outcome.writes.setdefault(target, []).extend(
        (key, h, record, [j.msg_id for j in jobs_by_key[key]], version)
        for (key, h, _), record, version in zip(embedded, records, versions))
    for r, error in zip(work.row_ids, errors):
        if error is None:
            continue
        # A vector the column cannot hold (out of range) is the same vector next time: not retried.
        retryable = getattr(error, "retryable", False)
        text = f"{target.regclass} {error}" if isinstance(error, str) else f"{target.regclass} id={r!r}: {error}"
        stats.note_error(text)
        for job in to_embed[r]:
            (outcome.retry if retryable else outcome.dead).append((job, text))
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
