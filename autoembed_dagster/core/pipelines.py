"""Pipeline specs: which table/column is kept embedded, with which model (plain data, no Dagster).

Pipelines are declared as Dagster components, one `defs/<name>/defs.yaml` per pipeline
(`type: autoembed_dagster.EmbeddingPipeline`, see autoembed_dagster/components/); the component
turns its attributes into the `Pipeline` below with `make_pipeline`, and core/ only ever receives
these plain specs. Tables registered in the database but declared nowhere (Supabase's SQL
triggers, `autoembed enroll`) are found by `discover_pipelines` and run with the default model.

The facts every path needs about a pipeline live here, on `Pipeline`: its model spec sized like
the drain sizes it (`spec`), its code version (`code_version`), its live target key (`live_key`),
its shard keys (`shard_keys`; `shard_of` is SQL's autoembed.shard_of in Python).

The old `autoembed.toml` is no longer read: `defs_yaml_for_toml` prints the defs.yaml files that
replace it.

May import: core.config, core.embed, core.targets.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg

from .config import PROVIDERS, ConfigError, EmbedderSettings, default_batch_size
from .embed import native_dimensions
from .targets.catalog import TargetKey
from .targets.models import ModelSpec

_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
COMPONENT_TYPE = "autoembed_dagster.EmbeddingPipeline"
# Triggers that enqueue jobs (what a table registered through SQL is recognised by). Their first
# arguments are (content function, embedding column[, key column, queue]).
_ENQUEUE_FUNCTIONS = ("util.queue_embeddings", "autoembed.queue_embeddings_bulk")
_MIGRATION_TRIGGER_PREFIX = "autoembed_migration_"  # a migration's shadow-column trigger


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
    # Long documents: embed chunks of at most `chunk_tokens` tokens (the model's own tokenizer) into
    # `<schema>.<table>_chunks` instead of one vector per row; None = a vector column target.
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    # How a re-embed calls the provider: "direct" (/v1/embeddings) or "batch" (its Batch API, half
    # price, within 24 h; core/migrate/batch_backfill.py); what a batch leaves undone: "resubmit" or "direct".
    backfill_via: str = "direct"
    backfill_fallback: str = "resubmit"
    discovered: bool = False  # registered in the database, declared in no defs.yaml

    @property
    def chunked(self) -> bool:
        return self.chunk_tokens is not None

    @property
    def chunk_table(self) -> str:
        """The chunk table's name (same schema as the table)."""
        return f"{self.table}_chunks"

    @property
    def table_key(self) -> tuple[str, str, str]:
        """How the drain names this pipeline's target (its stats' by_table key, the resolver's key):
        (schema, table, embedding column), or for a chunked pipeline (schema, table, chunk table)."""
        return (self.schema, self.table, self.chunk_table if self.chunked else self.embedding_column)

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

    def spec(self, *, column_dimensions: int | None = None, base: EmbedderSettings | None = None) -> ModelSpec:
        """The model the configuration names, sized like the drain sizes it: the configured
        dimensions, else the target's size (`column_dimensions`) when the model can make it, else
        the model's own size."""
        s = self.embedder_settings(base)
        native, flexible = native_dimensions(s.provider, s.model)
        dims = s.dimensions or (column_dimensions if flexible else None) or native
        if dims is None:
            raise ConfigError(f"pipeline {self.name}: the output size of {s.model!r} is unknown: set `dimensions`")
        model = "all-MiniLM-L6-v2" if s.provider == "local" else s.model  # the local model's aliases
        return ModelSpec(s.provider, model, dims, self.content_function)

    def code_version(self, base: EmbedderSettings | None = None) -> str:
        """The model identity as configured (provider, model, size, input), known without a
        database: a size that follows the target reads `column`. A change of any part makes the
        asset stale."""
        s = self.embedder_settings(base)
        native, flexible = native_dimensions(s.provider, s.model)
        dims = s.dimensions or (None if flexible else native)
        model = "all-MiniLM-L6-v2" if s.provider == "local" else s.model
        return f"{s.provider}:{model}:{dims or 'column'}:{self.content_function}"

    @property
    def live_key(self) -> TargetKey:
        """The vector column search reads (a column pipeline's target, as configured)."""
        return TargetKey(self.schema, self.table, self.content_function, self.embedding_column, self.key_column)

    @property
    def shard_keys(self) -> list[str]:
        """The partition keys of this pipeline's backfill shards (see shard_keys())."""
        return shard_keys(self.shards)


