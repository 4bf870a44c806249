"""Zero-downtime model changes (plain Python, no Dagster): the one flow every target shape's model
change runs (`step`: which action each state allows, the locked transaction, the promotion's
coverage check, the messages), over the shape's own steps (core.targets.shapes.ModelChange: a
vector column's `ColumnChange`, a chunk set's `ChunkSetChange`, core.migrate.chunk_migration);
and a vector column's migration record, started here:

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
from ..targets.catalog import Target, TargetError, TargetKey, resolve
from ..targets.models import (MIGRATION_COLUMNS, Migration, ModelSpec, describe_change, get_migration,
                              migration_from_row)
# (prepare_indexes, trigger_content_functions: a column's migration steps, core.targets.shadow)
from ..targets.shadow import (OLD_SUFFIX, SHADOW_SUFFIX, Coverage, column_models, prepare_indexes,  # noqa: F401
                              suffixed, trigger_content_functions)
from ..targets.shapes import ColumnChange, Made, ModelChange, ShadowState, Swapped, shape_of

_LOCK_CLASS = 0x61656D  # advisory lock class of migrations ("aem")

T = TypeVar("T")


class MigrationError(Exception):
    """The migration cannot do what was asked (conflict, wrong state, incomplete coverage...)."""


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


def in_change_transaction(conn: psycopg.Connection, target: str, body: Callable[[], T], *, lock_timeout: float = 5.0,
                          attempts: int = 5) -> T:
    """`in_locked_transaction` holding the advisory lock of `target`'s model changes (a column
    `schema.table.column`, a chunk set `schema.table.chunk_table`): two runs that read a change's
    state and then make its shadow take turns, so the second finds the first's shadow instead of
    making it again."""

    def locked() -> T:
        conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, target))
        return body()

    return in_locked_transaction(conn, locked, lock_timeout=lock_timeout, attempts=attempts)


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
                    vector_type: str | None = None, lock_timeout: float = 5.0, attempts: int = 5,
                    pipeline: str | None = None) -> Migration:
    """Start migrating `live` to `spec` (idempotent: the same spec returns the running migration).
    `pipeline`: its name, for the commands a refusal names."""
    probe_target(spec)

    def body() -> Migration:
        existing = get_migration(conn, live.schema, live.table, live.embedding_column)
        before = ShadowState(None, None)  # (no record: no shadow, no retired copy)
        if existing is not None:
            if existing.status == "backfilling" and existing.spec == spec:
                return existing
            change = ColumnChange(existing, pipeline)
            before = change.state(conn)
            if (why := refusal(change, before, "make")) is not None:
                raise MigrationError(f"{why} (it changes the model to {existing.spec.key})")
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
        make_shadow(conn, ColumnChange(m, pipeline), before)
        # Jobs dead-lettered because the configured model no longer fitted the live column (the
        # model was changed in code before this migration started) can succeed now: retry them.
        conn.execute(
            """select autoembed.retry_dead_letters(%s, array(
                   select msg_id from autoembed.dead_letter_jobs
                   where queue_name = %s and schema_name = %s and table_name = %s and embedding_column = %s
                     and error like '%%dimension mismatch%%'))""",
            (queue, queue, live.schema, live.table, live.embedding_column))
        return m

    return in_change_transaction(conn, f"{live.schema}.{live.table}.{live.embedding_column}", body,
                                 lock_timeout=lock_timeout, attempts=attempts)


# -- the one flow of a model change, for every shape ------------------------------------------------
MIGRATION_ACTIONS = ("status", "promote", "rollback", "abort", "drop_old")


class MigrationIncomplete(MigrationError):
    def __init__(self, change: ModelChange, cov: Coverage):
        super().__init__(f"{change.label}: {cov.current} of {cov.embeddable} {change.unit} with input hold the "
                         f"{change.model} vectors of their current input in {change.shadow_name} ({cov.ratio:.2%}); "
                         "finish the backfill or pass --force")
        self.coverage = cov


@dataclass
class Step:
    """What a migration action did: the state after it, the shadow's coverage a promotion checked,
    what the promotion swapped, and how long the table was locked."""

    action: str
    state: ShadowState
    coverage: Coverage | None = None
    swapped: Swapped | None = None
    notes: list[str] = field(default_factory=list)
    already: bool = False  # a promotion found the change promoted before it: nothing done
    locked_seconds: float = 0.0


def refusal(change: ModelChange, state: ShadowState, action: str) -> str | None:
    """Why `state` does not allow `action` (the state machine of a model change), or None:

        none ──(make_shadow: a backfill)──────▶ backfilling ──promote──▶ promoted ──drop_old──▶ none
                        ▲   └──abort──▶ none                              │
                        └──────────────────────rollback──────────────────┘
    """
    p = change.pipeline or "<pipeline>"
    in_progress = (f"{change.label}: {state.shadow} exists (another model change in progress): "
                   f"`autoembed migrate {p} abort` it first")
    kept = (f"{change.label}: {state.old} holds the vectors of the previous model change: "
            f"`autoembed migrate {p} drop-old` first")
    if action == "make":
        if state.shadow is not None:
            return in_progress
        if state.old is not None:
            return f"{kept} (or roll that change back: `autoembed migrate {p} rollback`)"
    elif action == "promote":
        if state.shadow is None:
            return (f"{change.label}: no shadow {change.noun} {change.shadow_name} to promote "
                    f"(run `autoembed backfill {p}` after a model change)")
        if state.old is not None:
            return kept
    elif action == "rollback":
        if state.old is None:
            return f"{change.label}: no old {change.noun} to roll back to (never promoted, or dropped)"
        if state.shadow is not None:
            return in_progress
        if not state.old_exists:
            return f"{change.label}: the old vectors ({state.old}) were dropped; nothing to roll back to"
    elif action == "drop_old":
        if state.old is None:
            return f"{change.label}: no old {change.noun} to drop"
    elif action == "abort":
        if state.shadow is None:
            return f"{change.label}: no model change in progress to abort (no {change.shadow_name})"
    return None


def make_shadow(conn: psycopg.Connection, change: ModelChange, state: ShadowState) -> None:
    """Make a model change's shadow (none ──▶ backfilling), for every shape: refused while another
    change holds a shadow or a retired copy (`state`: where it stood before, read by the caller
    inside its transaction), else the shape's `make`."""
    if (why := refusal(change, state, "make")) is not None:
        raise MigrationError(why)
    change.make(conn)


