"""Plain-Python core: no Dagster imports allowed anywhere under this package."""
