"""What one batch decided, settled in one transaction (core.drain.settle)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..targets.catalog import Target
from .jobs import Job

# (row key as canonical text, content hash the vector was made from, its binary COPY tuple,
#  the ids of the messages it settles)
Write = tuple[str, bytes, bytes, list[int]]


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
