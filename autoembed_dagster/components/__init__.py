"""Dagster components of autoembed: `EmbeddingPipeline` (one instance per pipeline, in
`defs/<name>/defs.yaml`) and its scaffolder (`dg scaffold defs autoembed_dagster.EmbeddingPipeline`)."""

from .embedding_pipeline import EmbeddingPipeline

__all__ = ["EmbeddingPipeline"]
