"""Per-table numbers of a drain (the core `DrainStats` is per queue).

`ReportingDrainer` is the core `Drainer`, unchanged in behaviour; it only attributes each batch's
outcome to the table it concerns, so a drain lane shared by several pipelines can report rows,
tokens and time per pipeline. It hooks the Drainer's per-target steps and keeps, for the settle
step, only the values of the attempt that committed (the settle transaction is retried once on a
deadlock). Plain Python, no Dagster.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from .drain import Drainer
from .targets import TargetError, target_key_from_message

TableKey = tuple[str, str, str]  # (schema, table, embedding column): how pipelines name a target
UNKNOWN: TableKey = ("?", "?", "?")  # messages too malformed to name a table


@dataclass
class TargetStats:
    messages: int = 0  # jobs claimed for this table
    embedded: int = 0
    unchanged: int = 0
    deleted_rows: int = 0
    empty_input: int = 0
    stale: int = 0
    retried: int = 0
    dead_lettered: int = 0
    tokens: int = 0
    requests: int = 0
    truncated: int = 0
    batches: int = 0
    embed_seconds: float = 0.0  # reading the rows' input + the embedding calls

    @property
    def skipped(self) -> int:
        """Jobs settled without a provider call: unchanged input, deleted row, empty input."""
        return self.unchanged + self.deleted_rows + self.empty_input

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped}


_COUNTED = ("unchanged", "deleted_rows", "empty_input", "tokens", "requests", "truncated")


def _table_of_body(body: Any) -> TableKey:
    try:
        key, _ = target_key_from_message(body)
    except TargetError:
        return UNKNOWN
    return (key.schema, key.table, key.embedding_column)


class ReportingDrainer(Drainer):
    """A Drainer that also fills `by_table`: {(schema, table, column): TargetStats}."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.by_table: dict[TableKey, TargetStats] = {}
        self._pending: dict[str, Any] | None = None

    def _stats(self, key: TableKey) -> TargetStats:
        return self.by_table.setdefault(key, TargetStats())

    def _process_target(self, target, jobs, outcome, stats, *args: Any, **kwargs: Any):
        before = {name: getattr(stats, name) for name in _COUNTED}
        started = time.perf_counter()
        try:
            return super()._process_target(target, jobs, outcome, stats, *args, **kwargs)
        finally:
            ts = self._stats((target.key.schema, target.key.table, target.key.embedding_column))
            for name in _COUNTED:
                setattr(ts, name, getattr(ts, name) + getattr(stats, name) - before[name])
            ts.messages += len(jobs)
            ts.batches += 1
            ts.embed_seconds += time.perf_counter() - started

    def _settle(self, outcome, stats, *args: Any, **kwargs: Any):
        self._pending = {"written": {}, "dead": Counter(), "retry": Counter()}
        try:
            result = super()._settle(outcome, stats, *args, **kwargs)
            pending = self._pending
            for key, (written, stale) in pending["written"].items():
                ts = self._stats(key)
                ts.embedded += written
                ts.stale += stale
            for key, n in pending["dead"].items():
                ts = self._stats(key)
                ts.dead_lettered += n
                if key == UNKNOWN:
                    ts.messages += n  # never reached _process_target
            for key, n in pending["retry"].items():
                self._stats(key).retried += n
            return result
        finally:
            self._pending = None

    # Each of these runs once per settle attempt: assignment (not addition) keeps the last attempt.
    def _write_vectors(self, target, *args: Any, **kwargs: Any):
        written, stale = super()._write_vectors(target, *args, **kwargs)
        if self._pending is not None:
            self._pending["written"][(target.key.schema, target.key.table, target.key.embedding_column)] = (written, stale)
        return written, stale

    def _dead_letter(self, dead, *args: Any, **kwargs: Any):
        result = super()._dead_letter(dead, *args, **kwargs)
        if self._pending is not None:
            self._pending["dead"] = Counter(_table_of_body(job.body) for job, _ in dead)
        return result

    def _schedule_retries(self, retry, *args: Any, **kwargs: Any):
        result = super()._schedule_retries(retry, *args, **kwargs)
        if self._pending is not None:
            self._pending["retry"] = Counter(_table_of_body(job.body) for job, _ in retry)
        return result
