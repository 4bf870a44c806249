"""Chunk tables: plan which chunks of changed documents need embedding, then replace each
document's chunk set in the caller's transaction (sql/011_chunks.sql creates the tables).

The drain (and the backfill) call three functions:

    plan = chunks.plan(conn, target, docs, splitter, model_key)       # docs: key -> (input, input hash)
    outcome = embedder.embed(plan.texts)                              # only chunk texts with no vector yet
    stats = chunks.write(conn, target, plan, dict(zip(plan.hashes, outcome.vectors)), model_key)

A chunk whose exact text already has a vector under `model_key` anywhere in the chunk table is
not embedded again (matched by hash, so shifted positions and repeated boilerplate cost nothing).
`write` swaps the chunk sets in the caller's transaction (other transactions see the old set or
the new one, never a mix), through the target's write function (the table owner's rights,
sql/019): one INSERT of the new sets, holding no lock on the parent rows or their old chunks;
then the stale-write guard locks each parent row (waiting at most GUARD_WAIT: a busy row is
reported) and keeps only the sets whose parent still has the input they were made from (a
document whose input changed is stale, one deleted meanwhile is gone), and only then deletes the
old sets. The application's UPDATE, DELETE, key change or SELECT FOR UPDATE of a parent waits at
most from the guard to the commit, never for the write (bench/bench_settle_wait.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np
import psycopg
from psycopg import sql

from .splitter import Splitter, chunk_hash
from ..embed.base import Embedder, ProviderConfigError
from .catalog import TargetError, ambiguous_keys, check_identifier, input_function, require_input_function
from .shadow import Coverage
from .vectors import encode_vectors, vector_array, write_as_owner

VECTOR_COLUMN = "embedding"


@dataclass(frozen=True)
class ChunkTarget:
    """A parent table + content function + its chunk table, resolved against the catalog."""

    schema: str
    table: str
    key_column: str
    key_type: str  # format_type of the key, as Postgres prints it
    function: str  # regproc text of the content function, as Postgres prints it
    chunk_table: str  # name of the chunk table, in `schema`
    vector_type: str  # "vector" or "halfvec"
    dimensions: int

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table} -> {self.chunk_table}"

    @property
    def parent_sql(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.table)

    @property
    def chunks_sql(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.chunk_table)

    @property
    def key_sql(self) -> sql.Composable:
        return sql.Identifier(self.key_column)

    @property
    def key_type_sql(self) -> sql.Composable:
        return sql.SQL(self.key_type)  # catalog text, not user text

    @property
    def function_sql(self) -> sql.Composable:
        return sql.SQL(self.function)  # regproc text from the catalog (quoted by Postgres)

    def with_chunk_table(self, name: str) -> "ChunkTarget":
        return ChunkTarget(self.schema, self.table, self.key_column, self.key_type, self.function, name,
                           self.vector_type, self.dimensions)


def create_chunk_table(conn: psycopg.Connection, schema: str, table: str, *, key_column: str = "id",
                       vector_type: str = "halfvec", dimensions: int, chunk_table: str | None = None) -> str:
    """Create (or check) `<schema>.<table>_chunks`; returns its regclass text."""
    for what, value in (("schema", schema), ("table", table), ("key column", key_column)):
        check_identifier(what, value)
    if chunk_table is not None:
        check_identifier("chunk table", chunk_table)
    parent = conn.execute("select to_regclass(format('%%I.%%I', %s::text, %s::text))::text", (schema, table)).fetchone()[0]
    if parent is None:
        raise TargetError(f"table {schema!r}.{table!r} does not exist")
    return conn.execute("select autoembed.create_chunk_table(%s::regclass, %s, %s, %s, %s)::text",
                        (parent, key_column, vector_type, dimensions, chunk_table)).fetchone()[0]


def resolve_chunk_target(conn: psycopg.Connection, schema: str, table: str, content_function: str, *,
                         key_column: str = "id", chunk_table: str | None = None) -> ChunkTarget:
    """Look a chunk target up in the catalog. Raises TargetError naming what is missing or wrong."""
    for what, value in (("schema", schema), ("table", table), ("content function", content_function),
                        ("key column", key_column)):
        check_identifier(what, value)
    chunk_table = check_identifier("chunk table", chunk_table or f"{table}_chunks")
    row = conn.execute(
        """select p.oid::regclass::text, p.oid::oid, autoembed.content_function(p.oid::regclass, %s)::oid,
                  (select format_type(a.atttypid, a.atttypmod) from pg_attribute a
                    where a.attrelid = p.oid and a.attname = %s and a.attnum > 0 and not a.attisdropped),
                  c.oid::regclass::text, (select parent::text from autoembed.chunk_parent(c.oid)),
                  (select key_column from autoembed.chunk_parent(c.oid))
           from (select to_regclass(format('%%I.%%I', %s::text, %s::text)) as oid) p,
                (select to_regclass(format('%%I.%%I', %s::text, %s::text)) as oid) c""",
        (content_function, key_column, schema, table, schema, chunk_table),
    ).fetchone()
    parent, parent_oid, function_oid, key_type, chunks, chunk_parent, chunk_key = row
    if parent is None:
        raise TargetError(f"table {schema!r}.{table!r} does not exist")
    if function_oid is None and re.fullmatch(r"autoembed\.input_[0-9]+", content_function):
        # A target's own input function (e.g. ChunkTarget.function, for its shadow table).
        function_oid = conn.execute("select to_regprocedure(%s)::oid", (f"{content_function}(anyelement)",)).fetchone()[0]
    if function_oid is None:
        raise TargetError(f"content function {content_function!r} taking a row of {parent} does not exist")
    function = require_input_function(input_function(conn, parent_oid, function_oid), parent, content_function)
    if key_type is None:
        raise TargetError(f"{parent} has no key column {key_column!r}")
    if chunks is None:
        raise TargetError(f"chunk table {schema!r}.{chunk_table!r} does not exist: create it with "
                          f"autoembed.create_chunk_table('{parent}', '{key_column}', 'halfvec', <dimensions>)")
    if chunk_parent != parent or chunk_key != key_column:
        raise TargetError(f"{chunks} is not the chunk table of {parent}.{key_column} (it references {chunk_parent})")
    col = conn.execute("select type_name, dimensions from autoembed.vector_column(%s::regclass, %s)",
                       (chunks, VECTOR_COLUMN)).fetchone()
    if col is None or col[1] is None:
        raise TargetError(f"{chunks} has no sized vector/halfvec column {VECTOR_COLUMN!r}")
    return ChunkTarget(schema, table, key_column, key_type, function, chunk_table, col[0], int(col[1]))


# -- plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    hash: bytes


@dataclass(frozen=True)
class DocumentPlan:
    input_hash: bytes | None  # the parent's content hash the chunks were made from (None: NULL input)
    chunks: list[Chunk]


@dataclass
class ChunkPlan:
    model: str
    splitter: str
    documents: dict[str, DocumentPlan] = field(default_factory=dict)  # to (re)write
    unchanged: list[str] = field(default_factory=list)  # chunk set already current: nothing to do
    to_embed: dict[bytes, str] = field(default_factory=dict)  # chunk hash -> text, no vector yet
    reused: set[bytes] = field(default_factory=set)  # chunk hashes with a vector under the model

    @property
    def hashes(self) -> list[bytes]:
        return list(self.to_embed)

    @property
    def texts(self) -> list[str]:
        """The texts to give the embedder, aligned with `hashes`."""
        return list(self.to_embed.values())

    @property
    def chunk_count(self) -> int:
        return sum(len(d.chunks) for d in self.documents.values())


def read_documents(conn: psycopg.Connection, target: ChunkTarget, keys: list[str]) -> dict[str, tuple[str | None, bytes | None]]:
    """key -> (current input, its content hash) for the parent rows that exist."""
    rows = conn.execute(
        sql.SQL("""select r.k, r.input, autoembed.content_hash(r.input)
                   from (select t.{key}::text as k, {fn}(t)::text as input from {parent} t
                         where t.{key} = any(%s::text[]::{kt}[])) r""").format(
            key=target.key_sql, fn=target.function_sql, parent=target.parent_sql, kt=target.key_type_sql),
        (list(keys),), prepare=False).fetchall()
    return {k: (text, h) for k, text, h in rows}


def plan(conn: psycopg.Connection, target: ChunkTarget, docs: Mapping[str, tuple[str | None, bytes | None]],
         splitter: Splitter, model_key: str) -> ChunkPlan:
    """The chunking of each document and which chunk texts need a vector (see module doc)."""
    result = ChunkPlan(model_key, splitter.key)
    current = {k: (h, m, s, n) for k, h, m, s, n in conn.execute(
        sql.SQL("""select c.{key}::text, (array_agg(c.source_hash))[1], (array_agg(c.model))[1],
                          (array_agg(c.splitter))[1], count(*)
                   from {chunks} c where c.{key} = any(%s::text[]::{kt}[]) group by 1""").format(
            key=target.key_sql, chunks=target.chunks_sql, kt=target.key_type_sql),
        (list(docs),), prepare=False).fetchall()}
    wanted: dict[bytes, str] = {}
    for key, (text, input_hash) in docs.items():
        pieces = splitter.split(text)
        doc = DocumentPlan(input_hash, [Chunk(i, c, chunk_hash(c)) for i, c in enumerate(pieces)])
        have = current.get(key)
        if (have is None and not pieces) or (
                have is not None and have[:3] == (input_hash, model_key, splitter.key) and have[3] == len(pieces)):
            result.unchanged.append(key)
            continue
        result.documents[key] = doc
        for c in doc.chunks:
            wanted.setdefault(c.hash, c.text)
    if wanted:
        known = {bytes(h) for (h,) in conn.execute(
            sql.SQL("select distinct chunk_hash from {chunks} where model = %s and chunk_hash = any(%s)").format(
                chunks=target.chunks_sql), (model_key, list(wanted)), prepare=False).fetchall()}
        result.reused = known
        result.to_embed = {h: t for h, t in wanted.items() if h not in known}
    return result


# -- write --------------------------------------------------------------------------------------
@dataclass
class WriteStats:
    written: list[str] = field(default_factory=list)  # documents whose chunk set was replaced
    busy: list[str] = field(default_factory=list)  # parent row locked by someone else: not waited for
    stale: list[str] = field(default_factory=list)  # input changed since the plan: not written
    gone: list[str] = field(default_factory=list)  # parent row deleted (its chunks went with it)
    missing: list[str] = field(default_factory=list)  # a chunk's vector was not given (embedding failed)
    ambiguous: dict[str, int] = field(default_factory=dict)  # keys matching several parent rows: not written
    chunks_embedded: int = 0  # chunk rows written with a vector embedded for this plan
    chunks_reused: int = 0  # chunk rows written with a vector that was already in the table
    chunks_deleted: int = 0  # chunk rows of the replaced sets


def write(conn: psycopg.Connection, target: ChunkTarget, plan: ChunkPlan,
          vectors_by_hash: Mapping[bytes, np.ndarray | None], model_key: str) -> WriteStats:
    """Replace the chunk sets of the planned documents, in the caller's transaction (see module doc)."""
    if plan.model != model_key:
        raise ValueError(f"the plan was made for model {plan.model!r}, not {model_key!r}")
    stats = WriteStats()
    keys = list(plan.documents)
    if not keys:
        return stats
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and conn.autocommit:
        raise RuntimeError("chunks.write() must run inside a transaction (with conn.transaction(): ...)")
    fmt = dict(key=target.key_sql, fn=target.function_sql, parent=target.parent_sql, kt=target.key_type_sql,
               chunks=target.chunks_sql)
    # The application never waits for the write of a chunk set, however large: the new sets are
    # inserted (with their vector index entries: seconds for thousands of chunks) inside a
    # savepoint holding no lock on the parent rows and none on their old chunk rows (the chunk
    # table's key is deferrable, so the new rows go in before the old ones are deleted): the
    # application's UPDATE, DELETE, key change or SELECT FOR UPDATE of a parent goes through, and
    # the parent's own triggers delete or move its old chunks unhindered. Then the parents are
    # locked FOR KEY SHARE (key order, waiting at most GUARD_WAIT) and their input checked, and the
    # old sets are deleted: the application's DELETE or key change of such a parent waits for that
    # delete (it would delete or move those very rows), its UPDATE does not. Last, the stale-write
    # guard takes the parents' FOR UPDATE locks and checks again that each parent's input is still
    # the one the set was made from; a parent that changed, is held by another transaction or is
    # gone (deleted, re-keyed) meanwhile undoes the savepoint: its new set never lands, and the
    # others are written again without it (at most WRITE_ROUNDS rounds, then the rest waits for the
    # next claim, busy). From the guard to the settle's commit the application's UPDATE of such a
    # row waits: a few statements, never the write nor the delete of the old set
    # (bench/bench_settle_wait.py). One drain writes a document at a time (a transaction-level
    # advisory lock per chunk table and key; the application never takes it).
    rows = conn.execute(sql.SQL(
        """select t.{key}::text, autoembed.content_hash({fn}(t)::text) from {parent} t
           where t.{key} = any(%s::text[]::{kt}[])""").format(**fmt),
        (keys,), prepare=False).fetchall()
    stats.ambiguous = ambiguous_keys(k for k, _ in rows)  # the key lost its uniqueness: write nothing for them
    now = {k: h for k, h in rows if k not in stats.ambiguous}
    stats.gone = [k for k in keys if k not in now and k not in stats.ambiguous]
    candidates = [k for k in keys if k in now]
    mine = {k for (k,) in conn.execute(
        "select k from unnest(%s::text[]) k where pg_try_advisory_xact_lock(hashtextextended(%s || k, 0))",
        (candidates, f"autoembed.chunks:{regclass_of(target)}:"), prepare=False).fetchall()}
    stats.busy = [k for k in candidates if k not in mine]  # another drain writes it now
    fresh: list[str] = []
    for k in candidates:
        if k not in mine:
            continue
        doc = plan.documents[k]
        if now[k] != doc.input_hash:
            stats.stale.append(k)
        elif any(c.hash not in plan.reused and vectors_by_hash.get(c.hash) is None for c in doc.chunks):
            stats.missing.append(k)
        else:
            fresh.append(k)
    for _ in range(WRITE_ROUNDS):
        if not fresh:
            break
        round_keys = list(fresh)
        with conn.transaction():  # a savepoint: undone when the guard finds a parent changed, held or gone
            fresh, written_rows, embedded, new_rows = _write_sets(conn, target, plan, vectors_by_hash, model_key,
                                                                  fresh, stats, fmt)
            # The old sets go under KEY SHARE locks on their parents: the application's DELETE or
            # key change (whose triggers delete or move those rows) waits for them, its UPDATE of
            # the row does not. Then the stale-write guard proper: FOR UPDATE, to the commit.
            late_busy, late_stale, late_gone = _guard(conn, fresh, plan, fmt, "key share")
            if not (late_busy or late_stale or late_gone):
                stats.chunks_deleted += _drop_old_sets(conn, target, fresh, new_rows)
                late_busy, late_stale, late_gone = _guard(conn, fresh, plan, fmt, "update")
            if late_busy or late_stale or late_gone:
                stats.missing = [k for k in stats.missing if k not in round_keys]  # found again next round
                stats.gone = [k for k in stats.gone if k not in round_keys]
                stats.busy = [k for k in stats.busy if k not in round_keys]
                raise psycopg.Rollback()
        if late_busy or late_stale or late_gone:
            stats.busy.extend(late_busy)
            stats.stale.extend(late_stale)
            stats.gone.extend(late_gone)  # its chunks went with it (the parent's triggers)
            fresh = [k for k in fresh if k not in late_busy and k not in late_stale and k not in late_gone]
            continue
        fresh_hashes = {h for h, _ in embedded}
        stats.chunks_embedded = sum(1 for k in fresh for c in plan.documents[k].chunks if c.hash in fresh_hashes)
        stats.chunks_reused = written_rows - stats.chunks_embedded
        stats.written = fresh
        return stats
    stats.busy.extend(fresh)  # (still changing after WRITE_ROUNDS rounds: the next claim)
    return stats


