"""Model changes in Dagster: a partitioned re-embed asset per pipeline, the `backfill` job that fans
out one run per shard, the `model_migration` job (promote / rollback / drop_old / abort) and a
sensor that keeps each pipeline's configured model among the asset's partitions.

Partitions: model × shard. `model` is dynamic (`<pipeline>_models`, keys like
`text-embedding-3-small@32f1`: the model's name and 4 digits of its identity
provider:model:dimensions:content_function, assets.model_partition_key) so the partitions made with
an older model stay listed, and show *stale*: the asset's code version is the configured model
identity. An instance made before these short keys holds full identities as keys: they are still
accepted, and the model-partitions sensor renames them.
`shard` is static (`0`..`n-1`, n = the pipeline's `shards`): rows where
autoembed.shard_of(key::text, n) = shard (SHA-256 of the key, see sql/007).

Everything here is a shell over core.migrate.reembed, written once for both target shapes (a vector
column, a chunk set).
"""


import json
import time
from typing import Literal, Sequence

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id
from pydantic import Field

from ..core.migrate import backfill_control
from ..core.config import ConfigError
from ..core.drain import ProviderConfigError, pipeline_resolver
from ..core.migrate.migration import MigrationError
from ..core.pipelines import Pipeline
from ..core.targets.catalog import TargetChanged, TargetError
from ..core.targets.models import ModelSpec
from . import batch_backfill
from .assets import (GROUP, SHARD_CHECK as CHECK, as_model_partition_key, embeddings_key, legacy_shards_key,
                     model_label, model_partition_key, model_version, models_partitions_name, refresh_op_name,
                     shards_key, source_key)
from .truth import configured_model_key, partition_model_key, partition_spec, table_is_current
from .resources import AutoembedResource

NO_RUN_RETRY = {"dagster/retry_on_asset_or_op_failure": "false"}
PROMOTE_TAG = "autoembed/promote"  # "false" on a run: a shard completing the migration does not promote
PIPELINE_TAG = "autoembed/pipeline"
# Failures that end the same way on every retry until the configuration changes (a wrong model or
# key, a missing table, a migration conflict): such a shard run fails once. Provider outages and
# rows that could not be embedded yet stay retried.
DETERMINISTIC_FAILURES = (ConfigError, ProviderConfigError, MigrationError, TargetChanged)


def reembed_of(p: Pipeline):
    """core.migrate.reembed.reembed_of, imported on first use: it brings every re-embed path (the
    Batch API's too), which only a shard or migration run needs, not each load of the code location."""
    from ..core.migrate.reembed import reembed_of as of

    return of(p)


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


def _shards_description(p: Pipeline) -> str:
    what, shadow = ((f"{p.schema}.{p.chunk_table} (the chunks of {p.qualified_table})",
                     f"a shadow chunk table {p.schema}.{p.chunk_table}__next, swapped in")
                    if p.chunked else (f"{p.qualified_table}.{p.embedding_column}",
                                       f"a shadow column {p.embedding_column}__next, promoted"))
    version = p.code_version()
    try:
        code = f"{model_partition_key(ModelSpec.parse(version))} = {version}"
    except ConfigError:  # sized like its column: known from the database only
        code = f"{version}, sized like the column"
    return (f"Model: {model_label(p)}. {what} re-embedded shard by shard (model × shard). A model partition "
            "is named after the model and 4 digits of its whole identity, provider:model:dimensions:content_function "
            f"(the code's: {code}; each materialization's `model` metadata names its identity in full). "
            "The code version is the configured model "
            "identity: a model change makes the materialized partitions stale. A model other than the one the "
            f"table holds is written to {shadow} atomically when complete. Shards the drain already keeps "
            "current under the code's model are reported materialized by it.")


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
        description=_shards_description(p),
        metadata={"table": p.qualified_table, **({"chunk_table": f"{p.schema}.{p.chunk_table}"} if p.chunked
                                                 else {"embedding_column": p.embedding_column}), "shards": p.shards,
                  "shard_function": f"autoembed.shard_of({p.key_column}::text, {p.shards})",
                  "partition_key": "<model>@<4 digits of provider:model:dimensions:content_function>|<shard>"},
    )
    def reembed(context: dg.AssetExecutionContext, config: ShardConfig, autoembed: AutoembedResource):
        try:
            yield from _reembed_shard(context, config, autoembed, p)
        except DETERMINISTIC_FAILURES as exc:
            fail_without_retry(context, f"partition {context.partition_key} of {p.name}", exc)
        yield from _record_completion(context, autoembed, p)

    return reembed


