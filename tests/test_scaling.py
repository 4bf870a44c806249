"""Parallel drains per queue: the pure decision (core/drain/scaling.py), the queue sensor that applies it
(build_sensor_context on a real instance and database), and the drain op's concurrency pool."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from dagster import DagsterRunStatus

from autoembed_dagster.core.config import DEFAULT_MAX_DRAINS, ConfigError, ScalingSettings
from autoembed_dagster.core.drain.scaling import desired_drains, drain_pool, drains_to_request
from autoembed_dagster.defs.assets import LANE_TAG

from .test_dagster_layer import defs, insert_docs, instance, make_run, tick  # noqa: F401 - fixtures

S = ScalingSettings(max_drains=4, rows_per_drain=100, min_age_seconds=10.0)


# -- the decision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("claimable, age, expected", [
    (0, 999.0, 0),  # nothing to claim: no drain
    (1, 999.0, 1),
    (100, 999.0, 1),  # exactly one drain's worth
    (101, 999.0, 2),  # ceil
    (350, 999.0, 4),
    (10_000, 999.0, 4),  # capped
    (10_000, 9.9, 1),  # deep but young: one drain first (a burst it may clear in seconds)
    (10_000, 10.0, 4),  # old enough
])
def test_desired_drains_follow_depth_and_age(claimable, age, expected):
    assert desired_drains(claimable, age, S) == expected


def test_more_drains_only_up_to_the_desired_number():
    assert drains_to_request(350, 60.0, active=0, settings=S) == 4
    assert drains_to_request(350, 60.0, active=1, settings=S) == 3
    assert drains_to_request(350, 60.0, active=4, settings=S) == 0
    # The backlog shrank below what runs: none more, and none stopped (they idle out).
    assert drains_to_request(50, 60.0, active=3, settings=S) == 0
    assert drains_to_request(0, 60.0, active=0, settings=S) == 0
    assert drains_to_request(1, 0.0, active=-1, settings=S) == 1  # a nonsense count is not a credit


def test_scaling_settings_from_the_environment(monkeypatch):
    assert ScalingSettings.from_env().max_drains == DEFAULT_MAX_DRAINS == 2
    monkeypatch.setenv("AUTOEMBED_MAX_DRAINS", "8")
    monkeypatch.setenv("AUTOEMBED_ROWS_PER_DRAIN", "2000")
    monkeypatch.setenv("AUTOEMBED_SCALE_MIN_AGE", "2.5")
    assert ScalingSettings.from_env() == ScalingSettings(8, 2000, 2.5)
    monkeypatch.setenv("AUTOEMBED_MAX_DRAINS", "0")
    with pytest.raises(ConfigError, match="AUTOEMBED_MAX_DRAINS='0' must be at least 1"):
        ScalingSettings.from_env()


def test_drain_pool_names_are_one_per_queue_and_safe():
    assert drain_pool("embedding_jobs") == "autoembed_drain_embedding_jobs"
    assert drain_pool("a-b.c") == "autoembed_drain_a_b_c"
    assert drain_pool("notes_q") != drain_pool("embedding_jobs")


# -- the sensor ------------------------------------------------------------------------------------
@pytest.fixture
def scale_env(monkeypatch):
    monkeypatch.setenv("AUTOEMBED_MAX_DRAINS", "3")
    monkeypatch.setenv("AUTOEMBED_ROWS_PER_DRAIN", "10")
    monkeypatch.setenv("AUTOEMBED_SCALE_MIN_AGE", "0")


def test_sensor_requests_as_many_drains_as_the_backlog_needs_with_unique_run_keys(supabase_docs, defs, instance,
                                                                                  scale_env):
    insert_docs(supabase_docs, 25)  # 3 drains' worth at 10 rows each
    first = tick(defs, instance)
    assert len(first.run_requests) == 3
    assert all(r.tags[LANE_TAG] == "embedding_jobs" for r in first.run_requests)
    second = tick(defs, instance, cursor=first.cursor)  # nothing launched them: asked again
    keys = [r.run_key for r in first.run_requests + second.run_requests]
    assert len(set(keys)) == 6, keys

    make_run(instance, DagsterRunStatus.QUEUED)
    assert len(tick(defs, instance, cursor=second.cursor).run_requests) == 2  # one is already queued
    make_run(instance, DagsterRunStatus.STARTED)
    make_run(instance, DagsterRunStatus.STARTING)
    full = tick(defs, instance, cursor=second.cursor)
    assert not full.run_requests
    assert "(3 of at most 3 active)" in full.skip_message
    # Runs of another lane and finished runs do not count.
    make_run(instance, DagsterRunStatus.STARTED, job_name="drain_other", lane="other")
    assert not tick(defs, instance, cursor=second.cursor).run_requests


def test_sensor_adds_no_drain_while_the_backlog_is_shallow_or_young(supabase_docs, defs, instance, scale_env,
                                                                     monkeypatch):
    insert_docs(supabase_docs, 5)
    make_run(instance, DagsterRunStatus.STARTED)
    shallow = tick(defs, instance)
    assert not shallow.run_requests and "(1 of at most 3 active)" in shallow.skip_message
    insert_docs(supabase_docs, 40, prefix="more")
    monkeypatch.setenv("AUTOEMBED_SCALE_MIN_AGE", "3600")  # the backlog is deep but seconds old
    assert not tick(defs, instance, cursor=shallow.cursor).run_requests
    monkeypatch.setenv("AUTOEMBED_SCALE_MIN_AGE", "0")
    assert len(tick(defs, instance, cursor=shallow.cursor).run_requests) == 2
    cursor = json.loads(shallow.cursor)
    assert cursor["tick"] == 1


# -- the pool --------------------------------------------------------------------------------------
def test_each_queue_drain_op_has_its_own_pool(defs):
    job = defs.resolve_job_def("drain_embedding_jobs")
    (node,) = job.graph.node_defs
    assert node.pool == "autoembed_drain_embedding_jobs"


def test_the_pool_holds_a_second_drain_run_in_the_queue_while_the_first_runs(defs):
    """What the queued run coordinator asks before it dequeues a run (Dagster's own counter, with
    granularity run as in dagster.yaml): a drain run waits while its queue's pool is full, whoever
    launched it, and goes when the running one ends."""
    from dagster import DagsterEvent, DagsterEventType, RunsFilter
    from dagster._core.op_concurrency_limits_counter import GlobalOpConcurrencyLimitsCounter

    job = defs.resolve_job_def("drain_embedding_jobs")
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"granularity": "run", "default_limit": 1}}}) as inst:
        running = inst.create_run_for_job(job)
        inst.run_storage.handle_run_event(running.run_id, DagsterEvent(DagsterEventType.RUN_START.value, job_name=job.name))
        queued = inst.create_run_for_job(job)
        assert queued.run_op_concurrency.all_pools == {"autoembed_drain_embedding_jobs"}

        def blocked() -> bool:
            counter = GlobalOpConcurrencyLimitsCounter(
                inst, [queued], inst.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED])),
                concurrency_keys=inst.event_log_storage.get_concurrency_keys(),
                pool_limits=inst.event_log_storage.get_pool_limits(),
                pool_granularity=inst.get_concurrency_config().pool_config.pool_granularity)
            return counter.is_blocked(queued)

        blocked()  # the daemon's first pass creates the pool with dagster.yaml's default_limit
        assert blocked()
        inst.run_storage.handle_run_event(running.run_id, DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=job.name))
        assert not blocked()
