"""Asset checks on each pipeline's embeddings: coverage, staleness, dead letters, dimensions.

The numbers come from `core.health` (plain SQL). The same evaluation runs in three places: the
standalone checks below (UI "Execute checks", the `health_checks` job and its schedule), and at
the end of every drain run for the pipelines it touched (drain.py).
"""


import os
from dataclasses import dataclass, field, replace
from typing import Any

import dagster as dg
import psycopg

from ..core import health
from ..core.drain import EmbedderResolver, pipeline_resolver, resolve_embedder
from ..core.targets.models import get_migration
from ..core.pipelines import Pipeline
from ..core.targets.catalog import TargetKey
from ..core.targets.shapes import shape_of
from .assets import embeddings_key, vectors_table
from .resources import AutoembedResource

CHECKS = {
    "coverage": "Every row with input has the vector of its current input under the current model "
                "(AUTOEMBED_MIN_COVERAGE, default 1.0; WARN: rows in flight count as missing).",
    "staleness": "No row carries a vector whose stored content hash or model differs from the row's "
                 "current input and the pipeline's current model.",
    "dead_letters": "No job of this table is in the dead-letter archive (`autoembed dead-letters`).",
    "dimensions": "The column's declared size equals the size of the vectors the model makes.",
}
# The same four for a chunked pipeline: a document is current when its whole chunk set is the
# chunking of its current input (declared sizes, the model's tokenizer) under the current model.
CHUNK_CHECKS = {
    "coverage": "Every document with input has the chunk set of its current input under the current model and "
                "the declared chunk sizes (AUTOEMBED_MIN_COVERAGE, default 1.0; WARN: documents in flight count).",
    "staleness": "No document has a chunk set made from older input, another model or other chunk sizes.",
    "dead_letters": "No job of this table is in the dead-letter archive (`autoembed dead-letters`).",
    "dimensions": "The chunk table's vector size equals the size of the vectors the model makes.",
}
SEVERITY = {
    "coverage": dg.AssetCheckSeverity.WARN,
    "staleness": dg.AssetCheckSeverity.ERROR,
    "dead_letters": dg.AssetCheckSeverity.WARN,
    "dimensions": dg.AssetCheckSeverity.ERROR,
}


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def severity(self) -> dg.AssetCheckSeverity:
        return SEVERITY[self.name]


def min_coverage() -> float:
    try:
        return float(os.environ.get("AUTOEMBED_MIN_COVERAGE", "1.0"))
    except ValueError:
        return 1.0


def evaluate(conn: psycopg.Connection, p: Pipeline, resolver: EmbedderResolver) -> list[CheckOutcome]:
    """All four checks of one pipeline, from one scan of its table. A target the schema broke
    (health.broken_targets: its content function dropped, its key no longer unique...) fails every
    check with the reason: it is never reported clean."""
    broken = [b for b in health.broken_targets(conn, p.schema, p.table)
              if b.vectors in ((p.chunk_table,) if p.chunked else health.pipeline_columns(p.embedding_column))]
    if broken:
        why = "; ".join(f"{b.problem}: {b.detail}" for b in broken)
        return [CheckOutcome(name, False, f"{p.name} is broken: {why}", {"problems": ", ".join(b.problem for b in broken)})
                for name in CHECKS]
    target, why = health.pipeline_target(conn, p)
    if target is None:
        return [CheckOutcome(name, False, f"{p.name}: {why}") for name in CHECKS]
    try:
        embedder = resolve_embedder(resolver, target, conn)
        identity, model_error = embedder.identity, None
    except ValueError as exc:  # ConfigError: e.g. the model cannot make vectors of this size
        embedder, identity, model_error = None, None, str(exc)
    column = f"{target.vector_type}({target.dimensions})"
    where = health.vectors_label(target)
    if identity is None:
        dims = CheckOutcome("dimensions", False, f"{where} is {column}: {model_error}", {"column": column})
    else:
        ok = identity.dimensions == target.dimensions
        dims = CheckOutcome(
            "dimensions", ok,
            f"{column} column, model {identity.model} makes {identity.dimensions}"
            + ("" if ok else ": every job of this table will be dead-lettered until they match"),
            {"column_dimensions": target.dimensions, "model_dimensions": identity.dimensions,
             "model": identity.key},
        )
    enrolled = (target.chunk_tokens, target.chunk_overlap)
    if p.chunked:
        # Current = the chunking the code declares (a set of other sizes is stale, whatever the registry says).
        target = replace(target, chunk_tokens=p.chunk_tokens, chunk_overlap=p.chunk_overlap)
    made = shape_of(target).made_by(embedder)
    if made is None:  # which chunk sets are current needs the model's tokenizer
        return [CheckOutcome(name, False, f"{where}: {model_error}") for name in CHECKS if name != "dimensions"] \
            + [dims]
    th = health.target_health(conn, target, made)
    if p.chunked:
        return _chunk_outcomes(p, th, dims, enrolled=enrolled)
    why = model_situation(conn, p, th) if th.stale or th.coverage < min_coverage() else ""
    return _outcomes(
        th, dims, target.key.label,
        current=f"{th.current} of {th.embeddable} rows with input have a current vector", coverage_note=why,
        stale=f"{th.stale} row(s) carry a vector of other content or another model than {th.model}{why}",
        counts={"rows": th.rows, "embeddable_rows": th.embeddable, "current_rows": th.current,
                "missing_rows": th.missing, "stale_rows": th.stale},
        stale_key="stale_rows")


