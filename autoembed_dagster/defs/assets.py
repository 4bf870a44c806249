"""Lineage: source table (external) + queue (observed) -> embeddings (per pipeline) -> vector index.

The tables and the queue are written by Postgres itself (triggers), so they are external assets
(`AssetSpec`). The embeddings and index assets are materialized by the drain runs (one drain lane per
queue, see drain.py), which report per-pipeline numbers as materialization metadata.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Sequence

import dagster as dg

from ..core.config import ConfigError
from ..core.pipelines import Pipeline
from ..core.targets.models import ModelSpec

GROUP = "autoembed"
DEFAULT_QUEUE = "embedding_jobs"  # Supabase's queue: SQL-enrolled tables land here
LANE_TAG = "autoembed/lane"  # the queue a drain run drains
CONFIG_ERROR_TAG = "autoembed/configuration_error"  # on a drain run the provider's configuration stopped
PROGRESS_EVERY_SECONDS = 5.0  # how often a drain run logs its progress (a backfill shard: core.migrate.reembed)
SHARD_CHECK = "shard_complete"  # the asset check a backfill shard run reports (column or chunk set)
_DAGSTER_NAME = re.compile(r"[A-Za-z0-9_]{1,60}")


def check_queue_name(queue: str) -> str:
    if not _DAGSTER_NAME.fullmatch(queue):
        raise ConfigError(f"queue name {queue!r} must be letters, digits and _ (at most 60)")
    return queue


def queues_of(pipelines: Iterable[Pipeline]) -> list[str]:
    """Every queue to drain: Supabase's default queue plus each pipeline's."""
    return sorted({DEFAULT_QUEUE, *(check_queue_name(p.queue) for p in pipelines)})


def shards_key(p: Pipeline) -> dg.AssetKey:
    """The re-embed asset of a pipeline (model × shard partitions, defs/backfill.py): `<name>_reembed`,
    short enough for the lineage graph and the asset list to show whole (they cut
    `stdlib_modules_embeddings_by_shard`)."""
    return dg.AssetKey(["reembed", f"{p.name}_reembed"])


def legacy_shards_key(p: Pipeline) -> dg.AssetKey:
    """The re-embed asset's key before it was shortened: an older instance's history is under it."""
    return dg.AssetKey(["embeddings_by_shard", f"{p.name}_embeddings_by_shard"])


def refresh_op_name(p: Pipeline) -> str:
    """The op of the pipeline's embeddings asset (the UI's Materialize, the queue sensor's check)."""
    return f"{p.name}_refresh"


def source_key(p: Pipeline) -> dg.AssetKey:
    return dg.AssetKey(["postgres", p.schema, p.table])


def queue_key(queue: str) -> dg.AssetKey:
    return dg.AssetKey(["pgmq", queue])


def embeddings_key(p: Pipeline) -> dg.AssetKey:
    """The pipeline's vectors: its embeddings column, or its chunk table (`<name>_chunks`)."""
    # Distinct last parts: the UI's lists and lineage show them alone (`documents` the table,
    # `documents_embeddings` or `documents_chunks`, `documents_vector_index`, `documents_reembed`).
    if p.chunked:
        return dg.AssetKey(["chunks", f"{p.name}_chunks"])
    return dg.AssetKey(["embeddings", f"{p.name}_embeddings"])


def index_key(p: Pipeline) -> dg.AssetKey:
    return dg.AssetKey(["vector_index", f"{p.name}_vector_index"])


def chunking_version(p: Pipeline) -> str:
    """`:chunks<tokens>/<overlap>` for a chunked pipeline: other sizes make other chunk sets."""
    return f":chunks{p.chunk_tokens}/{p.chunk_overlap}" if p.chunked else ""


def model_version(p: Pipeline, digest: str | None = None) -> str:
    """The code version: the configured model identity (provider, model, size, input function), the
    chunk sizes of a chunked pipeline, and a digest of the input function's definition, so editing
    its body marks the asset stale."""
    return p.code_version() + chunking_version(p) + (f"@{digest}" if digest else "")


def model_label(p: Pipeline) -> str:
    """The configured model in words, for the first line of an asset's description: the UI cuts a
    long model key (`provider:model:dimensions:content_function`) in its middle, where the model is."""
    provider, *model, dims, _ = p.code_version().split(":")  # a model name may hold a colon (model:tag)
    size = "as many dimensions as its column" if dims == "column" else f"{dims} dimensions"
    return f"{':'.join(model)} ({provider}, {size})"


