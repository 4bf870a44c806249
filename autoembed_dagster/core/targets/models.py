"""Which model a target's vectors are of: the model spec (provider, model, size, content function),
the record of a model migration in flight as the drain and search read it (`get_migration`), and
the migration-aware embedder resolver the drain uses. The migration's operations (start, promote,
rollback, drop-old, abort) are core.migrate.migration's flow over core.targets.shapes.ColumnChange."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import psycopg
from psycopg import errors, sql

from ..config import PROVIDERS, ConfigError, EmbedderSettings, default_batch_size
from ..db.server import lent_connection
from ..embed import make_embedder
from ..embed.base import Embedder
from .catalog import Target, TargetKey


ACTIVE = ("backfilling", "promoted")


# Characters a model spec may not contain: Dagster partition keys forbid `| , [ ]`; ':' separates
# the spec's fields (only the model name may contain it: Ollama tags like "nomic-embed-text:v1.5").
_FORBIDDEN = set("|,[]") | {chr(c) for c in range(32)}


class MigrationChanged(RuntimeError):
    """A writer holds a view of the column that a promotion/rollback has since changed.

    Deliberately not a ValueError/TargetError: the drain must not dead-letter its jobs. The drain
    batch fails, its messages reappear after their visibility timeout, and a fresh drain (which
    re-reads the catalog) embeds them with the right model."""


# -- model spec ----------------------------------------------------------------------------------
def _check_part(what: str, value: object, extra: str = "") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    bad = (_FORBIDDEN | set(extra)) & set(value)
    if bad or "..." in value:
        raise ConfigError(f"{what} {value!r} contains {''.join(sorted(bad)) or '...'!r}, which is not allowed")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """What makes a vector: provider, model, output size and the input (content) function."""

    provider: str
    model: str
    dimensions: int
    content_function: str

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"provider {self.provider!r} is not one of {', '.join(PROVIDERS)}")
        _check_part("model", self.model)
        _check_part("content function", self.content_function, ":")
        if not isinstance(self.dimensions, int) or self.dimensions < 1:
            raise ConfigError(f"dimensions must be a positive integer, got {self.dimensions!r}")

    @property
    def identity_key(self) -> str:
        """The model as embedding_state.model records it (ModelIdentity.key)."""
        return f"{self.provider}:{self.model}:{self.dimensions}"

    @property
    def key(self) -> str:
        """`provider:model:dimensions:content_function`: a Dagster partition key and code version."""
        return f"{self.identity_key}:{self.content_function}"

    @classmethod
    def parse(cls, key: str) -> "ModelSpec":
        parts = key.split(":")
        if len(parts) < 4:
            raise ConfigError(f"model key {key!r} is not provider:model:dimensions:content_function")
        try:
            dims = int(parts[-2])
        except ValueError:
            raise ConfigError(f"model key {key!r}: dimensions {parts[-2]!r} is not a number") from None
        return cls(parts[0], ":".join(parts[1:-2]), dims, parts[-1])

    @classmethod
    def from_identity(cls, identity_key: str, content_function: str) -> "ModelSpec":
        return cls.parse(f"{identity_key}:{content_function}")

    def settings(self, base: EmbedderSettings) -> EmbedderSettings:
        """Embedder settings for this model: the base's transport settings, this model's identity."""
        if self.provider != base.provider:
            base = replace(base, provider=self.provider, batch_size=default_batch_size(self.provider))
        return replace(base, model=self.model, dimensions=self.dimensions)


def describe_change(old: ModelSpec | None, new: ModelSpec) -> str:
    """Every part of what makes a vector that changed from `old` to `new` (model, dimensions,
    content function), for promotion messages."""
    if old is None:
        return f"{new.identity_key} of {new.content_function}"
    parts = []
    if old.identity_key != new.identity_key:
        parts.append(f"model {old.identity_key} -> {new.identity_key}")
    if old.content_function != new.content_function:
        parts.append(f"content function {old.content_function} -> {new.content_function}")
    return ", ".join(parts) or f"{new.key} (unchanged)"


# -- the migration record ------------------------------------------------------------------------
MIGRATION_COLUMNS = ("id", "schema_name", "table_name", "embedding_column", "shadow_column", "old_column",
            "key_column", "queue", "content_function", "old_content_function", "provider", "model",
            "dimensions", "vector_type", "model_key", "old_model", "status")


MIGRATION_SELECT = sql.SQL("select {} from autoembed.model_migrations").format(
    sql.SQL(", ").join(sql.Identifier(c) for c in MIGRATION_COLUMNS))


@dataclass(frozen=True)
class Migration:
    id: int
    schema_name: str
    table_name: str
    embedding_column: str
    shadow_column: str
    old_column: str
    key_column: str
    queue: str
    content_function: str
    old_content_function: str
    provider: str
    model: str
    dimensions: int
    vector_type: str
    model_key: str
    old_model: str | None
    status: str

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.provider, self.model, self.dimensions, self.content_function)

    @property
    def old_spec(self) -> ModelSpec | None:
        return ModelSpec.from_identity(self.old_model, self.old_content_function) if self.old_model else None

    @property
    def label(self) -> str:
        return f"{self.schema_name}.{self.table_name}.{self.embedding_column}"

    @property
    def live_key(self) -> TargetKey:
        """The column search uses, with the input of the vectors it holds now."""
        fn = self.content_function if self.status in ("promoted", "finished") else self.old_content_function
        return TargetKey(self.schema_name, self.table_name, fn, self.embedding_column, self.key_column)

    @property
    def shadow_key(self) -> TargetKey:
        return TargetKey(self.schema_name, self.table_name, self.content_function, self.shadow_column,
                         self.key_column)

    def spec_for_column(self, column: str) -> ModelSpec | None:
        """The model whose vectors `column` takes now; None: the configured one.

        Raises MigrationChanged for the shadow name of a promoted migration (it no longer exists)."""
        if self.status == "backfilling":
            if column == self.shadow_column:
                return self.spec
            return self.old_spec if column == self.embedding_column else None
        if self.status == "promoted":
            if column == self.embedding_column:
                return self.spec
            if column == self.shadow_column:
                raise MigrationChanged(f"{self.label}: the shadow column {column} was promoted; "
                                       "its pending jobs were replaced by jobs for the live column")
        return None


def migration_from_row(row: tuple | None) -> Migration | None:
    return Migration(*row) if row else None


def get_migration(conn: psycopg.Connection, schema: str, table: str, column: str,
                  statuses: tuple[str, ...] = ACTIVE) -> Migration | None:
    """The migration in flight whose live (or shadow) column is `column`."""
    return migration_from_row(conn.execute(
        MIGRATION_SELECT + sql.SQL(" where schema_name = %s and table_name = %s and status = any(%s)"
                          " and %s in (embedding_column, shadow_column) order by id desc limit 1"),
        (schema, table, list(statuses), column),
    ).fetchone())


# -- the drain's view: which model embeds which column -------------------------------------------------
ConfiguredSettings = Callable[[str, str, str], EmbedderSettings]  # (schema, table, live column) -> settings


class MigrationAwareResolver:
    """An EmbedderResolver that honours model migrations in flight.

    Without a migration: the configured model. During one: the shadow column gets the new model and
    the live column keeps the model its vectors were made with (the configuration may already name
    the new one). After promotion: the live column gets the new model. One indexed query per call
    (cheap next to a batch), on the connection a caller lends (database.lending: the drain lends
    the one it claims on) or else on a connection of its own.
    """

    MISSING_TABLE_RECHECK_SECONDS = 30.0

    def __init__(self, configured: ConfiguredSettings, url: str | None = None) -> None:
        self._configured = configured
        self._url = url
        self._conn: psycopg.Connection | None = None
        self._no_table_until = 0.0

    def __call__(self, target: Target) -> Embedder:
        k = target.key
        m = self.migration_for(k.schema, k.table, k.embedding_column)
        if m is None:
            return make_embedder(self._configured(k.schema, k.table, k.embedding_column), dimensions=target.dimensions)
        spec = m.spec_for_column(k.embedding_column)
        settings = self._configured(k.schema, k.table, m.embedding_column)
        if spec is not None:
            if spec.dimensions != target.dimensions:
                raise MigrationChanged(
                    f"{k.label} holds {target.vector_type}({target.dimensions}) for this writer, but migration "
                    f"{m.id} ({m.status}) gives it {spec.identity_key}: the column changed since it was read")
            settings = spec.settings(settings)
        return make_embedder(settings, dimensions=target.dimensions)

    def migration_for(self, schema: str, table: str, column: str) -> Migration | None:
        if time.monotonic() < self._no_table_until:
            return None
        lent = lent_connection()
        for attempt in (1, 2):
            conn = lent or self._connection()
            try:
                return get_migration(conn, schema, table, column)
            except errors.UndefinedTable:
                self._no_table_until = time.monotonic() + self.MISSING_TABLE_RECHECK_SECONDS  # before 007
                return None
            except psycopg.OperationalError:
                if lent is not None or attempt == 2:
                    raise  # the lender's connection is the lender's to reconnect
                self.close()  # the server restarted or dropped us: one reconnect
        return None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            from ..db.server import connect, database_url

            self._conn = connect(self._url or database_url())
            weakref.finalize(self, self._conn.close)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def migration_aware(configured: ConfiguredSettings, url: str | None = None) -> MigrationAwareResolver:
    return MigrationAwareResolver(configured, url)