def _record_completion(context: dg.AssetExecutionContext, autoembed: AutoembedResource, p: Pipeline):
    """The shard that completes the re-embed (every shard of the code's model materialized, the
    table current under it) records the embeddings asset's new code version: it is no longer
    stale in the UI (defs/truth.py)."""
    from .assets import queue_key
    from .checks import evaluate
    from .truth import defined_version, provenance_tags

    model = context.partition_key.keys_by_dimension["model"]
    done = {str(k) for k in context.instance.get_materialized_partitions(shards_key(p))} | {context.partition_key}
    if any(f"{model}|{s}" not in done for s in p.shard_keys):
        return
    with autoembed.connect() as conn:
        if partition_model_key(conn, p) != as_model_partition_key(model):
            return
        outcomes = evaluate(conn, p, pipeline_resolver([p]))
        version = defined_version(context, embeddings_key(p), conn, p)
        current = table_is_current(conn, p, outcomes)
    if version and current:
        yield dg.AssetMaterialization(
            asset_key=embeddings_key(p),
            description=f"re-embed with {model} complete: every vector of {p.qualified_table} is current",
            metadata={"model": model, "completed_by": f"partition {context.partition_key}"},
            tags=provenance_tags(version, [source_key(p), queue_key(p.queue)]))


def fail_without_retry(context: dg.AssetExecutionContext | dg.OpExecutionContext, what: str, exc: Exception):
    """Fail this run once: Dagster reads the run's tags when it decides on a run retry, and this
    failure would repeat on every retry until the configuration changes."""
    context.instance.add_run_tags(context.run_id, NO_RUN_RETRY)
    raise dg.Failure(f"{what}: {exc}", allow_retries=False) from exc


def stop_shard_run(context: dg.AssetExecutionContext, p: Pipeline, why: str, metadata: dict | None = None,
                   state: str | None = None):
    """A shard run that a pause or the pipeline's window stops (before it starts, or part-way) ends
    as a failure without retry, not a success: its partition is not materialized (the rows it wrote
    stay; the next run of it continues where it stopped). The asset's page shows why: an
    observation of the partition with `backfill` = "paused (...)" / "waiting for its window (...)"."""
    context.log_event(dg.AssetObservation(asset_key=shards_key(p), partition=context.partition_key,
                                          metadata={"backfill": state or why}))
    context.instance.add_run_tags(context.run_id, NO_RUN_RETRY)
    raise dg.Failure(f"partition {context.partition_key} of {p.name} not finished: {why}; then launch the backfill "
                     "again: its shards continue where they stopped",
                     metadata={**(metadata or {}), "stopped_early": why}, allow_retries=False)


def _reembed_shard(context: dg.AssetExecutionContext, config: ShardConfig, autoembed: AutoembedResource, p: Pipeline):
    with autoembed.connect() as conn:
        held = backfill_control.hold(conn, p.name)
    if held is not None:  # before anything is planned: no migration, no shadow column
        stop_shard_run(context, p, held.message, state=held.state)
    keys = context.partition_key.keys_by_dimension
    with autoembed.connect() as conn:
        spec, shard = partition_spec(conn, p, keys["model"]), int(keys["shard"])
    if spec is None:  # a short key is the hash of a model that neither the code nor a migration names now
        why = (f"model partition {keys['model']} is neither the configured model nor one a migration of "
               f"{p.qualified_table} holds (a retired model: nothing to re-embed)")
        context.log.warning(f"partition {context.partition_key} skipped: {why}")
        yield dg.AssetCheckResult(check_name=CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                  description=f"not embedded: {why}")
        return
    promote_on = config.promote if config.promote is not None else (
        context.run.tags.get(PROMOTE_TAG, "true").lower() != "false")
    # One path for every shape and strategy: a `via: batch` pipeline's shard run submits and returns
    # (core.migrate.reembed.BatchReembed); the autoembed_batches sensor collects (defs/batch_backfill.py).
    with autoembed.connect() as conn:
        run = reembed_of(p).run_shard(conn, spec, shard, promote=promote_on, batch_rows=config.batch_rows,
                                                max_rows=config.max_rows, log=context.log.info)
    if run.skipped is not None:
        context.log.warning(f"partition {context.partition_key} skipped: {run.skipped}")
        yield dg.AssetCheckResult(check_name=CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                  description=f"not embedded: {run.skipped}")
        return
    if run.stopped is not None:  # a pause or the window stopped it part-way
        stop_shard_run(context, p, run.stopped, run.metadata)
    yield dg.MaterializeResult(
        metadata=run.metadata,
        check_results=[dg.AssetCheckResult(check_name=CHECK, passed=run.check_passed,
                                           severity=dg.AssetCheckSeverity.WARN, description=run.check_description,
                                           metadata=run.check_metadata)],
    )
    if run.failure:
        raise dg.Failure(run.failure, metadata={"errors": "\n".join(run.errors)})


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
        return reembed_of(p).needs_backfill(conn)
    except Exception:  # noqa: BLE001 - a broken pipeline (missing table...) is reported by its checks
        return None


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


