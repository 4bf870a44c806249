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


def _root_modules(root: Path) -> set[str]:
    """The project's root and defs module names (pyproject.toml [tool.dg.project] or dg.toml [project])."""
    for name, table in (("pyproject.toml", ("tool", "dg", "project")), ("dg.toml", ("project",))):
        try:
            data = tomllib.loads((root / name).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        for part in table:
            data = data.get(part) if isinstance(data, dict) else None
        if isinstance(data, dict):
            return {str(data[k]).split(".")[0] for k in ("root_module", "defs_module") if data.get(k)}
    return set()


def _forget_other_copies(root: Path) -> None:
    """Dagster imports the project's module by name: one imported earlier in this process from
    another folder (another project of that name; a test's earlier copy) would be used again, its
    defs.yaml files read instead of this project's. Drop such a module and its submodules, and
    import this project's from the front of sys.path."""
    import importlib

    for module in _root_modules(root):
        cached = sys.modules.get(module)
        if cached is None:
            continue
        where = [Path(p) for p in (getattr(cached, "__path__", None) or [])] or (
            [Path(cached.__file__).parent] if getattr(cached, "__file__", None) else [])
        if where and all(Path(p).resolve().is_relative_to(root) for p in where):
            continue  # this project's own
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
        if str(root) in sys.path:
            sys.path.remove(str(root))
            sys.path.insert(0, str(root))
        importlib.invalidate_caches()


def declared_pipelines(start: Path | None = None) -> list[Pipeline]:
    """Every EmbeddingPipeline component of the project, as plain specs (sorted by name)."""
    from dagster.components.core.component_tree import ComponentTree

    from .embedding_pipeline import EmbeddingPipeline

    root = project_root(start)
    _refuse_toml(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # a project that is not pip-installed (the demo)
    _forget_other_copies(root)
    tree = ComponentTree.for_project(root)
    return sorted((c.pipeline() for c in tree.get_all_components(of_type=EmbeddingPipeline)),
                  key=lambda p: p.name)
