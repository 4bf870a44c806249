"""Assembles the Dagster objects of a set of pipelines (plain `Pipeline` specs).

- `build_pipeline_defs(p)`: one pipeline's own objects (embeddings + vector index assets, health
  checks, the partitioned re-embed asset and its job). Each EmbeddingPipeline component returns
  these for its pipeline.
- `build_shared_defs(declared, facts)`: what several pipelines share, built once from all of them
  (one component does it): per queue an observed queue asset, a drain job and its sensor; the
  source tables; `health_checks` + schedule; `backfill`, `model_migration`; the `autoembed`
  resource; and the pipelines of tables registered in the database but declared nowhere.
- `build_defs(pipelines)`: everything for `pipelines` (tests; a project without components).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import dagster as dg
import psycopg

from ..core.pipelines import Pipeline, content_function_digest, discover_pipelines
from .assets import embeddings_key, pipeline_specs, queues_of, shared_specs
from .backfill import build_embeddings_asset, build_model_change_defs, build_reembed_defs
from .checks import build_health_checks
from .drain import build_drain_job
from .resources import autoembed_resource
from .sensors import build_health_schedule, build_queue_sensor

log = logging.getLogger(__name__)
FACTS_TTL_SECONDS = 10.0  # one database look-up per code-location load, shared by its components


@dataclass(frozen=True)
class LoadTimeFacts:
    """What the definitions need from the database when they load: the digest of each content
    function's definition (part of the code version) and the tables registered but undeclared."""

    digests: dict[str, str] = field(default_factory=dict)
    discovered: tuple[Pipeline, ...] = ()
    note: str = ""


_facts_cache: dict[tuple, tuple[float, LoadTimeFacts]] = {}
_facts_lock = threading.Lock()


def load_time_facts(declared: tuple[Pipeline, ...]) -> LoadTimeFacts:
    """Read only when AUTOEMBED_DATABASE_URL is set: loading definitions never starts a server."""
    url = os.environ.get("AUTOEMBED_DATABASE_URL")
    if not url:
        return LoadTimeFacts(note="AUTOEMBED_DATABASE_URL is not set: no discovery, no content-function digests")
    key = (url, declared)
    with _facts_lock:
        hit = _facts_cache.get(key)
        if hit and time.monotonic() - hit[0] < FACTS_TTL_SECONDS:
            return hit[1]
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                discovered = tuple(discover_pipelines(conn, list(declared)))
                digests = {p.name: d for p in (*declared, *discovered)
                           if (d := content_function_digest(conn, p)) is not None}
            facts = LoadTimeFacts(digests, discovered)
        except psycopg.Error as exc:
            # The definitions still load (the UI shows why); runs report the database error.
            log.warning("autoembed: database not reachable while loading definitions: %s", exc)
            facts = LoadTimeFacts(note=f"database not reachable at load: {str(exc).strip()[:200]}")
        _facts_cache[key] = (time.monotonic(), facts)
        return facts


def build_pipeline_defs(p: Pipeline, facts: LoadTimeFacts | None = None) -> dg.Definitions:
    facts = facts or LoadTimeFacts()
    digest = facts.digests.get(p.name)
    embeddings, *others = pipeline_specs(p, digest, facts.note)
    return dg.Definitions.merge(
        dg.Definitions(assets=[build_embeddings_asset(p, embeddings), *others], asset_checks=[build_health_checks(p)]),
        build_reembed_defs(p, digest),
    )


def build_shared_defs(declared: Sequence[Pipeline], facts: LoadTimeFacts | None = None) -> dg.Definitions:
    facts = facts or LoadTimeFacts()
    pipelines = [*declared, *facts.discovered]
    jobs: list = []
    sensors = []
    for queue in queues_of(pipelines):
        job = build_drain_job(queue, pipelines)
        jobs.append(job)
        on_queue = [embeddings_key(p) for p in pipelines if p.queue == queue]
        refresh = dg.define_asset_job(
            f"refresh_{queue}", selection=on_queue, executor_def=dg.in_process_executor,
            description=(f"Check the pipelines of queue `{queue}`; re-embed those whose table is not current "
                         "under the code's model (what the asset page's Materialize does). The queue sensor runs "
                         "it check-only for an asset whose recorded model is not the code's.")) if on_queue else None
        jobs += [refresh] if refresh is not None else []
        sensors.append(build_queue_sensor(queue, job, refresh, [p for p in pipelines if p.queue == queue]))
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
    return dg.Definitions.merge(
        dg.Definitions(
            assets=shared_specs(pipelines),
            jobs=jobs,
            sensors=sensors,
            schedules=schedules,
            resources={"autoembed": autoembed_resource()},
        ),
        build_model_change_defs(pipelines),
        *(build_pipeline_defs(p, facts) for p in facts.discovered),
    )


def build_defs(pipelines: Sequence[Pipeline], *, discover: bool = False) -> dg.Definitions:
    """Every object for `pipelines` (+ the undeclared registered tables when `discover`)."""
    declared = tuple(pipelines)
    facts = load_time_facts(declared) if discover else LoadTimeFacts()
    return dg.Definitions.merge(
        *(build_pipeline_defs(p, facts) for p in declared),
        build_shared_defs(declared, facts),
    )
