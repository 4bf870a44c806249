"""The `autoembed_dagster.EmbeddingPipeline` component: one instance per pipeline.

    # defs/documents/defs.yaml   (dg scaffold defs autoembed_dagster.EmbeddingPipeline documents --table documents)
    type: autoembed_dagster.EmbeddingPipeline
    attributes:
      table: public.documents
      content_function: embedding_input
      model: "{{ env.AUTOEMBED_MODEL }}"     # per-deployment values from the environment
      chunking: {tokens: 200, overlap: 20}   # long text: chunks into public.documents_chunks

Each instance builds its pipeline's own objects (embeddings (or chunks) + vector index assets, health checks,
the partitioned re-embed asset and its job). Objects shared by several pipelines (a queue's drain
lane: queue asset, drain job, sensor; the source tables; `backfill`, `model_migration`,
`health_checks`; tables registered in the database but declared nowhere) are built once, by the
instance whose pipeline name sorts first, from every instance in the project: two pipelines on one
queue share one lane and nothing is defined twice.
"""

from __future__ import annotations

import warnings
from typing import Literal

import dagster as dg
from pydantic import Field, PrivateAttr

from ..core.targets.splitter import YAML_NAMES, check_chunk_sizes, provider_window
from ..core.config import ConfigError
from ..core.embed import size_problem
from ..core.pipelines import Pipeline, make_pipeline
from .scaffolder import EmbeddingPipelineScaffolder


# `model` is the attribute users expect in defs.yaml; pydantic warns that it shadows the classmethod
# Resolvable.model, which Dagster still reaches through the class (fields are not class attributes).
warnings.filterwarnings("ignore", message='Field name "model" in "EmbeddingPipeline" shadows')


class Chunking(dg.Resolvable, dg.Model):
    """`chunking:` of a pipeline. No `ge=` constraints here: Dagster copies them onto the
    template-accepting field and `{{ env.X }}` would fail; make_pipeline validates instead."""

    tokens: int = Field(description=("Tokens per chunk at most, counted with the model's own tokenizer (the local "
                                     "model embeds at most 254; OpenAI models 8191)."))
    overlap: int = Field(default=0, description="Tokens of the previous chunk's end repeated at a chunk's start.")


class Backfill(dg.Resolvable, dg.Model):
    """`backfill:` of a pipeline: how a re-embed (a model change) calls the provider."""

    via: Literal["direct", "batch"] = Field(
        default="direct",
        description=("`direct`: /v1/embeddings; `batch`: the provider's Batch API (half the price, results within "
                     "24 h; shard runs submit and return, the `autoembed_batches` sensor collects)."))
    fallback: Literal["resubmit", "direct"] = Field(
        default="resubmit",
        description="Rows a batch did not return (expired, failed, missing lines): submit them again, or embed them directly.")


