"""What a target's shadow and retired copies are named and indexed like, and how much of a target
is current: the shared vocabulary of model changes for both shapes (a vector column's
`<col>__next` / `<col>__old`, a chunk set's `<table>_chunks__next` / `__old`); and the steps a
vector column's model migration is made of (its shadow column's trigger, registration, renames,
index and trigger swaps), which core.targets.shapes.ColumnChange composes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import MAX_IDENTIFIER_BYTES, Target, TargetError
from .models import Migration
from .vectors import write_as_owner


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



# -- a vector column's model migration: the steps core.targets.shapes.ColumnChange composes ----------
def table_sql(m: Migration) -> sql.Composable:
    return sql.Identifier(m.schema_name, m.table_name)


def shadow_trigger(m: Migration) -> sql.Composable:
    return sql.Identifier(f"autoembed_migration_{m.id}")


def guard_trigger(m: Migration) -> sql.Composable:
    return sql.Identifier(f"autoembed_guard_{m.id}")


def install_shadow_trigger(conn: psycopg.Connection, m: Migration) -> None:
    # Supabase's trigger function in BEFORE mode: clears the shadow vector in NEW when the input
    # changed and enqueues a job for the shadow column; the ordinary drain does the rest.
    conn.execute(sql.SQL(
        "create or replace trigger {name} before insert or update on {table} for each row "
        "execute function util.queue_embeddings({fn}, {col}, {key}, {queue})"
    ).format(name=shadow_trigger(m), table=table_sql(m), fn=sql.Literal(m.content_function),
             col=sql.Literal(m.shadow_column), key=sql.Literal(m.key_column), queue=sql.Literal(m.queue)))


def drop_shadow_trigger(conn: psycopg.Connection, m: Migration) -> None:
    conn.execute(sql.SQL("drop trigger if exists {} on {}").format(shadow_trigger(m), table_sql(m)))


def drop_guard_trigger(conn: psycopg.Connection, m: Migration) -> None:
    conn.execute(sql.SQL("drop trigger if exists {} on autoembed.embedding_state").format(guard_trigger(m)))


def purge_jobs(conn: psycopg.Connection, m: Migration, column: str) -> int:
    """Delete queued jobs of one column of the table (jobs of a column that is going away)."""
    return conn.execute("select autoembed.purge_column_jobs(%s, %s, %s, %s)",
                        (m.queue, m.schema_name, m.table_name, column)).fetchone()[0]


def target_id(conn: psycopg.Connection, m: Migration, column: str) -> int | None:
    """The registered target of `column` (current name) of the migration's table."""
    return conn.execute("select autoembed.target_of(%s::regclass, %s)",
                        (table_sql(m).as_string(conn), column)).fetchone()[0]


def enqueue(conn: psycopg.Connection, m: Migration, column: str, where: sql.Composable) -> int:
    """Queue a job per row matching `where` (over alias t) for `column`'s registered target, in
    one send_batch (autoembed.enqueue_keys builds the messages: exact key texts, "target")."""
    registered = target_id(conn, m, column)
    if registered is None:
        raise TargetError(f"{m.label}: column {column} has no registered target: enroll the table again")
    return conn.execute(sql.SQL(
        "select autoembed.enqueue_keys(%s, array(select t.{key} from {table} t where {where}))"
    ).format(key=sql.Identifier(m.key_column), table=table_sql(m), where=where), (registered,)).fetchone()[0]


def clear_vectors(conn: psycopg.Connection, target: Target, where: sql.Composable, params: tuple = ()) -> int:
    """Clear the vector of the rows of `target` matching `where` (over alias t) through the owner's
    write function (vectors.write_as_owner, sql/019: a NULL vector clears), never with our own
    UPDATE: the owner's triggers on the table run with the owner's rights, not the runner's. No
    row to clear, no write (the owner's statement triggers do not run for nothing)."""
    keys = [k for (k,) in conn.execute(sql.SQL("select t.{key}::text from {table} t where {where}").format(
        key=target.key_sql, table=target.table_sql, where=where), params).fetchall()]
    if not keys:
        return 0
    vtype = "halfvec" if target.vector_type == "halfvec" else "vector"
    return write_as_owner(conn, "write_vector_rows", target.regclass, target.key.embedding_column,
                          target.key.key_column, f"%s::regclass, %s, %s, %s::text[], array_fill(null::{vtype}, array[%s])",
                          (target.regclass, target.key.embedding_column, target.key.key_column, keys, len(keys)))[0]