def start_reembed(context, autoembed: AutoembedResource, p: Pipeline, shards: list[int] | None = None,
                  promote: bool = True) -> dict:
    """Start (or resume) the re-embed of `p` with its configured model: the migration when the table
    holds another model, then a Dagster backfill of one run per shard. Its metadata."""
    with autoembed.connect() as conn:
        held = backfill_control.hold(conn, p.name)
        if held is not None:  # refused before a migration or a shadow column exists
            raise dg.Failure(f"{held.message} (nothing launched)", allow_retries=False,
                             metadata={"pipeline": p.name, "backfill": held.state})
        reembed = reembed_of(p)
        try:
            launch = reembed.launch(conn)
        except (ConfigError, ValueError, MigrationError, TargetError) as exc:
            raise dg.Failure(f"{p.name}: {exc}", allow_retries=False) from None
        if launch.mode == "skip":
            raise dg.Failure(f"nothing to backfill: {launch.reason}", allow_retries=False)
    spec, reason, todo = launch.spec, launch.reason, launch.todo
    name, model = models_partitions_name(p), model_partition_key(spec)
    if not context.instance.has_dynamic_partition(name, model):
        context.instance.add_dynamic_partitions(name, [model])
    shard_names = p.shard_keys
    if shards is not None and not all(0 <= i < p.shards for i in shards):
        raise dg.Failure(f"shards must be in 0..{p.shards - 1} (pipeline {p.name} has {p.shards}), got {shards}",
                         allow_retries=False)
    chosen = shard_names if shards is None else [shard_names[i] for i in shards]
    partitions = [f"{model}|{s}" for s in chosen]
    backfill_id = make_new_backfill_id()
    context.instance.add_backfill(PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id,
        asset_graph=AssetGraph.from_assets([build_shards_asset(p)]),
        partition_names=partitions,
        asset_selection=[shards_key(p)],
        backfill_timestamp=time.time(),
        tags={PIPELINE_TAG: p.name, PROMOTE_TAG: str(promote).lower()},
        dynamic_partitions_store=context.instance,
        all_partitions=False,
        title=f"re-embed {p.name}: {model}",
        description=reason,
        run_config=None,
    ))
    context.log.info(f"backfill {backfill_id}: {len(partitions)} shard run(s) of {shards_key(p).to_user_string()}; "
                     f"{todo.missing} of {todo.embeddable} {reembed.noun} to embed; {reason}")
    return {"backfill_id": backfill_id, "pipeline": p.name, "model": spec.key, "model_partition": model,
            "mode": launch.mode,
            "column": launch.column, "partitions": len(partitions), "rows_to_embed": todo.missing,
            "rows_with_input": todo.embeddable, "migration_id": launch.migration_id, "via": p.backfill_via}


class RefreshConfig(dg.Config):
    start_reembed: bool = Field(
        default=True, description=("Start the re-embed when the table is not current under the code's model "
                                   "(false: only check; the queue sensor's runs)."))


def build_embeddings_asset(p: Pipeline, spec: dg.AssetSpec) -> dg.AssetsDefinition:
    """The pipeline's embeddings as an asset Dagster can call stale: the drain lane and the re-embed
    record its materializations (defs/truth.py); materializing it by hand (the UI's Materialize)
    records it when the table is current under the code's model, and otherwise starts the re-embed,
    whose last shard records it. The queue sensor runs it check-only when the recorded model is
    not the code's (defs/sensors.py)."""
    from .checks import evaluate

    @dg.multi_asset(name=refresh_op_name(p), specs=[spec.replace_attributes(skippable=True)],
                    description=f"Check {p.name}; re-embed it when the table is not current under the code's model.")
    def refresh(context: dg.AssetExecutionContext, config: RefreshConfig, autoembed: AutoembedResource):
        with autoembed.connect() as conn:
            current = table_is_current(conn, p, evaluate(conn, p, pipeline_resolver([p])))
        if current:
            yield dg.MaterializeResult(asset_key=spec.key, metadata={"current": True})
            return
        if not config.start_reembed:
            context.log.warning(f"{p.name}: the table holds vectors not made by the code's model ({spec.code_version}) "
                                f"of their current input: launch the `backfill` job (or `autoembed backfill {p.name}`) "
                                "to re-embed it")
            return
        started = start_reembed(context, autoembed, p)
        context.log.info(f"{p.name} is not current under the code's model: re-embed started ({started})")

    return refresh


