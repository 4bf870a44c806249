"""Backfill pause/resume (a row in Postgres, seen by every shard run) and the time window."""

from __future__ import annotations

import json
import os
import re
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
    assert "waiting for its window (opens 22:00 UTC)" in bc.stop_reason(conn, "documents", now=at(12))
    assert "run 22:00-06:00 UTC only (it is 12:00 there)" in bc.stop_reason(conn, "documents", now=at(12))
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
    assert "waiting for its window" in backfill_shard(conn, p, resolve_spec(conn, p), 0, 1, batch_rows=5).stats.stopped
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
    out = capsys.readouterr().out
    # Nothing restarts by itself: it says what continues the shards (its --help says the same).
    assert "resumed: run `autoembed backfill documents`" in out and "nothing restarts by itself" in out
    assert not bc.paused(conn, "documents")
    assert cli.main(["backfill", "documents", "--resume"]) == 0
    assert capsys.readouterr().out.strip() == "backfill of documents was not paused: nothing to resume"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["backfill"].format_help()
    assert "continue where they stopped on the next `autoembed backfill PIPELINE`" in " ".join(help_text.split())
    assert "3 refused, nothing ran" in " ".join(help_text.split())


def later_window() -> tuple[str, str]:
    """A one-hour window that is not now, and the hour it opens."""
    later = (datetime.now(timezone.utc).hour + 2) % 24
    return f"{later:02d}:00-{(later + 1) % 24:02d}:00", f"{later:02d}:00"


def migrations(conn) -> int:
    return conn.execute("select count(*) from autoembed.model_migrations").fetchone()[0]


def test_a_held_backfill_is_refused_up_front_with_a_distinct_status_and_starts_nothing(
        supabase_docs, fake_openai, settings, tmp_path, monkeypatch, capsys):
    """Paused, or outside its window: refused once, before a migration or a shadow column exists,
    with the command (or setting) that lifts it and exit status 3; `autoembed status` shows it."""
    from autoembed_dagster import cli

    from .dg_project import make_project
    from .test_migration import column_type, seed

    conn = supabase_docs
    seed(conn, settings, 10)
    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512, "shards": 2}}, module="held")
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))

    assert cli.main(["backfill", "documents", "--pause"]) == 0
    capsys.readouterr()
    assert cli.main(["backfill", "documents", "-q"]) == bc.REFUSED_EXIT == 3
    out, err = capsys.readouterr()
    assert err.count("autoembed backfill documents --resume") == 1 and "is paused (since" in err, err
    assert "nothing started" in err and "embedded" not in out
    assert migrations(conn) == 0 and column_type(conn, "embedding__next") is None
    assert cli.main(["status"]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^documents +paused \(since .*\): resume it with `autoembed backfill documents --resume`$",
                     status, re.M), status

    assert cli.main(["backfill", "documents", "--resume"]) == 0
    window, opens = later_window()
    monkeypatch.setenv("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS", window)
    capsys.readouterr()
    assert cli.main(["backfill", "documents", "-q"]) == 3
    err = capsys.readouterr().err
    assert f"waiting for its window (opens {opens} UTC)" in err and "AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS" in err
    # Outside its window no migration starts: the incremental path keeps writing one column only.
    assert migrations(conn) == 0 and column_type(conn, "embedding__next") is None
    assert cli.main(["status", "--json"]) == 0
    [held] = json.loads(capsys.readouterr().out)["backfills"]
    assert held["pipeline"] == "documents" and held["state"] == f"waiting for its window (opens {opens} UTC)"


def test_a_pause_during_the_run_stops_the_shards_said_once_and_status_shows_it(
        supabase_docs, fake_openai, settings, tmp_path, monkeypatch, capsys):
    from autoembed_dagster import cli
    from autoembed_dagster.core.migrate.backfill import resolve_spec, run_backfill
    from autoembed_dagster.core.pipelines import Pipeline

    from .dg_project import make_project
    from .test_migration import seed

    conn = supabase_docs
    seed(conn, settings, 30)
    p = Pipeline(name="documents", schema="public", table="documents", dimensions=512, shards=3)

    def pause_after_first_page(stats, rows):
        bc.pause(conn, "documents")

    result = run_backfill(conn, p, resolve_spec(conn, p), batch_rows=4, on_batch=pause_after_first_page)
    assert "is paused" in result.total.stopped
    assert result.stopped_shards == [0, 1, 2] and result.not_run == [1, 2]  # later shards not even started
    assert result.promotion is None and not result.coverage.complete

    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512, "shards": 3}}, module="paused")
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))
    capsys.readouterr()
    assert cli.main(["migrate", "documents", "status"]) == 0
    out = capsys.readouterr().out
    assert "is backfilling;" in out and "backfill paused (since" in out and "--resume" in out, out
    assert json.loads((cli.main(["migrate", "documents", "status", "--json"]), capsys.readouterr().out)[1])[
        "backfill"].startswith("paused (since")
    assert cli.main(["backfill", "documents", "--resume"]) == 0
    capsys.readouterr()
    assert cli.main(["backfill", "documents", "-q"]) == 0  # continues where it stopped, then promotes
    out, err = capsys.readouterr()
    assert "stopped" not in out + err
    assert "promoted: embedding now holds model openai:text-embedding-3-small:1536 -> openai:text-embedding-3-small:512 " \
        "(old vectors in embedding__old" in out, out


def test_the_cli_says_once_which_shards_a_window_end_stopped_and_exits_4(
        supabase_docs, fake_openai, settings, tmp_path, monkeypatch, capsys):
    """The window closes while the backfill runs (here: it pauses itself from the provider's side,
    the fake's first request closing the window by setting the variable the shards read)."""
    from autoembed_dagster import cli

    from .dg_project import make_project
    from .test_migration import seed

    conn = supabase_docs
    seed(conn, settings, 12)
    make_project(tmp_path, {"documents": {"table": "public.documents", "dimensions": 512, "shards": 2}}, module="closing")
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))
    window, _ = later_window()
    requests = len(fake_openai.requests)
    fake_openai.on_request = lambda: (len(fake_openai.requests) > requests + 1
                                      and os.environ.__setitem__("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS", window))
    try:
        code = cli.main(["backfill", "documents", "-q", "--batch-rows", "2"])
    finally:
        fake_openai.on_request = None
        os.environ.pop("AUTOEMBED_BACKFILL_WINDOW_DOCUMENTS", None)
    out, err = capsys.readouterr()
    assert code == bc.STOPPED_EXIT == 4, out + err
    assert (out + err).count("waiting for its window") == 1, out + err
    assert "shard(s) 0, 1 not finished: they continue where they stopped on the next `autoembed backfill documents`" in err
    assert "stopped:" not in out  # not repeated per shard


def test_a_promotion_names_a_changed_content_function(supabase_docs, fake_openai, settings, tmp_path, monkeypatch,
                                                      capsys):
    from autoembed_dagster import cli

    from .dg_project import make_project
    from .test_migration import seed

    conn = supabase_docs
    seed(conn, settings, 6)
    conn.execute("create function title_input(doc documents) returns text language sql immutable "
                 "as $$ select doc.title $$")
    make_project(tmp_path, {"documents": {"table": "public.documents", "content_function": "title_input"}},
                 module="retitled")
    monkeypatch.setenv("AUTOEMBED_PROJECT", str(tmp_path))
    assert cli.main(["backfill", "documents", "-q"]) == 0
    out = capsys.readouterr().out
    assert "promoted: embedding now holds content function embedding_input -> title_input (old vectors" in out, out
    assert "model " not in out.split("promoted:")[1]  # the model did not change: not named
