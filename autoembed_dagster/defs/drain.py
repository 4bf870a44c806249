"""One drain job per queue (a "lane"): claims inside the run, calls the core drain, reports.

The run drains until the queue is empty, then keeps listening (LISTEN/NOTIFY) for `idle_timeout`
seconds so steady writes are embedded within about a second, and stops after `time_budget`
seconds (the sensor starts the next one). Pipelines sharing a queue share its lane; tables
enrolled only through SQL (Supabase's triggers) are drained with the default model.
"""


import time
from typing import Sequence

import dagster as dg
from pydantic import Field

from ..core import health
from ..core.drain import pipeline_resolver
from ..core.drain_report import ReportingDrainer, TargetStats
from ..core.health import estimated_cost, price_per_million_tokens
from ..core.pipelines import Pipeline
from ..core.targets import TargetKey
from .assets import LANE_TAG, embeddings_key, index_key
from .checks import as_check_evaluation, evaluate
from .resources import AutoembedResource

DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_TIME_BUDGET = 600.0
PROGRESS_EVERY_SECONDS = 5.0


class DrainConfig(dg.Config):
    idle_timeout: float = Field(
        default=DEFAULT_IDLE_TIMEOUT, ge=0,
        description="Once the queue is empty, wait this long for more work (LISTEN/NOTIFY) before exiting.")
    time_budget: float = Field(
        default=DEFAULT_TIME_BUDGET, gt=0,
        description="Stop claiming after this many seconds; the queue sensor starts the next run.")
    checks: bool = Field(
        default=True, description="Evaluate the health checks of the pipelines this run touched.")


def drain_job_name(queue: str) -> str:
    return f"drain_{queue}"


def _pipeline_metadata(p: Pipeline, ts: TargetStats, model_key: str | None, wall_seconds: float) -> dict:
    settings = p.embedder_settings()
    price = price_per_million_tokens(settings.provider, settings.model)
    cost = estimated_cost(ts.tokens, settings.provider, settings.model)
    return {
        "rows_embedded": ts.embedded,
        "rows_skipped": ts.skipped,
        "rows_unchanged": ts.unchanged,
        "rows_deleted": ts.deleted_rows,
        "rows_empty_input": ts.empty_input,
        "stale_writes_avoided": ts.stale,
        "rows_retried": ts.retried,
        "rows_dead_lettered": ts.dead_lettered,
        "jobs": ts.messages,
        "tokens": ts.tokens,
        "requests": ts.requests,
        "truncated_inputs": ts.truncated,
        "price_per_1m_tokens_usd": dg.MetadataValue.float(price) if price is not None else "unknown",
        "estimated_cost_usd": dg.MetadataValue.float(cost) if cost is not None else "unknown",
        "embed_latency_ms_per_batch": dg.MetadataValue.float(
            round(1000 * ts.embed_seconds / ts.batches, 1) if ts.batches else 0.0),
        "embed_seconds": dg.MetadataValue.float(round(ts.embed_seconds, 3)),
        "rows_per_second": dg.MetadataValue.float(round(ts.embedded / wall_seconds, 2) if wall_seconds > 0 else 0.0),
        "drain_seconds": dg.MetadataValue.float(round(wall_seconds, 3)),
        "model": model_key or f"{settings.provider}:{settings.model}",
    }


