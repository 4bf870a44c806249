"""The queue sensors (one per drain lane) and the health-check schedule.

A queue sensor only reads the queue's metrics (never claims: claiming happens inside the run). Each
tick it records an observation of the queue asset when the numbers moved (or once a minute), so
the UI plots depth and age, and it requests drain runs while jobs are claimable: as many as
core.drain.scaling.drains_to_request says for the backlog's depth and age, minus the drains of that lane
already queued or running (AUTOEMBED_MAX_DRAINS at most). Run keys are unique per tick and run:
Dagster dedupes run keys forever.
"""


import hashlib
import json
import os
import time
from contextlib import nullcontext

import dagster as dg
from dagster import DagsterRunStatus, RunsFilter

from ..core.queue import pgmq
from ..core.config import ScalingSettings
from ..core.drain.scaling import drains_to_request
from ..core.pipelines import Pipeline
from .assets import CONFIG_ERROR_TAG, LANE_TAG, embeddings_key, queue_key, refresh_op_name
from .resources import AutoembedResource
from .truth import recorded_version

ACTIVE_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
OBSERVE_AT_LEAST_EVERY_SECONDS = 60.0


# The queue sensor's minimum_interval_seconds. Dagster's sensor daemon evaluates sensors once per
# loop of 5 s at the most often; a minimum interval of 5 s aliases with that loop (a tick that
# starts a few ms short of 5 s after the last one is skipped), so a 5 s sensor often ticks every
# 10 s. 1 s lets it tick on every loop: a first write waits <= 5 s for its drain run to be
# requested, not up to 10 s (bench/bench_cold_start.py). A tick is one pgmq metrics query.
DEFAULT_SENSOR_INTERVAL = 1


# While no drain run of its lane is alive, a queue sensor's evaluation waits this long on LISTEN
# for a send to its queue, and requests the drain run the moment one is notified: a first write
# after an idle period no longer waits for the daemon's next sensor loop (up to 5 s). It stays
# under that 5 s loop (with room for the tick's own overhead), else the daemon, which keeps one
# tick per sensor in flight, would skip a loop. Each waiting lane holds one sensor worker thread
# (dagster.yaml `sensors.num_workers`) and one connection. 0 turns the wait off.
DEFAULT_SENSOR_WAIT = 3.5


def sensor_wait() -> float:
    try:
        return min(max(0.0, float(os.environ.get("AUTOEMBED_SENSOR_WAIT", str(DEFAULT_SENSOR_WAIT)))), 60.0)
    except ValueError:
        return DEFAULT_SENSOR_WAIT


def sensor_interval() -> int:
    try:
        return max(1, int(os.environ.get("AUTOEMBED_SENSOR_INTERVAL", str(DEFAULT_SENSOR_INTERVAL))))
    except ValueError:
        return DEFAULT_SENSOR_INTERVAL


def _blocking_runs(instance: dg.DagsterInstance, job_name: str, queue: str, limit: int = 10) -> list:
    """Drain runs of this lane that are queued or running (and not past their maximum runtime:
    a run whose process died is failed by run monitoring, and must not count meanwhile)."""
    records = instance.get_run_records(
        RunsFilter(job_name=job_name, tags={LANE_TAG: queue}, statuses=ACTIVE_STATUSES), limit=limit
    )
    now = time.time()
    live = []
    for record in records:
        max_runtime = record.dagster_run.tags.get(dg.MAX_RUNTIME_SECONDS_TAG)
        started = record.start_time
        if (record.dagster_run.status == DagsterRunStatus.STARTED and started and max_runtime
                and now - started > float(max_runtime) + 60):
            continue
        live.append(record)
    return live


CONFIG_ERROR_BACKOFF_SECONDS = 300.0  # after a drain stopped by a configuration error


def _stopped_by_configuration(instance: dg.DagsterInstance, job_name: str, queue: str) -> str | None:
    """Why not to start a drain now: the lane's last finished drain run failed on the provider's
    configuration (a rejected key, an unknown model) less than CONFIG_ERROR_BACKOFF_SECONDS ago.
    A new run would fail the same way; the jobs wait, queued, until then (or until the fix)."""
    records = instance.get_run_records(
        RunsFilter(job_name=job_name, tags={LANE_TAG: queue},
                   statuses=[DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE]), limit=1)
    if not records:
        return None
    record = records[0]
    ended = record.end_time or 0
    if record.dagster_run.tags.get(CONFIG_ERROR_TAG) != "true" or time.time() - ended >= CONFIG_ERROR_BACKOFF_SECONDS:
        return None
    return (f"drain run {record.dagster_run.run_id[:8]} failed on the provider's configuration; the next drain of "
            f"{queue} starts {CONFIG_ERROR_BACKOFF_SECONDS - (time.time() - ended):.0f} s from now (fix the "
            "configuration, then launch a drain job to start at once)")


def _refresh_requests(context: dg.SensorEvaluationContext, refresh_job, pipelines, state: dict) -> list:
    """Check-only runs of `refresh_<queue>`, one per embeddings asset whose recorded model (the code
    version of its latest materialization) is not the code's, once per code version: the run
    records the asset current when the table is (a pipeline declared over a table embedded
    already), else logs what to launch; it never re-embeds. `state` (the cursor's "refresh": the
    version last looked at per pipeline) keeps this to one look-up per pipeline and version."""
    repo = getattr(context, "repository_def", None)
    if refresh_job is None or repo is None:
        return []
    graph = repo.asset_graph
    requests = []
    for p in pipelines:
        key = embeddings_key(p)
        defined = graph.get(key).code_version if graph.has(key) else None
        digest = hashlib.sha256(defined.encode()).hexdigest()[:12] if defined else None
        if not defined or state.get(p.name) == digest:
            continue
        state[p.name] = digest  # the cursor stays short: the version's digest
        if recorded_version(context.instance, key) == defined:
            continue
        requests.append(dg.RunRequest(
            job_name=refresh_job.name, asset_selection=[key],
            run_key=f"refresh:{p.name}:{digest}",  # once per code version, ever
            run_config={"ops": {refresh_op_name(p): {"config": {"start_reembed": False}}}},
            tags={"autoembed/refresh": p.name}))
    return requests