def register_shadow(conn: psycopg.Connection, m: Migration) -> None:
    """Register the shadow column as a target of its own (origin 'migration'): its jobs are
    resolved like any other, and only the content function it names may run for it."""
    table = table_sql(m).as_string(conn)
    conn.execute(
        "select autoembed.register_target(%s::regclass, %s, autoembed.content_function(%s::regclass, %s), %s, %s, %s,"
        " 'migration')", (table, m.content_function, table, m.content_function, m.shadow_column, m.key_column, m.queue))


def swap_targets(conn: psycopg.Connection, m: Migration, live: str, other: str, live_fn: str) -> None:
    """After the column renames of a promotion/rollback: the live target moves to the column now
    named `live` (target ids keep their role, so queued jobs of the live column stay with it), and
    an enrolled table's triggers are re-created for it (they hold the column by attnum and the
    content function by oid)."""
    table = table_sql(m).as_string(conn)
    conn.execute("select autoembed.swap_targets(%s::regclass, %s, %s)", (table, live, other))
    conn.execute(
        """select autoembed.install_triggers(%(t)s::regclass, c.id, autoembed.content_function(%(t)s::regclass, %(fn)s), %(col)s)
           from autoembed.target_catalog c where c.id = autoembed.target_of(%(t)s::regclass, %(col)s) and c.origin = 'enroll'""",
        {"t": table, "fn": live_fn, "col": live})


def unregister(conn: psycopg.Connection, m: Migration, column: str) -> None:
    conn.execute("select autoembed.unregister_targets(%s::regclass, %s)", (table_sql(m).as_string(conn), column))


def rename_column(conn: psycopg.Connection, m: Migration, source: str, dest: str) -> None:
    conn.execute(sql.SQL("alter table {} rename column {} to {}").format(
        table_sql(m), sql.Identifier(source), sql.Identifier(dest)))


def drop_column(conn: psycopg.Connection, m: Migration, column: str) -> None:
    conn.execute(sql.SQL("alter table {} drop column if exists {}").format(table_sql(m), sql.Identifier(column)))


def has_column(conn: psycopg.Connection, m: Migration, column: str) -> bool:
    return conn.execute("select 1 from pg_attribute where attrelid = %s::regclass and attname = %s"
                        " and attnum > 0 and not attisdropped", (table_sql(m).as_string(conn), column)).fetchone() is not None


OUR_TRIGGER_FUNCTIONS = ("util.queue_embeddings", "autoembed.queue_embeddings_bulk", "autoembed.clear_on_change")


def retarget_triggers(conn: psycopg.Connection, m: Migration, from_fn: str, to_fn: str) -> list[str]:
    """Point the live column's triggers at another content function (a migration that changes the
    input). Re-creates each trigger from Postgres's own definition with only the arguments changed."""
    if from_fn == to_fn:
        return []
    changed = []
    rows = conn.execute(
        """select t.tgname, t.tgfoid::regproc::text, pg_get_triggerdef(t.oid), t.tgargs, t.tgnargs,
                  pn.nspname || '.' || p.proname
           from pg_trigger t join pg_proc p on p.oid = t.tgfoid join pg_namespace pn on pn.oid = p.pronamespace
           where t.tgrelid = %s::regclass and not t.tgisinternal""",
        (table_sql(m).as_string(conn),),
    ).fetchall()
    for name, func, definition, raw_args, nargs, qualified in rows:
        args = [a.decode() for a in bytes(raw_args).split(b"\x00")[:nargs]]
        if qualified not in OUR_TRIGGER_FUNCTIONS or len(args) < 2:
            continue
        if args[0] != from_fn or args[1] != m.embedding_column:
            continue
        marker = "EXECUTE FUNCTION "
        head = definition[: definition.rindex(marker) + len(marker)]
        new_args = sql.SQL(", ").join(sql.Literal(a) for a in [to_fn, *args[1:]])
        conn.execute(sql.SQL("drop trigger {} on {}").format(sql.Identifier(name), table_sql(m)))
        # `head` is Postgres's own rendering of the trigger (quoted names), not user text.
        conn.execute(sql.SQL(head) + sql.SQL(func) + sql.SQL("(") + new_args + sql.SQL(")"))
        changed.append(name)
    return changed


