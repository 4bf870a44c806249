"""Which embedder makes the vectors of a target: the configured model, migration-aware."""

from __future__ import annotations

from typing import Callable

import psycopg

from ..config import EmbedderSettings
from ..db.server import lending
from ..embed import make_embedder
from ..embed.base import Embedder
from ..targets.catalog import Target
from ..targets.models import migration_aware

EmbedderResolver = Callable[[Target], Embedder]


def resolve_embedder(resolver: EmbedderResolver, target: Target, conn: psycopg.Connection) -> Embedder:
    """resolver(target), with `conn` (a connection to the database `target` is in) lent for the
    migration lookup: the right database, and no connection of the resolver's own."""
    with lending(conn):
        return resolver(target)


def default_resolver(settings: EmbedderSettings | None = None, *, url: str | None = None,
                     migrations: bool = True) -> EmbedderResolver:
    """The model for every table: AUTOEMBED_PROVIDER / AUTOEMBED_MODEL, sized to the column.

    Migration-aware (core.targets.models): a column in a model migration gets the migration's model,
    looked up in the database at `url` (default: the configured one)."""
    settings = settings or EmbedderSettings.from_env()
    if not migrations:
        return lambda target: make_embedder(settings, dimensions=target.dimensions)
    return migration_aware(lambda schema, table, column: settings, url)


def pipeline_resolver(pipelines, base: EmbedderSettings | None = None, *, url: str | None = None,
                      migrations: bool = True) -> EmbedderResolver:
    """Each pipeline's own model for its table; the default model for any other enrolled table.

    Migration-aware like default_resolver: during a model migration the shadow column gets the new
    model and the live column keeps the model of the vectors it holds, whatever the config says."""
    base = base or EmbedderSettings.from_env()
    by_target = {p.table_key: p.embedder_settings(base) for p in pipelines}

    def configured(schema: str, table: str, column: str) -> EmbedderSettings:
        return by_target.get((schema, table, column), base)

    if migrations:
        return migration_aware(configured, url)

    def resolve(target: Target) -> Embedder:
        return make_embedder(configured(target.key.schema, target.key.table, target.key.embedding_column),
                             dimensions=target.dimensions)

    return resolve
