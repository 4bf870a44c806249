"""Re-embeds through the provider's Batch API in Dagster (a pipeline declaring
`backfill: {via: batch}`): a shard run of `<pipeline>_reembed` submits its rows and
returns at once (defs/backfill.py over core.migrate.reembed.BatchReembed, like any shard run); the `autoembed_batches` sensor polls the open batches and launches one
`collect_batches` run per finished batch, which writes its vectors, submits again what it left
and promotes at 100%. No run waits for a batch. Everything here is a shell over core.migrate.batch_backfill.
"""


from typing import TYPE_CHECKING

import dagster as dg
from dagster import RunsFilter
from pydantic import Field

from ..core.embed.batch_api import FINISHED_STATUSES
from ..core.pipelines import Pipeline
from .assets import shards_key
from .resources import AutoembedResource
from .sensors import ACTIVE_STATUSES

if TYPE_CHECKING:  # imported where used: the code location's load (every run's start-up) needs none of it
    from ..core.migrate import batch_backfill as bb

COLLECT_JOB = "collect_batches"
BATCH_TAG = "autoembed/batch"


def batch_metadata(record: "bb.BatchRecord", stats: "bb.CollectStats | None" = None) -> dict:
    cost, saving = record.cost()
    priced = {} if cost is None else {"estimated_cost_usd": dg.MetadataValue.float(round(cost, 6)),
                                      "saving_vs_direct_usd": dg.MetadataValue.float(round(saving, 6))}
    meta = {"batch_id": record.batch_id or "", "batch_record": record.id, "status": record.status,
            "rows": record.row_count, "tokens": record.tokens, **priced}
    if stats is not None:
        meta.update(provider_status=stats.status, rows_written=stats.written + stats.direct,
                    stale_results_dropped=stats.stale, rows_resubmitted=stats.resubmit,
                    rows_dead_lettered=stats.dead,
                    collect_seconds=dg.MetadataValue.float(round(stats.seconds, 3)))
    return meta


class CollectConfig(dg.Config):
    pipeline: str = Field(description="Pipeline name.")
    batch: int = Field(description="autoembed.embedding_batches.id of the batch to collect.")
    promote: bool | None = Field(
        default=None, description="Promote the migration when this batch completes it (default: as the shard run "
                                  "that submitted it was told, `promote` of the `backfill` job).")


def build_collect_job(pipelines: list[Pipeline]) -> dg.JobDefinition:
    by_name = {p.name: p for p in pipelines}

    @dg.op(name="collect_batch", description="Write a finished batch's vectors, resubmit what it left, promote at 100%.")
    def collect_batch(context: dg.OpExecutionContext, config: CollectConfig, autoembed: AutoembedResource):
        p = by_name.get(config.pipeline)
        if p is None:
            raise dg.Failure(f"no pipeline {config.pipeline!r} declares backfill: {{via: batch}}", allow_retries=False)
        from ..core.migrate import batch_backfill as bb

        with autoembed.connect() as conn:
            done = bb.collect_and_continue(conn, p, config.batch, promote_when_complete=config.promote)
        record = done.record
        if done.stats is None:
            context.log.info(f"batch record {config.batch}: nothing to collect "
                             f"({record.status if record else 'unknown'}: not finished, collected or being collected)")
            return dg.Output(None, metadata={"batch_record": config.batch, "collected": False})
        meta = batch_metadata(record, done.stats)
        if done.resubmitted is not None:
            meta["batches_resubmitted"] = len(done.resubmitted.batches)
        if done.coverage is not None:
            meta["migration_coverage"] = dg.MetadataValue.float(round(done.coverage.ratio, 6))
        meta["promoted"] = done.promotion is not None and not done.promotion.already
        for e in done.stats.errors:
            context.log.warning(e)
        context.log.info(f"batch {record.batch_id}: {done.stats.written} written, {done.stats.stale} stale, "
                         f"{done.stats.resubmit} resubmitted, {done.stats.dead} dead-lettered")
        # Plotted on the re-embed asset's page: one observation per collected batch.
        context.log_event(dg.AssetObservation(asset_key=shards_key(p), metadata={
            k: v for k, v in meta.items() if k in ("batch_id", "rows", "tokens", "estimated_cost_usd",
                                                   "saving_vs_direct_usd", "rows_written", "status")}))
        return dg.Output(None, metadata=meta)

    @dg.job(name=COLLECT_JOB, executor_def=dg.in_process_executor,
            description="Collect one finished Batch API batch of a re-embed (launched by the autoembed_batches sensor).")
    def collect_batches():
        collect_batch()

    return collect_batches


def build_batches_sensor(pipelines: list[Pipeline]) -> dg.SensorDefinition:
    @dg.sensor(name="autoembed_batches", job_name=COLLECT_JOB, minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Polls the open Batch API batches of re-embeds; one collect run per finished batch.")
    def batches_sensor(context: dg.SensorEvaluationContext, autoembed: AutoembedResource):
        from ..core.migrate import batch_backfill as bb

        requests, notes = [], []
        with autoembed.connect() as conn:
            for p in pipelines:
                try:
                    records = bb.poll_open(conn, p)
                except Exception as exc:  # noqa: BLE001 - one pipeline's provider must not stop the others
                    notes.append(f"{p.name}: {exc}")
                    continue
                for r in records:
                    if r.status not in FINISHED_STATUSES:
                        notes.append(f"{p.name}: batch {r.batch_id} {r.status}")
                        continue
                    if context.instance.get_run_records(RunsFilter(
                            job_name=COLLECT_JOB, tags={BATCH_TAG: str(r.id)}, statuses=ACTIVE_STATUSES), limit=1):
                        continue
                    requests.append(dg.RunRequest(
                        run_config={"ops": {"collect_batch": {"config": {"pipeline": p.name, "batch": r.id}}}},
                        tags={BATCH_TAG: str(r.id), "autoembed/pipeline": p.name}))
        if not requests:
            return dg.SkipReason("; ".join(notes) or "no open batch")
        return requests

    return batches_sensor


def build_batch_defs(pipelines: list[Pipeline]) -> dg.Definitions:
    """The collect job and the sensor, when a pipeline re-embeds through the Batch API."""
    batch = [p for p in pipelines if p.backfill_via == "batch" and not p.chunked]
    if not batch:
        return dg.Definitions()
    return dg.Definitions(jobs=[build_collect_job(batch)], sensors=[build_batches_sensor(batch)])