# -- shards: key slices of a table, the same for every target shape (SQL: autoembed.shard_of) --------
def shard_of(key_text: str, shards: int) -> int:
    """The shard of a row whose key prints as `key_text` (same as SQL autoembed.shard_of)."""
    return int.from_bytes(hashlib.sha256(key_text.encode()).digest()[:4], "big") % shards


def shard_keys(shards: int) -> list[str]:
    """Partition keys of the shards, zero-padded so they sort in order: 00, 01, ... 15."""
    if shards < 1:
        raise ConfigError(f"shards must be at least 1, got {shards}")
    width = len(str(shards - 1))
    return [str(i).zfill(width) for i in range(shards)]


def split_table(name: str, value: str, default_schema: str = "public") -> tuple[str, str]:
    """(schema, table) of a table named as in SQL (core.targets.parse_qualified: `name`,
    `schema.name`, quoted parts taken exactly)."""
    from .targets.catalog import parse_qualified

    try:
        schema, table = parse_qualified(value if isinstance(value, str) else "")
    except ValueError as exc:
        raise ConfigError(f"pipeline {name!r}: {exc}; write 'table' or 'schema.table'") from None
    return schema or default_schema, table


def make_pipeline(name: str, *, table: str, **fields) -> Pipeline:
    """A validated Pipeline from declared values (the component's attributes)."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"pipeline name {name!r} must be lowercase letters, digits and _ "
                          "(rename the defs/<name>/ folder or set `name:`)")
    unknown = set(fields) - (set(Pipeline.__dataclass_fields__) - {"name", "schema", "table"})
    if unknown:
        raise ConfigError(f"pipeline {name!r}: unknown setting(s) {', '.join(sorted(unknown))}")
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("provider") and fields["provider"] not in PROVIDERS:
        raise ConfigError(f"pipeline {name!r}: provider {fields['provider']!r} is not one of {', '.join(PROVIDERS)}")
    for field in ("dimensions", "batch_size", "shards", "chunk_tokens"):
        if field in fields and (not isinstance(fields[field], int) or fields[field] < 1):
            raise ConfigError(f"pipeline {name!r}: {field} = {fields[field]!r} must be a positive integer")
    overlap = fields.get("chunk_overlap", 0)
    if not isinstance(overlap, int) or overlap < 0:
        raise ConfigError(f"pipeline {name!r}: chunk_overlap = {overlap!r} must be 0 or a positive integer")
    if overlap and (fields.get("chunk_tokens") is None or overlap >= fields["chunk_tokens"]):
        raise ConfigError(f"pipeline {name!r}: chunk_overlap = {overlap!r} needs chunk_tokens greater than it "
                          f"(chunk_tokens = {fields.get('chunk_tokens')!r})")
    if fields.get("backfill_via", "direct") not in ("direct", "batch"):
        raise ConfigError(f"pipeline {name!r}: backfill via {fields['backfill_via']!r} must be `direct` or `batch`")
    if fields.get("backfill_fallback", "resubmit") not in ("resubmit", "direct"):
        raise ConfigError(f"pipeline {name!r}: backfill fallback {fields['backfill_fallback']!r} must be `resubmit` "
                          "or `direct`")
    schema, table_name = split_table(name, table)
    return Pipeline(name=name, schema=schema, table=table_name, **fields)


# -- tables registered in the database but declared nowhere ------------------------------------------
def registered_targets(conn: psycopg.Connection) -> list[tuple[str, str, str, str, str, str]]:
    """(schema, table, content function, embedding column, key column, queue) of every table
    registered for embedding: the `autoembed.targets` registry (enrolled tables, and tables whose
    Supabase-style trigger has fired), then tables whose enqueue triggers have not fired yet (not
    registered until their first write). A migration's shadow column is not a table of its own."""
    found: dict[tuple[str, str, str], tuple[str, str, str, str, str, str]] = {}
    for schema, table, fn, column, key, queue in conn.execute(
        """select schema_name, table_name, content_function, embedding_column, key_column, queue
           from autoembed.target_catalog
           where origin <> 'migration' and embedding_column is not null and key_column is not null
           order by 1, 2, 4"""):
        found.setdefault((schema, table, column), (schema, table, fn, column, key, queue))
    for schema, table, func, raw_args, nargs in conn.execute(
        """select n.nspname, c.relname, pn.nspname || '.' || p.proname, t.tgargs, t.tgnargs
           from pg_trigger t
           join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
           join pg_proc p on p.oid = t.tgfoid join pg_namespace pn on pn.oid = p.pronamespace
           where not t.tgisinternal and t.tgname not like %s
           order by 1, 2, t.tgname""", (_MIGRATION_TRIGGER_PREFIX + "%",)):
        if func not in _ENQUEUE_FUNCTIONS:
            continue
        args = [a.decode() for a in bytes(raw_args).split(b"\x00")[:nargs]]
        if len(args) < 2:
            continue
        key = args[2] if len(args) > 2 and args[2] else "id"
        queue = args[3] if len(args) > 3 and args[3] else "embedding_jobs"
        found.setdefault((schema, table, args[1]), (schema, table, args[0], args[1], key, queue))
    return list(found.values())


