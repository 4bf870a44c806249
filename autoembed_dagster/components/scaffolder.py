"""`dg scaffold defs autoembed_dagster.EmbeddingPipeline <name> --table ... [--content-function ...]
[--chunk-tokens N [--chunk-overlap M]]` writes `defs/<name>/defs.yaml` with the given attributes (the defaults left out, listed as comments)."""

from __future__ import annotations

import dagster as dg
from pydantic import BaseModel, Field


class ScaffoldParams(BaseModel):
    table: str | None = Field(default=None, description="The table, `name` or `schema.name`.")
    content_function: str | None = Field(default=None, description="SQL function row -> text to embed.")
    embedding_column: str | None = Field(default=None, description="The vector column.")
    key_column: str | None = Field(default=None, description="The table's key column.")
    queue: str | None = Field(default=None, description="pgmq queue (drain lane).")
    provider: str | None = Field(default=None, description="openai or local.")
    model: str | None = Field(default=None, description="Model name.")
    dimensions: int | None = Field(default=None, description="Output size.")
    shards: int | None = Field(default=None, description="Partitions of the re-embed asset.")
    chunk_tokens: int | None = Field(default=None, description="Embed chunks of at most this many tokens (chunking.tokens).")
    chunk_overlap: int | None = Field(default=None, description="Tokens repeated between chunks (chunking.overlap).")


DEFAULTS_COMMENT = """\
# Defaults of the attributes not set above:
#   content_function: embedding_input   embedding_column: embedding   key_column: id
#   queue: embedding_jobs   provider/model: AUTOEMBED_PROVIDER / AUTOEMBED_MODEL (or the provider's default)
#   dimensions: the column's size   shards: 8
#   chunking: none (one vector per row); `chunking: {tokens: 200, overlap: 20}` embeds chunks into <table>_chunks
# A change of provider, model, dimensions, chunking or content_function (or of the function's body) marks
# the pipeline's partitions stale: `dagster job launch -j backfill` re-embeds and promotes.
"""


class EmbeddingPipelineScaffolder(dg.Scaffolder[ScaffoldParams]):
    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        params = request.params or ScaffoldParams()
        attributes = {k: v for k, v in params.model_dump(exclude={"chunk_tokens", "chunk_overlap"}).items()
                      if v is not None}
        if params.chunk_overlap is not None and params.chunk_tokens is None:
            raise ValueError(f"--chunk-overlap {params.chunk_overlap} needs --chunk-tokens")
        if params.chunk_tokens is not None:
            attributes["chunking"] = {"tokens": params.chunk_tokens, "overlap": params.chunk_overlap or 0}
        attributes.setdefault("table", request.target_path.name)  # the folder names the table by default
        dg.scaffold_component(request, attributes)
        if request.scaffold_format == "yaml" and not request.append:
            path = request.target_path / "defs.yaml"
            path.write_text(path.read_text() + "\n" + DEFAULTS_COMMENT)
