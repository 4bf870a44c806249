"""Backfill pause/resume (a row in Postgres, seen by every shard run) and the time window."""

from __future__ import annotations

from datetime import datetime, time, timezone

import psycopg
import pytest

from autoembed_dagster.core.migrate import backfill_control as bc
from autoembed_dagster.core.config import ConfigError


def test_pause_is_seen_from_another_connection_and_resume_lifts_it(conn, db_url):
    assert not bc.paused(conn, "documents")
    bc.pause(conn, "documents", reason="provider incident")
    bc.pause(conn, "documents", reason="again")  # idempotent
    with psycopg.connect(db_url, autocommit=True) as other:  # another shard run's connection
        assert bc.paused(other, "documents")
        assert not bc.paused(other, "notes")
        assert "paused" in bc.stop_reason(other, "documents")
        assert bc.stop_reason(other, "notes") is None
    assert conn.execute("select reason from autoembed.backfill_pauses").fetchall() == [("again",)]
    assert bc.resume(conn, "documents") is True
    assert bc.resume(conn, "documents") is False
    assert not bc.paused(conn, "documents")


def at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 12, 1, hh, mm, tzinfo=timezone.utc)


@pytest.mark.parametrize("window, now, inside", [
    ("22:00-06:00", at(23), True),
    ("22:00-06:00", at(2), True),
    ("22:00-06:00", at(6), False),  # the end is exclusive
    ("22:00-06:00", at(22), True),
    ("22:00-06:00", at(12), False),
    ("09:30-17:00", at(9, 29), False),
    ("09:30-17:00", at(9, 30), True),
    ("22:00-06:00 Europe/Berlin", at(21, 30), True),  # 22:30 in Berlin (CET, UTC+1)
    ("22:00-06:00 Europe/Berlin", at(20, 30), False),
    (None, at(12), True),
    ("", at(12), True),
])
def test_in_window(window, now, inside):
    assert bc.in_window(now, window) is inside


@pytest.mark.parametrize("bad, message", [
    ("22-06", "write HH:MM-HH:MM"),
    ("25:00-06:00", "hours must be 0-23"),
    ("06:00-06:00", "is empty"),
    ("22:00-06:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
])
def test_a_bad_window_names_the_value_and_the_fix(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        bc.parse_window(bad)
    assert repr(bad) in str(info.value)


def test_the_window_comes_from_the_pipeline_variable_first(conn, monkeypatch):
    monkeypatch.setenv("AUTOEMBED_BACKFILL_WINDOW", "22:00-06:00")
    monkeypatch.setenv("AUTOEMBED_BACKFILL_WINDOW_NOTES", "00:00-23:59")
    assert bc.window_for("documents") == bc.Window(time(22), time(6))
    assert bc.window_for("notes") == bc.Window(time(0), time(23, 59))
    assert "runs only 22:00-06:00 UTC" in bc.stop_reason(conn, "documents", now=at(12))
    assert bc.stop_reason(conn, "documents", now=at(23)) is None
    assert bc.stop_reason(conn, "notes", now=at(12)) is None
    with pytest.raises(ValueError, match="aware datetime"):
        bc.in_window(datetime(2026, 12, 1, 12), "22:00-06:00")


def test_a_paused_backfill_stops_between_pages_and_resumes_where_it_stopped(supabase_docs, fake_openai, settings,
                                                                             monkeypatch):
    from autoembed_dagster.core.migrate.backfill import backfill_shard, resolve_spec
    from autoembed_dagster.core.pipelines import Pipeline

    from .test_migration import assert_all_current, seed

    conn = supabase_docs
    seed(conn, settings, 30)
    p = Pipeline(name="documents", schema="public", table="documents", dimensions=512, shards=1)
    pages = []

    def pause_after_two_pages(stats, rows):
        pages.append(rows)
        if len(pages) == 2:
            bc.pause(conn, "documents")

    first = backfill_shard(conn, p, resolve_spec(conn, p), 0, 1, batch_rows=5, on_batch=pause_after_two_pages)
    assert "paused" in first.stats.stopped and "stopped: " in first.stats.summary()
    assert not first.complete and first.stats.embedded <= 15  # two pages, and at most the one read ahead
    bc.resume(conn, "documents")
    later = (datetime.now(timezone.utc).hour + 2) % 24  # a window that is not now: stop at once
    monkeypatch.setenv("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS", f"{later:02d}:00-{(later + 1) % 24:02d}:00")
    assert "runs only" in backfill_shard(conn, p, resolve_spec(conn, p), 0, 1, batch_rows=5).stats.stopped
    monkeypatch.delenv("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS")
    rest = backfill_shard(conn, p, resolve_spec(conn, p), 0, 1, batch_rows=5)
    assert rest.stats.stopped is None and rest.complete
    assert rest.stats.current == first.stats.embedded  # nothing embedded twice
    assert_all_current(conn, 512, column="embedding__next")


def test_the_cli_pauses_and_resumes_a_pipelines_backfill(conn, db_url, capsys):
    from autoembed_dagster import cli

    assert cli.main(["backfill", "documents", "--pause"]) == 0  # the repository's own defs/documents
    assert bc.paused(conn, "documents") and "paused" in capsys.readouterr().out
    assert cli.main(["backfill", "documents", "--resume"]) == 0
    assert not bc.paused(conn, "documents")
