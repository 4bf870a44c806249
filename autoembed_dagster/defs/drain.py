"""One drain job per queue (a "lane"): claims inside the run, calls the core drain, reports.

The run drains until the queue is empty, then keeps listening (LISTEN/NOTIFY) for `idle_timeout`
seconds so steady writes are embedded within about a second, and stops after `time_budget`
seconds (the sensor starts the next one). Pipelines sharing a queue share its lane; tables
enrolled only through SQL (Supabase's triggers) are drained with the default model.
"""


import time
from typing import Iterator, Sequence

import dagster as dg
from pydantic import Field

from ..core import health
from ..core.queue import pgmq
from ..core.drain import Drainer, DrainStats, ProviderConfigError, TableStats, pipeline_resolver, resolve_embedder
from ..core.drain.report import run_in_chunks
from ..core.health import estimated_cost, price_per_million_tokens
from ..core.pipelines import Pipeline
from ..core.drain.scaling import drain_pool
from . import truth
from .truth import table_is_current
from .assets import CONFIG_ERROR_TAG, LANE_TAG, PROGRESS_EVERY_SECONDS, embeddings_key, index_key, queue_key, source_key
from .checks import as_check_evaluation, evaluate
from .resources import AutoembedResource

DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_TIME_BUDGET = 600.0
# Run monitoring fails a drain run older than this (tag dagster/max_runtime): a hung drain cannot
# block its lane forever. Above budget + idle timeout, with room for the final report and checks.
MAX_RUNTIME_SECONDS = int(DEFAULT_TIME_BUDGET + DEFAULT_IDLE_TIMEOUT + 300)
REPORT_EVERY_SECONDS = 60.0  # a long busy drain reports at least this often
MIN_REPORT_SECONDS = 10.0  # bursts of new jobs reported at most this often (the first at once)
CHECKS_EVERY_SECONDS = 300.0  # health checks (a table scan) of a pipeline at most this often, and at the end


class DrainConfig(dg.Config):
    idle_timeout: float = Field(
        default=DEFAULT_IDLE_TIMEOUT, ge=0,
        description="Once the queue is empty, wait this long for more work (LISTEN/NOTIFY) before exiting.")
    time_budget: float = Field(
        default=DEFAULT_TIME_BUDGET, gt=0,
        description="Stop claiming after this many seconds; the queue sensor starts the next run.")
    checks: bool = Field(
        default=True, description="Evaluate the health checks of the pipelines this run touched.")
    report_every: float = Field(
        default=REPORT_EVERY_SECONDS, gt=0,
        description="Report materializations at least this often during a long drain (seconds).")


def drain_job_name(queue: str) -> str:
    return f"drain_{queue}"


def _pipeline_metadata(p: Pipeline, ts: TableStats, model_key: str | None, period_seconds: float,
                       busy_seconds: float) -> dict:
    settings = p.embedder_settings()
    price = price_per_million_tokens(settings.provider, settings.model)
    cost = estimated_cost(ts.tokens, settings.provider, settings.model)
    # Cost only where a price is known: an "unknown" entry would be a plot of nothing in the UI.
    priced = {} if price is None else {"price_per_1m_tokens_usd": dg.MetadataValue.float(price),
                                       "estimated_cost_usd": dg.MetadataValue.float(cost)}
    # A chunked pipeline: rows are its documents; only chunks whose text is new reach the provider.
    chunked = {} if not p.chunked else {
        "chunks_embedded": ts.chunks_embedded,
        "chunks_reused": ts.chunks_reused,
        "chunks_replaced": ts.chunks_deleted,
    }
    return {
        **priced,
        **chunked,
        "rows_embedded": ts.embedded,
        # Settled with no provider call: unchanged input (content hash), deleted row, empty input.
        "rows_skipped": ts.skipped,
        "stale_writes_avoided": ts.stale,
        "rows_retried": ts.retried,
        "rows_dead_lettered": ts.dead_lettered,
        "jobs": ts.rows,
        "messages": ts.messages,
        "tokens": ts.tokens,
        "requests": ts.requests,
        "truncated_inputs": ts.truncated,
        # Mean time of one embed call (a batch of texts: the provider's latency, for HTTP).
        "embed_latency_ms_per_batch": dg.MetadataValue.float(
            round(1000 * ts.embed_seconds / ts.embed_calls, 1) if ts.embed_calls else 0.0),
        "embed_seconds": dg.MetadataValue.float(round(ts.embed_seconds, 3)),
        # Rows written per second while the lane was busy (waiting for work excluded).
        "rows_per_second": dg.MetadataValue.float(round(ts.embedded / busy_seconds, 2) if busy_seconds > 0 else 0.0),
        "busy_seconds": dg.MetadataValue.float(round(busy_seconds, 3)),
        "period_seconds": dg.MetadataValue.float(round(period_seconds, 3)),
        "model": model_key or f"{settings.provider}:{settings.model}",
    }