def _guard(conn: psycopg.Connection, keys: list[str], plan: ChunkPlan, fmt: dict,
           strength: str) -> tuple[list[str], list[str], list[str]]:
    """Lock the parents of documents `keys` FOR `strength` (_guard_locks) and check their input
    against the plan's. Returns the documents that cannot be written now: (busy: held by another
    transaction; stale: input changed; gone: deleted or re-keyed meanwhile)."""
    locked = _guard_locks(conn, keys, fmt, strength)
    busy = [k for k in keys if k not in locked]
    stale = [k for k in keys if k in locked and locked[k] != plan.documents[k].input_hash]
    gone: list[str] = []
    if busy:
        # Not locked: deleted (or re-keyed) by the application meanwhile, or held by it.
        still = {k for (k,) in conn.execute(sql.SQL(
            "select t.{key}::text from {parent} t where t.{key} = any(%s::text[]::{kt}[])").format(**fmt),
            (busy,), prepare=False).fetchall()}
        gone = [k for k in busy if k not in still]
        busy = [k for k in busy if k in still]
    return busy, stale, gone


WRITE_ROUNDS = 3
GUARD_WAIT = "100ms"  # how long the guard waits for a parent row an application's statement holds


def _guard_locks(conn: psycopg.Connection, keys: list[str], fmt: dict, strength: str = "update") -> dict[str, bytes]:
    """The stale-write guard's locks (FOR UPDATE, or FOR KEY SHARE while the old sets are
    deleted): key -> current content hash of the parents it locked. It waits at most GUARD_WAIT
    for a row an application's statement holds (a one-row UPDATE commits in milliseconds; the
    drain, not the application, waits); a row held longer is left out (busy), the others are
    locked (SKIP LOCKED)."""
    query = sql.SQL(
        """select t.{key}::text, autoembed.content_hash({fn}(t)::text) from {parent} t
           where t.{key} = any(%s::text[]::{kt}[]) order by t.{key} for {strength}{skip}""")
    fmt = dict(fmt, strength=sql.SQL({"update": "update", "key share": "key share"}[strength]))
    prior = conn.execute("select current_setting('lock_timeout')").fetchone()[0]
    conn.execute("select set_config('lock_timeout', %s, true)", (GUARD_WAIT,))
    try:
        with conn.transaction():
            return dict(conn.execute(query.format(skip=sql.SQL(""), **fmt), (keys,), prepare=False).fetchall())
    except psycopg.errors.LockNotAvailable:
        return dict(conn.execute(query.format(skip=sql.SQL(" skip locked"), **fmt), (keys,), prepare=False).fetchall())
    finally:
        conn.execute("select set_config('lock_timeout', %s, true)", (prior,))


