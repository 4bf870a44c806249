"""Assembles the Dagster objects from the pipelines declared in autoembed.toml (AUTOEMBED_PIPELINES).

Per queue (drain lane): an observed queue asset, a drain job and its sensor. Per pipeline: the
source table (external), the embeddings and vector index assets, and their health checks.
"""

from __future__ import annotations

from typing import Sequence

import dagster as dg

from ..core.pipelines import Pipeline, load_pipelines
from .assets import asset_specs, embeddings_key, queues_of
from .checks import build_health_checks
from .drain import build_drain_job
from .resources import autoembed_resource
from .sensors import build_health_schedule, build_queue_sensor


def build_defs(pipelines: Sequence[Pipeline] | None = None) -> dg.Definitions:
    pipelines = list(load_pipelines() if pipelines is None else pipelines)
    jobs: list = []
    sensors = []
    for queue in queues_of(pipelines):
        job = build_drain_job(queue, pipelines)
        jobs.append(job)
        sensors.append(build_queue_sensor(queue, job))
    checks = [build_health_checks(p, pipelines) for p in pipelines]
    schedules = []
    if pipelines:
        health_job = dg.define_asset_job(
            "health_checks",
            selection=dg.AssetSelection.checks_for_assets(*(embeddings_key(p) for p in pipelines)),
            description="Evaluate every pipeline's health checks.",
            executor_def=dg.in_process_executor,
        )
        jobs.append(health_job)
        schedules.append(build_health_schedule(health_job))
    return dg.Definitions(
        assets=asset_specs(pipelines),
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={"autoembed": autoembed_resource()},
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs()
