"""Pipeline definitions: which table/column is kept embedded, with which model.

Declared in `autoembed.toml` at the project root (or the file named by AUTOEMBED_PIPELINES), so a
model change is a reviewed code change. Example:

    [pipelines.documents]
    table = "public.documents"
    content_function = "embedding_input"
    embedding_column = "embedding"
    key_column = "id"
    queue = "embedding_jobs"       # default: Supabase's queue
    provider = "openai"            # default: AUTOEMBED_PROVIDER / zero-config choice
    model = "text-embedding-3-small"
    batch_size = 256
    shards = 8

Tables enrolled only through SQL (Supabase-style triggers) are drained too, with the default model.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .config import PROVIDERS, ConfigError, EmbedderSettings, default_batch_size

_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")


@dataclass(frozen=True)
class Pipeline:
    name: str
    schema: str
    table: str
    content_function: str = "embedding_input"
    embedding_column: str = "embedding"
    key_column: str = "id"
    queue: str = "embedding_jobs"
    provider: str | None = None
    model: str | None = None
    dimensions: int | None = None
    batch_size: int | None = None
    shards: int = 8

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    def embedder_settings(self, base: EmbedderSettings | None = None) -> EmbedderSettings:
        """The model of this pipeline: its own fields over the environment's defaults."""
        base = base or EmbedderSettings.from_env()
        if self.provider and self.provider != base.provider:
            # Another provider: its own defaults, not the environment's model name.
            default_model = "text-embedding-3-small" if self.provider == "openai" else "all-MiniLM-L6-v2"
            base = replace(base, provider=self.provider, model=default_model,
                           batch_size=default_batch_size(self.provider))
        return replace(
            base,
            model=self.model or base.model,
            dimensions=self.dimensions or base.dimensions,
            batch_size=self.batch_size or base.batch_size,
        )


def _split_table(name: str, value: str) -> tuple[str, str]:
    parts = value.split(".")
    if len(parts) == 1:
        return "public", parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ConfigError(f"pipeline {name!r}: table {value!r} must be 'table' or 'schema.table'")


def parse_pipelines(data: dict) -> list[Pipeline]:
    pipelines = []
    for name, spec in (data.get("pipelines") or {}).items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"pipeline name {name!r} must be lowercase letters, digits and _")
        if not isinstance(spec, dict) or "table" not in spec:
            raise ConfigError(f"pipeline {name!r} needs a table")
        known = set(Pipeline.__dataclass_fields__) - {"name", "schema"}
        unknown = set(spec) - known
        if unknown:
            raise ConfigError(f"pipeline {name!r}: unknown setting(s) {', '.join(sorted(unknown))}")
        if spec.get("provider") and spec["provider"] not in PROVIDERS:
            raise ConfigError(f"pipeline {name!r}: provider {spec['provider']!r} is not one of {', '.join(PROVIDERS)}")
        for field in ("dimensions", "batch_size", "shards"):
            if field in spec and (not isinstance(spec[field], int) or spec[field] < 1):
                raise ConfigError(f"pipeline {name!r}: {field} = {spec[field]!r} must be a positive integer")
        schema, table = _split_table(name, spec["table"])
        pipelines.append(Pipeline(name=name, schema=schema, **{**spec, "table": table}))
    return pipelines


def pipelines_path() -> Path:
    return Path(os.environ.get("AUTOEMBED_PIPELINES", "autoembed.toml"))


def load_pipelines(path: Path | None = None) -> list[Pipeline]:
    """Pipelines from the TOML file; none when the file does not exist."""
    path = path or pipelines_path()
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_pipelines(data)
