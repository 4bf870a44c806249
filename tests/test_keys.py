"""Every key type round-trips exactly (issue 11): rows written after enrolment, with any key
column, get their vector; keys travel and are stored as their exact text; a key column that
cannot round-trip or is not a unique not-null key is refused at enrolment."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.drain import drain

from .fake_openai import fake_vector
from .test_faults import settings_with
from .test_incremental import queue_depth

DIMS = 16

# (key type, three keys as SQL literals), chosen where a lossy round trip would show: text that
# looks like numbers, trailing zeros, time zones, padding, integers past 2^53, an empty string.
KEYS = [
    ("text", ["'001'", "'1'", "''"]),
    ("numeric", ["1.50", "1.5001", "-0.10"]),
    ("timestamptz", ["'2024-03-10 01:30:00+05'", "'2024-03-10 01:30:00.123456+00'", "'1999-12-31 23:59:59-08'"]),
    ("char(4)", ["'ab'", "'ab c'", "'0001'"]),
    ("bigint", ["9007199254740993", "-9007199254740993", "0"]),
    ("uuid", ["'00000000-0000-0000-0000-000000000001'", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
              "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12'"]),
    ("varchar(20)", ["'x y'", "'X Y'", "'  lead'"]),
    ("date", ["'2024-02-29'", "'0001-01-01'", "'2024-01-01'"]),
]


def _table(conn, key_type: str) -> None:
    conn.execute(f"""
        create table "Key Docs" (doc_key {key_type} primary key, body text, "Vec" vector({DIMS}));
        create function key_doc_input(d "Key Docs") returns text language sql immutable as $$ select d.body $$;
    """)


def _stored(conn) -> dict[str, tuple[np.ndarray | None, str]]:
    return {k: (v, body) for k, v, body in conn.execute('select doc_key::text, "Vec", body from "Key Docs"')}


def _assert_all_current(conn) -> None:
    for key, (vec, body) in _stored(conn).items():
        assert vec is not None, f"row {key!r} has no vector"
        assert np.allclose(vec.to_numpy(), fake_vector(body, DIMS), atol=1e-5), f"row {key!r} holds another vector"


@pytest.mark.parametrize("key_type, keys", KEYS, ids=[k[0] for k in KEYS])
def test_every_key_type_round_trips_through_insert_update_and_delete(conn, fake_openai, settings, key_type, keys):
    fake_openai.default_dims = DIMS
    _table(conn, key_type)
    conn.execute("""select autoembed.enroll('"Key Docs"', 'key_doc_input', 'Vec', 'doc_key')""")
    conn.execute("set timezone = 'America/New_York'")  # the application's session, not the drain's
    # Rows one by one (one-row messages) and in bulk (a shared message).
    conn.execute(f'insert into "Key Docs" values ({keys[0]}, %s)', ("first",))
    conn.execute(f'insert into "Key Docs" values ({keys[1]}, %s), ({keys[2]}, %s)', ("second", "third"))
    s = settings_with(settings)
    stats = drain(conn, s)
    assert (stats.embedded, stats.dead_lettered, stats.deleted_rows) == (3, 0, 0), stats.summary()
    _assert_all_current(conn)
    conn.execute('update "Key Docs" set body = body || \' again\'')
    assert drain(conn, s).embedded == 3
    _assert_all_current(conn)
    state = {r[0] for r in conn.execute("select row_id from autoembed.embedding_state")}
    with conn.transaction():
        conn.execute("set local timezone = 'UTC'; set local datestyle = 'ISO, YMD'")
        assert state == {r[0] for r in conn.execute('select doc_key::text from "Key Docs"')}
    conn.execute(f'delete from "Key Docs" where doc_key = {keys[0]}')
    drain(conn, s)
    assert conn.execute("select count(*) from autoembed.embedding_state").fetchone()[0] == 2
    assert pgmq.dead_letters(conn) == [] and queue_depth(conn) == 0


def test_a_failed_row_split_off_a_shared_message_keeps_its_exact_text_key(conn, fake_openai, settings):
    """'001' and '1' are two rows of a text key: the row split off after a failure is '001'."""
    fake_openai.default_dims = DIMS
    _table(conn, "text")
    conn.execute("""select autoembed.enroll('"Key Docs"', 'key_doc_input', 'Vec', 'doc_key')""")
    conn.execute("""insert into "Key Docs" values ('001', 'BROKEN zero-zero-one'), ('1', 'one'), ('', 'empty key')""")
    fake_openai.poison("BROKEN", status=500)
    s = settings_with(settings, max_attempts=5, retry_delay=60)
    # A first failure retries the message whole; the second splits it into one-row messages; the
    # rows then go alone and only '001' fails again.
    for _ in range(3):
        drain(conn, s)
        conn.execute("select pgmq.set_vt('embedding_jobs', array(select msg_id from pgmq.q_embedding_jobs), 0)")
    split = [m for (m,) in conn.execute("select message from pgmq.q_embedding_jobs")]
    assert [(m["id"], m["attempts"]) for m in split] == [("001", 2)], split
    fake_openai.reset()
    assert drain(conn, s).embedded == 1
    _assert_all_current(conn)
    assert pgmq.dead_letters(conn) == []


@pytest.mark.parametrize("ddl, expected", [
    ("create table bad (k double precision primary key, body text, v vector(16))", "double precision"),
    ("create table bad (k jsonb, body text, v vector(16))", "jsonb"),
    ("create table bad (k text, body text, v vector(16))", "unique"),
    ("create table bad (k text unique, body text, v vector(16))", "not null"),
])
def test_a_key_that_cannot_round_trip_or_is_not_unique_is_refused_at_enrolment(conn, ddl, expected):
    conn.execute(ddl)
    conn.execute("create function bad_input(b bad) returns text language sql immutable as $$ select b.body $$")
    with pytest.raises(psycopg.Error, match=expected):
        conn.execute("select autoembed.enroll('bad', 'bad_input', 'v', 'k')")
