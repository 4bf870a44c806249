"""A re-embed through the provider's Batch API, at half the price (plain Python, no Dagster).

    submit   the rows a backfill would embed (core.backfill's scan: not current under the model,
             input not empty), minus rows already in an open batch, as JSONL files of one
             `/v1/embeddings` request per row (custom_id = target/content hash/key); each batch is
             recorded in autoembed.embedding_batches with its rows (sql/009) BEFORE it is created
             at the provider (its metadata names the record), so a crash at any point is resumed
             without a second submission
    refresh  poll the provider; the record follows its status and counts
    collect  a finished batch (completed, expired, failed, cancelled), by one collector at a time
             (an advisory lock on the record): its vectors go through the direct path's write
             (core.targets.writes: the drain's write of a vector column, row lock, content-hash guard, state) into
             the column the backfill writes (a migration's shadow column), so a row edited since
             submission keeps what the incremental path wrote and the batch's stale result is
             dropped. Lines of the error file with a 4xx are dead letters with the provider's
             reason; other failures and rows the output lacks are submitted again (at most
             `max_attempts` batches per row), or embedded directly with fallback="direct".

Where vectors go, the migration, the probe and the promotion are core.backfill's and
core.migration's (`plan`, `coverage`, `promote`): this module only replaces "embed a page".
The incremental path (the drain) never uses batches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from ..config import ConfigError, EmbedderSettings
from ..db.server import second_connection
from ..targets.badrows import check_vectors
from ..drain.loop import pin_session
from ..drain.settle import clean
from ..embed.base import Embedder, EmbeddingError
from ..embed.batch_api import FINISHED_STATUSES, BatchClient, BatchLimits, BatchUnsupported, Result
from ..health import estimated_cost
from ..pipelines import Pipeline
from ..queue import pgmq
from ..targets.catalog import INTEGER_KEY_TYPES, Target, TargetKey, resolve
from ..targets.models import ModelSpec
from ..targets.shadow import Coverage
from ..targets.vectors import encode_vectors
from ..targets.writes import ColumnWrite, act_as_drain, write_page as write_rows
from .backfill import MAX_SCAN_ROWS, ShardPlan, _candidates, embedder_for, plan
from .migration import PromoteResult, coverage, promote

log = logging.getLogger(__name__)

VIA = ("direct", "batch")
FALLBACKS = ("resubmit", "direct")
BATCH_DISCOUNT = 0.5  # OpenAI's Batch API: 50% of the synchronous price
MAX_ATTEMPTS = 3  # batches a row may be submitted in before it is dead-lettered
DEFAULT_POLL_SECONDS = 30.0
_LOCK_CLASS = 0x616562  # advisory lock class of batch collectors ("aeb")
_SCAN_PAGE = 1000
_WRITE_PAGE = 500  # collected vectors written per transaction
_METADATA_KEY = "autoembed_batch"


__all__ = ["BatchUnsupported", "BatchRecord", "check_batch_support", "submit", "collect", "run_batch_backfill"]


# -- the record ------------------------------------------------------------------------------------------
@dataclass
class BatchRecord:
    id: int
    pipeline: str
    migration_id: int | None
    schema_name: str
    table_name: str
    embedding_column: str
    content_function: str
    key_column: str
    queue: str
    model: str
    shard: int | None
    shards: int | None
    attempt: int
    status: str
    input_file_id: str | None
    batch_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    row_count: int
    input_bytes: int
    tokens: int
    completed_lines: int
    failed_lines: int
    written: int
    stale: int
    resubmit: int
    dead: int
    error: str | None
    created_at: object
    submitted_at: object
    updated_at: object
    collected_at: object
    promote: bool

    @property
    def target_key(self) -> TargetKey:
        return TargetKey(self.schema_name, self.table_name, self.content_function, self.embedding_column,
                         self.key_column)

    @property
    def open(self) -> bool:
        return self.status != "collected"

    def cost(self) -> tuple[float | None, float | None]:
        """(estimated batch cost, saving against direct calls) in US$ for the tokens it used."""
        provider, _, rest = self.model.partition(":")
        direct = estimated_cost(self.tokens, provider, rest.rsplit(":", 1)[0])
        if direct is None:
            return None, None
        return direct * BATCH_DISCOUNT, direct * (1 - BATCH_DISCOUNT)


_COLUMNS = sql.SQL(", ").join(sql.Identifier(f.name) for f in fields(BatchRecord))


def get_batch(conn: psycopg.Connection, record_id: int) -> BatchRecord | None:
    with conn.cursor(row_factory=class_row(BatchRecord)) as cur:
        return cur.execute(sql.SQL("select {} from autoembed.embedding_batches where id = %s").format(_COLUMNS),
                           (record_id,)).fetchone()


def batches(conn: psycopg.Connection, *, pipeline: str | None = None, key: TargetKey | None = None,
            model: str | None = None, open_only: bool = False) -> list[BatchRecord]:
    """Recorded batches (of a pipeline, of a target and model), oldest first."""
    where = [sql.SQL("true")]
    args: list = []
    if pipeline is not None:
        where.append(sql.SQL("pipeline = %s"))
        args.append(pipeline)
    if key is not None:
        where.append(sql.SQL("schema_name = %s and table_name = %s and embedding_column = %s"))
        args += [key.schema, key.table, key.embedding_column]
    if model is not None:
        where.append(sql.SQL("model = %s"))
        args.append(model)
    if open_only:
        where.append(sql.SQL("status <> 'collected'"))
    with conn.cursor(row_factory=class_row(BatchRecord)) as cur:
        return cur.execute(sql.SQL("select {} from autoembed.embedding_batches where {} order by id").format(
            _COLUMNS, sql.SQL(" and ").join(where)), args).fetchall()


# -- the provider -------------------------------------------------------------------------------------------
def batch_client(p: Pipeline, spec: ModelSpec, target: Target | None = None,
                 base: EmbedderSettings | None = None) -> BatchClient:
    """The Batch API client of the pipeline's model (refused for a provider that has none)."""
    what = f"pipeline {p.name}"
    if spec.provider != "openai":
        raise BatchUnsupported(f"{what}: the {spec.provider} provider has no Batch API: re-embed with --via direct "
                               "(or `backfill: {via: direct}` in its defs.yaml)")
    if target is not None:
        embedder = embedder_for(p, spec, target, base)
    else:
        from ..embed import make_embedder

        embedder = make_embedder(spec.settings(p.embedder_settings(base)), dimensions=spec.dimensions)
    return BatchClient(embedder, what)


