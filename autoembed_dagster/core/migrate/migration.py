"""Zero-downtime model migration of an embedding column (plain Python, no Dagster).

    start_migration ──▶ shadow column `<col>__next` (new size) + a BEFORE row trigger that enqueues a
                        job for it on every changed row (the ordinary drain embeds those)
                    ──▶ backfill shards fill it (core/migrate/backfill.py)         search still uses <col>
    promote         ──▶ one transaction: rename <col> → <col>__old, <col>__next → <col>, move the
                        embedding_state records (autoembed.swap_targets: they are keyed by target), swap
                        triggers, swap the prebuilt vector indexes
    rollback        ──▶ the reverse swap, while <col>__old still exists
    drop_old        ──▶ drop <col>__old: the migration is finished
    abort           ──▶ drop the shadow column of a migration that was not promoted

The migration is recorded in autoembed.model_migrations (model named by provider, model and size
only: no API key, no URL). The drain's resolvers read it (`MigrationAwareResolver`) so that jobs
for the shadow column are embedded with the new model and jobs for the live column keep the old
one until promotion; a guard trigger on embedding_state refuses any record contradicting it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import psycopg
from psycopg import errors, sql

from ..config import ConfigError, EmbedderSettings
from ..embed import make_embedder
from ..queue import pgmq
from ..targets.catalog import Target, TargetError, TargetKey, resolve
from ..targets.models import (MIGRATION_COLUMNS, MIGRATION_SELECT, Migration, ModelSpec, get_migration,
                              migration_from_row)
from ..targets.shadow import (OLD_SUFFIX, SHADOW_SUFFIX, Coverage, IndexInfo, column_indexes, column_models,
                              opclass_for, suffixed, with_options)
from ..targets.shapes import Made, shape_of

_LOCK_CLASS = 0x61656D  # advisory lock class of migrations ("aem")

T = TypeVar("T")


class MigrationError(Exception):
    """The migration cannot do what was asked (conflict, wrong state, incomplete coverage...)."""


def _reload(conn: psycopg.Connection, m: Migration, lock: bool = False) -> Migration:
    q = MIGRATION_SELECT + sql.SQL(" where id = %s") + (sql.SQL(" for update") if lock else sql.SQL(""))
    fresh = migration_from_row(conn.execute(q, (m.id,)).fetchone())
    if fresh is None:
        raise MigrationError(f"migration {m.id} no longer exists")
    return fresh


def coverage(conn: psycopg.Connection, target: Target, model_key: str,
             shard: int | None = None, shards: int | None = None) -> Coverage:
    """How many rows (of one shard, or all) hold `model_key`'s vector of their current input: the
    target's one count (core.targets.shapes), also what core.health reports."""
    return shape_of(target).counts(conn, Made(model_key), shard, shards).coverage


# -- helpers ---------------------------------------------------------------------------------------
def in_locked_transaction(conn: psycopg.Connection, body: Callable[[], T], *, lock_timeout: float,
                           attempts: int) -> T:
    """Run `body` in one transaction that waits at most `lock_timeout` s for each table lock.

    A DDL lock request queues every later reader of the table behind it, so it must never wait
    long behind a slow query: give up quickly and try again instead."""
    if not conn.autocommit:
        raise ValueError("model migrations need an autocommit connection")
    for attempt in range(attempts):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("set local lock_timeout = {}").format(
                    sql.Literal(f"{max(1, int(lock_timeout * 1000))}ms")))
                conn.execute("set local autoembed.migrating = 'on'")
                conn.execute("set local autoembed.draining = 'on'")  # our own row writes enqueue nothing
                return body()
        except errors.LockNotAvailable:
            if attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def _table_sql(m: Migration) -> sql.Composable:
    return sql.Identifier(m.schema_name, m.table_name)


def _shadow_trigger(m: Migration) -> sql.Composable:
    return sql.Identifier(f"autoembed_migration_{m.id}")


