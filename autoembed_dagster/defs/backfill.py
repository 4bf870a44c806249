"""Model changes in Dagster: a partitioned re-embed asset per pipeline, the `backfill` job that fans
out one run per shard, the `model_migration` job (promote / rollback / drop_old / abort) and a
sensor that keeps each pipeline's configured model among the asset's partitions.

Partitions: model × shard. `model` is dynamic (`<pipeline>_models`, keys like
`openai:text-embedding-3-small:512:embedding_input`) so the partitions made with an older model
stay listed, and show *stale*: the asset's code version is the configured model identity.
`shard` is static (`0`..`n-1`, n = the pipeline's `shards`): rows where
autoembed.shard_of(key::text, n) = shard (SHA-256 of the key, see sql/007).

Everything here is a shell over core.migrate.backfill / core.migrate.migration.
"""


import time
from typing import Literal, Sequence

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id
from pydantic import Field

from ..core.migrate import migration as mig
from ..core.migrate.backfill import ShardResult, backfill_shard, estimated_shard_cost, migration_action, plan
from ..core.config import ConfigError
from ..core.drain import ProviderConfigError
from ..core.migrate.migration import coverage
from ..core.targets.models import ModelSpec
from ..core.targets.shadow import Coverage
from ..core.pipelines import Pipeline
from ..core.targets.catalog import TargetChanged, TargetError, resolve
from . import chunk_backfill
from .assets import GROUP, PROGRESS_EVERY_SECONDS, SHARD_CHECK as CHECK, model_version, source_key
from .resources import AutoembedResource

NO_RUN_RETRY = {"dagster/retry_on_asset_or_op_failure": "false"}
PROMOTE_TAG = "autoembed/promote"  # "false" on a run: a shard completing the migration does not promote
PIPELINE_TAG = "autoembed/pipeline"
# Failures that end the same way on every retry until the configuration changes (a wrong model or
# key, a missing table, a migration conflict): such a shard run fails once. Provider outages and
# rows that could not be embedded yet stay retried.
DETERMINISTIC_FAILURES = (ConfigError, ProviderConfigError, mig.MigrationError, TargetChanged)


def shards_key(p: Pipeline) -> dg.AssetKey:
    return dg.AssetKey(["embeddings_by_shard", f"{p.name}_embeddings_by_shard"])


def models_partitions_name(p: Pipeline) -> str:
    return f"{p.name}_models"


def reembed_job_name(p: Pipeline) -> str:
    return f"reembed_{p.name}"


def partitions_def(p: Pipeline) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({
        "model": dg.DynamicPartitionsDefinition(name=models_partitions_name(p)),
        "shard": dg.StaticPartitionsDefinition(p.shard_keys),
    })


class ShardConfig(dg.Config):
    batch_rows: int | None = Field(default=None, ge=1, description="Rows per provider request (default: the model's batch size).")
    max_rows: int | None = Field(default=None, ge=1, description="Stop after about this many vectors; a re-run resumes.")
    promote: bool | None = Field(
        default=None, description=f"Promote the migration when this shard completes it (default: run tag {PROMOTE_TAG}, else true).")


def _ratio(cov: Coverage | None) -> dg.MetadataValue | str:
    return dg.MetadataValue.float(round(cov.ratio, 6)) if cov is not None else "n/a"


def _shard_metadata(result: ShardResult, spec: ModelSpec, migration_cov: Coverage | None, promoted: bool) -> dict:
    s, cost = result.stats, estimated_shard_cost(spec, result.stats.tokens)
    priced = {} if cost is None else {"estimated_cost_usd": dg.MetadataValue.float(round(cost, 6))}
    return {
        **priced,
        "model": spec.key,
        "mode": result.plan.mode,
        "column": result.plan.column or "",
        "migration_id": result.plan.migration.id if result.plan.migration else -1,
        "shard": s.shard,
        "shards": s.shards,
        "rows_in_shard": result.coverage.rows if result.coverage else 0,
        "rows_embedded": s.embedded,
        "rows_already_current": s.current,
        "rows_empty_input": s.empty_input,
        "stale_writes_avoided": s.stale,
        "rows_failed": s.failed,
        "tokens": s.tokens,
        "requests": s.requests,
        "rows_per_second": dg.MetadataValue.float(round(s.rows_per_second, 2)),
        "seconds": dg.MetadataValue.float(round(s.seconds, 3)),
        "rate_limit_wait_seconds": dg.MetadataValue.float(round(s.limit_wait_seconds, 3)),
        "stopped_early": s.stopped or "",
        "shard_coverage": _ratio(result.coverage),
        "migration_coverage": _ratio(migration_cov),
        "promoted": promoted,
    }


