"""The stale-write guard re-reads the input only of a row that changed since the drain read it (a
new row version); a row at the version read keeps the input its vector was made from."""

from __future__ import annotations

import threading
import time

from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.drain import Drainer, drain

SCHEMA = """
create table guarded (id bigint primary key, title text not null, body text not null, embedding halfvec(1536));
create function guarded_input(g guarded) returns text language plpgsql stable as $$
begin
    raise notice 'input of %', g.id;
    return g.title || ': ' || g.body;
end $$;
select autoembed.enroll('guarded', 'guarded_input', 'embedding');
"""


def _notices(conn) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(d.message_primary))
    return seen


def test_the_guard_runs_the_content_function_again_only_for_rows_changed_since_the_read(conn, db_url, fake_openai,
                                                                                       settings):
    conn.execute(SCHEMA)
    with connect(db_url) as app:
        app.execute("insert into guarded select g, 't' || g, 'b' || g from generate_series(1, 5) g")
    calls = _notices(conn)
    # Not pipelined: the read and the write run on this connection, so every call is seen here.
    stats = Drainer(conn, settings, pipeline=False).run()
    assert stats.embedded == 5
    assert sorted(calls) == [f"input of {i}" for i in range(1, 6)], "read once per row, not again by the guard"
    assert conn.execute("select count(*) from guarded where embedding is null").fetchone()[0] == 0


def _while_embedding(conn, fake_openai, settings, db_url, statement: str):
    """Drain one batch; while its provider call is in flight, `statement` commits."""
    fake_openai.delay(1.0)
    drainer = Drainer(conn, settings, pipeline=False)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("stats", drainer.drain_batch()))
    t.start()
    while not fake_openai.requests:
        time.sleep(0.01)
    with connect(db_url) as other:
        other.execute(statement)
    t.join(60)
    fake_openai.delay(0)
    return result["stats"]


def test_a_row_resaved_during_embedding_is_checked_again_and_written(conn, db_url, fake_openai, settings):
    conn.execute(SCHEMA)
    conn.execute("insert into guarded values (1, 'a', 'old')")
    calls = _notices(conn)
    stats = _while_embedding(conn, fake_openai, settings, db_url, "update guarded set title = title where id = 1")
    assert stats.embedded == 1 and stats.stale == 0
    assert calls.count("input of 1") == 2, "a new row version: its input is read again and compared"


def test_a_row_changed_during_embedding_is_not_written(conn, db_url, fake_openai, settings):
    conn.execute(SCHEMA)
    conn.execute("insert into guarded values (1, 'a', 'old')")
    stats = _while_embedding(conn, fake_openai, settings, db_url, "update guarded set body = 'new' where id = 1")
    assert stats.stale == 1 and stats.embedded == 0
    assert conn.execute("select embedding is null from guarded where id = 1").fetchone()[0]
    drain(conn, settings)
    assert conn.execute("select embedding is not null from guarded where id = 1").fetchone()[0]