def _guard_trigger(m: Migration) -> sql.Composable:
    return sql.Identifier(f"autoembed_guard_{m.id}")


def _install_shadow_trigger(conn: psycopg.Connection, m: Migration) -> None:
    # Supabase's trigger function in BEFORE mode: clears the shadow vector in NEW when the input
    # changed and enqueues a job for the shadow column; the ordinary drain does the rest.
    conn.execute(sql.SQL(
        "create or replace trigger {name} before insert or update on {table} for each row "
        "execute function util.queue_embeddings({fn}, {col}, {key}, {queue})"
    ).format(name=_shadow_trigger(m), table=_table_sql(m), fn=sql.Literal(m.content_function),
             col=sql.Literal(m.shadow_column), key=sql.Literal(m.key_column), queue=sql.Literal(m.queue)))


def _drop_shadow_trigger(conn: psycopg.Connection, m: Migration) -> None:
    conn.execute(sql.SQL("drop trigger if exists {} on {}").format(_shadow_trigger(m), _table_sql(m)))


def _purge_jobs(conn: psycopg.Connection, m: Migration, column: str) -> int:
    """Delete queued jobs of one column of the table (jobs of a column that is going away)."""
    cur = conn.execute(
        sql.SQL("delete from {} where message ->> 'schema' = %s and message ->> 'table' = %s"
                " and message ->> 'embeddingColumn' = %s").format(pgmq.table_of(m.queue)),
        (m.schema_name, m.table_name, column),
    )
    return cur.rowcount


def _target_id(conn: psycopg.Connection, m: Migration, column: str) -> int | None:
    """The registered target of `column` (current name) of the migration's table."""
    return conn.execute("select autoembed.target_of(%s::regclass, %s)",
                        (_table_sql(m).as_string(conn), column)).fetchone()[0]


def _enqueue(conn: psycopg.Connection, m: Migration, column: str, where: sql.Composable) -> int:
    """Queue a job per row matching `where` (over alias t) for `column`'s registered target, in
    one send_batch (autoembed.enqueue_keys builds the messages: exact key texts, "target")."""
    target_id = _target_id(conn, m, column)
    if target_id is None:
        raise MigrationError(f"{m.label}: column {column} has no registered target: enroll the table again")
    return conn.execute(sql.SQL(
        "select autoembed.enqueue_keys(%s, array(select t.{key} from {table} t where {where}))"
    ).format(key=sql.Identifier(m.key_column), table=_table_sql(m), where=where), (target_id,)).fetchone()[0]


def _register_shadow(conn: psycopg.Connection, m: Migration) -> None:
    """Register the shadow column as a target of its own (origin 'migration'): its jobs are
    resolved like any other, and only the content function it names may run for it."""
    table = _table_sql(m).as_string(conn)
    conn.execute(
        "select autoembed.register_target(%s::regclass, %s, autoembed.content_function(%s::regclass, %s), %s, %s, %s,"
        " 'migration')", (table, m.content_function, table, m.content_function, m.shadow_column, m.key_column, m.queue))


def _swap_targets(conn: psycopg.Connection, m: Migration, live: str, other: str, live_fn: str) -> None:
    """After the column renames of a promotion/rollback: the live target moves to the column now
    named `live` (target ids keep their role, so queued jobs of the live column stay with it), and
    an enrolled table's triggers are re-created for it (they hold the column by attnum and the
    content function by oid)."""
    table = _table_sql(m).as_string(conn)
    conn.execute("select autoembed.swap_targets(%s::regclass, %s, %s)", (table, live, other))
    conn.execute(
        """select autoembed.install_triggers(%(t)s::regclass, c.id, autoembed.content_function(%(t)s::regclass, %(fn)s), %(col)s)
           from autoembed.target_catalog c where c.id = autoembed.target_of(%(t)s::regclass, %(col)s) and c.origin = 'enroll'""",
        {"t": table, "fn": live_fn, "col": live})


