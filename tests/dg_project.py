"""A user's own Dagster project on disk (pyproject with [tool.dg.project], definitions.py loading
the defs folder, one defs/<name>/defs.yaml per pipeline): what `pip install autoembed-dagster` +
`dg scaffold defs autoembed_dagster.EmbeddingPipeline ...` gives a user."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import yaml

DEFINITIONS = '''
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
'''


def make_project(root: Path, pipelines: dict[str, dict], module: str = "my_project") -> Path:
    (root / module / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{module}"\nversion = "0.1.0"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        f'[tool.dg.project]\nroot_module = "{module}"\ncode_location_name = "{module}"\n')
    (root / "workspace.yaml").write_text(
        f"load_from:\n  - python_module:\n      module_name: {module}.definitions\n      attribute: defs\n"
        f"      location_name: {module}\n      working_directory: .\n")
    (root / module / "__init__.py").write_text("")
    (root / module / "definitions.py").write_text(DEFINITIONS)
    for name, attributes in pipelines.items():
        write_pipeline(root, name, attributes, module)
    return root


def write_pipeline(root: Path, name: str, attributes: dict, module: str = "my_project") -> Path:
    folder = root / module / "defs" / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "defs.yaml"
    path.write_text(yaml.safe_dump({"type": "autoembed_dagster.EmbeddingPipeline", "attributes": attributes},
                                   sort_keys=False))
    return path


def load_project_defs(root: Path, module: str = "my_project"):
    """The project's Definitions, loaded the way `dagster`/`dg` load them (a fresh import)."""
    sys.path.insert(0, str(root))
    try:
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
        definitions = importlib.import_module(f"{module}.definitions")
        return definitions.defs()
    finally:
        sys.path.remove(str(root))
