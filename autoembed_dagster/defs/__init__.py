"""The Dagster wiring of autoembed (thin shells over `autoembed_dagster.core`), built by the
EmbeddingPipeline component (autoembed_dagster/components/). In this repository the folder is also
the project's defs folder: `documents/defs.yaml` is its example pipeline. The modules define no
Dagster objects at module level, so loading the folder adds only what the components build."""