def _chunk_outcomes(p: Pipeline, th: health.TableHealth, dims: CheckOutcome,
                    enrolled: tuple[int | None, int]) -> list[CheckOutcome]:
    sizes = f"chunks of at most {p.chunk_tokens} tokens, overlap {p.chunk_overlap}"
    fix = "" if enrolled == (p.chunk_tokens, p.chunk_overlap) else (
        f". {p.qualified_table} is enrolled with chunks of {enrolled[0]} tokens, overlap {enrolled[1]}: enrol it "
        f"again (autoembed enroll {p.qualified_table} --content-function {p.content_function} --chunk-tokens "
        f"{p.chunk_tokens} --chunk-overlap {p.chunk_overlap}), then launch the `backfill` job")
    return _outcomes(
        th, dims, th.table,
        current=f"{th.current} of {th.embeddable} documents with input have the current chunk set",
        sizes=sizes,
        coverage_note=(f": {th.missing} without chunks, {th.stale} with an outdated chunk set"
                       if th.current < th.embeddable else ""),
        stale=(f"{th.stale} document(s) have a chunk set of older input, another model than {th.model} or other "
               f"chunk sizes than {sizes}{fix}"),
        counts={"documents": th.rows, "documents_with_input": th.embeddable, "current_documents": th.current,
                "documents_without_chunks": th.missing, "stale_documents": th.stale},
        stale_key="stale_documents")


def _outcomes(th: health.TableHealth, dims: CheckOutcome, label: str, *, current: str, stale: str, counts: dict,
              stale_key: str, coverage_note: str = "", sizes: str = "") -> list[CheckOutcome]:
    """The four outcomes from one health scan (rows of a column, or documents of a chunk table)."""
    threshold = min_coverage()
    return [
        CheckOutcome(
            "coverage", th.coverage >= threshold,
            f"{current} ({th.coverage:.1%}; threshold {threshold:.0%}{'; ' + sizes if sizes else ''}){coverage_note}",
            {"coverage": dg.MetadataValue.float(round(th.coverage, 6)), **counts},
        ),
        CheckOutcome("staleness", th.stale == 0, stale, {stale_key: th.stale, "model": th.model}),
        # A row whose content function raises is reported here, with one of its errors: its job is
        # (or will be) a dead letter, and the scan goes on past it.
        CheckOutcome("dead_letters", th.dead_letters == 0 and th.unreadable == 0,
                     f"{th.dead_letters} dead-lettered job(s) for {label}"
                     + (f"; {th.unreadable} row(s) whose content function raises ({th.unreadable_error})"
                        if th.unreadable else ""),
                     {"dead_letters": th.dead_letters, "unreadable_rows": th.unreadable}),
        dims,
    ]


def model_situation(conn: psycopg.Connection, p: Pipeline, th: health.TableHealth) -> str:
    """Why vectors are not current, when the cause is a model change: a migration in flight, or
    the code naming another model than the one the table holds (and what to do)."""
    m = get_migration(conn, p.schema, p.table, p.embedding_column)
    if m is not None and m.status == "backfilling":
        return (f". Migration {m.id} to {m.spec.key} is in flight (into {m.shadow_column}; search uses the old "
                "vectors until it is promoted)")
    held = health.held_models(conn, TargetKey(p.schema, p.table, p.content_function, p.embedding_column))
    if held and held[0][0] != th.model:
        return (f". The code names {th.model}, the table holds {held[0][0]} ({held[0][1]} rows): launch the "
                f"`backfill` job to re-embed with the code's model, or set the model in defs/{p.name}/defs.yaml "
                "back to what the table holds")
    return ""


def as_check_result(p: Pipeline, o: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(asset_key=embeddings_key(p), check_name=o.name, passed=o.passed,
                               severity=o.severity, description=o.description, metadata=o.metadata)


def as_check_evaluation(p: Pipeline, o: CheckOutcome) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(asset_key=embeddings_key(p), check_name=o.name, passed=o.passed,
                                   severity=o.severity, description=o.description, metadata=o.metadata)


def build_health_checks(p: Pipeline) -> dg.AssetChecksDefinition:
    texts = CHUNK_CHECKS if p.chunked else CHECKS
    specs = [dg.AssetCheckSpec(name, asset=embeddings_key(p), description=text) for name, text in texts.items()]

    @dg.multi_asset_check(name=f"{p.name}_health", specs=specs, description=f"Health of {vectors_table(p)}")
    def _health(context: dg.AssetCheckExecutionContext, autoembed: AutoembedResource):
        resolver = pipeline_resolver([p])
        with autoembed.connect() as conn:
            for outcome in evaluate(conn, p, resolver):
                yield as_check_result(p, outcome)

    return _health