def _stats_table(by_table: dict, pipelines_by_table: dict) -> str:
    lines = ["| table | pipeline | jobs | embedded | skipped | retried | dead | tokens | chunks embedded | chunks reused |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, ts in sorted(by_table.items()):
        p = pipelines_by_table.get(key)
        lines.append(f"| {'.'.join(key)} | {p.name if p else '(SQL-enrolled)'} | {ts.rows} | {ts.embedded} "
                     f"| {ts.skipped} | {ts.retried} | {ts.dead_lettered} | {ts.tokens} "
                     f"| {ts.chunks_embedded} | {ts.chunks_reused} |")
    return "\n".join(lines)


class _Reporter:
    """Turns the drain's per-table numbers into materializations (the work since the previous
    report) and check evaluations (at most every CHECKS_EVERY_SECONDS per pipeline, and at the end)."""

    def __init__(self, conn, queue: str, pipelines: Sequence[Pipeline], resolver, checks: bool, context=None):
        self.conn, self.queue, self.resolver, self.checks = conn, queue, resolver, checks
        self.context = context  # the op's: the instance and the loaded code versions (truth.py)
        self.on_queue = [p for p in pipelines if p.queue == queue]
        self.unreported = DrainStats()  # the pieces since the last report
        self.last_report = time.monotonic()
        self.busy_seconds = 0.0  # lane busy time since the last report
        self.last_checks: dict[str, float] = {}
        self.pending_checks: set[str] = set()
        self.settled_once = False

    def add(self, piece) -> None:
        self.unreported.add(piece.stats)
        if piece.stats.messages:
            self.busy_seconds += piece.stats.seconds  # wall time of a piece that had work

    def report(self, settled: bool, final: bool = False) -> Iterator[dg.AssetMaterialization | dg.AssetCheckEvaluation]:
        """`settled`: the queue is empty (a backlog or burst is done). A long busy stretch is
        reported per chunk; bursts at most every MIN_REPORT_SECONDS (the first one at once)."""
        now = time.monotonic()
        period, busy = now - self.last_report, self.busy_seconds
        if settled and not final and self.settled_once and period < MIN_REPORT_SECONDS:
            return  # a trickle of small bursts: folded into the next report
        changes = {key: ts for key, ts in self.unreported.by_table.items() if ts.messages}
        if changes:
            self.unreported, self.last_report, self.busy_seconds = DrainStats(), now, 0.0
        if settled:
            self.settled_once = True
        for p in self.on_queue:
            ts = changes.get(p.table_key)
            if ts is not None:
                self.pending_checks.add(p.name)
            # Checks when the queue is empty (coverage means something then), throttled: a scan.
            outcomes = None
            if self.checks and settled and p.name in self.pending_checks and (
                    final or p.name not in self.last_checks
                    or now - self.last_checks[p.name] >= CHECKS_EVERY_SECONDS):
                outcomes = evaluate(self.conn, p, self.resolver)
                self.last_checks[p.name] = now
                self.pending_checks.discard(p.name)
            current = table_is_current(self.conn, p, outcomes) if outcomes is not None else None
            if ts is not None:
                yield from self._materialize(p, ts, period, busy, current)
            for outcome in outcomes or ():
                yield as_check_evaluation(p, outcome)
            if current and self.context is not None:
                yield from truth.settled_shards(self.context, self.conn, p, f"drain run of queue {self.queue}")

    def _materialize(self, p: Pipeline, ts: TableStats, period: float, busy: float, current: bool | None = None):
        target, _ = health.pipeline_target(self.conn, p)
        model_key = None
        if target is not None:
            try:
                model_key = resolve_embedder(self.resolver, target, self.conn).identity.key
            except ValueError:
                pass
        what = (f"{ts.embedded} document(s) given their new chunk set ({ts.chunks_embedded} chunk(s) embedded, "
                f"{ts.chunks_reused} reused)" if p.chunked else f"{ts.embedded} row(s) embedded")
        version = truth.version_to_record(self.context, embeddings_key(p), current, self.conn, p) if self.context else None
        yield dg.AssetMaterialization(
            asset_key=embeddings_key(p),
            description=f"{what} by the drain lane of queue {self.queue}",
            metadata=_pipeline_metadata(p, ts, model_key, period, busy),
            tags=truth.provenance_tags(version, [source_key(p), queue_key(p.queue)]) if version else None,
        )
        written = ts.chunks_embedded + ts.chunks_reused if p.chunked else ts.embedded
        if target is not None and written:
            indexes = health.vector_indexes(self.conn, target)
            names = ", ".join(f"{i.name} ({i.method})" for i in indexes)
            yield dg.AssetMaterialization(
                asset_key=index_key(p),
                description=f"{written} vector(s) written into " + (names or "no index: searches scan the table"),
                metadata={"indexes": names or "none", "index_size_bytes": sum(i.size_bytes for i in indexes),
                          "vectors_written": written},
            )


def build_drain_job(queue: str, pipelines: Sequence[Pipeline]) -> dg.JobDefinition:
    pipelines_by_table = {p.table_key: p for p in pipelines}

    @dg.op(name=f"drain_queue_{queue}", description=f"Embed every job of pgmq queue `{queue}`.",
           pool=drain_pool(queue))  # dagster.yaml concurrency.pools caps the drains of a queue
    def drain_op(context: dg.OpExecutionContext, config: DrainConfig, autoembed: AutoembedResource):
        settings = autoembed.settings(queue)
        resolver = pipeline_resolver(pipelines)
        with autoembed.connect() as conn:
            start = pgmq.metrics(conn, queue)
            if start is None:
                context.log.warning(f"queue {queue!r} does not exist yet (run `autoembed db init`): nothing to drain")
                yield dg.Output(None, metadata={"queue": queue, "jobs": 0})
                return
            context.log.info(f"queue {queue}: {start.depth} message(s), {start.visible} claimable, "
                             f"oldest {start.oldest_age_seconds:.0f} s")
            drainer = Drainer(conn, settings, resolver)
            reporter = _Reporter(conn, queue, pipelines, resolver, config.checks, context)
            total = DrainStats()
            t0 = time.monotonic()
            last_log = [t0]

            def on_batch(batch, running):
                now = time.monotonic()
                if batch.messages and now - last_log[0] >= PROGRESS_EVERY_SECONDS:
                    last_log[0] = now
                    context.log.info(f"{total.rows + running.rows} job(s) so far: "
                                     f"{total.embedded + running.embedded} embedded, "
                                     f"{total.dead_lettered + running.dead_lettered} dead-lettered")

            # Report as the drain goes: when the backlog is drained, then at least every minute.
            try:
                for piece in run_in_chunks(drainer, idle_timeout=config.idle_timeout, time_budget=config.time_budget,
                                           chunk_seconds=config.report_every, on_batch=on_batch):
                    total.add(piece.stats)
                    reporter.add(piece)
                    yield from reporter.report(piece.settled)
            except ProviderConfigError as exc:
                # Retrying cannot help until the configuration changes: the sensor holds back the
                # next drain of this queue for a while (CONFIG_ERROR_TAG), the jobs stay queued.
                context.instance.add_run_tags(context.run_id, {CONFIG_ERROR_TAG: "true"})
                raise dg.Failure(description=str(exc), allow_retries=False) from exc
            yield from reporter.report(settled=True, final=True)
            total.seconds = time.monotonic() - t0
            context.log.info(f"drain of {queue} done: {total.summary()}")
            for error in total.errors:
                context.log.warning(error)
            end = pgmq.metrics(conn, queue)

        yield dg.Output(None, metadata={
            "queue": queue,
            "jobs": total.rows,
            "messages": total.messages,
            "rows_embedded": total.embedded,
            "chunks_embedded": total.chunks_embedded,
            "chunks_reused": total.chunks_reused,
            "rows_skipped": total.skipped,
            "rows_retried": total.retried,
            "rows_dead_lettered": total.dead_lettered,
            # Rows the application held locked at write time: taken up again, no attempt counted.
            "rows_busy": total.busy,
            "tokens": total.tokens,
            "rate_limit_wait_seconds": dg.MetadataValue.float(round(total.limit_wait_seconds, 3)),
            "run_seconds": dg.MetadataValue.float(round(total.seconds, 3)),
            "queue_depth_at_start": start.depth,
            "oldest_job_age_at_start_s": dg.MetadataValue.float(start.oldest_age_seconds),
            "queue_depth_at_end": end.depth if end else 0,
            "tables": dg.MetadataValue.md(_stats_table(total.by_table, pipelines_by_table)),
        })

    @dg.job(
        name=drain_job_name(queue),
        executor_def=dg.in_process_executor,  # one op: no step subprocess to start
        description=f"Drain lane of pgmq queue `{queue}` (started by the `{queue}_sensor`).",
        tags={
            LANE_TAG: queue,
            dg.MAX_RUNTIME_SECONDS_TAG: str(MAX_RUNTIME_SECONDS),
            # A failed drain is not re-run: the queue sensor starts the next one when it should.
            "dagster/retry_on_asset_or_op_failure": "false",
        },
    )
    def drain_job():
        drain_op()

    return drain_job