def _stats_table(by_table: dict, pipelines_by_table: dict) -> str:
    lines = ["| table | pipeline | jobs | embedded | skipped | retried | dead | tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, ts in sorted(by_table.items()):
        p = pipelines_by_table.get(key)
        lines.append(f"| {'.'.join(key)} | {p.name if p else '(SQL-enrolled)'} | {ts.messages} | {ts.embedded} "
                     f"| {ts.skipped} | {ts.retried} | {ts.dead_lettered} | {ts.tokens} |")
    return "\n".join(lines)


def build_drain_job(queue: str, pipelines: Sequence[Pipeline]) -> dg.JobDefinition:
    on_queue = [p for p in pipelines if p.queue == queue]
    pipelines_by_table = {(p.schema, p.table, p.embedding_column): p for p in pipelines}

    @dg.op(name=f"drain_queue_{queue}", description=f"Embed every job of pgmq queue `{queue}`.")
    def drain_op(context: dg.OpExecutionContext, config: DrainConfig, autoembed: AutoembedResource):
        settings = autoembed.settings(queue)
        resolver = pipeline_resolver(pipelines)
        with autoembed.connect() as conn:
            start = health.queue_metrics(conn, queue)
            if start is None:
                context.log.warning(f"queue {queue!r} does not exist yet (run `autoembed db init`): nothing to drain")
                yield dg.Output(None, metadata={"queue": queue, "jobs": 0})
                return
            context.log.info(f"queue {queue}: {start.depth} job(s), {start.visible} claimable, "
                             f"oldest {start.oldest_age_seconds:.0f} s")
            last_log = [time.monotonic()]

            def on_batch(batch, total):
                now = time.monotonic()
                if batch.messages and now - last_log[0] >= PROGRESS_EVERY_SECONDS:
                    last_log[0] = now
                    context.log.info(f"{total.messages} job(s) so far: {total.embedded} embedded, "
                                     f"{total.dead_lettered} dead-lettered, {total.rows_per_second:.0f} rows/s")

            drainer = ReportingDrainer(conn, settings, resolver)
            total = drainer.run(idle_timeout=config.idle_timeout, time_budget=config.time_budget, on_batch=on_batch)
            context.log.info(f"drain of {queue} done: {total.summary()}")
            for error in total.errors:
                context.log.warning(error)

            touched = [p for p in on_queue
                       if drainer.by_table.get((p.schema, p.table, p.embedding_column), TargetStats()).messages]
            for p in touched:
                ts = drainer.by_table[(p.schema, p.table, p.embedding_column)]
                target, _ = health.resolve_target(
                    conn, TargetKey(p.schema, p.table, p.content_function, p.embedding_column, p.key_column))
                model_key = None
                if target is not None:
                    try:
                        model_key = resolver(target).identity.key
                    except ValueError:
                        pass
                yield dg.AssetMaterialization(
                    asset_key=embeddings_key(p),
                    description=f"{ts.embedded} row(s) embedded by a drain of queue {queue}",
                    metadata=_pipeline_metadata(p, ts, model_key, total.seconds),
                )
                if target is not None and ts.embedded:
                    indexes = health.vector_indexes(conn, target)
                    yield dg.AssetMaterialization(
                        asset_key=index_key(p),
                        description=(f"{ts.embedded} vector(s) written into "
                                     + (", ".join(f"{i.name} ({i.method})" for i in indexes) if indexes
                                        else "no index: searches scan the table")),
                        metadata={
                            "indexes": ", ".join(f"{i.name} ({i.method})" for i in indexes) or "none",
                            "index_size_bytes": sum(i.size_bytes for i in indexes),
                            "vectors_written": ts.embedded,
                        },
                    )
                if config.checks:
                    for outcome in evaluate(conn, p, resolver):
                        yield as_check_evaluation(p, outcome)
            end = health.queue_metrics(conn, queue)

        yield dg.Output(None, metadata={
            "queue": queue,
            "jobs": total.messages,
            "rows_embedded": total.embedded,
            "rows_skipped": total.unchanged + total.deleted_rows + total.empty_input,
            "rows_retried": total.retried,
            "rows_dead_lettered": total.dead_lettered,
            "tokens": total.tokens,
            "rows_per_second": dg.MetadataValue.float(round(total.rows_per_second, 2)),
            "drain_seconds": dg.MetadataValue.float(round(total.seconds, 3)),
            "queue_depth_at_start": start.depth,
            "oldest_job_age_at_start_s": dg.MetadataValue.float(start.oldest_age_seconds),
            "queue_depth_at_end": end.depth if end else 0,
            "tables": dg.MetadataValue.md(_stats_table(drainer.by_table, pipelines_by_table)),
        })

    @dg.job(
        name=drain_job_name(queue),
        description=f"Drain lane of pgmq queue `{queue}` (started by the `{queue}_sensor`).",
        tags={
            LANE_TAG: queue,
            # Run monitoring fails a run that outlives this (e.g. its process was killed), so a dead
            # run cannot block its lane forever.
            "dagster/max_runtime_seconds": str(int(DEFAULT_TIME_BUDGET + DEFAULT_IDLE_TIMEOUT + 600)),
        },
    )
    def drain_job():
        drain_op()

    return drain_job