def clear_vectors(conn: psycopg.Connection, target: Target, where: sql.Composable, params: tuple = ()) -> int:
    """Clear the vector of the rows of `target` matching `where` (over alias t) through the owner's
    write function (autoembed.write_vectors, sql/019: a NULL vector clears), never with our own
    UPDATE: the owner's triggers on the table run with the owner's rights, not the runner's."""
    return conn.execute(sql.SQL(
        """select autoembed.write_vectors(%s::regclass, %s, %s, k.keys,
                                          array_fill(null::{vtype}, array[cardinality(k.keys)]))
           from (select array(select t.{key}::text from {table} t where {where}) as keys) k"""
    ).format(vtype=target.vector_type_sql, key=target.key_sql, table=target.table_sql, where=where),
        (target.regclass, target.key.embedding_column, target.key.key_column, *params)).fetchone()[0]


def _unregister(conn: psycopg.Connection, m: Migration, column: str) -> None:
    conn.execute("select autoembed.unregister_targets(%s::regclass, %s)", (_table_sql(m).as_string(conn), column))


def _rename_column(conn: psycopg.Connection, m: Migration, source: str, dest: str) -> None:
    conn.execute(sql.SQL("alter table {} rename column {} to {}").format(
        _table_sql(m), sql.Identifier(source), sql.Identifier(dest)))


_OUR_TRIGGER_FUNCTIONS = ("util.queue_embeddings", "autoembed.queue_embeddings_bulk", "autoembed.clear_on_change")


def _retarget_triggers(conn: psycopg.Connection, m: Migration, from_fn: str, to_fn: str) -> list[str]:
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
        (sql.Identifier(m.schema_name, m.table_name).as_string(conn),),
    ).fetchall()
    for name, func, definition, raw_args, nargs, qualified in rows:
        args = [a.decode() for a in bytes(raw_args).split(b"\x00")[:nargs]]
        if qualified not in _OUR_TRIGGER_FUNCTIONS or len(args) < 2:
            continue
        if args[0] != from_fn or args[1] != m.embedding_column:
            continue
        marker = "EXECUTE FUNCTION "
        head = definition[: definition.rindex(marker) + len(marker)]
        new_args = sql.SQL(", ").join(sql.Literal(a) for a in [to_fn, *args[1:]])
        conn.execute(sql.SQL("drop trigger {} on {}").format(sql.Identifier(name), _table_sql(m)))
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
        if func in _OUR_TRIGGER_FUNCTIONS and len(args) >= 2 and args[1] == column:
            counts[args[0]] = counts.get(args[0], 0) + 1
    return sorted(counts, key=lambda fn: -counts[fn])


def _indexes(conn: psycopg.Connection, m: Migration, column: str) -> list[IndexInfo]:
    return column_indexes(conn, sql.Identifier(m.schema_name, m.table_name).as_string(conn), column)


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
            sql.Identifier(name), _table_sql(m), sql.Identifier(ix.method), sql.Identifier(m.shadow_column),
            sql.Identifier(opclass), with_options(ix)))
        ready.append(name)
    return ready, notes


def _swap_index_names(conn: psycopg.Connection, m: Migration, promoting: bool) -> list[str]:
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


# -- lifecycle ------------------------------------------------------------------------------------
PROBE_TEXT = "autoembed probe: can this model embed?"