_PROBED: dict[tuple[str, str], str | None] = {}


def check_batch_support(p: Pipeline, base: EmbedderSettings | None = None, *, cached: bool = True) -> None:
    """Refuse (BatchUnsupported) a pipeline whose provider has no Batch API: the local model, or a
    compatible server answering 404 on /v1/batches (probed once per process and URL). A server
    that cannot be reached is not refused here: the backfill itself reports it."""
    s = p.embedder_settings(base)
    what = f"pipeline {p.name}"
    if s.provider != "openai":
        raise BatchUnsupported(f"{what}: the {s.provider} provider has no Batch API: re-embed with --via direct "
                               "(or `backfill: {via: direct}` in its defs.yaml)")
    key = (s.base_url or os.environ.get("OPENAI_BASE_URL") or "openai", p.name)
    if cached and key in _PROBED:
        if _PROBED[key]:
            raise BatchUnsupported(_PROBED[key])
        return
    from ..embed import make_embedder

    try:
        client = BatchClient(make_embedder(s), what)
        client.probe()
        _PROBED[key] = None
    except BatchUnsupported as exc:
        _PROBED[key] = str(exc)
        raise
    except Exception as exc:  # noqa: BLE001 - no key, no connection: not a verdict on the API
        log.warning("%s: could not probe the Batch API: %s", what, exc)


def refuse_chunked(p: Pipeline) -> None:
    if p.chunked:
        raise BatchUnsupported(f"pipeline {p.name} is chunked: its chunk table is not re-embedded through the Batch "
                               "API (a document's chunk set is swapped whole, in one transaction): re-embed it with "
                               "--via direct (or `backfill: {via: direct}` in its defs.yaml)")


# -- custom_id --------------------------------------------------------------------------------------------
def custom_id(key: TargetKey, content_hash: bytes, row_id: str) -> str:
    """`schema.table.column/<content hash hex>/<key>`: the target, the input and the row."""
    return f"{key.label}/{content_hash.hex()}/{row_id}"


def parse_custom_id(key: TargetKey, cid: str) -> tuple[str, bytes] | None:
    """(row key, content hash) of a custom_id of `key`'s target; None when it is not one."""
    prefix = key.label + "/"
    if not cid.startswith(prefix):
        return None
    digest, sep, row_id = cid[len(prefix):].partition("/")
    try:
        return (row_id, bytes.fromhex(digest)) if sep else None
    except ValueError:
        return None


# -- submit --------------------------------------------------------------------------------------------------
@dataclass
class SubmitStats:
    batches: list[int] = field(default_factory=list)  # record ids
    rows: int = 0
    empty_input: int = 0
    in_open_batches: int = 0  # rows left out: an open batch holds them
    dead: int = 0  # rows dead-lettered: submitted max_attempts times already
    truncated: int = 0
    unreadable: int = 0  # rows left out: their content function raises (the drain dead-letters their jobs)


def _excluded(conn: psycopg.Connection, key: TargetKey, model: str, rows: list[tuple[str, str, bytes]],
              max_attempts: int) -> tuple[set[str], dict[str, str], set[str]]:
    """Of `rows` (key, input, hash): keys in an open batch; keys to dead-letter now (submitted
    max_attempts times with this input) with their last error; keys already dead-lettered with
    this input."""
    ids = [k for k, _, _ in rows]
    hashes = {k: h for k, _, h in rows}
    in_open, tries, last_error, dead = set(), Counter(), {}, set()
    for row_id, h, status, error, batch_open in conn.execute(
        """select r.row_id, r.content_hash, r.status, r.error, b.status <> 'collected'
           from autoembed.embedding_batch_rows r join autoembed.embedding_batches b on b.id = r.batch
           where b.schema_name = %s and b.table_name = %s and b.embedding_column = %s and b.model = %s
             and r.row_id = any(%s) order by r.batch""",
        (key.schema, key.table, key.embedding_column, model, ids), prepare=False):
        if batch_open:
            in_open.add(row_id)
        elif bytes(h) == hashes[row_id]:
            if status == "dead":
                dead.add(row_id)
            elif status == "retry":
                tries[row_id] += 1
                last_error[row_id] = error or "not returned"
    give_up = {k: f"gave up after {n} batch(es): {last_error[k]}" for k, n in tries.items()
               if n >= max_attempts and k not in in_open and k not in dead}
    return in_open, give_up, dead