def trigger_content_functions(conn: psycopg.Connection, schema: str, table: str, column: str) -> list[str]:
    """The content functions `column`'s vectors are made of, whatever the configuration says now:
    the registered target's first, then those the table's util.queue_embeddings triggers pass,
    most used first."""
    counts: dict[str, int] = {}
    for (fn,) in conn.execute("select content_function from autoembed.target_catalog"
                              " where schema_name = %s and table_name = %s and embedding_column = %s",
                              (schema, table, column)):
        counts[fn] = 10**6
    for func, raw_args, nargs in conn.execute(
        """select pn.nspname || '.' || p.proname, t.tgargs, t.tgnargs from pg_trigger t
           join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
           join pg_proc p on p.oid = t.tgfoid join pg_namespace pn on pn.oid = p.pronamespace
           where n.nspname = %s and c.relname = %s and not t.tgisinternal""", (schema, table)):
        args = [a.decode() for a in bytes(raw_args).split(b"\x00")[:nargs]]
        if func in OUR_TRIGGER_FUNCTIONS and len(args) >= 2 and args[1] == column:
            counts[args[0]] = counts.get(args[0], 0) + 1
    return sorted(counts, key=lambda fn: -counts[fn])


def _indexes(conn: psycopg.Connection, m: Migration, column: str) -> list[IndexInfo]:
    return column_indexes(conn, table_sql(m).as_string(conn), column)


def prepare_indexes(conn: psycopg.Connection, m: Migration) -> tuple[list[str], list[str]]:
    """Build, on the shadow column, a copy of each vector index of the live column (CONCURRENTLY:
    writes and reads go on), so the promotion only renames. Returns (indexes ready, notes)."""
    ready, notes = [], []
    for ix in _indexes(conn, m, m.embedding_column):
        if not ix.simple:
            notes.append(f"index {ix.name} is not a plain one-column index: not rebuilt, create it yourself")
            continue
        opclass = opclass_for(ix.opclass, m.vector_type)
        if conn.execute("select 1 from pg_opclass where opcname = %s", (opclass,)).fetchone() is None:
            notes.append(f"index {ix.name}: no operator class {opclass} for {m.vector_type}: not rebuilt")
            continue
        name = suffixed(ix.name, SHADOW_SUFFIX)
        existing = {i.name: i for i in _indexes(conn, m, m.shadow_column)}
        if name in existing and existing[name].valid:
            ready.append(name)
            continue
        if name in existing:  # left invalid by an interrupted concurrent build
            conn.execute(sql.SQL("drop index concurrently if exists {}").format(sql.Identifier(ix.schema, name)))
        conn.execute(sql.SQL("create index concurrently if not exists {} on {} using {} ({} {}){}").format(
            sql.Identifier(name), table_sql(m), sql.Identifier(ix.method), sql.Identifier(m.shadow_column),
            sql.Identifier(opclass), with_options(ix)))
        ready.append(name)
    return ready, notes


def swap_index_names(conn: psycopg.Connection, m: Migration, promoting: bool) -> list[str]:
    """After the column renames, give the now-live column's indexes the original names.

    Promoting: the old column's index X becomes X__old and the shadow's X__next becomes X.
    Rolling back: X (on the column that is the shadow again) becomes X__next, X__old becomes X."""
    retired_column = m.old_column if promoting else m.shadow_column
    retire_suffix, live_suffix = (OLD_SUFFIX, SHADOW_SUFFIX) if promoting else (SHADOW_SUFFIX, OLD_SUFFIX)
    on_live = {i.name for i in _indexes(conn, m, m.embedding_column)}
    swapped = []
    for ix in _indexes(conn, m, retired_column):
        incoming = suffixed(ix.name, live_suffix)
        if ix.name.endswith(live_suffix) or incoming not in on_live:
            continue
        conn.execute(sql.SQL("alter index {} rename to {}").format(
            sql.Identifier(ix.schema, ix.name), sql.Identifier(suffixed(ix.name, retire_suffix))))
        conn.execute(sql.SQL("alter index {} rename to {}").format(
            sql.Identifier(ix.schema, incoming), sql.Identifier(ix.name)))
        swapped.append(ix.name)
    return swapped