def _write_sets(conn: psycopg.Connection, target: ChunkTarget, plan: ChunkPlan,
                vectors_by_hash: Mapping[bytes, np.ndarray | None], model_key: str, fresh: list[str],
                stats: WriteStats, fmt: dict) -> tuple[list[str], int, list, list]:
    """Write the new chunk sets of documents `fresh` (no lock on their parents: see write). Returns
    (the documents written: those whose reused vectors are all still there, the chunk rows
    written, the (hash, vector) pairs embedded for them, the new rows' ctids); documents deferred
    are added to stats.missing and stats.chunks_deleted counts the old rows deleted already (a
    chunk table whose key is not deferrable: its old rows go first)."""
    needed = {c.hash for k in fresh for c in plan.documents[k].chunks}
    embedded = [(h, vectors_by_hash[h]) for h in needed if h not in plan.reused]
    rows = [(k, c.index, c.text, c.hash, plan.documents[k].input_hash) for k in fresh for c in plan.documents[k].chunks]
    # One call of the target's write function (sql/019): the chunk table's triggers run with its
    # owner's rights, never the drain's. It deletes the old sets and inserts the new ones, each
    # chunk's vector the embedded one or, reused, one the table holds under the model (a document
    # whose reused vector vanished since the plan is `lost`: it waits for the next round).
    deleted, inserted, lost, new_rows = write_as_owner(
        conn, "write_chunk_rows", regclass_of(target), None, None,
        "%s::regclass, %s::text[], %s::text[], %s::integer[], %s::text[], %s::bytea[], %s::bytea[], %s::bytea[], %b::"
        + ("halfvec" if target.vector_type == "halfvec" else "vector") + "[], %s, %s",
        (regclass_of(target), fresh, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
         [r[3] for r in rows], [r[4] for r in rows], [h for h, _ in embedded],
         vector_array(conn, target.vector_type, encode_vectors(target, [v for _, v in embedded])),
         model_key, plan.splitter))
    if lost:
        stats.missing.extend(lost)
        fresh = [k for k in fresh if k not in set(lost)]
    stats.chunks_deleted = deleted
    return fresh, inserted, embedded, new_rows