def build_shards_asset(p: Pipeline, digest: str | None = None) -> dg.AssetsDefinition:
    key = shards_key(p)

    @dg.asset(
        key=key,
        partitions_def=partitions_def(p),
        code_version=model_version(p, digest),
        deps=[source_key(p)],
        group_name=GROUP,
        kinds={"pgvector"},
        output_required=False,  # a partition of a retired model is skipped, not materialized
        check_specs=[dg.AssetCheckSpec(CHECK, asset=key, description=(
            "Every row of the shard with input holds the partition model's vector of its current input."))],
        description=(
            f"{p.qualified_table}.{p.embedding_column} re-embedded shard by shard (model × shard). The code version is "
            "the configured model identity: a model change makes the materialized partitions stale. A model other "
            "than the one the column holds is written to a shadow column and promoted atomically when complete."),
        metadata={"table": p.qualified_table, "embedding_column": p.embedding_column, "shards": p.shards,
                  "shard_function": f"autoembed.shard_of({p.key_column}::text, {p.shards})",
                  "partition_key": "<model: provider:model:dimensions:content_function>|<shard>"},
    )
    def embeddings_by_shard(context: dg.AssetExecutionContext, config: ShardConfig, autoembed: AutoembedResource):
        try:
            yield from _reembed_shard(context, config, autoembed, p)
        except DETERMINISTIC_FAILURES as exc:
            fail_without_retry(context, f"partition {context.partition_key} of {p.name}", exc)

    return embeddings_by_shard


def fail_without_retry(context: dg.AssetExecutionContext | dg.OpExecutionContext, what: str, exc: Exception):
    """Fail this run once: Dagster reads the run's tags when it decides on a run retry, and this
    failure would repeat on every retry until the configuration changes."""
    context.instance.add_run_tags(context.run_id, NO_RUN_RETRY)
    raise dg.Failure(f"{what}: {exc}", allow_retries=False) from exc


def _reembed_shard(context: dg.AssetExecutionContext, config: ShardConfig, autoembed: AutoembedResource, p: Pipeline):
    keys = context.partition_key.keys_by_dimension
    spec, shard = ModelSpec.parse(keys["model"]), int(keys["shard"])
    promote_on = config.promote if config.promote is not None else (
        context.run.tags.get(PROMOTE_TAG, "true").lower() != "false")
    if p.chunked:
        yield from chunk_backfill.reembed_chunk_shard(context, spec, shard, promote_on, autoembed, p)
        return
    with autoembed.connect() as conn:
        shard_plan = plan(conn, p, spec)
        if shard_plan.mode == "skip":
            context.log.warning(f"partition {context.partition_key} skipped: {shard_plan.reason}")
            yield dg.AssetCheckResult(check_name=CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                      description=f"not embedded: {shard_plan.reason}")
            return
        context.log.info(f"shard {shard}/{p.shards} of {p.qualified_table}, {spec.key}: {shard_plan.reason}")
        last = [time.monotonic()]

        def on_batch(stats, rows):
            if time.monotonic() - last[0] >= PROGRESS_EVERY_SECONDS:
                last[0] = time.monotonic()
                context.log.info(f"shard {shard}: {stats.embedded} embedded, {stats.rows_per_second:.0f} rows/s")

        result = backfill_shard(conn, p, spec, shard, p.shards, shard_plan=shard_plan, batch_rows=config.batch_rows,
                                max_rows=config.max_rows, on_batch=on_batch)
        context.log.info(f"shard {shard}: {result.stats.summary()}")
        migration_cov, promoted = None, False
        m = result.plan.migration
        if result.plan.mode == "migration" and m is not None:
            migration_cov = coverage(conn, resolve(conn, m.shadow_key), m.model_key)
            if migration_cov.complete and promote_on:
                promotion = mig.promote(conn, m)
                promoted = not promotion.already
                if promoted:
                    context.log.info(f"migration {m.id} complete: {m.embedding_column} now holds {m.model_key} "
                                     f"(old vectors kept in {m.old_column}; {promotion.locked_seconds:.3f} s locked)")
    cov = result.coverage
    yield dg.MaterializeResult(
        metadata=_shard_metadata(result, spec, migration_cov, promoted),
        check_results=[dg.AssetCheckResult(
            check_name=CHECK, passed=result.complete, severity=dg.AssetCheckSeverity.WARN,
            description=(f"{cov.current} of {cov.embeddable} rows with input hold the {spec.identity_key} vector "
                         f"of their current input" if cov else "no coverage"),
            metadata={"coverage": _ratio(cov), "missing_rows": cov.missing if cov else 0})],
    )
    if result.stats.retryable_failures:
        raise dg.Failure(f"{result.stats.retryable_failures} row(s) could not be embedded (provider errors); "
                         "re-run this partition to resume", metadata={"errors": "\n".join(result.stats.errors)})


