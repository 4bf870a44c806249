"""`autoembed deploy scaffold`: the files that put a user's Dagster project on Kubernetes.

Writes into the project folder (the one whose pyproject.toml has `[tool.dg.project]`):
`Dockerfile` (the image of its code server and run pods), `.dockerignore`, and `values.yaml` for
Dagster's official Helm chart. The templates are the files beside this module.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..core.config import ConfigError

TEMPLATES = {"Dockerfile": "Dockerfile", ".dockerignore": "dockerignore", "values.yaml": "values.yaml"}


@dataclass(frozen=True)
class Project:
    root: Path
    root_module: str
    code_location: str

    @classmethod
    def read(cls, root: Path) -> "Project":
        path = root / "pyproject.toml"
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no pyproject.toml in {root}: run in your Dagster project's folder") from None
        dg = data.get("tool", {}).get("dg", {}).get("project")
        if not isinstance(dg, dict) or not dg.get("root_module"):
            raise ConfigError(f"{path} has no [tool.dg.project] root_module: `autoembed deploy scaffold` needs a "
                              "Dagster project (`dg scaffold project NAME`)")
        deps = data.get("project", {}).get("dependencies", [])
        if not any(re.match(r"autoembed[-_]dagster\b", d, re.I) for d in deps):
            raise ConfigError(f"{path}: [project] dependencies do not name autoembed-dagster, which the image "
                              "installs from there: add it (e.g. \"autoembed-dagster\")")
        return cls(root, dg["root_module"], dg.get("code_location_name") or dg["root_module"])

    @property
    def k8s_name(self) -> str:
        """The code location as a Kubernetes name (lower case, digits, '-')."""
        return re.sub(r"[^a-z0-9-]+", "-", self.code_location.lower()).strip("-")[:50] or "dagster"


def render(name: str, project: Project, image: str) -> str:
    text = (Path(__file__).parent / TEMPLATES[name]).read_text()
    values = {"root_module": project.root_module, "code_location": project.code_location, "image": image,
              "deployment_name": project.k8s_name, "release": project.k8s_name,
              "dagster_version": metadata.version("dagster")}
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise AssertionError(f"template {name}: unfilled {left}")
    return text


def scaffold(root: Path, image: str | None = None, force: bool = False) -> list[Path]:
    """Write the deployment files into the project at `root`; returns the paths written. Refuses
    to overwrite an existing file unless `force`."""
    project = Project.read(root)
    image = image or f"registry.example.com/{project.k8s_name}"
    paths = {name: root / name for name in TEMPLATES}
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already in {root}: keep your own or pass --force to overwrite")
    for name, path in paths.items():
        path.write_text(render(name, project, image))
    return list(paths.values())