def _drop_old_sets(conn: psycopg.Connection, target: ChunkTarget, keys: list[str], new_rows: list) -> int:
    """The old chunk rows of documents `keys` (all but `new_rows`), deleted after the guard
    (through the target's write function, sql/019). Returns the rows deleted."""
    if not keys:
        return 0
    return write_as_owner(conn, "drop_old_chunk_rows", regclass_of(target), None, None,
                          "%s::regclass, %s::text[], %s::tid[]", (regclass_of(target), keys, new_rows))[0]


def write_isolating(conn: psycopg.Connection, target: ChunkTarget, plan: ChunkPlan,
                    vectors_by_hash: Mapping[bytes, np.ndarray | None], model_key: str,
                    check: Callable[[], None] | None = None) -> tuple[WriteStats, dict[str, str]]:
    """write(), with a document whose write fails (a trigger or constraint of the chunk table, a
    content function raising for its parent, a revoked grant) failing alone: the others are
    written in the same transaction (targets.badrows.write_isolating). Returns (what was written,
    {document key: why it failed})."""
    from .badrows import write_isolating as isolate

    def part(keys: list[str]) -> WriteStats:
        return write(conn, target, replace(plan, documents={k: plan.documents[k] for k in keys}),
                     vectors_by_hash, model_key)

    parts, failed = isolate(conn, list(plan.documents), part, check=check)
    total = WriteStats()
    for w in parts:
        for name in ("written", "busy", "stale", "gone", "missing"):
            getattr(total, name).extend(getattr(w, name))
        total.ambiguous.update(w.ambiguous)
        total.chunks_embedded += w.chunks_embedded
        total.chunks_reused += w.chunks_reused
        total.chunks_deleted += w.chunks_deleted
    return total, {k: f"writing its chunk set into {target.chunk_table} failed: {why}" for k, why in failed}


