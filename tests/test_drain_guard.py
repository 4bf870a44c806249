"""The stale-write guard re-reads the input only of a row that changed since the drain read it (a
new row version); a row at the version read keeps the input its vector was made from."""

from __future__ import annotations

import threading
import time

import pytest

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


def test_an_application_write_waits_only_for_the_slice_holding_its_row(conn, db_url, fake_openai, settings):
    """A vector column's batch is written in slices, a transaction each: while the drain is held
    inside the write of row 2's slice, the application updates row 1 (an earlier slice, committed)
    and row 3 (a later slice, not locked yet) without waiting. In one transaction for the whole
    batch, the guard held all three rows until the end."""
    import psycopg

    conn.execute(SCHEMA)
    for i in (1, 2, 3):  # one message per row
        conn.execute("insert into guarded values (%s, 't', 'b')", (i,))
    conn.execute("""
        create function hold_row_2() returns trigger language plpgsql as $$
        begin perform pg_advisory_lock_shared(4343); perform pg_advisory_unlock_shared(4343); return new; end $$;
        create trigger hold before update on guarded for each row
            when (new.id = 2 and new.embedding is not null) execute function hold_row_2()""")
    with psycopg.connect(db_url, autocommit=True) as drain_conn, \
            psycopg.connect(db_url, autocommit=True) as gate, \
            psycopg.connect(db_url, autocommit=True) as app:
        drainer = Drainer(drain_conn, settings, pipeline=False)
        drainer.settler.slicer.rows, drainer.settler.slicer.adaptive = 1, False
        gate.execute("select pg_advisory_lock(4343)")
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("stats", drainer.drain_batch()))
        t.start()
        _update_rows_around_the_held_slice(gate, app, t, 4343, "the drain")
    stats = result["stats"]
    assert stats.embedded == 2 and stats.stale == 1  # row 3 changed before its slice: its new job writes it
    assert conn.execute("select count(*) from pgmq.q_embedding_jobs").fetchone()[0] == 2  # rows 1 and 3 again
    drain(conn, settings)
    assert conn.execute("select count(*) from guarded where embedding is null").fetchone()[0] == 0


def test_an_application_write_waits_only_for_the_backfill_slice_holding_its_row(conn, db_url, fake_openai, settings,
                                                                               monkeypatch):
    """A backfill page of a vector column is written in slices too (core.targets.writes.Slicer,
    shared with the drain's settle): while the backfill is held inside the write of row 2's slice,
    the application updates row 1 (an earlier slice, committed) and row 3 (a later slice, not locked
    yet) without waiting. With the page in one transaction, the guard held all three rows."""
    import psycopg

    from autoembed_dagster.core.migrate.backfill import run_backfill
    from autoembed_dagster.core.pipelines import Pipeline
    from autoembed_dagster.core.targets.catalog import resolve
    from autoembed_dagster.core.targets.writes import Slicer

    conn.execute(SCHEMA)
    conn.execute("insert into guarded select g, 't', 'b' from generate_series(1, 3) g")
    conn.execute("select pgmq.purge_queue('embedding_jobs')")  # the backfill alone writes them
    conn.execute("""
        create function hold_row_2() returns trigger language plpgsql as $$
        begin perform pg_advisory_lock_shared(4344); perform pg_advisory_unlock_shared(4344); return new; end $$;
        create trigger hold before update on guarded for each row
            when (new.id = 2 and new.embedding is not null) execute function hold_row_2()""")
    monkeypatch.setattr(Slicer, "START_ROWS", 1)  # one row a slice, whatever the time a slice takes
    monkeypatch.setattr(Slicer, "ADAPTIVE", False)
    p = Pipeline(name="guarded", schema="public", table="guarded", content_function="guarded_input", shards=1)
    with psycopg.connect(db_url, autocommit=True) as backfill_conn, \
            psycopg.connect(db_url, autocommit=True) as gate, \
            psycopg.connect(db_url, autocommit=True) as app:
        spec = p.spec(column_dimensions=resolve(backfill_conn, p.live_key).dimensions)
        gate.execute("select pg_advisory_lock(4344)")
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("run", run_backfill(backfill_conn, p, spec,
                                                                                   batch_rows=3)))
        t.start()
        _update_rows_around_the_held_slice(gate, app, t, 4344, "the backfill")
    total = result["run"].total
    assert (total.embedded, total.stale) == (2, 1), total.summary()  # row 3 changed before its slice
    drain(conn, settings)  # the application's changes are queued: the drain writes them
    assert conn.execute("select count(*) from guarded where embedding is null").fetchone()[0] == 0


def _update_rows_around_the_held_slice(gate, app, writer: threading.Thread, lock: int, who: str) -> None:
    """Once `writer` waits on advisory lock `lock` (held by `gate`) inside the write of row 2's
    slice, the application updates row 1 (an earlier slice, committed) and row 3 (a later slice,
    not locked yet), each allowed to wait 3 s for a lock; then the writer goes on."""
    try:
        for _ in range(600):  # until the write of row 2 waits for the gate
            if gate.execute("select exists (select 1 from pg_locks where locktype = 'advisory' and objid = %s"
                            " and not granted)", (lock,)).fetchone()[0]:
                break
            writer.join(0.1)
        else:
            pytest.fail(f"{who} never reached the write of row 2")
        app.execute("set lock_timeout = '3s'")
        app.execute("update guarded set body = 'changed' where id = 1")  # its slice committed
        app.execute("update guarded set body = 'changed' where id = 3")  # its slice not begun
    finally:
        gate.execute("select pg_advisory_unlock(%s)", (lock,))
        writer.join(60)


def test_a_vector_another_writer_wrote_for_the_same_input_is_left_alone(conn, db_url, fake_openai, settings):
    """The guard's statement (core.targets.writes.write_vectors: lock, compare, write, record in one
    statement): a row already holding the vector of the very input and model it is given (another
    drain wrote it meanwhile) is not written again; under another model it is; a row whose input
    changed is stale; a key no row has any more is neither."""
    import numpy as np

    from autoembed_dagster.core.targets.catalog import lookup_registered
    from autoembed_dagster.core.targets.vectors import encode_vectors
    from autoembed_dagster.core.targets.writes import write_vectors

    conn.execute(SCHEMA)
    conn.execute("insert into guarded select g, 't' || g, 'b' || g from generate_series(1, 3) g")
    target, _ = lookup_registered(conn, target_id=conn.execute("select id from autoembed.targets").fetchone()[0])
    hashes = dict(conn.execute("select id::text, autoembed.content_hash(autoembed.input_%s(g)::text) from guarded g"
                               % target.registered).fetchall())
    records = encode_vectors(target, [np.full(1536, 0.5, np.float32)] * 3)

    def write(model, keys=("1", "2", "3")):
        with conn.transaction():
            return write_vectors(conn, target, [(k, hashes[k], records[int(k) - 1], []) for k in keys], model)

    first = write("m1")
    assert (first.written, first.stale, first.busy, first.ambiguous) == (3, 0, [], {})
    again = write("m1")
    assert (again.written, again.stale) == (0, 0), "the same input and model: nothing written again"
    assert write("m2").written == 3
    conn.execute("update guarded set body = 'changed' where id = 2")
    conn.execute("delete from guarded where id = 3")
    w = write("m3")
    assert (w.written, w.stale, w.busy) == (1, 1, [])
    assert conn.execute("select row_id, model from autoembed.embedding_state order by 1").fetchall() == [
        ("1", "m3"), ("2", "m2")], "a deleted row's record goes with it"