# -- the `backfill` job: start (or resume) a re-embed and fan it out, one run per shard ---------------------------
class BackfillConfig(dg.Config):
    pipeline: str | None = Field(
        default=None, description="Pipeline name (its defs/<name>/ folder); default: the one stale pipeline.")
    shards: list[int] | None = Field(default=None, description="Only these shards (default: all).")
    promote: bool = Field(default=True, description="Promote the migration when the last shard completes it.")


def _pipeline(pipelines: Sequence[Pipeline], name: str) -> Pipeline:
    for p in pipelines:
        if p.name == name:
            return p
    raise dg.Failure(f"no pipeline named {name!r} (declared: {', '.join(p.name for p in pipelines) or 'none'})")


def _needs_backfill(conn, p: Pipeline) -> str | None:
    """Why the table does not hold the pipeline's configured model for every row; None when it does."""
    try:
        if p.chunked:
            return chunk_backfill.needs_backfill(conn, p)
        spec = p.spec(column_dimensions=resolve(conn, p.live_key).dimensions)
        shard_plan = plan(conn, p, spec, start=False)
    except Exception:  # noqa: BLE001 - a broken pipeline (missing table...) is reported by its checks
        return None
    if shard_plan.mode != "in_place":
        return shard_plan.reason
    cov = coverage(conn, resolve(conn, shard_plan.target_key(p)), spec.identity_key)
    return None if cov.complete else f"{cov.missing} of {cov.embeddable} rows lack the {spec.identity_key} vector"


def stale_pipelines(conn, pipelines: Sequence[Pipeline]) -> dict[str, str]:
    """{pipeline name: why it is stale} for every pipeline whose table does not match its code."""
    out = {}
    for p in pipelines:
        why = _needs_backfill(conn, p)
        if why:
            out[p.name] = why
    return out


def _choose_pipeline(conn, pipelines: Sequence[Pipeline], name: str | None) -> Pipeline:
    if name:
        return _pipeline(pipelines, name)
    if len(pipelines) == 1:
        return pipelines[0]
    stale = stale_pipelines(conn, pipelines)
    if len(stale) == 1:
        return _pipeline(pipelines, next(iter(stale)))
    if not stale:
        raise dg.Failure("no pipeline is stale (every table holds its configured model): nothing to backfill; "
                         f"name one with the config `pipeline` ({', '.join(p.name for p in pipelines)}) to re-run it")
    raise dg.Failure(f"{len(stale)} pipelines are stale ({'; '.join(f'{k}: {v}' for k, v in stale.items())}): "
                     "choose one with --config-json '{\"ops\": {\"launch_backfill\": {\"config\": "
                     "{\"pipeline\": \"NAME\"}}}}'")


