"""How many drain runs a queue should have: scale on backlog depth and age, like KEDA.

desired = ceil(claimable rows / rows per drain), capped at the queue's maximum; a backlog younger
than `min_age_seconds` gets one drain (a burst that one drain clears in seconds is not worth a
run's start-up); an empty one none, and the drains that run end on their own when idle.
The queue sensor asks for `desired - active` more runs. Pure functions: no database, no Dagster.
"""

from __future__ import annotations

import math
import re

from ..config import ScalingSettings


def desired_drains(claimable: int, oldest_age_seconds: float, settings: ScalingSettings) -> int:
    """Drain runs the queue should have now for `claimable` visible messages, the oldest of the
    queue being `oldest_age_seconds` old."""
    if claimable <= 0:
        return 0
    wanted = math.ceil(claimable / settings.rows_per_drain)
    if oldest_age_seconds < settings.min_age_seconds:
        wanted = 1
    return max(1, min(wanted, settings.max_drains))


def drains_to_request(claimable: int, oldest_age_seconds: float, active: int, settings: ScalingSettings) -> int:
    """More drain runs to request this tick, given `active` queued or running ones (never negative:
    surplus drains are not stopped, they end when the queue is empty and they idle out)."""
    return max(0, desired_drains(claimable, oldest_age_seconds, settings) - max(active, 0))


_POOL_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def drain_pool(queue: str) -> str:
    """The Dagster concurrency pool of a queue's drain op (limit: dagster.yaml `concurrency.pools`
    default_limit, or `dagster instance concurrency set <pool> <n>` per queue)."""
    return "autoembed_drain_" + _POOL_UNSAFE.sub("_", queue)