# -- coverage and promotion (model migrations) -------------------------------------------------
def coverage(conn: psycopg.Connection, target: ChunkTarget, model_key: str, splitter_key: str,
             shard: int | None = None, shards: int | None = None) -> Coverage:
    """Documents (of one shard, or all) whose chunk set is the chunking of their current input
    under `model_key` and `splitter_key`, out of those with input."""
    return document_counts(conn, target, model_key, splitter_key, shard, shards).coverage


@dataclass(frozen=True)
class DocumentCounts:
    coverage: Coverage  # documents with a current chunk set, of those with input
    without_chunks: int  # documents with input and no chunk set (pending, or never queued)
    stale: int  # documents whose chunk set is not the chunking of their current input under the model


def document_counts(conn: psycopg.Connection, target: ChunkTarget, model_key: str, splitter_key: str,
                    shard: int | None = None, shards: int | None = None) -> DocumentCounts:
    """One scan of the parent table (content hash per row) against each document's chunk set. Rows
    whose content function raises are counted apart (targets.badrows.scan_isolating)."""
    from .badrows import input_lateral, scan_isolating

    def query(safe: bool) -> sql.Composable:
        return sql.SQL(
            """select count(*), count(*) filter (where x.embeddable),
                      count(*) filter (where x.embeddable and x.current),
                      count(*) filter (where x.embeddable and x.source_hash is null),
                      count(*) filter (where x.source_hash is not null and not (x.embeddable and x.current)),
                      count(*) filter (where x.error is not null),
                      min('key ' || x.k::text || ': ' || x.error)
               from (select y.*, coalesce(y.source_hash = y.h and y.model = %(model)s and y.splitter = %(splitter)s,
                                          false) as current
                     from (select t.{key} as k, autoembed.content_hash(i.input) as h, i.error,
                                  coalesce(btrim(i.input), '') <> '' as embeddable, s.*
                           from {parent} t {lateral}
                           left join lateral (select c.source_hash, c.model, c.splitter from {chunks} c
                                              where c.{key} = t.{key} limit 1) s on true
                           where %(shards)s::integer is null
                              or autoembed.shard_of(t.{key}::text, %(shards)s) = %(shard)s) y) x""").format(
            key=target.key_sql, parent=target.parent_sql, chunks=target.chunks_sql,
            lateral=input_lateral(conn, target.function_sql, "t", safe))

    rows, embeddable, current, without, stale, unreadable, error = scan_isolating(
        conn, query, {"model": model_key, "splitter": splitter_key, "shard": shard, "shards": shards})
    return DocumentCounts(Coverage(rows, embeddable, current, unreadable, error), without, stale)