def probe_target(spec: ModelSpec, base: EmbedderSettings | None = None) -> None:
    """Embed one text with the target model before a migration creates anything. An impossible
    target (the local provider asked for an OpenAI model, a missing API key, a size the model
    cannot make) is refused here with the reason, instead of a shadow column, failing shard runs
    and dead letters for every new row."""
    settings = spec.settings(base or EmbedderSettings.from_env())
    try:
        embedder = make_embedder(settings, dimensions=spec.dimensions)
        if embedder.identity.key != spec.identity_key:
            raise ConfigError(f"the {spec.provider} provider makes {embedder.identity.key} vectors")
        outcome = embedder.embed([PROBE_TEXT])
        if outcome.errors[0] is not None:
            raise outcome.errors[0]
        made = len(outcome.vectors[0])
        if made != spec.dimensions:
            raise ConfigError(f"the model returned {made} dimensions, not {spec.dimensions}")
    except Exception as exc:  # noqa: BLE001 - whatever stops the probe stops the migration, with its reason
        raise MigrationError(f"cannot migrate to {spec.identity_key}: {exc}. Fix the model in the pipeline's "
                             "defs.yaml (or the provider's key/URL in the environment) and launch again") from None


def start_migration(conn: psycopg.Connection, live: TargetKey, spec: ModelSpec, *, queue: str = "embedding_jobs",
                    vector_type: str | None = None, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Start migrating `live` to `spec` (idempotent: the same spec returns the running migration)."""
    probe_target(spec)

    def body() -> Migration:
        conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))",
                     (_LOCK_CLASS, f"{live.schema}.{live.table}.{live.embedding_column}"))
        existing = get_migration(conn, live.schema, live.table, live.embedding_column)
        if existing is not None:
            if existing.status == "backfilling" and existing.spec == spec:
                return existing
            raise MigrationError(
                f"{existing.label} already has a migration ({existing.status}) to {existing.spec.key}: "
                + ("abort it first" if existing.status == "backfilling" else "drop_old or rollback it first"))
        target = resolve(conn, live)
        if conn.execute("select autoembed.content_function(%s::regclass, %s)", (target.regclass, spec.content_function)
                        ).fetchone()[0] is None:
            raise TargetError(f"content function {spec.content_function!r} taking a row of {target.regclass} does not exist")
        vtype = vector_type or target.vector_type
        if vtype not in ("vector", "halfvec"):
            raise ConfigError(f"vector type must be vector or halfvec, got {vtype!r}")
        shadow, old = suffixed(live.embedding_column, SHADOW_SUFFIX), suffixed(live.embedding_column, OLD_SUFFIX)
        for name in (shadow, old):
            if conn.execute("select 1 from pg_attribute where attrelid = %s::regclass and attname = %s"
                            " and attnum > 0 and not attisdropped", (target.regclass, name)).fetchone():
                raise MigrationError(f"{target.regclass} already has a column {name}: drop it first")
        if not conn.execute("select 1 from pgmq.meta where queue_name = %s", (queue,)).fetchone():
            conn.execute("select pgmq.create(%s)", (queue,))
        models = column_models(conn, live.schema, live.table, live.embedding_column)
        m = migration_from_row(conn.execute(sql.SQL(
            """insert into autoembed.model_migrations
                 (schema_name, table_name, embedding_column, shadow_column, old_column, key_column, queue,
                  content_function, old_content_function, provider, model, dimensions, vector_type,
                  model_key, old_model)
               values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) returning {}"""
        ).format(sql.SQL(", ").join(sql.Identifier(c) for c in MIGRATION_COLUMNS)), (
            live.schema, live.table, live.embedding_column, shadow, old, live.key_column, queue,
            spec.content_function, live.content_function, spec.provider, spec.model, spec.dimensions, vtype,
            spec.identity_key, models[0][0] if models else None,
        )).fetchone())
        assert m is not None
        conn.execute(sql.SQL("alter table {} add column {} {}").format(
            _table_sql(m), sql.Identifier(shadow), sql.SQL(f"{vtype}({int(spec.dimensions)})")))
        _register_shadow(conn, m)
        _install_shadow_trigger(conn, m)
        conn.execute("select autoembed.install_migration_guard(%s)", (m.id,))
        # Jobs dead-lettered because the configured model no longer fitted the live column (the
        # model was changed in code before this migration started) can succeed now: retry them.
        conn.execute(
            """select autoembed.retry_dead_letters(%s, array(
                   select msg_id from autoembed.dead_letter_jobs
                   where queue_name = %s and schema_name = %s and table_name = %s and embedding_column = %s
                     and error like '%%dimension mismatch%%'))""",
            (queue, queue, live.schema, live.table, live.embedding_column))
        return m

    return in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)


@dataclass
class PromoteResult:
    migration: Migration
    coverage: Coverage | None
    indexes: list[str] = field(default_factory=list)  # vector indexes now serving the promoted column
    triggers: list[str] = field(default_factory=list)  # triggers re-pointed at a new content function
    notes: list[str] = field(default_factory=list)
    already: bool = False  # the migration was promoted before this call: nothing done
    purged_jobs: int = 0  # queued jobs of the shadow column dropped by the promotion
    locked_seconds: float = 0.0


class MigrationIncomplete(MigrationError):
    def __init__(self, m: Migration, cov: Coverage):
        super().__init__(f"{m.label}: {cov.current} of {cov.embeddable} rows have the {m.model_key} vector of "
                         f"their current input ({cov.ratio:.2%}); finish the backfill or pass force")
        self.coverage = cov


def promote(conn: psycopg.Connection, m: Migration, *, force: bool = False, lock_timeout: float = 5.0,
            attempts: int = 5) -> PromoteResult:
    """Swap the shadow column in, atomically, once every row has its new-model vector.

    The coverage check runs under SHARE ROW EXCLUSIVE (writers wait, readers do not); the renames
    then need ACCESS EXCLUSIVE only for the instant of the catalog change. Idempotent."""
    m = _reload(conn, m)
    if m.status == "promoted":
        return PromoteResult(m, None, already=True)
    if m.status != "backfilling":
        raise MigrationError(f"{m.label}: migration {m.id} is {m.status}, not backfilling")
    _, notes = prepare_indexes(conn, m)

    def body() -> PromoteResult:
        mm = _reload(conn, m, lock=True)
        if mm.status == "promoted":
            return PromoteResult(mm, None, already=True)
        started = time.perf_counter()
        conn.execute(sql.SQL("lock table {} in share row exclusive mode").format(_table_sql(mm)))
        cov = coverage(conn, resolve(conn, mm.shadow_key), mm.model_key)
        if not cov.complete and not force:
            raise MigrationIncomplete(mm, cov)
        _drop_shadow_trigger(conn, mm)
        purged = _purge_jobs(conn, mm, mm.shadow_column)
        _rename_column(conn, mm, mm.embedding_column, mm.old_column)
        _rename_column(conn, mm, mm.shadow_column, mm.embedding_column)
        _swap_targets(conn, mm, mm.embedding_column, mm.old_column, mm.content_function)
        indexes = _swap_index_names(conn, mm, promoting=True)
        triggers = _retarget_triggers(conn, mm, mm.old_content_function, mm.content_function)
        conn.execute("update autoembed.model_migrations set status = 'promoted', promoted_at = now() where id = %s",
                     (mm.id,))
        # Keywords: positionally, `purged` once landed in `already` (a promotion reported as a no-op).
        return PromoteResult(_reload(conn, mm), cov, indexes=indexes, triggers=triggers, notes=notes,
                             purged_jobs=purged, locked_seconds=time.perf_counter() - started)

    result = in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)
    result.notes = notes
    return result


def rollback(conn: psycopg.Connection, m: Migration, *, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Undo a promotion while the old vectors still exist: the old column is live again and the
    migration is back to backfilling (promote again later, or abort). Old vectors whose row changed
    since the promotion are cleared and re-queued, so search never returns a vector of old content."""
    def body() -> Migration:
        mm = _reload(conn, m, lock=True)
        if mm.status != "promoted":
            raise MigrationError(f"{mm.label}: only a promoted migration can be rolled back (it is {mm.status})")
        live = resolve(conn, mm.live_key)
        conn.execute(sql.SQL("lock table {} in access exclusive mode").format(_table_sql(mm)))
        if not conn.execute("select 1 from pg_attribute where attrelid = %s::regclass and attname = %s"
                            " and attnum > 0 and not attisdropped", (live.regclass, mm.old_column)).fetchone():
            raise MigrationError(f"{mm.label}: the old vectors ({mm.old_column}) were dropped; nothing to roll back to")
        _rename_column(conn, mm, mm.embedding_column, mm.shadow_column)
        _rename_column(conn, mm, mm.old_column, mm.embedding_column)
        _swap_targets(conn, mm, mm.embedding_column, mm.shadow_column, mm.old_content_function)
        _swap_index_names(conn, mm, promoting=False)
        _retarget_triggers(conn, mm, mm.content_function, mm.old_content_function)
        conn.execute("update autoembed.model_migrations set status = 'backfilling', promoted_at = null where id = %s",
                     (mm.id,))
        mm = _reload(conn, mm)
        _install_shadow_trigger(conn, mm)
        _purge_jobs(conn, mm, mm.shadow_column)
        # Both columns: clear vectors whose record does not match the row's current input, then
        # queue every row left without one.
        for column, fn in ((mm.embedding_column, mm.old_content_function), (mm.shadow_column, mm.content_function)):
            target = resolve(conn, TargetKey(mm.schema_name, mm.table_name, fn, column, mm.key_column))
            clear_vectors(conn, target, sql.SQL(
                """t.{col} is not null and not exists (
                       select 1 from autoembed.embedding_state s
                       where s.target_id = (select autoembed.state_target(%s, %s, %s))
                         and s.row_id = t.{key}::text and s.content_hash = autoembed.content_hash({fn}(t)::text))"""
            ).format(col=target.column_sql, key=target.key_sql, fn=target.function_sql),
                (mm.schema_name, mm.table_name, column))
            _enqueue(conn, mm, column, sql.SQL("t.{col} is null and nullif(btrim({fn}(t)::text), '') is not null")
                     .format(col=target.column_sql, fn=target.function_sql))
        return mm

    return in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)


