"""Embedding targets: (table, key column, content function, embedding column), validated.

Every identifier here comes from a queue message or configuration, so none is trusted: names are
checked against the catalog and only ever reach SQL through `sql.Identifier` or as regclass /
regprocedure text that Postgres itself produced.
"""

from __future__ import annotations

import re
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
    # The content function with its table owner's rights: the registered target's input function
    # autoembed.input_<id> (sql/005 install_input_function), as text the catalog produced. None
    # when no target of the table registers the content function: then nothing here runs it.
    function: str | None
    key_type: str  # format_type of the key column, e.g. "integer", "uuid"
    vector_type: str  # "vector" or "halfvec"
    dimensions: int
    registered: int | None = None  # the id in autoembed.targets a message was resolved through
    # A chunk target (sql/012): documents embedded as chunks into this table of the same schema;
    # key.embedding_column is then its name too, and vector_type/dimensions are its column's.
    chunk_table: str | None = None
    chunk_tokens: int | None = None
    chunk_overlap: int = 0

    @property
    def chunked(self) -> bool:
        return self.chunk_table is not None

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
        # Catalog text (already quoted by Postgres), not user text.
        return sql.SQL(require_input_function(self.function, self.regclass, self.key.content_function))

    @property
    def key_type_sql(self) -> sql.Composable:
        return sql.SQL(self.key_type)

    @property
    def vector_type_sql(self) -> sql.Composable:
        return sql.SQL(f"{self.vector_type}({int(self.dimensions)})")


def require_input_function(function: str | None, regclass: str, content_function: str) -> str:
    """The owner's-rights input function of a target, or TargetError naming the fix: a content
    function runs only through the input function of a registered target, never with the rights
    of whoever reads the input."""
    if function is None:
        raise TargetError(
            f"content function {content_function!r} of {regclass} is not registered by an enrolment or trigger of "
            f"the table (or its input function autoembed.input_<target> is missing): enrol the table, or run "
            f"autoembed db init; content functions run only with their table owner's rights")
    return function


def input_function(conn: psycopg.Connection, table_oid: int, function_oid: int | None) -> str | None:
    """How to call content function `function_oid` of table `table_oid` with the table owner's
    rights: the input function registered for it (sql/017); else, when the acting role is the
    table's owner itself, the content function (its rights are the owner's); else None."""
    if function_oid is None:
        return None
    registered, own = conn.execute(
        """select autoembed.input_function(%(t)s::oid, %(f)s::oid),
                  case when (select c.relowner from pg_class c where c.oid = %(t)s::oid)
                            = (select r.oid from pg_roles r where r.rolname = current_user)
                       then %(f)s::oid::regproc::text end""", {"t": table_oid, "f": function_oid}).fetchone()
    return registered or own


