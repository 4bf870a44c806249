"""What one batch decided, settled in one transaction (core.drain.settle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import psycopg

from ..targets.catalog import Target
from .jobs import Job

# (row key as canonical text, content hash the vector was made from, its binary COPY tuple,
#  the ids of the messages it settles[, the row version (xmin) the input was read from, or None])
Write = tuple  # (str, bytes, bytes, list[int]) or (str, bytes, bytes, list[int], str | None)


@dataclass
class Outcome:
    done: list[int] = field(default_factory=list)  # delete these messages
    dead: list[tuple[Job, str]] = field(default_factory=list)
    retry: list[tuple[Job, str]] = field(default_factory=list)  # failed: retried later, one attempt counted
    writes: dict[Target, list[Write]] = field(default_factory=dict)
    deleted_rows: dict[Target, list[str]] = field(default_factory=dict)
    # The model that made each target's vectors, fixed at embedding time: a promotion between
    # embedding and writing must not relabel old-model vectors as the new model.
    models: dict[Target, str] = field(default_factory=dict)
    # Jobs of each write, by row key: what is put back (no attempt counted) when the row is busy.
    jobs: dict[Target, dict[str, list[Job]]] = field(default_factory=dict)
    # Chunk targets: documents to swap chunk sets of (drain.chunked.ChunkWrite), with their jobs.
    chunk_writes: list = field(default_factory=list)


@dataclass
class Settled:
    """What writing one target's vectors under the stale-write guard did (TargetWrite.settle), by
    row key: a vector column's row, a chunk target's document. A key neither busy nor dead is
    settled: its messages are deleted (written, stale: a newer job exists, gone with its row)."""

    written: int = 0  # rows (documents) whose vector (chunk set) was written
    stale: int = 0  # not written: the input changed since it was read
    busy: list[str] = field(default_factory=list)  # not written now: taken up again later, no attempt counted
    dead: dict[str, str] = field(default_factory=dict)  # key -> why it cannot be written (its write failed alone...)
    chunks_embedded: int = 0
    chunks_reused: int = 0
    chunks_deleted: int = 0


class TargetWrite(Protocol):
    """The vectors one batch made for one target, written in the settle's transaction under the
    stale-write guard (a vector lands only if its row still has the input it was made from),
    through the target's write function (the table owner's rights, sql/019), a row whose write
    fails failing alone. The settle is written once against it: drain.settle.ColumnWrite (a
    vector column), drain.chunked.ChunkWrite (chunk sets)."""

    target: Target
    jobs: dict[str, list[Job]]  # the jobs of each row key written

    def keys(self) -> list[str]:
        """The row keys written (each once)."""
        ...

    def settle(self, conn: psycopg.Connection) -> Settled:
        ...