def build_backfill_job(pipelines: Sequence[Pipeline]) -> dg.JobDefinition:
    @dg.op(name="launch_backfill",
           description="Start (or resume) the re-embed of a pipeline with its configured model; one run per shard.")
    def launch_backfill(context: dg.OpExecutionContext, config: BackfillConfig, autoembed: AutoembedResource):
        with autoembed.connect() as conn:
            p = _choose_pipeline(conn, pipelines, config.pipeline)
        return dg.Output(None, metadata=start_reembed(context, autoembed, p, config.shards, config.promote))

    @dg.job(name="backfill", executor_def=dg.in_process_executor,
            # A wrong pipeline name or an impossible model fails the same way on every retry.
            tags=NO_RUN_RETRY,
            description=("Re-embed a pipeline with the model its defs.yaml names: starts the zero-downtime "
                         "migration when the table holds another model, then one run per shard of its "
                         "<pipeline>_reembed asset. No config needed when one pipeline is stale. "
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
        with autoembed.connect() as conn:
            try:
                result = reembed_of(p).migration_action(conn, config.action, config.force)
            except MigrationError as exc:
                raise dg.Failure(str(exc)) from None
        if result.keep_models is not None:
            _retire_model_partitions(context.instance, p, keep=result.keep_models)
        context.log.info(result.summary)
        return dg.Output(None, metadata=result.metadata)

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
    keep = {as_model_partition_key(k) for k in keep}  # full model keys
    for key in instance.get_dynamic_partitions(name):
        try:
            kept = as_model_partition_key(key) in keep
        except ConfigError:  # a key this version cannot read
            kept = True
        if not kept:
            instance.delete_dynamic_partition(name, key)


# -- the sensor: the configured model's partitions exist as soon as the code does ----------------------------------
def rename_old_model_partitions(instance: dg.DagsterInstance, p: Pipeline) -> list[str]:
    """The model partitions an instance made before short keys (full provider:model:dimensions:
    content_function keys, cut in the UI) renamed to today's keys (assets.model_partition_key); the
    old keys' events stay in the asset's history. The old keys renamed."""
    name = models_partitions_name(p)
    renamed = []
    for key in [k for k in instance.get_dynamic_partitions(name) if ":" in k]:
        try:
            new = as_model_partition_key(key)
        except ConfigError:  # not a model this version reads: left as it is
            continue
        if not instance.has_dynamic_partition(name, new):
            instance.add_dynamic_partitions(name, [new])
        instance.delete_dynamic_partition(name, key)
        renamed.append(key)
    return renamed


def _history_under_legacy_key(instance: dg.DagsterInstance, p: Pipeline) -> bool:
    """The re-embed asset has no materialization under its key yet, but has under the key an older
    version gave it (legacy_shards_key): an upgraded instance."""
    return (instance.get_latest_materialization_event(shards_key(p)) is None
            and instance.get_latest_materialization_event(legacy_shards_key(p)) is not None)


def build_model_partitions_sensor(pipelines: Sequence[Pipeline]) -> dg.SensorDefinition:
    @dg.sensor(name="autoembed_model_partitions", minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=("Adds each pipeline's configured model to the model dimension of its re-embed asset "
                            "(and renames the full model keys of an older instance to short ones)."))
    def model_partitions(context: dg.SensorEvaluationContext, autoembed: AutoembedResource) -> dg.SensorResult:
        from ..core.drain import pipeline_resolver
        from .checks import evaluate
        from .truth import settled_shards

        requests, problems, events = [], [], []
        try:
            moved_once = set(json.loads(context.cursor or "{}").get("moved", []))
        except (ValueError, AttributeError):
            moved_once = set()
        with autoembed.connect() as conn:
            for p in pipelines:
                try:
                    renamed = rename_old_model_partitions(context.instance, p)
                    moved = p.name not in moved_once and _history_under_legacy_key(context.instance, p)
                    moved_once.add(p.name)
                    if (renamed or moved) and table_is_current(conn, p, evaluate(conn, p, pipeline_resolver([p]))):
                        # the configured model's shards under their new name: materialized, as the table is
                        why = (f"renamed from {', '.join(renamed)}" if renamed
                               else f"moved from {legacy_shards_key(p).to_user_string()}")
                        events += settled_shards(context, conn, p, why)
                    model = configured_model_key(conn, p)
                except Exception as exc:  # noqa: BLE001 - one broken pipeline must not hide the others
                    problems.append(f"{p.name}: {exc}")
                    continue
                if not context.instance.has_dynamic_partition(models_partitions_name(p), model):
                    requests.append(dg.AddDynamicPartitionsRequest(models_partitions_name(p), [model]))
        cursor = json.dumps({"moved": sorted(moved_once)})
        if not requests and not events:
            return dg.SensorResult(skip_reason="; ".join(problems) or "every configured model is registered",
                                   cursor=cursor)
        return dg.SensorResult(dynamic_partitions_requests=requests, asset_events=events, cursor=cursor)

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
    return dg.Definitions.merge(
        dg.Definitions(jobs=[build_backfill_job(pipelines), build_migration_job(pipelines)],
                       sensors=[build_model_partitions_sensor(pipelines)]),
        batch_backfill.build_batch_defs(list(pipelines)))
