"""What a drain counts, in total (DrainStats) and per table (TableStats)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields

from ..targets.catalog import TargetError, TargetKey, target_key_from_message

TableKey = tuple[str, str, str]  # (schema, table, embedding column): how pipelines name a target
UNKNOWN_TABLE: TableKey = ("?", "?", "?")  # messages too malformed to name a table


@dataclass
class _Counts:
    embedded: int = 0  # rows whose vector was written
    unchanged: int = 0  # jobs skipped: the stored vector already matches the input and model
    deleted_rows: int = 0  # jobs whose row no longer exists
    empty_input: int = 0  # rows whose input is NULL or blank: no vector, column left NULL
    stale: int = 0  # vectors not written because the row changed meanwhile (a newer job exists)
    busy: int = 0  # rows the application held locked at write time: put back, no attempt counted
    retried: int = 0  # jobs put back for a later attempt after a failure
    dead_lettered: int = 0
    messages: int = 0  # messages claimed
    rows: int = 0  # rows those messages cover
    tokens: int = 0
    requests: int = 0  # provider requests (HTTP calls, or local model batches)
    truncated: int = 0
    limit_wait_seconds: float = 0.0  # waiting for the shared provider rate limit
    # Chunk targets (`embedded` counts their documents whose chunk set was written):
    chunks_embedded: int = 0  # chunk rows written with a vector the provider made now
    chunks_reused: int = 0  # chunk rows written with a vector already in the chunk table (same text)
    chunks_deleted: int = 0  # chunk rows of the replaced chunk sets

    @property
    def skipped(self) -> int:
        """Jobs settled with no provider call: unchanged input, deleted row, empty input."""
        return self.unchanged + self.deleted_rows + self.empty_input

    def _add_counts(self, other: "_Counts", names: tuple[str, ...]) -> None:
        for name in names:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_COUNTS = tuple(f.name for f in fields(_Counts))


@dataclass
class TableStats(_Counts):
    """One table's (embedding column's) share of a drain: DrainStats.by_table."""

    texts: int = 0  # texts sent to the embedder
    embed_calls: int = 0  # embedder calls (one per provider batch of the drain)
    embed_seconds: float = 0.0  # time inside the embedder

    def add(self, other: "TableStats") -> None:
        self._add_counts(other, tuple(f.name for f in fields(self)))


def table_key(key: TargetKey) -> TableKey:
    return (key.schema, key.table, key.embedding_column)


def table_of_body(body: object) -> TableKey:
    try:
        key, _ = target_key_from_message(body)
    except TargetError:
        return UNKNOWN_TABLE
    return table_key(key)


@dataclass
class DrainStats(_Counts):
    batches: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # distinct error texts seen (capped)
    # The same numbers per table (messages too malformed to name one: UNKNOWN_TABLE); they add up
    # to the totals above.
    by_table: dict[TableKey, TableStats] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def table(self, key: TableKey) -> TableStats:
        ts = self.by_table.get(key)
        if ts is None:
            ts = self.by_table[key] = TableStats()
        return ts

    def add(self, other: "DrainStats") -> None:
        self._add_counts(other, (*_COUNTS, "batches"))
        for key, ts in other.by_table.items():
            self.table(key).add(ts)
        for e in other.errors:
            self.note_error(e)

    def note_error(self, text: str) -> None:
        if text not in self.errors and len(self.errors) < 20:
            self.errors.append(text)

    def summary(self) -> str:
        chunked = (f"chunks: {self.chunks_embedded} embedded, {self.chunks_reused} reused, "
                   f"{self.chunks_deleted} replaced; ") if self.chunks_embedded or self.chunks_reused or self.chunks_deleted else ""
        return (
            f"{self.embedded} embedded, {self.unchanged} unchanged, {self.deleted_rows} deleted rows, "
            f"{self.empty_input} empty inputs, {self.stale} stale, {self.busy} busy, {self.retried} retried, "
            f"{self.dead_lettered} dead-lettered; {chunked}{self.tokens} tokens, {self.requests} requests; "
            f"{self.seconds:.1f} s, {self.rows_per_second:.{0 if self.rows_per_second >= 100 else 1}f} rows/s"
        )


@contextmanager
def attributed(stats: DrainStats, key: TableKey, names: tuple[str, ...]):
    """Add what the block adds to `stats` counters `names` to the table's share as well."""
    before = [getattr(stats, n) for n in names]
    yield
    ts = stats.table(key)
    for n, b in zip(names, before):
        setattr(ts, n, getattr(ts, n) + getattr(stats, n) - b)


def spent(stats: DrainStats) -> DrainStats:
    """The provider usage of a batch (per table too), without its outcome."""
    out = DrainStats(tokens=stats.tokens, requests=stats.requests, truncated=stats.truncated)
    for key, ts in stats.by_table.items():
        out.by_table[key] = TableStats(tokens=ts.tokens, requests=ts.requests, truncated=ts.truncated,
                                       texts=ts.texts, embed_calls=ts.embed_calls, embed_seconds=ts.embed_seconds)
    return out
