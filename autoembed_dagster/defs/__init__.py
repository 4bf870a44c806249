"""Dagster objects only (loaded by `dg.load_from_defs_folder` from definitions.py). Each op, asset
check and sensor here is a thin shell over `autoembed_dagster.core`."""
