"""What one batch decided, settled in one transaction (core.drain.settle)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..targets.catalog import Target
# What one target's write settled and the interface of that write, one implementation per shape:
# core.targets.writes (shared with the backfill's pages), re-exported here.
from ..targets.writes import Settled, TargetWrite, Write  # noqa: F401
from .jobs import Job


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
    # Chunk targets: documents to swap chunk sets of (core.targets.writes.ChunkWrite), with their jobs.
    chunk_writes: list = field(default_factory=list)
