"""What a target's shadow and retired copies are named and indexed like, and how much of a target
is current: the shared vocabulary of model changes for both shapes (a vector column's
`<col>__next` / `<col>__old`, a chunk set's `<table>_chunks__next` / `__old`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import MAX_IDENTIFIER_BYTES


SHADOW_SUFFIX = "__next"


OLD_SUFFIX = "__old"


def suffixed(name: str, suffix: str) -> str:
    """`name + suffix`, shortened with a hash when it would pass Postgres's 63-byte limit."""
    full = name + suffix
    if len(full.encode()) <= MAX_IDENTIFIER_BYTES:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = name.encode()[: MAX_IDENTIFIER_BYTES - len(suffix) - 9].decode(errors="ignore")
    return f"{keep}_{digest}{suffix}"


# -- coverage ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Coverage:
    rows: int
    embeddable: int  # rows whose input is not NULL/blank
    current: int  # embeddable rows holding the vector of their current input under the model
    # Rows whose content function raises (not counted embeddable: they cannot be), and one error.
    unreadable: int = 0
    unreadable_error: str | None = None

    @property
    def missing(self) -> int:
        return self.embeddable - self.current

    @property
    def complete(self) -> bool:
        return self.current == self.embeddable

    @property
    def ratio(self) -> float:
        return self.current / self.embeddable if self.embeddable else 1.0


def column_models(conn: psycopg.Connection, schema: str, table: str, column: str) -> list[tuple[str, int]]:
    """(model, rows) recorded for a column, most common first."""
    return [(r[0], r[1]) for r in conn.execute(
        """select model, count(*) from autoembed.embedding_state
           where target_id = (select autoembed.state_target(%s, %s, %s))
           group by model order by 2 desc, 1""",
        (schema, table, column),
    )]


# -- vector indexes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexInfo:
    schema: str
    name: str
    method: str
    opclass: str
    options: list[str] | None
    simple: bool  # one plain column, no expression, no predicate
    valid: bool


def column_indexes(conn: psycopg.Connection, table: str, column: str) -> list[IndexInfo]:
    """The indexes whose first column is `column` of `table` (a regclass text)."""
    rows = conn.execute(
        """select n.nspname, ci.relname, am.amname, opc.opcname, ci.reloptions,
                  i.indnatts = 1 and i.indexprs is null and i.indpred is null, i.indisvalid
           from pg_index i
           join pg_class ci on ci.oid = i.indexrelid
           join pg_namespace n on n.oid = ci.relnamespace
           join pg_am am on am.oid = ci.relam
           join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
           join pg_opclass opc on opc.oid = i.indclass[0]
           where i.indrelid = %s::regclass and a.attname = %s order by ci.relname""",
        (table, column),
    ).fetchall()
    return [IndexInfo(*r) for r in rows]


def opclass_for(opclass: str, vector_type: str) -> str:
    """The same distance for another element type: halfvec_cosine_ops <-> vector_cosine_ops."""
    for prefix in ("halfvec_", "vector_"):
        if opclass.startswith(prefix):
            return vector_type + "_" + opclass[len(prefix):]
    return opclass


def with_options(ix: IndexInfo) -> sql.Composable:
    """` with (...)` of an index's storage options, or nothing."""
    if not ix.options:
        return sql.SQL("")
    # reloptions as Postgres stores them (e.g. m=16), not user text.
    return sql.SQL(" with ({})").format(sql.SQL(", ").join(sql.SQL(o) for o in ix.options))