def vectors_table(p: Pipeline) -> str:
    """Where the pipeline's vectors are: `schema.table.column`, or the chunk table's `embedding`."""
    return f"{p.schema}.{p.chunk_table}.embedding" if p.chunked else f"{p.qualified_table}.{p.embedding_column}"


def _origin(p: Pipeline) -> str:
    return ("discovered in the database (declared in no defs.yaml): default model"
            if p.discovered else "declared in defs.yaml")


def shared_specs(pipelines: Sequence[Pipeline]) -> list[dg.AssetSpec]:
    """The queues and source tables (several pipelines may share one)."""
    specs: dict[dg.AssetKey, dg.AssetSpec] = {}
    for queue in queues_of(pipelines):
        specs[queue_key(queue)] = dg.AssetSpec(
            queue_key(queue),
            description=(f"pgmq queue `{queue}`: embedding jobs enqueued by the tables' triggers. "
                         "The queue sensor records its depth (messages and the rows they cover) and "
                         "oldest message age as observations."),
            group_name=GROUP,
            kinds={"postgres"},
            metadata={"queue": queue},
        )
    for p in pipelines:
        specs.setdefault(source_key(p), dg.AssetSpec(
            source_key(p),
            description=f"Table {p.qualified_table}, written by the application; its triggers enqueue jobs.",
            group_name=GROUP,
            kinds={"postgres", "table"},
            metadata={"table": p.qualified_table, "key_column": p.key_column},
        ))
    return list(specs.values())


def pipeline_specs(p: Pipeline, digest: str | None = None, why_no_digest: str = "") -> list[dg.AssetSpec]:
    """The pipeline's own assets: its embeddings and its vector index."""
    version = model_version(p, digest)
    tags = {"autoembed/origin": "discovered" if p.discovered else "declared"}
    if p.chunked:
        what = (f"{p.schema}.{p.chunk_table}: the chunks of {p.content_function}(row) of every row of "
                f"{p.qualified_table}, at most {p.chunk_tokens} tokens each (overlap {p.chunk_overlap}), one vector "
                "each; an edit re-embeds only the chunks whose text is new.")
        target = {"chunk_table": f"{p.schema}.{p.chunk_table}", "chunk_tokens": p.chunk_tokens,
                  "chunk_overlap": p.chunk_overlap}
    else:
        what = f"{p.qualified_table}.{p.embedding_column} = embedding of {p.content_function}(row)."
        target = {"embedding_column": p.embedding_column}
    return [
        dg.AssetSpec(
            embeddings_key(p),
            deps=[source_key(p), queue_key(p.queue)],
            description=(f"Model: {model_label(p)}. {what} Kept in sync by the drain lane of queue `{p.queue}` "
                         f"(its sensor, {p.queue}_sensor). Pipeline {p.name}: {_origin(p)}."),
            group_name=GROUP,
            kinds={"pgvector"},
            code_version=version,
            tags=tags,
            metadata={
                "table": p.qualified_table,
                **target,
                "content_function": p.content_function,
                "content_function_digest": digest or f"unknown: {why_no_digest or 'the function does not exist yet'}",
                "queue": p.queue,
                "model": version,
                "origin": _origin(p),
            },
        ),
        dg.AssetSpec(
            index_key(p),
            deps=[embeddings_key(p)],
            description=f"Vector index(es) over {vectors_table(p)}, updated as vectors are written.",
            group_name=GROUP,
            kinds={"pgvector", "index"},
            tags=tags,
            metadata={"table": p.qualified_table, "vectors": vectors_table(p)},
        ),
    ]


def models_partitions_name(p: Pipeline) -> str:
    return f"{p.name}_models"


MODEL_NAME_CHARS = 22  # of a model partition key: with "@" and 4 digits, what the UI's partition list shows whole


def model_partition_key(spec: ModelSpec) -> str:
    """The re-embed asset's model partition of `spec`: the model's name and 4 hex digits of its
    whole identity (provider:model:dimensions:content_function), e.g. `all-MiniLM-L6-v2@3f9c`.
    Short, so the UI shows it whole (it cut the full identity in its middle, where the model is),
    and one per identity: another size or content function of the same model gets other digits.
    It never holds ':', which every key of an older instance does (as_model_partition_key)."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", spec.model.rsplit("/", 1)[-1]))
    name = name.strip("-.")[:MODEL_NAME_CHARS] or "model"
    return f"{name}@{hashlib.sha256(spec.key.encode()).hexdigest()[:4]}"


def as_model_partition_key(key: str) -> str:
    """A model partition key in today's form: the full `provider:model:dimensions:content_function`
    key an instance made before short keys holds, converted; any other key as it is."""
    return model_partition_key(ModelSpec.parse(key)) if ":" in key else key

