"""autoembed-dagster: automatic embeddings for Postgres, run by Dagster."""

__version__ = "0.1.0"