def build_backfill_job(pipelines: Sequence[Pipeline]) -> dg.JobDefinition:
    @dg.op(name="launch_backfill",
           description="Start (or resume) the re-embed of a pipeline with its configured model; one run per shard.")
    def launch_backfill(context: dg.OpExecutionContext, config: BackfillConfig, autoembed: AutoembedResource):
        with autoembed.connect() as conn:
            p = _choose_pipeline(conn, pipelines, config.pipeline)
            try:
                if p.chunked:  # documents into the chunk table (or its shadow): defs/chunk_backfill.py
                    spec, mode, reason, todo = chunk_backfill.launch_plan(conn, p)
                    column, migration_id = "", -1
                else:
                    spec = p.spec(column_dimensions=resolve(conn, p.live_key).dimensions)
                    # The model the code names, nothing else: a migration to it starts here when the
                    # column holds another one (after a probe embedding proves the target).
                    shard_plan = plan(conn, p, spec)
                    mode, reason, column = shard_plan.mode, shard_plan.reason, shard_plan.column or ""
                    migration_id = shard_plan.migration.id if shard_plan.migration else -1
            except (ConfigError, ValueError, mig.MigrationError, TargetError) as exc:
                raise dg.Failure(f"{p.name}: {exc}", allow_retries=False) from None
            if mode == "skip":
                raise dg.Failure(f"nothing to backfill: {reason}", allow_retries=False)
            if not p.chunked:
                todo = coverage(conn, resolve(conn, shard_plan.target_key(p)), spec.identity_key)
        name = models_partitions_name(p)
        if not context.instance.has_dynamic_partition(name, spec.key):
            context.instance.add_dynamic_partitions(name, [spec.key])
        shard_names = p.shard_keys
        if config.shards is not None and not all(0 <= i < p.shards for i in config.shards):
            raise dg.Failure(f"shards must be in 0..{p.shards - 1} (pipeline {p.name} has {p.shards}), got {config.shards}",
                             allow_retries=False)
        chosen = shard_names if config.shards is None else [shard_names[i] for i in config.shards]
        partitions = [f"{spec.key}|{s}" for s in chosen]
        backfill_id = make_new_backfill_id()
        context.instance.add_backfill(PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=AssetGraph.from_assets([build_shards_asset(p)]),
            partition_names=partitions,
            asset_selection=[shards_key(p)],
            backfill_timestamp=time.time(),
            tags={PIPELINE_TAG: p.name, PROMOTE_TAG: str(config.promote).lower()},
            dynamic_partitions_store=context.instance,
            all_partitions=False,
            title=f"re-embed {p.name}: {spec.key}",
            description=reason,
            run_config=None,
        ))
        context.log.info(f"backfill {backfill_id}: {len(partitions)} shard run(s) of {shards_key(p).to_user_string()}; "
                         f"{todo.missing} of {todo.embeddable} {'documents' if p.chunked else 'rows'} to embed; {reason}")
        return dg.Output(None, metadata={
            "backfill_id": backfill_id, "pipeline": p.name, "model": spec.key, "mode": mode,
            "column": column, "partitions": len(partitions), "rows_to_embed": todo.missing,
            "rows_with_input": todo.embeddable, "migration_id": migration_id,
        })

    @dg.job(name="backfill", executor_def=dg.in_process_executor,
            # A wrong pipeline name or an impossible model fails the same way on every retry.
            tags=NO_RUN_RETRY,
            description=("Re-embed a pipeline with the model its defs.yaml names: starts the zero-downtime "
                         "migration when the table holds another model, then one run per shard of its "
                         "embeddings_by_shard asset. No config needed when one pipeline is stale. "
                         "Config: pipeline, shards, promote."))
    def backfill():
        launch_backfill()

    return backfill


# -- the `model_migration` job -----------------------------------------------------------------------------------
class MigrationConfig(dg.Config):
    pipeline: str = Field(description="Pipeline name (its defs/<name>/ folder).")
    action: Literal["status", "promote", "rollback", "drop_old", "abort"] = Field(default="status")
    force: bool = Field(default=False, description="promote below 100% coverage; drop_old when the config names another model.")