def drop_old(conn: psycopg.Connection, m: Migration, *, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Drop the old vectors of a promoted migration (no rollback after this): it is finished."""
    def body() -> Migration:
        mm = _reload(conn, m, lock=True)
        if mm.status != "promoted":
            raise MigrationError(f"{mm.label}: only a promoted migration can drop its old vectors (it is {mm.status})")
        _unregister(conn, mm, mm.old_column)
        conn.execute(sql.SQL("alter table {} drop column if exists {}").format(_table_sql(mm), sql.Identifier(mm.old_column)))
        conn.execute(sql.SQL("drop trigger if exists {} on autoembed.embedding_state").format(_guard_trigger(mm)))
        conn.execute("update autoembed.model_migrations set status = 'finished', finished_at = now() where id = %s",
                     (mm.id,))
        return _reload(conn, mm)

    return in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)


def abort(conn: psycopg.Connection, m: Migration, *, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Give up a migration that was not promoted: drop the shadow column, its records and jobs."""
    def body() -> Migration:
        mm = _reload(conn, m, lock=True)
        if mm.status != "backfilling":
            raise MigrationError(f"{mm.label}: only a backfilling migration can be aborted (it is {mm.status}); "
                                 "roll it back first")
        _drop_shadow_trigger(conn, mm)
        _unregister(conn, mm, mm.shadow_column)
        conn.execute(sql.SQL("alter table {} drop column if exists {}").format(_table_sql(mm), sql.Identifier(mm.shadow_column)))
        _purge_jobs(conn, mm, mm.shadow_column)
        conn.execute(sql.SQL("drop trigger if exists {} on autoembed.embedding_state").format(_guard_trigger(mm)))
        conn.execute("update autoembed.model_migrations set status = 'aborted', finished_at = now() where id = %s",
                     (mm.id,))
        return _reload(conn, mm)

    return in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)