def check_identifier(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TargetError(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise TargetError(f"{what} {value!r} contains a NUL byte")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise TargetError(f"{what} {value[:80]!r} is longer than {MAX_IDENTIFIER_BYTES} bytes")
    return value


def parse_qualified(value: str, what: str = "table") -> tuple[str | None, str]:
    """(schema or None, name) of an SQL name as Postgres reads it (parse_ident, regclass): parts
    separated by dots; a part in double quotes is taken exactly ("" for a quote: `"My ""T"".x"`),
    an unquoted part is folded to lower case. The one reading of table and content-function names
    in the CLI, the pipelines' `table:` and the SQL functions. Raises ValueError naming the value."""
    parts: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i].isspace():
            i += 1
        if i < n and value[i] == '"':
            j, part = i + 1, []
            while True:
                k = value.find('"', j)
                if k < 0:
                    raise ValueError(f"{what} {value!r}: unterminated quoted name")
                part.append(value[j:k])
                if value.startswith('"', k + 1):
                    part.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            name = "".join(part)
        else:
            j = i
            while j < n and value[j] != "." and not value[j].isspace():
                j += 1
            name = value[i:j]
            if not re.fullmatch(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*", name):
                raise ValueError(f"{what} {value!r}: {name!r} is not a plain name; quote it as in SQL "
                                 f"(\"{name.replace(chr(34), chr(34) * 2)}\")")
            name = name.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"))
            i = j
        if not name:
            raise ValueError(f"{what} {value!r}: an empty name")
        parts.append(name)
        while i < n and value[i].isspace():
            i += 1
        if i == n:
            break
        if value[i] != ".":
            raise ValueError(f"{what} {value!r}: unexpected {value[i]!r} after {name!r}; quote a name that holds "
                             'spaces, dots or capitals as in SQL ("my table")')
        i += 1
    if len(parts) > 2:
        raise ValueError(f"{what} {value!r} has {len(parts)} parts: use name or schema.name (quote a name holding a dot)")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def sql_name(*parts: str) -> str:
    """Parts joined as SQL writes them, each quoted only when it must be (what parse_qualified reads back)."""
    return ".".join(p if re.fullmatch(r"[a-z_][a-z0-9_$]*", p) else '"' + p.replace('"', '""') + '"' for p in parts)


MAX_IDS_PER_MESSAGE = 10_000  # the triggers group 200 rows per message (sql/003 key_messages)


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


INTEGER_KEY_TYPES = ("smallint", "integer", "bigint")
_INTEGER_TEXT = re.compile(r"-?[0-9]+")


def key_text(raw: Any, target: "Target") -> str:
    """The exact text of one key a message names, checked against the target's key type so a
    bad key fails alone. Keys are never converted: a text key '001' stays '001'."""
    if raw is None or isinstance(raw, (bool, dict, list, float)):
        # (JSON numbers with a fraction arrive as Decimal on the drain's connections: exact.)
        raise TargetError(f"id {raw!r} is not a key: a message names keys as JSON strings or integers")
    text = str(raw)
    if target.key_type in INTEGER_KEY_TYPES and not _INTEGER_TEXT.fullmatch(text):
        raise TargetError(f"id {raw!r} is not a valid {target.key_type} key of {target.regclass}")
    if "\x00" in text:
        raise TargetError(f"id {raw!r} contains a NUL byte")
    return text


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
        ids = body["ids"].split(",")  # integer keys; each piece is checked against the key type
    elif isinstance(body["ids"], list):
        ids = body["ids"]
    else:
        raise TargetError(f"message ids must be a JSON array or a comma-separated string, got {body['ids']!r}")
    if not ids:
        raise TargetError(f"message ids is empty: {body!r}")
    if len(ids) > MAX_IDS_PER_MESSAGE:
        raise TargetError(f"message lists {len(ids)} ids, more than {MAX_IDS_PER_MESSAGE}")
    # Bad keys are dead-lettered one by one (drain.jobs), not the message's other rows.
    if all(type(i) is int for i in ids):  # (the usual integer keys: no per-key text to dedupe them)
        return list(dict.fromkeys(ids))
    return list({f"{type(i).__name__}:{i!r}": i for i in ids}.values())


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
    fn, fn_oid = conn.execute(
        "select f::oid::regproc::text, f::oid from autoembed.content_function(%s::oid::regclass, %s) f",
        (oid, key.content_function)
    ).fetchone()
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
    return Target(key, regclass, input_function(conn, oid, fn_oid), key_type[0], vector_type, int(dimensions))


def ambiguous_keys(keys) -> dict[str, int]:
    """Keys that matched more than one row where vectors are written (the table's key lost its
    primary key or unique index after enrolment): {key: rows}. Nothing is written for them."""
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return {k: n for k, n in counts.items() if n > 1}


def ambiguous_key_error(target: "Target", key: str, rows: int) -> str:
    """The dead letter's reason for a job whose key matches several rows."""
    return (f"key {key!r} matches {rows} rows of {target.regclass}: its key column {target.key.key_column} is no "
            "longer unique (primary key or unique index dropped?); no vector was written, so none can land on "
            "another row. Make the key unique again, then retry the dead letters")


class TargetChanged(RuntimeError):
    """A table/column resolved earlier no longer is what the drain resolved (renamed, resized...)."""


def check_target(conn: psycopg.Connection, target: Target) -> None:
    """Raise TargetChanged when `target` no longer is what the registry or catalog says."""
    try:
        now = (lookup_registered(conn, target_id=target.registered)[0] if target.registered is not None
               else resolve(conn, target.key))
    except TargetError as exc:
        raise TargetChanged(f"{target.key.label}: {exc}") from exc
    if now != target:
        raise TargetChanged(f"{target.key.label} is {now.vector_type}({now.dimensions}) now, "
                            f"was {target.vector_type}({target.dimensions})")


def registered_target(conn: psycopg.Connection, body: Any, queue: str) -> tuple[Target, list[Any]]:
    """The target a queue message points at, as the registry (autoembed.targets, written only by
    enrolment, the table owner's triggers and migrations) says it is, and the message's row keys.

    A message is a pointer, never an instruction: a message with "target" is resolved by that id,
    one without (Supabase's shape, sent by hand or before the registry existed) by its names. The
    content function called is the one registered, never the one a message names. Raises
    TargetError, naming what the message asked for, when nothing registered matches."""
    key, row_ids = target_key_from_message(body)
    wanted = body.get("target")
    if wanted is not None and (type(wanted) is not int or wanted <= 0):
        raise TargetError(f"message target must be a registered target id, got {wanted!r}: nothing of this message was run")
    target, target_queue = lookup_registered(conn, target_id=wanted, key=key)
    if target_queue != queue:
        raise TargetError(f"target {target.registered} ({target.key.label}) is registered for queue "
                          f"{target_queue!r}, not {queue!r}: nothing of this message was run")
    return target, row_ids


def lookup_registered(conn: psycopg.Connection, *, target_id: int | None = None,
                      key: TargetKey | None = None) -> tuple[Target, str]:
    """A registered target (by id, else by names) with its current catalog names, and its queue."""
    row = conn.execute(
        """select id, queue, schema_name, table_name, content_function, embedding_column, key_column, function,
                  key_type, vector_type, dimensions, format('%%I.%%I', schema_name, table_name)::regclass::text,
                  chunk_table, chunk_tokens, chunk_overlap,
                  case when chunk_table is not null then (
                      select v.type_name || ',' || v.dimensions from autoembed.vector_column(
                          format('%%I.%%I', schema_name, chunk_table)::regclass, 'embedding') v) end,
                  input_function
           from autoembed.target_catalog
           where case when %(id)s::bigint is not null then id = %(id)s
                      else schema_name = %(schema)s and table_name = %(table)s and embedding_column = %(column)s
                           and content_function = %(fn)s and key_column = %(key)s end""",
        {"id": target_id, "schema": key and key.schema, "table": key and key.table,
         "column": key and key.embedding_column, "fn": key and key.content_function, "key": key and key.key_column},
    ).fetchone()
    if row is None:
        if target_id is not None:
            raise TargetError(f"target {target_id} is not a registered target: nothing of this message was run")
        raise TargetError(f"{key.label} with content function {key.content_function!r} and key "
                          f"{key.key_column!r} is not a registered target ({why_unregistered(conn, key)}): "
                          "nothing of this message was run")
    (target_id, target_queue, schema, table, content_function, column, key_column, function, key_type,
     vector_type, dimensions, regclass, chunk_table, chunk_tokens, chunk_overlap, chunk_vector, input_fn) = row
    if chunk_tokens is not None:
        # A chunk target: the vector column is the chunk table's (core.targets.chunks.VECTOR_COLUMN).
        if chunk_table is None:
            raise TargetError(f"the chunk table of target {target_id} ({regclass}) is gone: enrol the table again")
        column = chunk_table
        vector_type, _, size = (chunk_vector or ",").partition(",")
        vector_type, dimensions = vector_type or None, int(size) if size else None
    where = f"target {target_id} ({regclass}.{column})"
    if function is None:
        raise TargetError(f"the content function registered for {where} no longer exists: enrol the table again")
    if input_fn is None:
        raise TargetError(f"the content function {function} registered for {where} has no input function "
                          f"autoembed.input_{target_id} owned by the table's owner (content functions run with "
                          "their table owner's rights only): run autoembed db init as a superuser")
    function = input_fn
    if column is None or vector_type is None:
        raise TargetError(f"the embedding column of {where} is gone or no longer a vector column: enrol it again")
    if dimensions is None:
        raise TargetError(f"column {regclass}.{column} has no declared size: declare it as {vector_type}(n)")
    if key_column is None or key_type is None:
        raise TargetError(f"the key column of {where} is gone or of a type that cannot round-trip: enrol it again")
    target = Target(TargetKey(schema, table, content_function, column, key_column), regclass, function, key_type,
                    vector_type, int(dimensions), target_id, chunk_table, chunk_tokens, chunk_overlap or 0)
    return target, target_queue


def why_unregistered(conn: psycopg.Connection, key: TargetKey) -> str:
    """Why no target is registered under a message's names, and the fix, read from the catalog
    only (nothing the message names is run). Registration rules: sql/005 register_target."""
    rel = conn.execute(
        "select c.oid, c.oid::regclass::text from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p')", (key.schema, key.table)).fetchone()
    if rel is None:
        return f"table {key.schema!r}.{key.table!r} does not exist"
    oid, regclass = rel
    fn = conn.execute(
        """select p.oid::regprocedure::text, p.provolatile = 'v',
                  p.proowner <> c.relowner and not r.rolsuper, p.proowner::regrole::text, c.relowner::regrole::text
           from pg_proc p, pg_class c, pg_roles r
           where p.oid = autoembed.content_function(%s::oid::regclass, %s) and c.oid = %s and r.oid = p.proowner""",
        (oid, key.content_function, oid)).fetchone()
    if fn is None:
        return f"content function {key.content_function!r} taking a row of {regclass} does not exist"
    function, volatile, foreign, fn_owner, table_owner = fn
    if volatile:
        return (f"content function {function} is VOLATILE: alter function {function} immutable (or stable), "
                "then re-save the rows or retry the dead letters")
    if foreign:
        return f"content function {function} is owned by {fn_owner}, not by {table_owner}, the table's owner"
    if conn.execute("select 1 from autoembed.vector_column(%s::oid::regclass, %s)",
                    (oid, key.embedding_column)).fetchone() is None:
        return f"{regclass} has no vector/halfvec column {key.embedding_column!r}"
    return ("no enrolment or util.queue_embeddings trigger registered it: enrol the table (autoembed enroll), "
            "or check the key column and queue its trigger names")


def check_dimensions(target: Target, model_dimensions: int, model: str) -> None:
    if model_dimensions != target.dimensions:
        raise TargetError(
            f"dimension mismatch: {target.regclass}.{target.key.embedding_column} is "
            f"{target.vector_type}({target.dimensions}) but model {model} makes {model_dimensions}-dimensional vectors"
        )


def adopt_state_cleanup(conn: psycopg.Connection) -> int:
    """Give tables registered by Supabase's triggers the state-cleanup triggers of enrolled tables
    (sql/013). A drain role without EXECUTE on it leaves that to `autoembed db init`."""
    allowed = conn.execute(
        "select has_function_privilege('autoembed.adopt_state_cleanup()', 'execute')").fetchone()[0]
    return conn.execute("select autoembed.adopt_state_cleanup()").fetchone()[0] if allowed else 0


def repair_schema(conn: psycopg.Connection, queue: str) -> None:
    """What the drain does at its start about schema changes (sql/015): re-create its queue when it
    was dropped, bind targets whose content function was dropped and created again (when its role
    may re-create their triggers; else they stay in autoembed.broken_targets), re-create the
    triggers of enrolled tables that were dropped (same condition), forget the targets (and their
    embedding_state records) of tables dropped unseen, and give tables of Supabase's triggers
    the state cleanup. A drain role without EXECUTE on these leaves them to the
    event triggers and `autoembed db init`."""
    for call in ("autoembed.restore_queue(%s)", "autoembed.rebind_content_functions()",
                 "autoembed.restore_target_triggers()", "autoembed.forget_gone_targets()"):
        name = call.split("(")[0]
        signature = f"{name}(text)" if "%s" in call else f"{name}()"
        if not conn.execute("select has_function_privilege(%s, 'execute')", (signature,)).fetchone()[0]:
            continue
        with conn.transaction():
            conn.execute(f"select {call}", (queue,) if "%s" in call else None)
    adopt_state_cleanup(conn)
