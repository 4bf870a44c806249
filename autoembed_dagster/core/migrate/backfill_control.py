"""Pause, resume and a time window for a pipeline's backfill (re-embed) shard runs.

The pause flag is a row of `autoembed.backfill_pauses` (sql/010_rate_limit.sql), so every shard
run, on any machine, sees it at its next page. The window (e.g. nights only) comes from the
environment: AUTOEMBED_BACKFILL_WINDOW_<PIPELINE> or AUTOEMBED_BACKFILL_WINDOW, "HH:MM-HH:MM"
with an optional IANA zone ("22:00-06:00 Europe/Berlin"; default UTC). A window may cross
midnight. A shard that stops for either reason has lost nothing: the next run resumes it.

A backfill that is held (paused, or outside its window) is refused before it starts anything (no
migration, no shadow column): `hold()` says why and how to lift it. The CLI exits with
REFUSED_EXIT then, and with STOPPED_EXIT when a pause or the window's end stopped shards part-way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, time, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from ..config import ConfigError

REFUSED_EXIT = 3  # `autoembed backfill`: held (paused / outside its window), nothing ran
STOPPED_EXIT = 4  # `autoembed backfill`: a pause or the window's end stopped shards part-way

_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*(?:\s(\S+))?\s*")


def paused(conn: psycopg.Connection, pipeline: str) -> bool:
    return conn.execute("select exists (select from autoembed.backfill_pauses where pipeline = %s)",
                        (pipeline,)).fetchone()[0]


def paused_at(conn: psycopg.Connection, pipeline: str) -> tuple[datetime, str | None] | None:
    """(when, reason) of the pipeline's pause, or None."""
    return conn.execute("select paused_at, reason from autoembed.backfill_pauses where pipeline = %s",
                        (pipeline,)).fetchone()


def paused_pipelines(conn: psycopg.Connection) -> list[tuple[str, datetime, str | None]]:
    return conn.execute("select pipeline, paused_at, reason from autoembed.backfill_pauses order by pipeline").fetchall()


def pause(conn: psycopg.Connection, pipeline: str, reason: str | None = None) -> None:
    """Shard runs of `pipeline` stop at their next page (and new ones stop at once) until resume."""
    conn.execute("insert into autoembed.backfill_pauses (pipeline, reason) values (%s, %s) "
                 "on conflict (pipeline) do update set paused_at = now(), reason = excluded.reason",
                 (pipeline, reason))


def resume(conn: psycopg.Connection, pipeline: str) -> bool:
    """Lift the pause; returns whether there was one. Nothing restarts by itself: the stopped
    shards continue when the backfill is run (or launched in Dagster) again."""
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


def window_variable(pipeline: str) -> str | None:
    """The variable that sets the pipeline's window (its own first), or None."""
    for name in (f"AUTOEMBED_BACKFILL_WINDOW_{pipeline.upper()}", "AUTOEMBED_BACKFILL_WINDOW"):
        if os.environ.get(name, "").strip():
            return name
    return None


def _zone_name(window: Window) -> str:
    return "UTC" if window.zone == timezone.utc else str(window.zone)


@dataclass(frozen=True)
class Hold:
    """Why a pipeline's backfill may not run now, for people: `state` (what `status` shows),
    `lift` (how to lift it)."""

    pipeline: str
    kind: str  # "paused" | "window"
    state: str  # "paused since ..." / "waiting for its window (opens 02:00 UTC)"
    lift: str

    @property
    def message(self) -> str:
        return f"backfill of {self.pipeline} is {self.state}: {self.lift}"


def hold(conn: psycopg.Connection, pipeline: str, now: datetime | None = None) -> Hold | None:
    """Whether the pipeline's backfill is held now (paused first, then its window), or None."""
    pause_row = paused_at(conn, pipeline)
    if pause_row is not None:
        when, reason = pause_row
        return Hold(pipeline, "paused",
                    f"paused (since {when.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC{'; ' + reason if reason else ''})",
                    f"resume it with `autoembed backfill {pipeline} --resume`")
    window = window_for(pipeline)
    now = now or datetime.now(timezone.utc)
    if window is not None and not window.contains(now):
        zone = _zone_name(window)
        return Hold(pipeline, "window", f"waiting for its window (opens {window.start:%H:%M} {zone})",
                    f"{window_variable(pipeline)} lets it run {window.start:%H:%M}-{window.end:%H:%M} {zone} only "
                    f"(it is {now.astimezone(window.zone):%H:%M} there); run it then, or unset the variable")
    return None


class BackfillHeld(Exception):
    """A backfill refused before it started anything (no migration, no shadow column)."""

    def __init__(self, held: Hold):
        super().__init__(held.message)
        self.hold = held


def refuse_if_held(conn: psycopg.Connection, pipeline: str, now: datetime | None = None) -> None:
    held = hold(conn, pipeline, now)
    if held is not None:
        raise BackfillHeld(held)


def stop_reason(conn: psycopg.Connection, pipeline: str, now: datetime | None = None) -> str | None:
    """Why a shard run of `pipeline` must stop now (paused, or outside its window), or None."""
    held = hold(conn, pipeline, now)
    return held.message if held is not None else None


EVERY_PIPELINE = "(every pipeline)"


def held_pipelines(conn: psycopg.Connection, now: datetime | None = None) -> list[Hold]:
    """What `autoembed status` shows: every paused pipeline, every pipeline whose own window is
    closed now, and the shared window (AUTOEMBED_BACKFILL_WINDOW) when it is closed."""
    prefix = "AUTOEMBED_BACKFILL_WINDOW_"
    names = {name for name, _, _ in paused_pipelines(conn)}
    names |= {k[len(prefix):].lower() for k, v in os.environ.items() if k.startswith(prefix) and v.strip()}
    holds = [h for h in (hold(conn, name, now) for name in sorted(names)) if h is not None]
    shared = os.environ.get("AUTOEMBED_BACKFILL_WINDOW", "").strip()
    if shared:
        window, now = parse_window(shared), now or datetime.now(timezone.utc)
        if not window.contains(now):
            zone = _zone_name(window)
            holds.append(Hold(EVERY_PIPELINE, "window", f"waiting for its window (opens {window.start:%H:%M} {zone})",
                              f"AUTOEMBED_BACKFILL_WINDOW lets backfills run {window.start:%H:%M}-{window.end:%H:%M} "
                              f"{zone} only (it is {now.astimezone(window.zone):%H:%M} there)"))
    return holds