def submit(conn: psycopg.Connection, p: Pipeline, shard_plan: ShardPlan, client: BatchClient, *,
           shard: int | None = None, shards: int | None = None, limits: BatchLimits | None = None,
           max_attempts: int = MAX_ATTEMPTS, on_batch: Callable[[BatchRecord], None] | None = None,
           promote_when_complete: bool = True) -> SubmitStats:
    """Submit every row of the plan's target (or of one shard) that lacks the model's vector of its
    current input and is in no open batch. Returns what was submitted."""
    limits = limits or BatchLimits.from_env()
    pin_session(conn)  # key text as the triggers and the drain print it
    stats = SubmitStats()
    key = shard_plan.target_key(p)
    target = resolve(conn, key)
    model = shard_plan.spec.identity_key
    lines: list[bytes] = []
    rows: list[tuple[str, bytes]] = []
    size = 0

    def flush() -> None:
        nonlocal lines, rows, size
        if rows:
            record = _create(conn, p, shard_plan, key, model, client, lines, rows, shard, shards,
                             promote_when_complete)
            stats.batches.append(record.id)
            stats.rows += len(rows)
            if on_batch:
                on_batch(record)
        lines, rows, size = [], [], 0

    after: str | None = None
    page_rows = max(1, min(_SCAN_PAGE, MAX_SCAN_ROWS // (shards or 1)))
    while True:
        scanned_to, page, unreadable = _candidates(conn, target, model, shard or 0, shards or 1, after, page_rows)
        if scanned_to is None:
            break
        after = scanned_to
        stats.unreadable += len(unreadable)  # the content function raises for them: left out (badrows)
        todo = [(k, text, bytes(h)) for k, text, h in page if text is not None and text.strip()]
        stats.empty_input += len(page) - len(todo)
        if not todo:
            continue
        in_open, give_up, dead = _excluded(conn, key, model, todo, max_attempts)
        stats.in_open_batches += len(in_open)
        if give_up:
            stats.dead += dead_letter(conn, p, target, list(give_up.items()))
            _mark_dead(conn, key, model, give_up)
        for k, text, h in todo:
            if k in in_open or k in give_up or k in dead:
                continue
            line, truncated = client.request_line(custom_id(key, h, k), text)
            stats.truncated += truncated
            if rows and (len(rows) + 1 > limits.requests or size + len(line) > limits.file_bytes):
                flush()
            if len(line) > limits.file_bytes:
                raise ConfigError(f"row {k} of {target.regclass}: one request is {len(line)} bytes, over the "
                                  f"batch file limit of {limits.file_bytes}")
            lines.append(line)
            rows.append((k, h))
            size += len(line)
    flush()
    return stats


def _create(conn: psycopg.Connection, p: Pipeline, shard_plan: ShardPlan, key: TargetKey, model: str,
            client: BatchClient, lines: list[bytes], rows: list[tuple[str, bytes]], shard: int | None,
            shards: int | None, promote_when_complete: bool) -> BatchRecord:
    """Record the batch and its rows (committed), upload its file, create it, record its id."""
    data = b"".join(lines)
    retried = conn.execute(
        """select count(*) from autoembed.embedding_batch_rows r join autoembed.embedding_batches b on b.id = r.batch
           where b.schema_name = %s and b.table_name = %s and b.embedding_column = %s and b.model = %s
             and r.status = 'retry' and r.row_id = any(%s)""",
        (key.schema, key.table, key.embedding_column, model, [k for k, _ in rows]), prepare=False).fetchone()[0]
    with conn.transaction():
        record_id = conn.execute(
            """insert into autoembed.embedding_batches
                 (pipeline, migration_id, schema_name, table_name, embedding_column, content_function, key_column,
                  queue, model, shard, shards, attempt, row_count, input_bytes, promote)
               values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) returning id""",
            (p.name, shard_plan.migration.id if shard_plan.migration and shard_plan.mode == "migration" else None,
             key.schema, key.table, key.embedding_column, key.content_function, key.key_column, p.queue, model,
             shard, shards, 2 if retried else 1, len(rows), len(data), promote_when_complete)).fetchone()[0]
        with conn.cursor().copy("copy autoembed.embedding_batch_rows (batch, row_id, content_hash) from stdin") as cp:
            for k, h in rows:
                cp.write_row((record_id, k, h))
    _send(conn, record_id, client, data)
    record = get_batch(conn, record_id)
    assert record is not None
    return record


def _send(conn: psycopg.Connection, record_id: int, client: BatchClient, data: bytes) -> None:
    """Upload and create the recorded batch; each step is recorded as soon as it is done."""
    file_id = client.upload(data, f"autoembed-batch-{record_id}.jsonl")
    conn.execute("update autoembed.embedding_batches set input_file_id = %s, updated_at = now() where id = %s",
                 (file_id, record_id))
    b = client.create(file_id, {_METADATA_KEY: str(record_id)})
    _record_status(conn, record_id, b, submitted=True)


def _record_status(conn: psycopg.Connection, record_id: int, b, submitted: bool = False) -> None:
    counts = b.request_counts
    conn.execute(
        """update autoembed.embedding_batches set batch_id = %s, status = %s, output_file_id = %s,
               error_file_id = %s, completed_lines = %s, failed_lines = %s, error = coalesce(%s, error),
               submitted_at = case when %s then coalesce(submitted_at, now()) else submitted_at end,
               updated_at = now()
           where id = %s and status <> 'collected'""",
        (b.id, b.status, b.output_file_id, b.error_file_id, counts.completed if counts else 0,
         counts.failed if counts else 0,
         "; ".join(e.message or e.code or "" for e in b.errors.data) if b.errors and b.errors.data else None,
         submitted, record_id))


def recover(conn: psycopg.Connection, client: BatchClient, record: BatchRecord) -> None:
    """A record left `preparing` by a crash: find the batch it may have created (its metadata
    names the record) or send it now. Its rows were recorded first, so they were never sent
    elsewhere; an input file uploaded without a batch is uploaded again (the old one is unused)."""
    found = client.find(_METADATA_KEY, str(record.id))
    if found is not None:
        _record_status(conn, record.id, found, submitted=True)
        return
    target = resolve(conn, record.target_key)
    lines = []
    texts = dict(_current_inputs(conn, target, [k for k, _ in _rows(conn, record.id, "pending")]))
    for k, h in _rows(conn, record.id, "pending"):
        # The text as it was submitted is not kept: send the row's current input under its old
        # hash only if it still hashes the same (else the guard would drop it anyway: re-scan it).
        current = texts.get(k)
        if current is not None and current[1] == h:
            lines.append(client.request_line(custom_id(record.target_key, h, k), current[0])[0])
    if not lines:
        _close(conn, record.id, error="recovered with nothing left to send")
        conn.execute("update autoembed.embedding_batch_rows set status = 'retry', error = 'recovered' "
                     "where batch = %s and status = 'pending'", (record.id,))
        return
    _send(conn, record.id, client, b"".join(lines))


# -- refresh and collect ----------------------------------------------------------------------------------------
def refresh(conn: psycopg.Connection, client: BatchClient, record: BatchRecord) -> BatchRecord:
    """Poll the provider for an open batch; the record as it is now."""
    if record.status == "preparing":
        recover(conn, client, record)
    elif record.open and record.batch_id and record.status not in FINISHED_STATUSES:
        _record_status(conn, record.id, client.retrieve(record.batch_id))
    now = get_batch(conn, record.id)
    assert now is not None
    return now


@dataclass
class CollectStats:
    batch: int  # record id
    status: str  # the provider's final status
    rows: int = 0
    written: int = 0
    current: int = 0  # written meanwhile with the same input (nothing to do)
    stale: int = 0  # edited after submission: the batch's result dropped
    resubmit: int = 0  # left for another batch
    direct: int = 0  # embedded directly (fallback direct)
    dead: int = 0
    tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.errors and len(self.errors) < 20:
            self.errors.append(text)


def _rows(conn: psycopg.Connection, record_id: int, status: str) -> list[tuple[str, bytes]]:
    return [(k, bytes(h)) for k, h in conn.execute(
        "select row_id, content_hash from autoembed.embedding_batch_rows where batch = %s and status = %s "
        "order by row_id", (record_id, status))]


def _set_rows(conn: psycopg.Connection, record_id: int, status: str, keys: Iterable[str],
              errors: dict[str, str] | None = None) -> None:
    keys = list(keys)
    if not keys:
        return
    errs = [clean(errors[k]) if errors and k in errors else None for k in keys]
    conn.execute(
        """update autoembed.embedding_batch_rows r set status = %s, error = u.e
           from unnest(%s::text[], %s::text[]) as u(k, e) where r.batch = %s and r.row_id = u.k""",
        (status, keys, errs, record_id), prepare=False)


def _close(conn: psycopg.Connection, record_id: int, s: CollectStats | None = None, error: str | None = None) -> None:
    conn.execute(
        """update autoembed.embedding_batches set status = 'collected', collected_at = now(), updated_at = now(),
               written = %s, stale = %s, resubmit = %s, dead = %s, tokens = greatest(tokens, %s),
               error = coalesce(%s, error) where id = %s""",
        (s.written + s.direct if s else 0, s.stale if s else 0, s.resubmit if s else 0, s.dead if s else 0,
         s.tokens if s else 0, error, record_id))


def collect(conn: psycopg.Connection, p: Pipeline, record_id: int, client: BatchClient, *,
            fallback: str = "resubmit", embedder: Embedder | None = None,
            on_rows: Callable[[int], None] | None = None) -> CollectStats | None:
    """Collect a finished batch into its column: None when it is not finished yet, already
    collected, or another collector holds it (each row is written once)."""
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")
    if not conn.execute("select pg_try_advisory_lock(%s, %s)", (_LOCK_CLASS, record_id)).fetchone()[0]:
        return None
    try:
        record = get_batch(conn, record_id)
        if record is None or not record.open:
            return None
        record = refresh(conn, client, record)
        if record.status not in FINISHED_STATUSES:
            return None
        return _collect(conn, p, record, client, fallback, embedder, on_rows)
    finally:
        conn.execute("select pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, record_id))


def _collect(conn: psycopg.Connection, p: Pipeline, record: BatchRecord, client: BatchClient, fallback: str,
             embedder: Embedder | None, on_rows: Callable[[int], None] | None) -> CollectStats:
    started = time.perf_counter()
    s = CollectStats(record.id, record.status, rows=record.row_count)
    try:
        target = resolve(conn, record.target_key)
    except Exception as exc:  # noqa: BLE001 - the shadow column was promoted or dropped meanwhile
        _set_rows(conn, record.id, "retry", [k for k, _ in _rows(conn, record.id, "pending")])
        _close(conn, record.id, s, error=f"its column is gone ({exc}): its rows are re-scanned")
        s.note(f"batch {record.batch_id}: {exc}")
        return s
    pin_session(conn)
    pending = dict(_rows(conn, record.id, "pending"))
    dead: dict[str, str] = {}
    retry: dict[str, str] = {}
    seen: set[str] = set()
    counted = threading.Lock()

    def write_page(wconn: psycopg.Connection, page: list[tuple[str, bytes, object]], records: list[bytes]) -> None:
        w = write_rows(wconn, ColumnWrite(target, [(k, h, r, []) for (k, h, _), r in zip(page, records)], record.model))
        # Not written: busy (retried), failed alone (badrows) or matching several rows: dead letters.
        busy = set(w.busy) | set(w.dead)
        # Which rows were stale is asked only when some were (the guard counted them).
        stale = _stale_keys(wconn, target, [(k, h) for k, h, _ in page if k not in busy]) if w.stale else set()
        _set_rows(wconn, record.id, "written", [k for k, _, _ in page if k not in busy and k not in stale])
        _set_rows(wconn, record.id, "stale", stale)
        with counted:
            s.written += w.written
            s.stale += w.stale
            s.current += len(page) - w.written - w.stale - len(busy)
            for k in w.busy:
                retry[k] = "the application held the row locked"
            dead.update(w.dead)  # (a row whose write failed alone, a key matching several rows)
        if on_rows:
            on_rows(len(page))

    # The output is read and parsed in a thread, a page ahead of the writes (the writes wait on
    # the database, the parse on the CPU).
    pages: queue.Queue = queue.Queue(maxsize=2)

    def produce() -> None:
        try:
            page: list[tuple[str, bytes, object]] = []
            for result in _results(client, record):
                parsed = parse_custom_id(record.target_key, result.custom_id)
                if parsed is None or parsed[0] not in pending or parsed[0] in seen:
                    s.note(f"batch {record.batch_id}: unexpected custom_id {result.custom_id!r} ignored")
                    continue
                k, h = parsed
                seen.add(k)
                if result.error is None:
                    try:
                        vector = client.embedder.parse_response(result.body or {}, 1)[0]  # type: ignore[attr-defined]
                    except EmbeddingError as exc:
                        retry[k] = str(exc)
                        continue
                    usage = (result.body or {}).get("usage")
                    s.tokens += usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
                    problem = check_vectors(target.vector_type, target.dimensions, [vector])[0]
                    if problem is not None:  # a vector the column cannot hold: this row alone (badrows)
                        dead[k] = f"key {k}: {problem}"
                        continue
                    page.append((k, h, vector))
                    if len(page) >= _WRITE_PAGE:
                        pages.put((page, encode_vectors(target, [v for _, _, v in page])))
                        page = []
                elif result.status is not None and 400 <= result.status < 500 and result.status not in (408, 409, 429):
                    dead[k] = result.error
                else:
                    retry[k] = result.error
            if page:
                pages.put((page, encode_vectors(target, [v for _, _, v in page])))
            pages.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which raises it
            pages.put(exc)

    stop = threading.Event()

    def consume(wconn: psycopg.Connection) -> None:
        """Write pages until the end of the output (each of the two writers on its own connection:
        the pages hold distinct rows, and an index insert, not the parse, bounds a write)."""
        while not stop.is_set():
            item = pages.get()
            if item is None or isinstance(item, BaseException):
                pages.put(item)  # for the other writer
                if item is not None:
                    raise item
                return
            write_page(wconn, *item)

    reader = threading.Thread(target=produce, name=f"autoembed-batch-{record.id}", daemon=True)
    second = second_connection(conn, f"the second writer of batch {record.batch_id}") if record.row_count > _WRITE_PAGE \
        else None
    helper: threading.Thread | None = None
    failure: list[BaseException] = []
    reader.start()
    try:
        if second is not None:
            pin_session(second)

            def run_second() -> None:
                try:
                    consume(second)
                except BaseException as exc:  # noqa: BLE001 - raised by the main writer below
                    failure.append(exc)
                    stop.set()

            helper = threading.Thread(target=run_second, name=f"autoembed-batch-{record.id}-w2", daemon=True)
            helper.start()
        consume(conn)
        if helper is not None:
            helper.join()
        if failure:
            raise failure[0]
    finally:
        stop.set()
        while reader.is_alive() or (helper is not None and helper.is_alive()):
            # After a failed write: unblock a reader waiting on a full queue, a writer on an empty one.
            try:
                pages.get_nowait()
            except queue.Empty:
                pass
            try:
                pages.put_nowait(None)
            except queue.Full:
                pass
            time.sleep(0.05)
        reader.join()
        if second is not None:
            second.close()
    for k in pending:
        if k not in seen:
            retry[k] = f"not in the output of batch {record.batch_id} ({record.status})"
    if dead:
        s.dead += dead_letter(conn, p, target, list(dead.items()))
        _set_rows(conn, record.id, "dead", dead, dead)
        for k, e in list(dead.items())[:3]:
            s.note(f"{target.regclass} id={k}: {e}")
    if retry and fallback == "direct":
        done = _embed_directly(conn, p, record, target, retry, embedder, s)
        _set_rows(conn, record.id, "direct", done)
        for k in done:
            retry.pop(k, None)
    s.resubmit = len(retry)
    _set_rows(conn, record.id, "retry", retry, retry)
    if retry:
        s.note(f"batch {record.batch_id}: {len(retry)} row(s) to submit again, e.g. {next(iter(retry.values()))}")
    s.seconds = time.perf_counter() - started
    _close(conn, record.id, s)
    return s


def _results(client: BatchClient, record: BatchRecord) -> Iterable[Result]:
    yield from client.results(record.output_file_id)
    yield from client.results(record.error_file_id)


def _stale_keys(conn: psycopg.Connection, target: Target, rows: list[tuple[str, bytes]]) -> set[str]:
    """Keys whose current input no longer hashes as submitted (or that are gone)."""
    current = {k: h for k, (_, h) in _current_inputs(conn, target, [k for k, _ in rows])}
    return {k for k, h in rows if current.get(k) != h}


def _current_inputs(conn: psycopg.Connection, target: Target, keys: list[str]) -> list[tuple[str, tuple[str, bytes]]]:
    if not keys:
        return []
    return [(k, (text, bytes(h))) for k, text, h in conn.execute(
        sql.SQL("""select t.{key}::text, i.input, autoembed.content_hash(i.input) from {table} t
                   cross join lateral (select {fn}(t)::text as input) i
                   where t.{key} = any(%s::text[]::{key_type}[])""").format(
            key=target.key_sql, table=target.table_sql, fn=target.function_sql, key_type=target.key_type_sql),
        (keys,), prepare=False)]


def _embed_directly(conn: psycopg.Connection, p: Pipeline, record: BatchRecord, target: Target,
                    retry: dict[str, str], embedder: Embedder | None, s: CollectStats) -> list[str]:
    """fallback=direct: embed the rows' current input with /v1/embeddings, write under the guard.
    Returns the keys settled (written, current or dead-lettered)."""
    embedder = embedder or client_embedder(record, p)
    done: list[str] = []
    inputs = [(k, text, h) for k, (text, h) in _current_inputs(conn, target, list(retry))
              if text is not None and text.strip()]
    done += [k for k in retry if k not in {k2 for k2, _, _ in inputs}]  # gone or emptied: nothing to embed
    for i in range(0, len(inputs), 256):
        chunk = inputs[i:i + 256]
        outcome = embedder.embed([t for _, t, _ in chunk])
        s.tokens += outcome.tokens
        ok = [(k, h, v) for (k, _, h), v in zip(chunk, outcome.vectors) if v is not None]
        if ok:
            w = write_rows(conn, ColumnWrite(target, [(k, h, r, []) for (k, h, _), r in
                                                      zip(ok, encode_vectors(target, [v for _, _, v in ok]))], record.model))
            s.direct += w.written
            s.stale += w.stale
            busy = set(w.busy) | set(w.dead)
            done += [k for k, _, _ in ok if k not in busy]
        bad = [(k, str(e)) for (k, _, _), e in zip(chunk, outcome.errors)
               if isinstance(e, EmbeddingError) and not e.retryable]
        if ok:
            bad += list(w.dead.items())  # a row whose write failed alone (badrows), a key matching several rows
        if bad:
            s.dead += dead_letter(conn, p, target, bad)
            _set_rows(conn, record.id, "dead", [k for k, _ in bad], dict(bad))
            for k, _ in bad:
                retry.pop(k, None)
    return done


def client_embedder(record: BatchRecord, p: Pipeline) -> Embedder:
    from ..embed import make_embedder

    spec = ModelSpec.from_identity(record.model, record.content_function)
    return make_embedder(spec.settings(p.embedder_settings()), dimensions=spec.dimensions)


def _mark_dead(conn: psycopg.Connection, key: TargetKey, model: str, give_up: dict[str, str]) -> None:
    """The last retry record of each row given up becomes `dead` (so it is not offered again)."""
    conn.execute(
        """update autoembed.embedding_batch_rows r set status = 'dead', error = u.e
           from unnest(%s::text[], %s::text[]) as u(k, e)
           where r.row_id = u.k and r.status = 'retry' and r.batch = (
               select max(b.id) from autoembed.embedding_batches b join autoembed.embedding_batch_rows x on x.batch = b.id
               where b.schema_name = %s and b.table_name = %s and b.embedding_column = %s and b.model = %s
                 and x.row_id = u.k and x.status = 'retry')""",
        (list(give_up), [clean(e) for e in give_up.values()], key.schema, key.table, key.embedding_column, model),
        prepare=False)


def dead_letter(conn: psycopg.Connection, p: Pipeline, target: Target, rows: list[tuple[str, str]]) -> int:
    """Dead letters of rows the provider refused, as the drain leaves them: a job for the row on
    its queue (Supabase's message for the column written), archived at once, with the reason in
    autoembed.dead_letters; `autoembed dead-letters --retry` puts it back for the drain."""
    if not rows:
        return 0
    integer = target.key_type in INTEGER_KEY_TYPES
    bodies = [{"id": int(k) if integer else k, "schema": target.key.schema, "table": target.key.table,
               "contentFunction": target.key.content_function, "embeddingColumn": target.key.embedding_column,
               "keyColumn": target.key.key_column} for k, _ in rows]
    with conn.transaction():
        act_as_drain(conn)
        ids = pgmq.send_batch(conn, p.queue, bodies)
        with conn.cursor() as cur:
            cur.executemany(
                """insert into autoembed.dead_letters (queue_name, msg_id, message, error, attempts)
                   values (%s, %s, %s, %s, 1) on conflict (queue_name, msg_id) do nothing""",
                [(p.queue, i, Jsonb(b), clean(f"batch re-embed: {e}")) for i, b, (_, e) in zip(ids, bodies, rows)])
        pgmq.archive(conn, p.queue, ids)
    return len(rows)


def forget_rows_of_collected(conn: psycopg.Connection, key: TargetKey, model: str) -> int:
    """After a promotion: the per-row records of the target's collected batches are of no more use
    (the batches' own records stay, for the history of what was paid)."""
    return conn.execute(
        """delete from autoembed.embedding_batch_rows r using autoembed.embedding_batches b
           where r.batch = b.id and b.status = 'collected' and b.schema_name = %s and b.table_name = %s
             and b.embedding_column = %s and b.model = %s""",
        (key.schema, key.table, key.embedding_column, model)).rowcount


def _promote(conn: psycopg.Connection, shard_plan: ShardPlan, p: Pipeline) -> PromoteResult:
    assert shard_plan.migration is not None
    result = promote(conn, shard_plan.migration)
    forget_rows_of_collected(conn, shard_plan.target_key(p), shard_plan.spec.identity_key)
    return result


# -- the whole re-embed in one process (the CLI) ------------------------------------------------------------
@dataclass
class Progress:
    """What the progress bar shows."""

    rows_to_embed: int = 0
    submitted: int = 0  # rows in batches submitted (this run and before)
    by_status: dict[str, int] = field(default_factory=dict)  # open batches by provider status
    collected_rows: int = 0  # rows written, current or stale (settled), this run
    batches_open: list[str] = field(default_factory=list)


@dataclass
class BatchBackfillResult:
    plan: ShardPlan
    submitted: SubmitStats = field(default_factory=SubmitStats)
    collected: list[CollectStats] = field(default_factory=list)
    coverage: Coverage | None = None
    promotion: PromoteResult | None = None
    open_batches: list[BatchRecord] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.collected)

    def summary(self) -> str:
        c = self.collected
        return (f"{len(self.submitted.batches)} batch(es) submitted ({self.submitted.rows} rows), {len(c)} collected: "
                f"{sum(x.written for x in c)} written, {sum(x.direct for x in c)} embedded directly, "
                f"{sum(x.current for x in c)} already current, {sum(x.stale for x in c)} stale (edited meanwhile: "
                f"the incremental path's vector kept), {sum(x.resubmit for x in c)} resubmitted, "
                f"{sum(x.dead for x in c) + self.submitted.dead} dead-lettered; {self.tokens} tokens")


def run_batch_backfill(
    conn: psycopg.Connection,
    p: Pipeline,
    spec: ModelSpec,
    *,
    fallback: str = "resubmit",
    promote_when_complete: bool = True,
    poll_seconds: float | None = None,
    wait: bool = True,
    max_attempts: int = MAX_ATTEMPTS,
    on_plan: Callable[[ShardPlan, Coverage], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    base: EmbedderSettings | None = None,
) -> BatchBackfillResult:
    """Submit, poll, collect, resubmit what came back missing, promote at 100%. `wait=False`
    returns after one round (collect what finished, submit what is not in a batch). Resumable:
    run it again after a crash or Ctrl-C; open batches are collected, never submitted again."""
    refuse_chunked(p)
    if fallback not in FALLBACKS:
        raise ConfigError(f"--fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")
    check_batch_support(p, base)  # before any migration starts
    poll = poll_seconds if poll_seconds is not None else float(os.environ.get("AUTOEMBED_BATCH_POLL_SECONDS",
                                                                              DEFAULT_POLL_SECONDS))
    shard_plan = plan(conn, p, spec, base=base)
    result = BatchBackfillResult(shard_plan)
    if shard_plan.mode == "skip":
        return result
    key = shard_plan.target_key(p)
    target = resolve(conn, key)
    client = batch_client(p, spec, target, base)
    model = spec.identity_key
    progress = Progress()
    before = coverage(conn, target, model)
    progress.rows_to_embed = before.missing
    if on_plan:
        on_plan(shard_plan, before)

    def report() -> None:
        open_now = batches(conn, key=key, model=model, open_only=True)
        progress.by_status = dict(Counter(b.status for b in open_now))
        progress.submitted = sum(b.row_count for b in open_now) + progress.collected_rows
        progress.batches_open = [b.batch_id or f"record {b.id}" for b in open_now]
        if on_progress:
            on_progress(progress)

    def on_rows(n: int) -> None:
        progress.collected_rows += n
        report()

    need_submit = True
    while True:
        for record in batches(conn, key=key, model=model, open_only=True):
            record = refresh(conn, client, record)
            if record.status in FINISHED_STATUSES:
                got = collect(conn, p, record.id, client, fallback=fallback, on_rows=on_rows)
                if got is not None:
                    result.collected.append(got)
                    need_submit = need_submit or got.resubmit > 0
        if need_submit:
            sub = submit(conn, p, shard_plan, client, max_attempts=max_attempts,
                         promote_when_complete=promote_when_complete)
            result.submitted.batches += sub.batches
            result.submitted.rows += sub.rows
            result.submitted.dead += sub.dead
            result.submitted.truncated += sub.truncated
            need_submit = False
        report()
        if not wait or not progress.batches_open:
            break
        time.sleep(poll)
    result.open_batches = batches(conn, key=key, model=model, open_only=True)
    result.coverage = coverage(conn, target, model)
    m = shard_plan.migration
    if (shard_plan.mode == "migration" and m is not None and promote_when_complete and result.coverage.complete
            and not result.open_batches):
        result.promotion = _promote(conn, shard_plan, p)
    elif shard_plan.mode == "in_place" and result.coverage.complete and not result.open_batches:
        forget_rows_of_collected(conn, key, model)
    return result


# -- one step at a time (Dagster: shard runs submit, the sensor polls, collect runs collect) ----------------
def submit_shard(conn: psycopg.Connection, p: Pipeline, spec: ModelSpec, shard: int, shards: int, *,
                 promote_when_complete: bool = True,
                 base: EmbedderSettings | None = None) -> tuple[ShardPlan, SubmitStats]:
    """Submit one shard's rows (starting the migration when needed) and return at once."""
    refuse_chunked(p)
    check_batch_support(p, base)
    shard_plan = plan(conn, p, spec, base=base)
    if shard_plan.mode == "skip":
        return shard_plan, SubmitStats()
    client = batch_client(p, spec, resolve(conn, shard_plan.target_key(p)), base)
    return shard_plan, submit(conn, p, shard_plan, client, shard=shard, shards=shards,
                              promote_when_complete=promote_when_complete)


def poll_open(conn: psycopg.Connection, p: Pipeline, *, base: EmbedderSettings | None = None) -> list[BatchRecord]:
    """Refresh the pipeline's open batches from the provider; the records as they are now."""
    out = []
    clients: dict[str, BatchClient] = {}
    for record in batches(conn, pipeline=p.name, open_only=True):
        if record.model not in clients:
            spec = ModelSpec.from_identity(record.model, record.content_function)
            clients[record.model] = batch_client(p, spec, base=base)
        out.append(refresh(conn, clients[record.model], record))
    return out


@dataclass
class Collected:
    stats: CollectStats | None  # None: not finished, already collected, or claimed by another collector
    record: BatchRecord | None
    resubmitted: SubmitStats | None = None
    coverage: Coverage | None = None
    promotion: PromoteResult | None = None


def collect_and_continue(conn: psycopg.Connection, p: Pipeline, record_id: int, *, fallback: str | None = None,
                         promote_when_complete: bool | None = None,
                         base: EmbedderSettings | None = None) -> Collected:
    """Collect one finished batch; submit again what it left (its shard); promote the migration
    when the target is complete and no batch of it is open (unless the batch was submitted with
    promote=False, or `promote_when_complete` is False)."""
    record = get_batch(conn, record_id)
    if record is None:
        raise ConfigError(f"no batch record {record_id}")
    spec = ModelSpec.from_identity(record.model, record.content_function)
    client = batch_client(p, spec, base=base)
    got = collect(conn, p, record_id, client, fallback=fallback or p.backfill_fallback)
    out = Collected(got, get_batch(conn, record_id))
    if got is None:
        return out
    shard_plan = plan(conn, p, spec, start=False, base=base)
    if shard_plan.mode == "skip":
        return out
    promote_on = record.promote if promote_when_complete is None else promote_when_complete
    if got.resubmit:
        out.resubmitted = submit(conn, p, shard_plan, client, shard=record.shard, shards=record.shards,
                                 promote_when_complete=record.promote)
    target = resolve(conn, shard_plan.target_key(p))
    out.coverage = coverage(conn, target, spec.identity_key)
    m = shard_plan.migration
    if (shard_plan.mode == "migration" and m is not None and promote_on and out.coverage.complete
            and not batches(conn, key=shard_plan.target_key(p), model=spec.identity_key, open_only=True)):
        out.promotion = _promote(conn, shard_plan, p)
    return out
