"""A pipeline's re-embed and model change, whatever the shape of its target: one interface
(`Reembed`), one implementation per shape (`ColumnReembed`: a vector column, core.migrate.backfill;
`ChunkSetReembed`: a chunk set, core.migrate.chunk_backfill), picked by `reembed_of(p)`; both run
their migration actions through the one flow of core.migrate.migration (`step`). The Dagster layer (defs/backfill.py)
is written once against it; a third shape is a third implementation.

Everything a caller shows is plain data here (metadata dicts, check results, log lines), so the
Dagster layer only wraps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import psycopg

from ..targets.shapes import chunk_target_of
from ..pipelines import Pipeline
from ..targets import chunks
from ..targets.catalog import resolve
from ..targets.models import ModelSpec, describe_change
from ..targets.shadow import Coverage
from ..targets.shapes import ChunkSetChange, ShadowState
from ..config import ConfigError
from . import backfill_control
from . import batch_backfill as bb
from . import migration as mig
from .backfill import ShardPlan, backfill_shard, estimated_shard_cost, plan, run_backfill
from .chunk_backfill import (ChunkBackfillPlan, ChunkSetBackfill, backfill_chunk_shard, chunk_plan, pipeline_embedder,
                             registered_chunk_target, run_chunk_backfill)
from .chunk_migration import chunk_migration_action
from .shards import BackfillResult, ShardStats

Log = Callable[[str], None]


@dataclass(frozen=True)
class Launch:
    """Where a backfill of the configured model writes, and how much is left (the `backfill` job)."""

    spec: ModelSpec
    mode: str  # "in_place", "migration" (a shadow column), "shadow" (a shadow chunk table), "skip"
    reason: str
    todo: Coverage | None  # of the table written; None when skipped
    column: str = ""
    migration_id: int = -1


@dataclass
class ShardRun:
    """One shard × model run, as the Dagster asset reports it."""

    skipped: str | None = None  # why nothing was embedded (a retired model's partition)
    stopped: str | None = None  # a pause or the window stopped it part-way (what it wrote stays)
    metadata: dict[str, Any] = field(default_factory=dict)
    check_passed: bool = False
    check_description: str = ""
    check_metadata: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None  # rows that could not be embedded yet: the run fails, a re-run resumes
    errors: list[str] = field(default_factory=list)


@dataclass
class ActionResult:
    """A migration action's outcome: `metadata` and `summary` for the Dagster `model_migration`
    job, `info` (JSON) and `line` for `autoembed migrate`, `promoted` when it promoted."""

    metadata: dict[str, Any]
    summary: str
    keep_models: set[str] | None = None  # model partitions still in use (others can go), when known
    info: dict[str, Any] = field(default_factory=dict)
    line: str = ""
    promoted: str | None = None

    @property
    def status(self) -> str:
        return self.metadata["status"]


def action_result(unit: str, state: ShadowState, cov: Coverage, *, status: str, model: str,
                  summary: str, line: str, metadata: dict[str, Any], info: dict[str, Any],
                  keep_models: set[str] | None = None, promoted: str | None = None) -> ActionResult:
    """A migration action's outcome for any shape, after the action: the keys every shape carries
    (`status`, `model`, `unit` (its ModelChange's: rows, documents), `shadow`, `old`, `coverage` of the shadow while backfilling else of
    the live vectors, `current`, `with_input`, `missing`) in both `metadata` and `info`, beside the
    shape's own keys (`metadata`, `info`: kept for their readers, e.g. a column's `missing_rows`, a
    chunk set's `shadow_table`)."""
    shared = {"status": status, "model": model, "unit": unit, "shadow": state.shadow or "",
              "old": state.old or "", "coverage": round(cov.ratio, 6), "current": cov.current,
              "with_input": cov.embeddable, "missing": cov.missing}
    # (Dagster metadata takes no None)
    return ActionResult({**{k: "" if v is None else v for k, v in metadata.items()}, **shared}, summary,
                        keep_models, info={**info, **shared}, line=line, promoted=promoted)


class Reembed(Protocol):
    p: Pipeline
    noun: str  # what a shard counts: "rows" or "documents"
    via: str  # "direct", or "batch" (the provider's Batch API)

    def configured_spec(self, conn: psycopg.Connection) -> ModelSpec:
        """The model the pipeline's declaration names, sized like its live target."""

    def needs_backfill(self, conn: psycopg.Connection) -> str | None:
        """Why the target does not hold the configured model for everything; None when it does."""

    def launch(self, conn: psycopg.Connection) -> Launch:
        """Start (or resume) a backfill of the configured model: creates the shadow when needed."""

    def run_shard(self, conn: psycopg.Connection, spec: ModelSpec, shard: int, *, promote: bool,
                  batch_rows: int | None, max_rows: int | None, log: Log) -> ShardRun:
        """Bring one shard up to date under `spec`; promote the shadow when it is complete."""

    def migration_action(self, conn: psycopg.Connection, action: str, force: bool) -> ActionResult:
        """status / promote / rollback / drop_old / abort of the pipeline's model change."""

    def run(self, conn: psycopg.Connection, *, only: list[int] | None = None, promote: bool = True,
            batch_rows: int | None = None, on_plan: Callable[[Any, Coverage], None] | None = None,
            on_page: Callable[[ShardStats, int], None] | None = None) -> BackfillResult:
        """A whole backfill of the configured model in this process (core.migrate.shards.run_shards)."""

    def written_to(self, plan: Any) -> str:
        """Where a backfill plan writes, for messages."""

    def promoted_line(self, result: BackfillResult) -> str:
        """What a backfill's promotion (`result.promotion`) did, and how it is finished."""


def reembed_of(p: Pipeline, via: str | None = None) -> Reembed:
    """The pipeline's re-embed. `via`: "direct" (synchronous provider calls) or "batch" (the
    provider's Batch API: `BatchReembed`; a chunked pipeline is refused, naming --via direct).
    Default: what the declaration says (`backfill: {via: ...}`), direct for a chunked pipeline."""
    if via is None:
        via = "batch" if p.backfill_via == "batch" and not p.chunked else "direct"
    if via not in bb.VIA:
        raise ConfigError(f"--via {via!r} is not one of {', '.join(bb.VIA)}")
    if via == "batch":
        bb.refuse_chunked(p)
        return BatchReembed(p)
    return ChunkSetReembed(p) if p.chunked else ColumnReembed(p)


def checked_shard_run(metadata: dict[str, Any], unit: str, made: str, cov: Coverage | None, failed: int,
                      errors: list[str]) -> ShardRun:
    """A finished shard run of any shape: its coverage check (`made`: what a current unit holds,
    e.g. "<model> vector"; `missing_<unit>` in the check's metadata), failed when units could not
    be embedded (a re-run resumes)."""
    return ShardRun(
        metadata=metadata, check_passed=cov is not None and cov.complete,
        check_description=(f"{cov.current} of {cov.embeddable} {unit} with input hold the {made} of their "
                           "current input" if cov else "no coverage"),
        check_metadata={"coverage": _ratio(cov), f"missing_{unit}": cov.missing if cov else 0},
        failure=(f"{failed} {unit[:-1]}(s) could not be embedded (provider errors); re-run this partition to "
                 "resume") if failed else None,
        errors=list(errors))


def _ratio(cov: Coverage | None) -> float | str:
    return round(cov.ratio, 6) if cov is not None else "n/a"


class _PipelineReembed:
    """What every implementation shares: its pipeline, the direct strategy, the configured model
    sized like the live target (`live_dimensions`, per shape)."""

    via = "direct"

    def __init__(self, p: Pipeline) -> None:
        self.p = p

    def live_dimensions(self, conn: psycopg.Connection) -> int:
        raise NotImplementedError

    def configured_spec(self, conn: psycopg.Connection) -> ModelSpec:
        return self.p.spec(column_dimensions=self.live_dimensions(conn))

    def plan_only(self, conn: psycopg.Connection) -> tuple[str, str, Callable[[], Coverage], str]:
        """The shape's plan of the configured model without making a shadow: its mode, reason, the
        live target's coverage (counted on demand) and what a current unit holds."""
        raise NotImplementedError

    def needs_backfill(self, conn: psycopg.Connection) -> str | None:
        mode, reason, live_coverage, made = self.plan_only(conn)
        if mode != "in_place":
            return reason
        cov = live_coverage()
        return None if cov.complete else f"{cov.missing} of {cov.embeddable} {self.noun} lack the {made}"

    def promoted_line(self, result: BackfillResult) -> str:
        return result.promotion.line(self.p.name)  # (a migration.PromoteResult, every shape)

    # -- one shard × model run, every shape: the walk once, the shape's steps below -----------------
    def run_shard(self, conn: psycopg.Connection, spec: ModelSpec, shard: int, *, promote: bool,
                  batch_rows: int | None, max_rows: int | None, log: Log) -> ShardRun:
        """Plan (skip a model that is not the shape's to write), fill the shard with a progress log,
        then promote a complete shadow (migration.step, via the shape's promote); the shape's
        metadata keys."""
        p = self.p
        bp, skipped = self._shard_plan(conn, spec)
        if skipped is not None:
            return ShardRun(skipped=skipped)
        log(f"shard {shard}/{p.shards} of {p.qualified_table}, {spec.key}: {bp.reason}")
        work = self._fill(conn, spec, bp, shard, batch_rows, max_rows, _every_few_seconds(
            lambda stats, _n: log(f"shard {shard}: {self._progress(stats)}")))
        log(f"shard {shard}: {work.stats.summary()}")
        if work.stats.stopped:
            return ShardRun(stopped=work.stats.stopped, metadata=self._metadata(spec, bp, work, None, None))
        whole = self._written_coverage(conn, bp)
        promotion = None
        if bp.into_shadow and whole is not None and whole.complete and promote:
            promotion = self._promote(conn, bp)
            if not promotion.already:
                log(f"model change complete: {promotion.live} now holds {promotion.holds} (old {promotion.kept} "
                    f"kept in {promotion.old} until `autoembed migrate {p.name} drop-old`; "
                    f"{promotion.locked_seconds:.3f} s locked)")
        return checked_shard_run(self._metadata(spec, bp, work, whole, promotion), self.noun, self._made(spec),
                                 work.mine, work.failed, work.stats.errors)

    def _shard_plan(self, conn: psycopg.Connection, spec: ModelSpec) -> tuple[Any, str | None]:
        """The shard's plan (makes the shadow when needed), or why `spec` is skipped."""
        raise NotImplementedError

    def _fill(self, conn: psycopg.Connection, spec: ModelSpec, bp: Any, shard: int, batch_rows: int | None,
              max_rows: int | None, on_progress: Callable[..., None]) -> ShardWork:
        raise NotImplementedError

    def _progress(self, stats: ShardStats) -> str:
        raise NotImplementedError

    def _written_coverage(self, conn: psycopg.Connection, bp: Any) -> Coverage | None:
        """The coverage of the whole target the plan writes (None: not counted)."""
        raise NotImplementedError

    def _promote(self, conn: psycopg.Connection, bp: Any) -> mig.PromoteResult:
        raise NotImplementedError

    def _made(self, spec: ModelSpec) -> str:
        """What a current unit holds (the shard check's description)."""
        raise NotImplementedError

    def _metadata(self, spec: ModelSpec, bp: Any, work: ShardWork, whole: Coverage | None,
                  promotion: mig.PromoteResult | None) -> dict[str, Any]:
        """The run's metadata (`whole` None and no promotion: the run stopped early)."""
        raise NotImplementedError


@dataclass
class ShardWork:
    """One shard's fill, for the shared walk: its stats, its own coverage in the target written,
    the units that could not be embedded (a re-run resumes) and the shape's own result."""

    stats: ShardStats
    mine: Coverage | None
    failed: int
    result: Any = None


# -- a vector column -------------------------------------------------------------------------------
class ColumnReembed(_PipelineReembed):
    noun = "rows"

    def live_dimensions(self, conn: psycopg.Connection) -> int:
        return resolve(conn, self.p.live_key).dimensions

    def plan_only(self, conn: psycopg.Connection) -> tuple[str, str, Callable[[], Coverage], str]:
        spec = self.configured_spec(conn)
        sp = plan(conn, self.p, spec, start=False)
        return (sp.mode, sp.reason, lambda: mig.coverage(conn, resolve(conn, sp.target_key(self.p)), spec.identity_key),
                f"{spec.identity_key} vector")

    def launch(self, conn: psycopg.Connection) -> Launch:
        spec = self.configured_spec(conn)
        # The model the code names, nothing else: a migration to it starts here when the column
        # holds another one (after a probe embedding proves the target).
        shard_plan = plan(conn, self.p, spec)
        if shard_plan.mode == "skip":
            return Launch(spec, "skip", shard_plan.reason, None)
        todo = mig.coverage(conn, resolve(conn, shard_plan.target_key(self.p)), spec.identity_key)
        return Launch(spec, shard_plan.mode, shard_plan.reason, todo, shard_plan.column or "",
                      shard_plan.migration.id if shard_plan.migration else -1)

    def _shard_plan(self, conn: psycopg.Connection, spec: ModelSpec) -> tuple[ShardPlan, str | None]:
        shard_plan = plan(conn, self.p, spec)
        return shard_plan, shard_plan.reason if shard_plan.mode == "skip" else None

    def _fill(self, conn: psycopg.Connection, spec: ModelSpec, bp: ShardPlan, shard: int, batch_rows: int | None,
              max_rows: int | None, on_progress: Callable[..., None]) -> ShardWork:
        result = backfill_shard(conn, self.p, spec, shard, self.p.shards, shard_plan=bp, batch_rows=batch_rows,
                                max_rows=max_rows, on_batch=on_progress)
        return ShardWork(result.stats, result.coverage, result.stats.retryable_failures, result)

    def _progress(self, stats: ShardStats) -> str:
        return f"{stats.embedded} embedded, {stats.rows_per_second:.0f} rows/s"

    def _written_coverage(self, conn: psycopg.Connection, bp: ShardPlan) -> Coverage | None:
        m = bp.migration
        return mig.coverage(conn, resolve(conn, m.shadow_key), m.model_key) if bp.mode == "migration" and m else None

    def _promote(self, conn: psycopg.Connection, bp: ShardPlan) -> mig.PromoteResult:
        return mig.promote(conn, bp.migration)

    def _made(self, spec: ModelSpec) -> str:
        return f"{spec.identity_key} vector"

    def _metadata(self, spec: ModelSpec, bp: ShardPlan, work: ShardWork, whole: Coverage | None,
                  promotion: mig.PromoteResult | None) -> dict[str, Any]:
        return _column_metadata(work.result, spec, whole, promotion is not None and not promotion.already)

    def migration_action(self, conn: psycopg.Connection, action: str, force: bool) -> ActionResult:
        return _column_migration_action(conn, self.p, action, force)

    def run(self, conn: psycopg.Connection, *, only: list[int] | None = None, promote: bool = True,
            batch_rows: int | None = None, on_plan: Callable[[Any, Coverage], None] | None = None,
            on_page: Callable[[ShardStats, int], None] | None = None) -> BackfillResult:
        return run_backfill(conn, self.p, self.configured_spec(conn), only=only, promote_when_complete=promote,
                            batch_rows=batch_rows, on_batch=on_page, on_plan=on_plan)

    def written_to(self, plan: ShardPlan) -> str:
        return plan.column or ""



def _column_metadata(result, spec: ModelSpec, migration_cov: Coverage | None, promoted: bool) -> dict[str, Any]:
    s, cost, cov = result.stats, estimated_shard_cost(spec, result.stats.tokens), result.coverage
    return {
        **({} if cost is None else {"estimated_cost_usd": round(cost, 6)}),
        "model": spec.key, "mode": result.plan.mode, "column": result.plan.column or "",
        "migration_id": result.plan.migration.id if result.plan.migration else -1,
        "shard": s.shard, "shards": s.shards, "rows_in_shard": cov.rows if cov else 0,
        "rows_embedded": s.embedded, "rows_already_current": s.current, "rows_empty_input": s.empty_input,
        "stale_writes_avoided": s.stale, "rows_failed": s.failed, "tokens": s.tokens, "requests": s.requests,
        "rows_per_second": round(s.rows_per_second, 2), "seconds": round(s.seconds, 3),
        "rate_limit_wait_seconds": round(s.limit_wait_seconds, 3), "stopped_early": s.stopped or "",
        "shard_coverage": _ratio(cov), "migration_coverage": _ratio(migration_cov), "promoted": promoted,
    }


def _column_migration_action(conn: psycopg.Connection, p: Pipeline, action: str, force: bool) -> ActionResult:
    m = mig.get_migration(conn, p.schema, p.table, p.embedding_column)
    if m is None:
        if action != "status":
            raise mig.MigrationError(f"{p.qualified_table}.{p.embedding_column} has no model migration in flight")
        return ActionResult({"status": "none"}, f"{p.qualified_table}.{p.embedding_column}: no model migration",
                            info={"status": "none"}, line=f"{p.name}: no model migration in flight")
    configured = None
    if action == "drop_old":
        configured = p.spec(column_dimensions=m.dimensions)
        if configured != m.spec and not force:
            # Else the drain would go on embedding the live column with the old model.
            raise mig.MigrationError(f"{p.name} is configured with {configured.key} but the column holds "
                                     f"{m.spec.key}: update the model in its defs.yaml first (or force)")
    change = mig.ColumnChange(m, p.name)
    r = mig.step(conn, change, action, force=force)
    m = change.m
    meta: dict[str, Any] = {"migration_id": m.id, "old_model": m.old_model}
    if action == "promote":
        meta.update(indexes=", ".join(r.swapped.indexes if r.swapped else []), notes="\n".join(r.notes),
                    locked_seconds=round(r.locked_seconds, 4))
    state = change.state(conn)
    cov = change.coverage(conn, state)  # after the action: what `autoembed migrate` says
    return action_result(
        change.unit, state, cov, status=m.status, model=m.spec.key, summary=f"migration {m.id} of {m.label}: {m.status}",
        metadata={**meta, "missing_rows": cov.missing},
        info={"migration": m.id, "old_model": m.old_model, "column": m.embedding_column,
              "shadow_column": m.shadow_column, "rows_current": cov.current, "rows_with_input": cov.embeddable},
        keep_models={m.spec.key, configured.key} if configured is not None else None,
        line=(f"{p.name}: migration {m.id} to {m.spec.key} is {m.status}; coverage {_pct(cov.ratio)} "
              f"({cov.current}/{cov.embeddable})"),
        promoted=(mig.promoted_line(p.name, m.embedding_column, describe_change(m.old_spec, m.spec), m.old_column)
                  if r.swapped is not None else None))


def _pct(ratio: float) -> str:
    return "100%" if ratio >= 1 else f"{ratio:.1%}"


# -- a vector column through the Batch API -----------------------------------------------------------
class BatchReembed(ColumnReembed):
    """A vector column re-embedded through the provider's Batch API (core.migrate.batch_backfill):
    the same plan, migration, coverage and promotion as `ColumnReembed`; a shard run submits its
    rows and returns at once (the `autoembed_batches` sensor collects), a whole run submits, polls,
    collects and promotes. `fallback`: what collects rows a batch left ("resubmit", "direct")."""

    via = "batch"

    def __init__(self, p: Pipeline, fallback: str | None = None) -> None:
        super().__init__(p)
        self.fallback = fallback or p.backfill_fallback

    def run_shard(self, conn: psycopg.Connection, spec: ModelSpec, shard: int, *, promote: bool,
                  batch_rows: int | None, max_rows: int | None, log: Log) -> ShardRun:
        p = self.p
        shard_plan, sub = bb.submit_shard(conn, p, spec, shard, p.shards, promote_when_complete=promote)
        if shard_plan.mode == "skip":
            return ShardRun(skipped=shard_plan.reason)
        records = [bb.get_batch(conn, i) for i in sub.batches]
        for r in records:
            log(f"shard {shard}: batch {r.batch_id} submitted ({r.row_count} rows, {r.input_bytes} bytes)")
        # Whether the collect run that completes the migration promotes it is recorded with the batches.
        return ShardRun(
            metadata={"via": "batch", "model": spec.key, "mode": shard_plan.mode,
                      "batches_submitted": len(sub.batches), "batch_ids": ", ".join(r.batch_id or "" for r in records),
                      "rows_submitted": sub.rows, "rows_in_open_batches": sub.in_open_batches,
                      "rows_empty_input": sub.empty_input, "rows_dead_lettered": sub.dead,
                      "migration_id": shard_plan.migration.id if shard_plan.migration else -1},
            check_passed=False,
            check_description=(f"{sub.rows} row(s) submitted to the Batch API ({len(sub.batches)} batch(es)): the "
                               f"`autoembed_batches` sensor collects them when the provider is done" if sub.rows
                               else f"nothing submitted: {sub.in_open_batches} row(s) already in open batches"))

    def run(self, conn: psycopg.Connection, *, only: list[int] | None = None, promote: bool = True,
            batch_rows: int | None = None, on_plan: Callable[[Any, Coverage], None] | None = None,
            on_page: Callable[[Any], None] | None = None) -> bb.BatchBackfillResult:
        """Submit, poll, collect, promote (core.migrate.batch_backfill.run_batch_backfill); `on_page`
        is called with its `Progress` after each poll."""
        if only:
            raise ConfigError("--shards is for --via direct: a batch re-embed submits every row of the table")
        backfill_control.refuse_if_held(conn, self.p.name)  # no batch is submitted while held
        return bb.run_batch_backfill(conn, self.p, self.configured_spec(conn), fallback=self.fallback,
                                     promote_when_complete=promote, on_plan=on_plan, on_progress=on_page)


# -- a chunk set -------------------------------------------------------------------------------------
class ChunkSetReembed(_PipelineReembed):
    noun = "documents"

    def live_dimensions(self, conn: psycopg.Connection) -> int:
        return registered_chunk_target(conn, self.p).dimensions

    def plan_only(self, conn: psycopg.Connection) -> tuple[str, str, Callable[[], Coverage], str]:
        live, spec, embedder, splitter = pipeline_embedder(conn, self.p)
        bp = chunk_plan(conn, self.p, live, spec, start=False)
        return (bp.mode, bp.reason,
                lambda: chunks.coverage(conn, chunk_target_of(live), embedder.identity.key, splitter.key),
                f"{embedder.identity.key} chunk set of their current input")

    def launch(self, conn: psycopg.Connection) -> Launch:
        live, spec, embedder, splitter = pipeline_embedder(conn, self.p)
        bp = chunk_plan(conn, self.p, live, spec)
        return Launch(spec, bp.mode, bp.reason, chunks.coverage(conn, chunk_target_of(bp.write_to),
                                                                embedder.identity.key, splitter.key))

    def _shard_plan(self, conn: psycopg.Connection, spec: ModelSpec) -> tuple[Any, str | None]:
        self._backfill = cb = ChunkSetBackfill(self.p)
        live, configured, cb.embedder, cb.splitter = pipeline_embedder(conn, self.p)
        if spec.key != configured.key:
            return None, f"{self.p.name} declares {configured.key}, not {spec.key} (a retired model's partition)"
        return chunk_plan(conn, self.p, live, configured), None

    def _fill(self, conn: psycopg.Connection, spec: ModelSpec, bp: ChunkBackfillPlan, shard: int,
              batch_rows: int | None, max_rows: int | None, on_progress: Callable[..., None]) -> ShardWork:
        cb, p = self._backfill, self.p
        stats = backfill_chunk_shard(conn, bp.write_to, cb.embedder, cb.splitter, shard, p.shards, pipeline=p.name,
                                     max_rows=max_rows, on_page=on_progress)
        mine = None if stats.stopped else chunks.document_counts(
            conn, chunk_target_of(bp.write_to), cb.embedder.identity.key, cb.splitter.key, shard=shard,
            shards=p.shards).coverage
        return ShardWork(stats, mine, stats.failed)

    def _progress(self, stats: ShardStats) -> str:
        return (f"{stats.written} documents written, {stats.chunks_embedded} chunks embedded, "
                f"{stats.chunks_reused} reused")

    def _written_coverage(self, conn: psycopg.Connection, bp: ChunkBackfillPlan) -> Coverage | None:
        cb = self._backfill
        return chunks.coverage(conn, chunk_target_of(bp.write_to), cb.embedder.identity.key, cb.splitter.key)

    def _promote(self, conn: psycopg.Connection, bp: ChunkBackfillPlan) -> mig.PromoteResult:
        return self._backfill.promote(conn, bp)

    def _made(self, spec: ModelSpec) -> str:
        return f"{spec.identity_key} chunk set"

    def _metadata(self, spec: ModelSpec, bp: ChunkBackfillPlan, work: ShardWork, whole: Coverage | None,
                  promotion: mig.PromoteResult | None) -> dict[str, Any]:
        stats, p = work.stats, self.p
        if stats.stopped:
            return {"documents_written": stats.written, "shard": stats.shard}
        assert whole is not None and work.mine is not None
        return {
            "model": spec.key, "mode": bp.mode, "chunk_table": f"{p.schema}.{bp.write_to.chunk_table}",
            "shard": stats.shard, "shards": p.shards, "documents_in_shard": work.mine.rows,
            "documents_written": stats.written, "documents_already_current": stats.current,
            "documents_failed": stats.failed, "chunks_embedded": stats.chunks_embedded,
            "chunks_reused": stats.chunks_reused, "tokens": stats.tokens, "seconds": round(stats.seconds, 3),
            "stopped_early": stats.stopped or "", "coverage": round(whole.ratio, 6),
            "promoted": promotion is not None and not promotion.already,
        }

    def migration_action(self, conn: psycopg.Connection, action: str, force: bool) -> ActionResult:
        m = chunk_migration_action(conn, self.p, action, force=force)
        state = ShadowState(m.shadow.chunk_table if m.shadow else None, m.old_table)
        info = m.as_dict()
        return action_result(ChunkSetChange.unit, state, m.coverage, status=m.status, model=m.model,
                             summary=m.summary(), line=m.summary(),
                             metadata={**info, "missing_documents": m.coverage.missing}, info=info)

    def run(self, conn: psycopg.Connection, *, only: list[int] | None = None, promote: bool = True,
            batch_rows: int | None = None, on_plan: Callable[[Any, Coverage], None] | None = None,
            on_page: Callable[[ShardStats, int], None] | None = None) -> BackfillResult:
        # A page is a few documents (their chunk sets), not `batch_rows` rows.
        return run_chunk_backfill(conn, self.p, only=only, promote_when_complete=promote, on_plan=on_plan,
                                  on_page=on_page)

    def written_to(self, plan: ChunkBackfillPlan) -> str:
        return plan.write_to.chunk_table or ""


PROGRESS_EVERY_SECONDS = 5.0  # how often a running shard logs its progress


def _every_few_seconds(report: Callable[..., None]) -> Callable[..., None]:
    last = [time.monotonic()]

    def on_progress(*args: Any) -> None:
        if time.monotonic() - last[0] >= PROGRESS_EVERY_SECONDS:
            last[0] = time.monotonic()
            report(*args)

    return on_progress
