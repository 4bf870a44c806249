"""The re-embed of a chunked pipeline in Dagster, over core.migrate.chunk_backfill: a partition run of its
`<name>_embeddings_by_shard` asset (model × shard) brings every document of the shard up to date
(chunk texts that already have a vector are reused), into the live chunk table, or into the shadow
`<table>_chunks__next` of a model change, promoted when every document's shadow set is current.
The `backfill` job and the model-partitions sensor (backfill.py) call the helpers below for a
chunked pipeline."""

from __future__ import annotations

import time

import dagster as dg
import psycopg

from ..core.targets import chunks
from ..core.migrate.chunk_backfill import backfill_chunk_shard, chunk_plan, pipeline_embedder, registered_chunk_target
from ..core.migrate.chunk_migration import chunk_migration_action
from ..core.drain.chunked import chunk_target_of, shadow_of
from ..core.migrate.migration import MigrationError
from ..core.targets.models import ModelSpec
from ..core.targets.shadow import Coverage
from ..core.pipelines import Pipeline
from .assets import PROGRESS_EVERY_SECONDS, SHARD_CHECK as CHECK
from .resources import AutoembedResource


def configured_spec(conn: psycopg.Connection, p: Pipeline) -> ModelSpec:
    """The model the pipeline's defs.yaml names, sized like its registered chunk table."""
    return p.spec(column_dimensions=registered_chunk_target(conn, p).dimensions)


def launch_plan(conn: psycopg.Connection, p: Pipeline) -> tuple[ModelSpec, str, str, Coverage]:
    """(model, mode, why, coverage of the table the shards write) of a backfill of `p`; creates
    the shadow chunk table when the model or size changes."""
    live, spec, embedder, splitter = pipeline_embedder(conn, p)
    bp = chunk_plan(conn, p, live, spec)
    return spec, bp.mode, bp.reason, chunks.coverage(conn, chunk_target_of(bp.write_to), embedder.identity.key,
                                                     splitter.key)


def needs_backfill(conn: psycopg.Connection, p: Pipeline) -> str | None:
    """Why the chunk table is not the declared chunking under the declared model; None when it is."""
    live, _, embedder, splitter = pipeline_embedder(conn, p)
    if shadow_of(conn, live) is not None:
        return f"a model change into {chunks.shadow_name(chunk_target_of(live))} is in progress"
    cov = chunks.coverage(conn, chunk_target_of(live), embedder.identity.key, splitter.key)
    return None if cov.complete else (f"{cov.missing} of {cov.embeddable} documents lack the {embedder.identity.key} "
                                      "chunk set of their current input")


def reembed_chunk_shard(context: dg.AssetExecutionContext, spec: ModelSpec, shard: int, promote_on: bool,
                        autoembed: AutoembedResource, p: Pipeline):
    with autoembed.connect() as conn:
        live, configured, embedder, splitter = pipeline_embedder(conn, p)
        if spec.key != configured.key:
            why = f"{p.name} declares {configured.key}, not {spec.key} (a retired model's partition)"
            context.log.warning(f"partition {context.partition_key} skipped: {why}")
            yield dg.AssetCheckResult(check_name=CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                      description=f"not embedded: {why}")
            return
        bp = chunk_plan(conn, p, live, configured)
        context.log.info(f"shard {shard}/{p.shards} of {p.qualified_table}, {spec.key}: {bp.reason}")
        last = [time.monotonic()]

        def on_page(stats, documents):
            if time.monotonic() - last[0] >= PROGRESS_EVERY_SECONDS:
                last[0] = time.monotonic()
                context.log.info(f"shard {shard}: {stats.written} documents written, {stats.chunks_embedded} chunks "
                                 f"embedded, {stats.chunks_reused} reused")

        stats = backfill_chunk_shard(conn, bp.write_to, embedder, splitter, shard, p.shards, pipeline=p.name,
                                     on_page=on_page)
        context.log.info(f"shard {shard}: {stats.summary()}")
        written = chunk_target_of(bp.write_to)
        mine = chunks.document_counts(conn, written, embedder.identity.key, splitter.key, shard=shard,
                                      shards=p.shards).coverage
        whole = chunks.coverage(conn, written, embedder.identity.key, splitter.key)
        promoted = bp.mode == "shadow" and whole.complete and promote_on
        if promoted:
            old = chunks.promote(conn, chunk_target_of(live), written, embedder.identity.key, splitter.key)
            context.log.info(f"model change complete: {live.chunk_table} now holds {spec.key} (old chunks kept in "
                             f"{old} until the model_migration job's drop_old)")
    yield dg.MaterializeResult(
        metadata={
            "model": spec.key, "mode": bp.mode, "chunk_table": f"{p.schema}.{bp.write_to.chunk_table}",
            "shard": shard, "shards": p.shards, "documents_in_shard": mine.rows, "documents_written": stats.written,
            "documents_already_current": stats.current, "documents_failed": stats.failed,
            "chunks_embedded": stats.chunks_embedded, "chunks_reused": stats.chunks_reused, "tokens": stats.tokens,
            "seconds": dg.MetadataValue.float(round(stats.seconds, 3)), "stopped_early": stats.stopped or "",
            "coverage": dg.MetadataValue.float(round(whole.ratio, 6)), "promoted": promoted,
        },
        check_results=[dg.AssetCheckResult(
            check_name=CHECK, passed=mine.complete, severity=dg.AssetCheckSeverity.WARN,
            description=f"{mine.current} of {mine.embeddable} documents with input hold the {spec.identity_key} chunk "
                        "set of their current input",
            metadata={"coverage": dg.MetadataValue.float(round(mine.ratio, 6)), "missing_documents": mine.missing})],
    )
    if stats.failed:
        raise dg.Failure(f"{stats.failed} document(s) could not be embedded (provider errors); re-run this partition "
                         "to resume", metadata={"errors": "\n".join(stats.errors)})


def migration_action(context: dg.OpExecutionContext, p: Pipeline, action: str, force: bool,
                     autoembed: AutoembedResource) -> dg.Output:
    """The `model_migration` job's op for a chunked pipeline (core.migrate.chunk_migration)."""
    with autoembed.connect() as conn:
        try:
            m = chunk_migration_action(conn, p, action, force=force)
        except MigrationError as exc:
            raise dg.Failure(str(exc)) from None
    context.log.info(m.summary())
    info = m.as_dict()
    return dg.Output(None, metadata={
        **{k: v if v is not None else "" for k, v in info.items() if k != "coverage"},
        "coverage": dg.MetadataValue.float(info["coverage"]),
        "missing_documents": m.coverage.missing})