@dg.scaffold_with(EmbeddingPipelineScaffolder)
class EmbeddingPipeline(dg.Component, dg.Resolvable, dg.Model):
    """Keep a Postgres table's vector column equal to the embedding of each row's current content:
    triggers enqueue changed rows, a queue sensor starts drain runs, a partitioned asset re-embeds
    the table after a model change (a change of model, dimensions, provider or content function
    here marks it stale)."""

    table: str = Field(description="The table, `name` or `schema.name`.")
    content_function: str = Field(
        default="embedding_input",
        description="SQL function taking a row of the table and returning the text to embed.")
    embedding_column: str = Field(default="embedding", description="The vector/halfvec column to keep in sync.")
    key_column: str = Field(default="id", description="The table's key column.")
    queue: str = Field(default="embedding_jobs", description="pgmq queue of the table's jobs (its drain lane).")
    provider: Literal["openai", "local"] | None = Field(
        default=None, description="`openai` (any OpenAI-compatible server) or `local`; default: AUTOEMBED_PROVIDER.")
    model: str | None = Field(default=None, description="Model name; default: AUTOEMBED_MODEL or the provider's.")
    dimensions: int | None = Field(default=None, description="Output size; default: the column's size.")
    batch_size: int | None = Field(default=None, description="Texts per provider request.")
    shards: int = Field(default=8, description="Partitions of the re-embed asset (slices of the key space).")
    chunking: Chunking | None = Field(
        default=None,
        description=("Embed long text as chunks into `<table>_chunks` (one vector per chunk, not per row): "
                     "e.g. `{tokens: 200, overlap: 20}`. Unset: one vector per row in `embedding_column`."))
    backfill: Backfill | None = Field(
        default=None, description="How a re-embed calls the provider: `{via: batch}` for the Batch API at half price.")
    name: str | None = Field(default=None, description="Pipeline name; default: the defs/<name>/ folder's name.")

    _folder: str | None = PrivateAttr(default=None)

    @classmethod
    def load(cls, attributes, context: dg.ComponentLoadContext) -> "EmbeddingPipeline":
        component = super().load(attributes, context)
        component._folder = context.path.name  # the pipeline's default name
        return component

    def pipeline(self) -> Pipeline:
        """The plain spec core/ works with (validated: errors name the value and the fix)."""
        name = self.name or self._folder
        if not name:
            raise dg.DagsterInvalidDefinitionError("EmbeddingPipeline needs a `name` when built outside a defs/ folder")
        fields = self.model_dump(exclude={"name", "table", "chunking", "backfill"})
        if self.backfill is not None:
            fields.update(backfill_via=self.backfill.via, backfill_fallback=self.backfill.fallback)
        if self.chunking is not None:
            fields.update(chunk_tokens=self.chunking.tokens, chunk_overlap=self.chunking.overlap)
        p = make_pipeline(name, table=self.table, **fields)
        s = p.embedder_settings()
        problem = size_problem(s.provider, s.model, p.dimensions)
        if problem:  # checked at load (`dg check defs`), not by a backfill that cannot succeed
            raise ConfigError(f"pipeline {name!r}: `dimensions: {p.dimensions}`: {problem}: remove `dimensions:` "
                              "or choose a model that makes that size")
        if p.chunked:
            # Checked at load, not at the first drain: the sizes and the model's window.
            s = p.embedder_settings()
            try:
                check_chunk_sizes(p.chunk_tokens, p.chunk_overlap, provider_window(s.provider, s.max_input_tokens),
                                  YAML_NAMES)
            except ConfigError as exc:
                raise ConfigError(f"pipeline {name!r}, chunking: {{tokens: {p.chunk_tokens}, overlap: "
                                  f"{p.chunk_overlap}}} with the {s.provider} model: {exc}") from None
        return p

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from ..defs.autoembed import build_pipeline_defs, build_shared_defs, load_time_facts

        me = self.pipeline()
        if me.backfill_via == "batch":
            # Refused at load (`dg check defs`): the local model, a server answering 404 on /v1/batches.
            from ..core.migrate.batch_backfill import check_batch_support, refuse_chunked

            refuse_chunked(me)
            check_batch_support(me)
        declared = sorted(project_pipelines(context, self), key=lambda p: p.name)
        names = [p.name for p in declared]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise dg.DagsterInvalidDefinitionError(
                f"two EmbeddingPipeline components are named {', '.join(dup)}: give one a different `name:`")
        facts = load_time_facts(tuple(declared))
        own = build_pipeline_defs(me, facts)
        if declared[0].name != me.name:
            return own
        return dg.Definitions.merge(own, build_shared_defs(declared, facts))


def project_pipelines(context: dg.ComponentLoadContext, me: EmbeddingPipeline) -> list[Pipeline]:
    """Every EmbeddingPipeline of the project (this one included), as specs."""
    try:
        components = context.component_tree.get_all_components(of_type=EmbeddingPipeline)
    except Exception:  # noqa: BLE001 - a component built outside a project tree (tests, a python defs file)
        components = []
    pipelines = {c.pipeline().name: c.pipeline() for c in components}
    pipelines[me.pipeline().name] = me.pipeline()
    return list(pipelines.values())
