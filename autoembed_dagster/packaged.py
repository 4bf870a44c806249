"""Files the package carries besides its code, the same way in a checkout and in an installed wheel.

The checkout keeps them at its top (sql/, demo/, dagster_home/dagster.yaml); the package holds
links to them (autoembed_dagster/sql, demo_project, dagster_home), which a wheel stores as real
folders (pyproject.toml, package-data); the deployment templates live in the package itself
(autoembed_dagster/deploy). Nothing here depends on the source tree being next to the installed
package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged(name: str) -> Path:
    """`name` (sql, demo_project, dagster_home) inside the installed package."""
    return Path(str(resources.files("autoembed_dagster").joinpath(name)))


def checkout() -> Path | None:
    """The source checkout the package runs from (editable install, PYTHONPATH): the folder its
    links point into. None when the package is installed from a wheel."""
    link = packaged("demo_project")
    return link.resolve().parent if link.is_symlink() else None
