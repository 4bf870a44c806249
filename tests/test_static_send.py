"""One job message is written with a static INSERT into pgmq's queue table (sql/018), only where
`autoembed db init` verified that table's layout; elsewhere it goes through pgmq.send."""
import psycopg

from autoembed_dagster.core.db.server import connect
from autoembed_dagster.core.db.schema import init_db


def _enroll_docs(conn, queue="embedding_jobs"):
    conn.execute("""
        create table docs (id bigint primary key, body text not null, embedding halfvec(3));
        create function docs_input(d docs) returns text language sql immutable as $$ select d.body $$;
    """)
    conn.execute("select autoembed.enroll('docs', 'docs_input', 'embedding', 'id', %s, false)", (queue,))


def _send_one_body(conn) -> str:
    return conn.execute("select pg_get_functiondef('autoembed.send_one(text, jsonb)'::regprocedure)").fetchone()[0]


def _read_back(conn):
    """pgmq's own read: the message of row 7 the trigger queued, as pgmq.send would have written it."""
    rows = conn.execute("select msg_id, read_ct, message, headers, vt > enqueued_at from pgmq.read('embedding_jobs', 30, 10)"
                        ).fetchall()
    assert len(rows) == 1, rows
    _msg_id, read_ct, message, headers, vt_moved = rows[0]
    assert read_ct == 1 and headers is None and vt_moved
    assert message["id"] == 7 and message["table"] == "docs", message
    return message


def test_single_row_insert_is_a_static_insert_pgmq_reads_back(conn, db_url):
    static = conn.execute("select autoembed.install_static_send()").fetchone()[0]
    assert static == ["embedding_jobs"]  # db init created the default queue and verified its table
    assert "insert into pgmq.q_embedding_jobs" in _send_one_body(conn)
    _enroll_docs(conn)
    # the drains wait on NOTIFY autoembed; pgmq's own insert notification (a trigger on its table) still fires too
    conn.execute("select pgmq.enable_notify_insert('embedding_jobs', 0)")
    with connect(db_url) as listener:
        listener.execute("listen autoembed")
        listener.execute('listen "pgmq.q_embedding_jobs.INSERT"')
        with conn.transaction():
            conn.execute("set local track_functions = 'all'")
            conn.execute("insert into docs values (7, 'seven')")
            calls = dict(conn.execute(
                "select schemaname || '.' || funcname, calls from pg_stat_xact_user_functions").fetchall())
        assert calls.get("autoembed.send_one") == 1 and "pgmq.send" not in calls, calls
        channels = {n.channel for n in listener.notifies(timeout=30, stop_after=2)}
    assert channels == {"autoembed", "pgmq.q_embedding_jobs.INSERT"}, channels
    _read_back(conn)

def test_a_queue_table_of_another_layout_falls_back_to_pgmq_send(conn):
    # a pgmq whose queue table differs (here: one more column) is not written to directly
    conn.execute("alter table pgmq.q_embedding_jobs add column priority int default 0")
    init_db(conn)  # `autoembed db init` again: re-checks and regenerates
    assert conn.execute("select autoembed.install_static_send()").fetchone()[0] == []
    body = _send_one_body(conn)
    assert "insert into" not in body.lower() and "pgmq.send(queue, msg)" in body
    _enroll_docs(conn)
    conn.execute("insert into docs values (7, 'seven')")
    _read_back(conn)
    # the layout restored, init makes it static again
    conn.execute("alter table pgmq.q_embedding_jobs drop column priority")
    init_db(conn)
    assert "insert into pgmq.q_embedding_jobs" in _send_one_body(conn)


def test_a_queue_created_after_init_goes_through_pgmq_send(conn):
    _enroll_docs(conn, queue="lane_b")
    conn.execute("insert into docs values (7, 'seven')")
    assert conn.execute("select count(*) from pgmq.read('lane_b', 30, 10)").fetchone()[0] == 1
    assert "q_lane_b" not in _send_one_body(conn)
    init_db(conn)  # the next init makes it static too
    assert "insert into pgmq.q_lane_b" in _send_one_body(conn)