def shadow_name(target: ChunkTarget) -> str:
    from .shadow import suffixed

    return suffixed(target.chunk_table, "__next")


def old_table(conn: psycopg.Connection, target: ChunkTarget) -> str | None:
    """The previous live table a promotion kept (`<chunk table>__old`), if it still exists."""
    row = conn.execute("select c.relname::text from pg_class c where c.oid = autoembed.old_chunk_table(%s::regclass)",
                       (regclass_of(target),)).fetchone()
    return row[0] if row else None


def create_shadow(conn: psycopg.Connection, target: ChunkTarget, *, vector_type: str | None = None,
                  dimensions: int | None = None) -> ChunkTarget:
    """The shadow chunk table a backfill to another model writes into (same parent, any size),
    with the vector indexes of the live table rebuilt at its own type (see copy_vector_indexes)."""
    create_chunk_table(conn, target.schema, target.table, key_column=target.key_column,
                       vector_type=vector_type or target.vector_type,
                       dimensions=dimensions or target.dimensions, chunk_table=shadow_name(target))
    shadow = resolve_chunk_target(conn, target.schema, target.table, target.function,
                                  key_column=target.key_column, chunk_table=shadow_name(target))
    copy_vector_indexes(conn, target, shadow)
    return shadow


def copy_vector_indexes(conn: psycopg.Connection, live: ChunkTarget, shadow: ChunkTarget) -> list[str]:
    """Give the shadow the live table's plain vector indexes (method, operator class for its own
    vector type, options such as m = 32) instead of the default HNSW it was created with, so the
    promotion swaps in the index the live table had. A live table with none keeps the default.
    Returns the indexes created."""
    from .shadow import column_indexes, opclass_for, with_options

    def shape(ix, vector_type: str) -> tuple:
        return ix.method, opclass_for(ix.opclass, vector_type), tuple(sorted(ix.options or ()))

    wanted = {shape(ix, shadow.vector_type): ix for ix in column_indexes(conn, regclass_of(live), VECTOR_COLUMN)
              if ix.simple}
    have = {shape(ix, shadow.vector_type): ix for ix in column_indexes(conn, regclass_of(shadow), VECTOR_COLUMN)}
    if not wanted or wanted.keys() == have.keys():
        return []
    made = []
    for key, ix in wanted.items():
        method, opclass, _ = key
        if key in have or conn.execute("select 1 from pg_opclass where opcname = %s", (opclass,)).fetchone() is None:
            continue  # already there, or no such operator class for this vector type
        conn.execute(sql.SQL("create index on {} using {} ({} {}){}").format(
            shadow.chunks_sql, sql.Identifier(method), sql.Identifier(VECTOR_COLUMN), sql.Identifier(opclass),
            with_options(ix)))
        made.append(f"{method} ({opclass})")
    if made or wanted.keys() & have.keys():  # the default goes only when a copy replaces it
        for key, ix in have.items():
            if key not in wanted:
                conn.execute(sql.SQL("drop index {}").format(sql.Identifier(ix.schema, ix.name)))
    return made