def build_migration_job(pipelines: Sequence[Pipeline]) -> dg.JobDefinition:
    default = {"pipeline": pipelines[0].name} if len(pipelines) == 1 else {}

    @dg.op(name="model_migration_action", description="status / promote / rollback / drop_old / abort a model migration.")
    def model_migration_action(context: dg.OpExecutionContext, config: MigrationConfig, autoembed: AutoembedResource):
        p = _pipeline(pipelines, config.pipeline)
        if p.chunked:  # its shadow / old chunk tables: defs/chunk_backfill.py
            return chunk_backfill.migration_action(context, p, config.action, config.force, autoembed)
        with autoembed.connect() as conn:
            m = mig.get_migration(conn, p.schema, p.table, p.embedding_column)
            if m is None:
                if config.action != "status":
                    raise dg.Failure(f"{p.qualified_table}.{p.embedding_column} has no model migration in flight")
                return dg.Output(None, metadata={"status": "none"})
            cov = coverage(conn, resolve(conn, m.shadow_key if m.status == "backfilling" else m.live_key), m.model_key)
            meta = {"migration_id": m.id, "model": m.spec.key, "old_model": m.old_model or "", "coverage": _ratio(cov),
                    "missing_rows": cov.missing}
            try:
                m, r, configured = migration_action(conn, p, m, config.action, force=config.force)
                if r is not None:
                    meta.update(indexes=", ".join(r.indexes), notes="\n".join(r.notes),
                                locked_seconds=dg.MetadataValue.float(round(r.locked_seconds, 4)))
                if configured is not None:
                    _retire_model_partitions(context.instance, p, keep={m.spec.key, configured.key})
            except mig.MigrationError as exc:
                raise dg.Failure(str(exc)) from None
        context.log.info(f"migration {m.id} of {m.label}: {m.status}")
        return dg.Output(None, metadata={**meta, "status": m.status})

    @dg.job(name="model_migration", executor_def=dg.in_process_executor,
            config={"ops": {"model_migration_action": {"config": default}}} if default else None,
            tags=NO_RUN_RETRY,
            description="Inspect or act on a pipeline's model migration: status, promote, rollback, drop_old, abort.")
    def model_migration():
        model_migration_action()

    return model_migration


def _retire_model_partitions(instance: dg.DagsterInstance, p: Pipeline, keep: set[str]) -> None:
    """Once no column holds an old model any more, its (stale) partitions are removed from the UI."""
    name = models_partitions_name(p)
    for key in instance.get_dynamic_partitions(name):
        if key not in keep:
            instance.delete_dynamic_partition(name, key)


# -- the sensor: the configured model's partitions exist as soon as the code does ----------------------------------
def build_model_partitions_sensor(pipelines: Sequence[Pipeline]) -> dg.SensorDefinition:
    @dg.sensor(name="autoembed_model_partitions", minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Adds each pipeline's configured model to the model dimension of embeddings_by_shard.")
    def model_partitions(context: dg.SensorEvaluationContext, autoembed: AutoembedResource) -> dg.SensorResult:
        requests, problems = [], []
        with autoembed.connect() as conn:
            for p in pipelines:
                try:
                    spec = (chunk_backfill.configured_spec(conn, p) if p.chunked
                            else p.spec(column_dimensions=resolve(conn, p.live_key).dimensions))
                except Exception as exc:  # noqa: BLE001 - one broken pipeline must not hide the others
                    problems.append(f"{p.name}: {exc}")
                    continue
                if not context.instance.has_dynamic_partition(models_partitions_name(p), spec.key):
                    requests.append(dg.AddDynamicPartitionsRequest(models_partitions_name(p), [spec.key]))
        if not requests:
            return dg.SensorResult(skip_reason="; ".join(problems) or "every configured model is registered")
        return dg.SensorResult(dynamic_partitions_requests=requests)

    return model_partitions


def build_reembed_defs(p: Pipeline, digest: str | None = None) -> dg.Definitions:
    """One pipeline's partitioned re-embed asset and its job."""
    job = dg.define_asset_job(reembed_job_name(p), selection=[shards_key(p)], executor_def=dg.in_process_executor,
                              tags={PIPELINE_TAG: p.name},
                              description=f"One shard × model of {p.qualified_table} per run "
                                          f"(`dagster job backfill -j {reembed_job_name(p)} --all TRUE`).")
    return dg.Definitions(assets=[build_shards_asset(p, digest)], jobs=[job])


def build_model_change_defs(pipelines: Sequence[Pipeline]) -> dg.Definitions:
    """`backfill`, `model_migration` and the model-partitions sensor, over every pipeline."""
    if not pipelines:
        return dg.Definitions()
    return dg.Definitions(jobs=[build_backfill_job(pipelines), build_migration_job(pipelines)],
                          sensors=[build_model_partitions_sensor(pipelines)])
