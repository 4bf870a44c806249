"""Embedding targets: (table, key column, content function, embedding column), validated.

Every identifier here comes from a queue message or configuration, so none is trusted: names are
checked against the catalog and only ever reach SQL through `sql.Identifier` or as regclass /
regprocedure text that Postgres itself produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

MAX_IDENTIFIER_BYTES = 63


class TargetError(Exception):
    """A job can never succeed as given (missing table/column/function, bad identifier...)."""


@dataclass(frozen=True)
class TargetKey:
    schema: str
    table: str
    content_function: str
    embedding_column: str
    key_column: str = "id"

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}.{self.embedding_column}"


@dataclass(frozen=True)
class Target:
    key: TargetKey
    regclass: str  # quoted, schema-qualified name as Postgres prints it
    function: str  # regproc text of the content function, as Postgres prints it
    key_type: str  # format_type of the key column, e.g. "integer", "uuid"
    vector_type: str  # "vector" or "halfvec"
    dimensions: int

    @property
    def table_sql(self) -> sql.Composable:
        return sql.Identifier(self.key.schema, self.key.table)

    @property
    def column_sql(self) -> sql.Composable:
        return sql.Identifier(self.key.embedding_column)

    @property
    def key_sql(self) -> sql.Composable:
        return sql.Identifier(self.key.key_column)

    @property
    def function_sql(self) -> sql.Composable:
        # regproc text from the catalog (already quoted by Postgres), not user text.
        return sql.SQL(self.function)

    @property
    def key_type_sql(self) -> sql.Composable:
        return sql.SQL(self.key_type)

    @property
    def vector_type_sql(self) -> sql.Composable:
        return sql.SQL(f"{self.vector_type}({int(self.dimensions)})")


def check_identifier(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TargetError(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise TargetError(f"{what} {value!r} contains a NUL byte")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise TargetError(f"{what} {value[:80]!r} is longer than {MAX_IDENTIFIER_BYTES} bytes")
    return value


MAX_IDS_PER_MESSAGE = 10_000  # the triggers group 200 rows per message (sql/003 job_messages)


def target_key_from_message(body: Any) -> tuple[TargetKey, list[Any]]:
    """Parse a Supabase-shaped job message into (target key, row ids). Raises TargetError.

    A message covers one row ("id"), or several when it has "ids": a JSON array, or for integer
    keys a comma-separated string, or "idRange": [first, last] of integer keys (what autoembed's
    statement triggers send, sql/003)."""
    if not isinstance(body, dict):
        raise TargetError(f"message is not a JSON object: {body!r}")
    missing = [f for f in ("id", "schema", "table", "contentFunction", "embeddingColumn") if f not in body]
    if missing:
        raise TargetError(f"message lacks {', '.join(missing)}: {body!r}")
    row_ids = _row_ids(body)
    key = TargetKey(
        schema=check_identifier("schema", body["schema"]),
        table=check_identifier("table", body["table"]),
        content_function=check_identifier("content function", body["contentFunction"]),
        embedding_column=check_identifier("embedding column", body["embeddingColumn"]),
        key_column=check_identifier("key column", body.get("keyColumn", "id")),
    )
    return key, row_ids


def message_row_count(body: Any) -> int:
    """How many rows a message covers, without validating it (sizing claims)."""
    if not isinstance(body, dict):
        return 1
    span = body.get("idRange")
    if isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span):
        return min(max(span[1] - span[0] + 1, 1), MAX_IDS_PER_MESSAGE)
    ids = body.get("ids")
    if isinstance(ids, str):
        return ids.count(",") + 1
    if isinstance(ids, list):
        return max(len(ids), 1)
    return 1


def key_value(text: str) -> int | str:
    """A key written as text (an "ids" string, a row id): the integer when it is one."""
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isascii() and digits.isdigit() else text


def _row_ids(body: dict) -> list[Any]:
    if "idRange" in body:
        span = body["idRange"]
        if not (isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span) and span[0] <= span[1]):
            raise TargetError(f"message idRange must be [first, last] integers, got {span!r}")
        if span[1] - span[0] >= MAX_IDS_PER_MESSAGE:
            raise TargetError(f"message idRange {span!r} covers more than {MAX_IDS_PER_MESSAGE} ids")
        return list(range(span[0], span[1] + 1))
    if "ids" not in body:
        ids = [body["id"]]
    elif isinstance(body["ids"], str):
        ids = [key_value(i) for i in body["ids"].split(",")]
    elif isinstance(body["ids"], list):
        ids = body["ids"]
    else:
        raise TargetError(f"message ids must be a JSON array or a comma-separated string, got {body['ids']!r}")
    if not ids:
        raise TargetError(f"message ids is empty: {body!r}")
    if len(ids) > MAX_IDS_PER_MESSAGE:
        raise TargetError(f"message lists {len(ids)} ids, more than {MAX_IDS_PER_MESSAGE}")
    for row_id in ids:
        if row_id is None or isinstance(row_id, (dict, list, bool)) or row_id == "":
            raise TargetError(f"message id must be a scalar, got {row_id!r}")
    return list(dict.fromkeys(ids))


def resolve(conn: psycopg.Connection, key: TargetKey) -> Target:
    """Look the target up in the catalog. Raises TargetError naming what is missing or wrong."""
    rel = conn.execute(
        "select c.oid, c.oid::regclass::text from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p')",
        (key.schema, key.table),
    ).fetchone()
    if rel is None:
        raise TargetError(f"table {key.schema!r}.{key.table!r} does not exist")
    oid, regclass = rel
    fn = conn.execute(
        "select autoembed.content_function(%s::oid::regclass, %s)::oid::regproc::text", (oid, key.content_function)
    ).fetchone()[0]
    if fn is None:
        raise TargetError(
            f"content function {key.content_function!r} taking a row of {regclass} does not exist"
        )
    col = conn.execute(
        "select type_name, dimensions from autoembed.vector_column(%s::oid::regclass, %s)",
        (oid, key.embedding_column),
    ).fetchone()
    if col is None:
        raise TargetError(f"{regclass} has no vector/halfvec column {key.embedding_column!r}")
    vector_type, dimensions = col
    if dimensions is None:
        raise TargetError(
            f"column {regclass}.{key.embedding_column} has no declared size: declare it as {vector_type}(n)"
        )
    key_type = conn.execute(
        "select format_type(atttypid, atttypmod) from pg_attribute"
        " where attrelid = %s and attname = %s and attnum > 0 and not attisdropped",
        (oid, key.key_column),
    ).fetchone()
    if key_type is None:
        raise TargetError(f"{regclass} has no key column {key.key_column!r}")
    return Target(key, regclass, fn, key_type[0], vector_type, int(dimensions))


def check_dimensions(target: Target, model_dimensions: int, model: str) -> None:
    if model_dimensions != target.dimensions:
        raise TargetError(
            f"dimension mismatch: {target.regclass}.{target.key.embedding_column} is "
            f"{target.vector_type}({target.dimensions}) but model {model} makes {model_dimensions}-dimensional vectors"
        )