def promote(conn: psycopg.Connection, live: ChunkTarget, shadow: ChunkTarget, model_key: str, splitter_key: str,
            *, force: bool = False) -> str:
    """Swap the shadow in for the live chunk table in one transaction, when every document's
    shadow chunk set is current (or `force`). Returns the old table's name (kept for rollback)."""
    with conn.transaction():
        if not force:
            cov = coverage(conn, shadow, model_key, splitter_key)
            if not cov.complete:
                raise TargetError(f"{shadow.label}: {cov.missing} of {cov.embeddable} documents have no current "
                                  f"chunk set under {model_key}: finish the backfill, or promote with force")
        # (and the registry's chunk target follows the live table: sql/012)
        old = conn.execute("select autoembed.promote_chunk_target(%s::regclass, %s::regclass)::text",
                           (regclass_of(live), regclass_of(shadow))).fetchone()[0]
    return old


def regclass_of(target: ChunkTarget) -> str:
    return sql.Identifier(target.schema, target.chunk_table).as_string(None)


# -- one round, for callers without a queue (backfill, CLI, demo, tests) ------------------------
@dataclass
class Prepared:
    """Documents read, planned and embedded, not written yet (`prepare`)."""

    plan: ChunkPlan
    vectors: dict[bytes, np.ndarray]  # chunk hash -> its new vector (the good ones)
    tokens: int  # as the provider reported them
    errors: dict[bytes, str]  # chunk hash -> why its embedding failed (or its vector cannot be held)
    unreadable: dict[str, str]  # document key -> why its input could not be read

    def failed_documents(self) -> dict[str, str]:
        """Planned documents with a chunk whose embedding failed: key -> why (never written in part)."""
        failed = {}
        for k, doc in self.plan.documents.items():
            bad = next((c for c in doc.chunks if c.hash in self.errors), None)
            if bad is not None:
                failed[k] = f"chunk {bad.index}: {self.errors[bad.hash]}"
        return failed