def build_queue_sensor(queue: str, job: dg.JobDefinition, refresh_job=None,
                       pipelines: list[Pipeline] | None = None) -> dg.SensorDefinition:
    """`refresh_job`: the asset job of the queue's embeddings assets (`pipelines`), which the sensor
    runs check-only when an asset's recorded model is not the code's (_refresh_requests). Being
    among its targets, the sensor is named on each embeddings asset's page as what keeps it fresh."""
    pipelines = list(pipelines or [])

    @dg.sensor(
        name=f"{queue}_sensor",
        jobs=[job, refresh_job] if refresh_job is not None else [job],
        minimum_interval_seconds=sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(f"Keeps the embeddings of queue `{queue}` fresh: watches the queue and starts `{job.name}` "
                     "runs while jobs wait: one, and more while the backlog stays deep and old "
                     "(AUTOEMBED_MAX_DRAINS at most)."
                     + (f" When an embeddings asset's recorded model is not the code's (a new pipeline, a model "
                        f"change), it starts one check-only `{refresh_job.name}` run for it: that records the asset "
                        "current if the table is, and never re-embeds." if refresh_job is not None else "")),
    )
    def queue_sensor(context: dg.SensorEvaluationContext, autoembed: AutoembedResource) -> dg.SensorResult:
        try:
            state = json.loads(context.cursor) if context.cursor else {}
            tick = int(state.get("tick", 0)) + 1
        except (ValueError, TypeError, AttributeError):  # a cursor edited by hand: start over
            state, tick = {}, 1
        looked = dict(state.get("refresh") or {}) if isinstance(state.get("refresh"), dict) else {}
        refresh = _refresh_requests(context, refresh_job, pipelines, looked)

        def result(*, cursor: str, run_requests=(), skip_reason: str | None = None, **kw) -> dg.SensorResult:
            cursor = json.dumps({**json.loads(cursor), "refresh": looked})
            requests = [*refresh, *run_requests]
            return dg.SensorResult(run_requests=requests, skip_reason=None if requests else skip_reason,
                                   cursor=cursor, **kw)

        now = time.time()
        events = []
        last = state.get("observed") or {}
        # No drain alive: listen for the first send (a live drain run listens itself).
        wait = sensor_wait()
        listen = wait > 0 and not _blocking_runs(context.instance, job.name, queue, limit=1)
        with autoembed.connect() as conn, (pgmq.Listening(conn, queue) if listen else nullcontext()) as listening:
            # Read after LISTEN took effect: a send in between is counted here, not missed.
            m = pgmq.metrics(conn, queue)
            if listening is not None and m is not None and m.visible == 0 and listening.wait(wait):
                m = pgmq.metrics(conn, queue)
            observe = m is not None and (last.get("depth") != m.depth or last.get("visible") != m.visible
                                         or now - float(last.get("at", 0)) >= OBSERVE_AT_LEAST_EVERY_SECONDS)
            # Rows, not only messages: a bulk statement's message covers up to 200 rows.
            queued_rows = pgmq.rows(conn, queue) if observe else None
        if m is None:
            return result(skip_reason=f"queue {queue!r} does not exist (run `autoembed db init`)",
                          cursor=json.dumps({**state, "tick": tick}))
        if observe:
            events.append(dg.AssetObservation(
                asset_key=queue_key(queue),
                metadata={
                    "rows": queued_rows,
                    "depth": m.depth,
                    "claimable": m.visible,
                    "in_flight_or_retrying": m.invisible,
                    "oldest_age_seconds": dg.MetadataValue.float(m.oldest_age_seconds),
                    "total_sent": m.total_sent,
                },
            ))
            last = {"depth": m.depth, "visible": m.visible, "at": now}
        cursor = json.dumps({"tick": tick, "observed": last})

        if m.visible == 0:
            return result(asset_events=events, cursor=cursor,
                          skip_reason=f"no claimable job in {queue} (depth {m.depth})")
        stopped = _stopped_by_configuration(context.instance, job.name, queue)
        if stopped:
            return result(asset_events=events, cursor=cursor, skip_reason=stopped)
        scaling = ScalingSettings.from_env()
        active = _blocking_runs(context.instance, job.name, queue, limit=scaling.max_drains + 10)
        more = drains_to_request(m.visible, m.oldest_age_seconds, len(active), scaling)
        if not more:
            run = active[0].dagster_run
            return result(
                asset_events=events, cursor=cursor,
                skip_reason=(f"{m.visible} job(s) wait; drain run {run.run_id[:8]} is {run.status.value}"
                             f" ({len(active)} of at most {scaling.max_drains} active)"))
        requests = [
            dg.RunRequest(
                job_name=job.name,
                run_key=f"{queue}:{tick}:{int(now * 1000)}:{i}",  # unique per tick and per run of the tick
                tags={LANE_TAG: queue, "autoembed/claimable_at_request": str(m.visible)},
            )
            for i in range(more)
        ]
        return result(run_requests=requests, asset_events=events, cursor=cursor)

    return queue_sensor


def build_health_schedule(job) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="health_checks_schedule",
        job=job,
        cron_schedule=os.environ.get("AUTOEMBED_HEALTH_CRON", "17 * * * *"),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-evaluates every pipeline's health checks (catches a model change with an idle queue).",
    )
