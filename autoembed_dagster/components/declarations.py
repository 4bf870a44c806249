"""The pipelines a Dagster project declares, read the way Dagster reads them (its component tree
and the component's own model: one parser), for the `autoembed` CLI and the Python API.

The project is the directory named by AUTOEMBED_PROJECT, else the nearest directory at or above
the current one whose pyproject.toml / dg.toml has a `[tool.dg.project]` (or dg.toml `[project]`)
table, else (running from a source checkout) the checkout's own project.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from ..core.config import ConfigError
from ..core.pipelines import Pipeline, defs_yaml_for_toml


def _is_project(directory: Path) -> bool:
    for name, table in (("pyproject.toml", ("tool", "dg", "project")), ("dg.toml", ("project",))):
        path = directory / name
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError:
                continue
            for part in table:
                data = data.get(part) if isinstance(data, dict) else None
            if isinstance(data, dict):
                return True
    return False


def project_root(start: Path | None = None) -> Path:
    explicit = os.environ.get("AUTOEMBED_PROJECT")
    if explicit:
        root = Path(explicit).expanduser().resolve()
        if not _is_project(root):
            raise ConfigError(f"AUTOEMBED_PROJECT={explicit!r} is not a Dagster project (no [tool.dg.project] in "
                              "its pyproject.toml): point it at the directory holding pyproject.toml")
        return root
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if _is_project(directory):
            return directory
    from ..packaged import checkout

    own = checkout()  # None in an installed wheel: there the user's project is the only one
    if own is not None and _is_project(own):
        return own
    raise ConfigError(f"no Dagster project at or above {here}: run inside your project (pyproject.toml with "
                      "[tool.dg.project]) or set AUTOEMBED_PROJECT")


def _refuse_toml(root: Path) -> None:
    for path in {Path("autoembed.toml").resolve(), root / "autoembed.toml"}:
        if path.is_file():
            files = defs_yaml_for_toml(path)
            body = "\n".join(f"--- {name} ---\n{text}" for name, text in files.items())
            raise ConfigError(f"{path} is no longer read: pipelines are Dagster components now. Create these files "
                              f"under your project's defs module, then delete {path.name}:\n{body}")


def declared_pipelines(start: Path | None = None) -> list[Pipeline]:
    """Every EmbeddingPipeline component of the project, as plain specs (sorted by name)."""
    from dagster.components.core.component_tree import ComponentTree

    from .embedding_pipeline import EmbeddingPipeline

    root = project_root(start)
    _refuse_toml(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # a project that is not pip-installed (the demo)
    tree = ComponentTree.for_project(root)
    return sorted((c.pipeline() for c in tree.get_all_components(of_type=EmbeddingPipeline)),
                  key=lambda p: p.name)