def step(conn: psycopg.Connection, change: ModelChange, action: str, *, force: bool = False,
         lock_timeout: float = 5.0, attempts: int = 5) -> Step:
    """Apply `action` (status, promote, rollback, drop_old, abort) to a model change of any shape,
    in one transaction with short lock waits (`in_locked_transaction`). Raises MigrationError when
    its state does not allow it, MigrationIncomplete when a promotion's shadow is not complete
    (unless `force`). A promotion is idempotent: promoted already, it does nothing.

    The coverage check of a promotion runs after `lock_writers` (a column: SHARE ROW EXCLUSIVE,
    writers wait, readers do not); the swap then needs ACCESS EXCLUSIVE only for the instant of the
    catalog change."""
    if action not in MIGRATION_ACTIONS:
        raise MigrationError(f"migration action {action!r} is not one of {', '.join(MIGRATION_ACTIONS)}")
    state = change.state(conn)
    if action == "status" or (action == "promote" and state.status == "promoted"):
        return Step(action, state, already=action == "promote")
    if (why := refusal(change, state, action)) is not None:
        raise MigrationError(why)
    notes = change.prepare(conn) if action == "promote" else []  # (outside the transaction: no lock held)

    def body() -> Step:
        state = change.state(conn, lock=True)
        if action == "promote" and state.status == "promoted":
            return Step(action, state, already=True)
        if (why := refusal(change, state, action)) is not None:
            raise MigrationError(why)
        started = time.perf_counter()
        cov, swapped = None, None
        if action == "promote":
            change.lock_writers(conn)
            cov = change.coverage(conn, state)
            if not cov.complete and not force:
                raise MigrationIncomplete(change, cov)
            swapped = change.promote(conn)
        elif action == "rollback":
            change.rollback(conn)
        elif action == "drop_old":
            change.drop_old(conn)
        else:
            change.drop_shadow(conn)
        return Step(action, change.state(conn), cov, swapped, locked_seconds=time.perf_counter() - started)

    result = in_locked_transaction(conn, body, lock_timeout=lock_timeout, attempts=attempts)
    result.notes = notes
    return result


