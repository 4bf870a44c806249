"""The code location `autoembed` (workspace.yaml, `dagster dev`, `dg`): everything under defs/."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

_PACKAGE = Path(__file__).resolve().parent


@dg.definitions
def defs() -> dg.Definitions:
    if (_PACKAGE.parent / "pyproject.toml").exists():
        # A checkout / editable install: the dg project layout ([tool.dg.project] in pyproject).
        return dg.load_from_defs_folder(path_within_project=_PACKAGE)
    # Installed as a plain package (no pyproject next to it): the same objects, built directly.
    from .core.pipelines import load_pipelines
    from .defs.autoembed import build_defs
    from .defs.backfill import build_backfill_defs

    pipelines = load_pipelines()
    return dg.Definitions.merge(build_defs(pipelines), build_backfill_defs(pipelines))