def prepare(conn: psycopg.Connection, target: ChunkTarget, keys: list[str], splitter: Splitter,
            embedder: Embedder) -> Prepared:
    """Read the documents `keys` (one whose content function raises fails alone), plan their chunk
    sets and embed what is new. A refusal every request would get raises ProviderConfigError."""
    from .badrows import check_vectors, describe, read_isolating

    model = embedder.identity.key
    docs, unreadable = read_isolating(
        conn, keys, lambda part: read_documents(conn, target, part),
        lambda k, exc: f"reading its input with {target.function} failed: {describe(exc)}")
    p = plan(conn, target, docs, splitter, model)
    out = embedder.embed(p.texts)
    if out.refusal is not None:
        raise ProviderConfigError(f"the provider refused the chunks of {target.label}: {out.refusal} "
                                  "(fix the key or the model, then re-run: nothing of this page was written)")
    # Each chunk's vector on its own (targets.badrows): a bad one fails its document alone.
    vectors = list(out.vectors)
    errors = {h: str(e) for h, e in zip(p.hashes, out.errors) if e is not None}
    for h, problem in zip(p.hashes, check_vectors(target.vector_type, target.dimensions, vectors)):
        if problem is not None:
            errors[h] = problem
    return Prepared(p, {h: v for h, v in zip(p.hashes, vectors) if h not in errors}, out.tokens, errors, unreadable)


@dataclass
class SyncResult:
    plan: ChunkPlan
    stats: WriteStats
    tokens: int  # as the provider reported them
    errors: dict[bytes, str]  # chunk hash -> why its embedding failed
    failed: dict[str, str] = field(default_factory=dict)  # document key -> why it was not written


def sync(conn: psycopg.Connection, target: ChunkTarget, keys: list[str], splitter: Splitter,
         embedder: Embedder) -> SyncResult:
    """Bring the chunk sets of `keys` up to date: read, plan, embed what is new (prepare), write (one
    transaction). The drain and the backfill write a prepared page through
    core.targets.writes.ChunkWrite instead."""
    page = prepare(conn, target, keys, splitter, embedder)
    with conn.transaction():
        stats, failed = write_isolating(conn, target, page.plan, page.vectors, page.plan.model)
    failed.update(page.unreadable)
    stats.missing.extend(failed)
    failed.update(page.failed_documents())
    return SyncResult(page.plan, stats, page.tokens, page.errors,
                      {k: f"{target.label} key {k}: {why}" for k, why in failed.items()})