def discovered_name(schema: str, table: str, column: str, taken: set[str]) -> str:
    """A pipeline name for a discovered table, what a user would type: the table's name (plus the
    column when it is not `embedding`); the schema goes in front only when that name is taken."""
    def plain(text: str) -> str:
        return re.sub(r"[^a-z0-9_]", "_", text.lower()).lstrip("_0123456789")[:40] or "table"

    short = plain(table if column == "embedding" else f"{table}_{column}")
    base = short if short not in taken else plain(f"{schema}_{short}")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def discover_pipelines(conn: psycopg.Connection, declared: list[Pipeline]) -> list[Pipeline]:
    """Registered tables that no declared pipeline covers, as pipelines with the default model
    (chunk targets with their registered chunk sizes). A declared pipeline for the same table and
    column (or chunk table) wins."""
    covered = {p.table_key for p in declared}
    taken = {p.name for p in declared}
    out = []
    for schema, table, fn, column, key, queue in registered_targets(conn):
        if (schema, table, column) in covered:
            continue
        name = discovered_name(schema, table, column, taken)
        taken.add(name)
        out.append(Pipeline(name=name, schema=schema, table=table, content_function=fn, embedding_column=column,
                            key_column=key, queue=queue, discovered=True))
    # Chunk targets (sql/012) enrolled without a declaration: their registered chunk sizes.
    chunked = {(p.schema, p.table) for p in declared if p.chunked}
    for schema, table, fn, chunk_table, key, queue, tokens, overlap in conn.execute(
        """select schema_name, table_name, content_function, chunk_table, key_column, queue, chunk_tokens, chunk_overlap
           from autoembed.target_catalog where chunk_tokens is not null and chunk_table is not null
             and key_column is not null order by 1, 2"""):
        if (schema, table) in chunked:
            continue
        name = discovered_name(schema, table, "embedding", taken)  # (a table has one kind of enrolment)
        taken.add(name)
        out.append(Pipeline(name=name, schema=schema, table=table, content_function=fn, key_column=key, queue=queue,
                            chunk_tokens=tokens, chunk_overlap=overlap, discovered=True))
    return out


# -- the content function's body is part of the model identity ----------------------------------------
def content_function_digest(conn: psycopg.Connection, p: Pipeline) -> str | None:
    """First 12 hex digits of SHA-256 of the content function's definition (pg_get_functiondef),
    so editing its body changes the pipeline's code version. None when it does not exist (yet)."""
    row = conn.execute(
        """select case when r.t is not null then pg_get_functiondef(autoembed.content_function(r.t, %s)) end
           from (select to_regclass(format('%%I.%%I', %s::text, %s::text)) as t) r""",
        (p.content_function, p.schema, p.table)).fetchone()
    if not row or row[0] is None:
        return None
    return hashlib.sha256(row[0].encode()).hexdigest()[:12]


# -- autoembed.toml: read only to print what replaces it -----------------------------------------------
def defs_yaml_for_toml(path: Path) -> dict[str, str]:
    """{`defs/<name>/defs.yaml`: its text} for every pipeline of an old autoembed.toml."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    out = {}
    for name, spec in (data.get("pipelines") or {}).items():
        if not isinstance(spec, dict) or "table" not in spec:
            raise ConfigError(f"{path}: pipeline {name!r} needs a table")
        make_pipeline(name, **spec)  # the same validation as the component's
        lines = [f"type: {COMPONENT_TYPE}", "", "attributes:"]
        lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in spec.items()]
        out[f"defs/{name}/defs.yaml"] = "\n".join(lines) + "\n"
    return out


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
