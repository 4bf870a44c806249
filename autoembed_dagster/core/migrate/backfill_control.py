"""Pause, resume and a time window for a pipeline's backfill (re-embed) shard runs.

The pause flag is a row of `autoembed.backfill_pauses` (sql/010_rate_limit.sql), so every shard
run, on any machine, sees it at its next page. The window (e.g. nights only) comes from the
environment: AUTOEMBED_BACKFILL_WINDOW_<PIPELINE> or AUTOEMBED_BACKFILL_WINDOW, "HH:MM-HH:MM"
with an optional IANA zone ("22:00-06:00 Europe/Berlin"; default UTC). A window may cross
midnight. A shard that stops for either reason has lost nothing: the next run resumes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, time, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from ..config import ConfigError

_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*(?:\s(\S+))?\s*")


def paused(conn: psycopg.Connection, pipeline: str) -> bool:
    return conn.execute("select exists (select from autoembed.backfill_pauses where pipeline = %s)",
                        (pipeline,)).fetchone()[0]


def pause(conn: psycopg.Connection, pipeline: str, reason: str | None = None) -> None:
    """Shard runs of `pipeline` stop at their next page (and new ones stop at once) until resume."""
    conn.execute("insert into autoembed.backfill_pauses (pipeline, reason) values (%s, %s) "
                 "on conflict (pipeline) do update set paused_at = now(), reason = excluded.reason",
                 (pipeline, reason))


def resume(conn: psycopg.Connection, pipeline: str) -> bool:
    """Lift the pause; returns whether there was one. Re-launch the backfill to continue."""
    return conn.execute("delete from autoembed.backfill_pauses where pipeline = %s",
                        (pipeline,)).rowcount > 0


@dataclass(frozen=True)
class Window:
    start: time
    end: time
    zone: ZoneInfo | timezone = timezone.utc

    def contains(self, now: datetime) -> bool:
        if now.tzinfo is None:
            raise ValueError("in_window needs an aware datetime (e.g. datetime.now(timezone.utc))")
        t = now.astimezone(self.zone).time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # crosses midnight: 22:00-06:00


def parse_window(text: str, name: str = "AUTOEMBED_BACKFILL_WINDOW") -> Window:
    m = _WINDOW.fullmatch(text)
    if m is None:
        raise ConfigError(f"{name}={text!r} is not a window: write HH:MM-HH:MM, optionally with a zone "
                          "(e.g. '22:00-06:00' or '22:00-06:00 Europe/Berlin')")
    h1, m1, h2, m2, zone = m.groups()
    try:
        start, end = time(int(h1), int(m1)), time(int(h2), int(m2))
    except ValueError:
        raise ConfigError(f"{name}={text!r}: hours must be 0-23 and minutes 0-59") from None
    if start == end:
        raise ConfigError(f"{name}={text!r} is empty (start = end); unset it to allow any time")
    try:
        tz = ZoneInfo(zone) if zone else timezone.utc
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name}={text!r}: unknown time zone {zone!r} (use an IANA name like Europe/Berlin)") from None
    return Window(start, end, tz)


def in_window(now: datetime, window: str | Window | None) -> bool:
    """Whether a backfill may run at `now` (aware) under `window` (None or "": always)."""
    if not window:
        return True
    return (parse_window(window) if isinstance(window, str) else window).contains(now)


def window_for(pipeline: str) -> Window | None:
    """The pipeline's window from the environment, its own variable first."""
    for name in (f"AUTOEMBED_BACKFILL_WINDOW_{pipeline.upper()}", "AUTOEMBED_BACKFILL_WINDOW"):
        raw = os.environ.get(name, "").strip()
        if raw:
            return parse_window(raw, name)
    return None


def stop_reason(conn: psycopg.Connection, pipeline: str, now: datetime | None = None) -> str | None:
    """Why a shard run of `pipeline` must stop now (paused, or outside its window), or None."""
    if paused(conn, pipeline):
        return f"backfill of {pipeline} is paused (resume: autoembed_dagster.core.migrate.backfill_control.resume)"
    window = window_for(pipeline)
    now = now or datetime.now(timezone.utc)
    if window is not None and not window.contains(now):
        return (f"backfill of {pipeline} runs only {window.start:%H:%M}-{window.end:%H:%M} {window.zone}; "
                f"it is {now.astimezone(window.zone):%H:%M} there")
    return None