# -- a vector column's migration: the record's entry points over the flow ------------------------------
@dataclass
class PromoteResult:
    """What a backfill's promotion did, for every shape (`promoted`): `live` (a column, a chunk
    table) now holds `holds`; the previous `kept` stay in `old` for rollback."""

    live: str
    holds: str
    old: str
    coverage: Coverage | None
    migration: Migration | None = None  # a column's migration record (a chunk set has none)
    indexes: list[str] = field(default_factory=list)  # vector indexes now serving the promoted vectors
    triggers: list[str] = field(default_factory=list)  # triggers re-pointed at a new content function
    notes: list[str] = field(default_factory=list)
    already: bool = False  # the change was promoted before this call: nothing done
    purged_jobs: int = 0  # queued jobs of the shadow dropped by the promotion
    locked_seconds: float = 0.0
    kept: str = "vectors"

    def line(self, pipeline: str) -> str:
        return promoted_line(pipeline, self.live, self.holds, self.old, self.kept)


def promoted_line(pipeline: str, live: str, holds: str, old: str, kept: str = "vectors") -> str:
    """A promotion, as the CLI and a migration action say it."""
    return f"promoted: {live} now holds {holds} (old {kept} in {old} until `autoembed migrate {pipeline} drop-old`)"


def promoted(r: Step, live: str, holds: str, *, migration: Migration | None = None,
             kept: str = "vectors") -> PromoteResult:
    """The PromoteResult of a `step(..., "promote")` of any shape."""
    s = r.swapped or Swapped(r.state.old or "")
    return PromoteResult(live, holds, s.old, r.coverage, migration, indexes=s.indexes, triggers=s.triggers,
                         notes=r.notes, already=r.already, purged_jobs=s.purged_jobs,
                         locked_seconds=r.locked_seconds, kept=kept)


def promote(conn: psycopg.Connection, m: Migration, *, force: bool = False, lock_timeout: float = 5.0,
            attempts: int = 5) -> PromoteResult:
    """Swap the shadow column in, atomically, once every row has its new-model vector (`step`)."""
    change = ColumnChange(m)
    r = step(conn, change, "promote", force=force, lock_timeout=lock_timeout, attempts=attempts)
    m = change.m
    return promoted(r, m.embedding_column, describe_change(m.old_spec, m.spec), migration=m)


def rollback(conn: psycopg.Connection, m: Migration, *, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Undo a promotion while the old vectors still exist: the old column is live again and the
    migration is back to backfilling (promote again later, or abort). Old vectors whose row changed
    since the promotion are cleared and re-queued, so search never returns a vector of old content."""
    return _column_step(conn, m, "rollback", lock_timeout, attempts)


def drop_old(conn: psycopg.Connection, m: Migration, *, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Drop the old vectors of a promoted migration (no rollback after this): it is finished."""
    return _column_step(conn, m, "drop_old", lock_timeout, attempts)


def abort(conn: psycopg.Connection, m: Migration, *, lock_timeout: float = 5.0, attempts: int = 5) -> Migration:
    """Give up a migration that was not promoted: drop the shadow column, its records and jobs."""
    return _column_step(conn, m, "abort", lock_timeout, attempts)


def _column_step(conn: psycopg.Connection, m: Migration, action: str, lock_timeout: float, attempts: int) -> Migration:
    change = ColumnChange(m)
    step(conn, change, action, lock_timeout=lock_timeout, attempts=attempts)
    return change.m
