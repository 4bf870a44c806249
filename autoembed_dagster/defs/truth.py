"""What the Dagster UI shows about a pipeline, made to say what the database holds.

- **Staleness.** Dagster marks an asset stale when its code version differs from the one recorded
  with its latest materialization (the `dagster/code_version` tag). The drain's materializations of
  `<pipeline>_embeddings` record the current code version (model + content function digest) only
  when the table holds no stale vector under it (the staleness check passed); otherwise they keep
  the version recorded before, so after a model or content-function change the asset stays stale
  ("has a new code version") until the re-embed is complete, and the shard run that completes it
  records the new version.
- **Partitions of the re-embed asset.** When a pipeline's table is current under the code's model,
  every shard partition of that model holds what a backfill would write: those not materialized
  yet are reported materialized (with a passing shard check), so the partition bar shows what the
  database holds instead of "Missing" for rows the drain embedded.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import dagster as dg
from dagster._core.definitions.data_version import (CODE_VERSION_TAG, DEFAULT_DATA_VERSION,
                                                    INPUT_DATA_VERSION_TAG_PREFIX, INPUT_EVENT_POINTER_TAG_PREFIX,
                                                    NULL_EVENT_POINTER, extract_data_provenance_from_entry)

from ..core.config import ConfigError
from ..core.pipelines import Pipeline
from ..core.targets.models import ModelSpec

STALENESS = "staleness"
NOT_CURRENT = "not current in the database"


def provenance_tags(version: str, deps: Iterable[dg.AssetKey]) -> dict[str, str]:
    """The tags Dagster reads an asset's provenance from: the code version, and the (unversioned)
    external tables and queue it depends on, so that only the code version decides staleness."""
    tags = {CODE_VERSION_TAG: version}
    for dep in deps:
        tags[f"{INPUT_DATA_VERSION_TAG_PREFIX}/{dep.to_user_string()}"] = DEFAULT_DATA_VERSION.value
        tags[f"{INPUT_EVENT_POINTER_TAG_PREFIX}/{dep.to_user_string()}"] = NULL_EVENT_POINTER
    return tags


def recorded_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The code version recorded with the asset's latest materialization (None: none recorded)."""
    event = instance.get_latest_materialization_event(key)
    provenance = extract_data_provenance_from_entry(event) if event is not None else None
    return provenance.code_version if provenance is not None else None


def defined_version(context, key: dg.AssetKey, conn=None, p: Pipeline | None = None) -> str | None:
    """The asset's code version in the definitions this run loaded; else (a job executed on its
    own) the one they would give it now: the model identity and the content function's digest."""
    try:
        graph = context.repository_def.asset_graph
        if graph.has(key):
            return graph.get(key).code_version
    except Exception:  # noqa: BLE001 - no repository around this run
        pass
    if conn is None or p is None:
        return None
    from ..core.pipelines import content_function_digest
    from .assets import model_version

    return model_version(p, content_function_digest(conn, p))


def is_current(outcomes: Sequence | None) -> bool | None:
    """From a pipeline's check outcomes: no vector of other content or another model (None: unknown)."""
    if outcomes is None:
        return None
    return all(o.passed for o in outcomes if o.name == STALENESS)


def version_to_record(context, key: dg.AssetKey, current: bool | None, conn, p: Pipeline) -> str | None:
    """The code version an embeddings materialization records (see the module's docstring)."""
    defined = defined_version(context, key, conn, p)
    if defined is None:
        return None
    if current:
        return defined
    recorded = recorded_version(context.instance, key)
    if recorded is not None:
        return recorded
    return defined if current is None else f"{NOT_CURRENT}: {defined}"


def settled_shards(context, conn, p: Pipeline, why: str) -> Iterator[dg.AssetMaterialization | dg.AssetCheckEvaluation]:
    """The shard partitions of the code's model that are not materialized yet, reported
    materialized (the table is current under that model: call only then), each with its check."""
    from .assets import SHARD_CHECK as CHECK, models_partitions_name, shards_key

    from .assets import model_partition_key

    try:
        spec = configured_spec(conn, p)
    except Exception:  # noqa: BLE001 - a table not enrolled yet, a model that cannot be sized
        return
    model = model_partition_key(spec)
    instance, key = context.instance, shards_key(p)
    if not instance.has_dynamic_partition(models_partitions_name(p), model):
        instance.add_dynamic_partitions(models_partitions_name(p), [model])
    done = set(instance.get_materialized_partitions(key))
    version = defined_version(context, key, conn, p)
    deps = [dg.AssetKey(["postgres", p.schema, p.table])]
    for shard in p.shard_keys:
        partition = dg.MultiPartitionKey({"model": model, "shard": shard})
        if partition in done:
            continue
        yield dg.AssetMaterialization(
            asset_key=key, partition=partition,
            description=f"shard {shard} of {p.qualified_table} holds the {model} vectors of its current input ({why})",
            metadata={"reported_by": why, "model": spec.key},
            tags=provenance_tags(version, deps) if version else None)
        yield dg.AssetCheckEvaluation(
            asset_key=key, check_name=CHECK, passed=True, partition=partition, severity=dg.AssetCheckSeverity.WARN,
            description=f"every row of shard {shard} with input holds the {model} vector of its current input ({why})")


def configured_spec(conn, p: Pipeline) -> ModelSpec:
    """The model the code names (sized to the table's column)."""
    from ..core.migrate.reembed import reembed_of

    return reembed_of(p).configured_spec(conn)


def configured_model_key(conn, p: Pipeline) -> str:
    """The model dimension's key of the model the code names."""
    from .assets import model_partition_key

    return model_partition_key(configured_spec(conn, p))


def partition_spec(conn, p: Pipeline, key: str) -> ModelSpec | None:
    """The model a model partition key stands for: one the code or a migration of the table names
    (no other model's shard can be re-embedded); a full key of an older instance is the model it
    spells. None: no such model any more."""
    from ..core.targets.models import get_migration
    from .assets import model_partition_key

    if ":" in key:
        return ModelSpec.parse(key)
    candidates = []
    try:
        candidates.append(configured_spec(conn, p))
    except Exception:  # noqa: BLE001 - cannot be sized now: the migration's models may still match
        pass
    if not p.chunked:
        m = get_migration(conn, p.schema, p.table, p.embedding_column)
        if m is not None:
            candidates += [m.spec, *([m.old_spec] if m.old_spec is not None else [])]
    matches = {spec for spec in candidates if model_partition_key(spec) == key}
    if len(matches) > 1:  # 4 hex digits of two identities of one model name agree: refuse to guess
        raise ConfigError(f"model partition {key} stands for {' and '.join(sorted(m.key for m in matches))}: "
                          f"launch the backfill of {p.name} with `autoembed backfill {p.name}` (it names models "
                          "in full) instead")
    return next(iter(matches), None)


def table_is_current(conn, p: Pipeline, outcomes) -> bool | None:
    """Every vector of the table is of its current input under the model the code names (from the
    check outcomes: a live column still holding the old model during a migration is not)."""
    current = is_current(outcomes)
    if not current:
        return current
    try:
        expected = configured_spec(conn, p).identity_key
    except Exception:  # noqa: BLE001 - cannot be sized: not current under it
        return False
    return all(str(o.metadata.get("model", expected)) == expected for o in outcomes if o.name == "staleness")


def partition_model_key(conn, p: Pipeline) -> str | None:
    try:
        return configured_model_key(conn, p)
    except Exception:  # noqa: BLE001 - a table not enrolled yet, a model that cannot be sized
        return None
