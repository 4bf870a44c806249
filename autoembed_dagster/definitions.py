"""The code location `autoembed` (workspace.yaml, `dagster dev`, `dg`): the components under defs/
(one `defs/<name>/defs.yaml` per pipeline, `type: autoembed_dagster.EmbeddingPipeline`)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
