"""The one resource: where the database is. Secrets stay in the environment (dg.EnvVar), so the
Dagster UI and run config show the variable's name, never the URL."""


import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import dagster as dg
import psycopg

from ..core.config import Settings
from ..core.db.server import connect, database_url


class AutoembedResource(dg.ConfigurableResource):
    """The autoembed database. Unset: the embedded server under AUTOEMBED_HOME (started on demand)."""

    database_url: str | None = None

    def url(self) -> str:
        return self.database_url or database_url(Settings.from_env())

    def settings(self, queue: str | None = None) -> Settings:
        """Drain settings from the environment, for this database and queue."""
        settings = replace(Settings.from_env(), database_url=self.url())
        return replace(settings, queue=queue) if queue else settings

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        conn = connect(self.url())
        try:
            yield conn
        finally:
            conn.close()


def autoembed_resource() -> AutoembedResource:
    """AUTOEMBED_DATABASE_URL through dg.EnvVar when it is set, else the embedded server."""
    if os.environ.get("AUTOEMBED_DATABASE_URL"):
        return AutoembedResource(database_url=dg.EnvVar("AUTOEMBED_DATABASE_URL"))
    return AutoembedResource()
