"""The schema changes under an enrolled table (issue 21): content functions dropped and re-created,
queues dropped, keys renamed, changed or no longer unique, tables truncated. No stale vector stays
searchable and the application's writes keep working. Real Postgres, real pgmq, the real OpenAI
client against the fake server; one test per change, each for both target shapes where both apply."""

from __future__ import annotations

import numpy as np
import pytest

from autoembed_dagster.core import api, health
from autoembed_dagster.core.drain import drain

from .fake_openai import fake_vector

DIMS = 1536


def make_table(conn, shape: str) -> int:
    """`notes` (integer key, body), enrolled as a vector column or a chunk target; returns its target id."""
    conn.execute("""
        create table notes (id integer primary key, body text, embedding halfvec(1536));
        create function note_text(n notes) returns text language sql immutable as $$ select n.body $$;
    """)
    if shape == "column":
        conn.execute("select autoembed.enroll('notes', 'note_text', 'embedding')")
    else:
        api.enroll("notes", "note_text", chunk_tokens=64, url=conn.info.dsn)
    return conn.execute("select id from autoembed.targets where relid = 'notes'::regclass").fetchone()[0]


def vectors(conn, shape: str) -> dict[int, list[np.ndarray]]:
    """Each row's stored vectors (one for a column target, the chunk set's for a chunk target)."""
    if shape == "column":
        rows = conn.execute("select id, embedding from notes where embedding is not null order by id").fetchall()
        return {i: [np.array(v.to_list(), dtype=np.float32)] for i, v in rows}
    out: dict[int, list[np.ndarray]] = {}
    for i, v in conn.execute("select id, embedding from notes_chunks order by id, chunk_index").fetchall():
        out.setdefault(i, []).append(np.array(v.to_list(), dtype=np.float32))
    return out


def assert_current(conn, shape: str, ids) -> None:
    """Every row `ids` has the vector of its current input (a short body is one chunk)."""
    held = vectors(conn, shape)
    for i in ids:
        text = conn.execute("select note_text(n) from notes n where id = %s", (i,)).fetchone()[0]
        assert i in held, f"row {i} has no vector"
        assert len(held[i]) == 1 and np.allclose(held[i][0], fake_vector(text, DIMS), atol=2e-3), \
            f"row {i} holds a vector of other content than {text!r}"


def queued_ids(conn, queue="embedding_jobs") -> set:
    out = set()
    for (m,) in conn.execute(f"select message from pgmq.q_{queue}"):
        if "idRange" in m:
            out |= set(range(m["idRange"][0], m["idRange"][1] + 1))
        elif isinstance(m.get("ids"), str):
            out |= {int(x) for x in m["ids"].split(",")}
        else:
            out |= set(m.get("ids") or [m["id"]])
    return out


@pytest.mark.parametrize("shape", ["column", "chunk"])
def test_content_function_dropped_and_recreated_is_followed(conn, fake_openai, settings, shape):
    target = make_table(conn, shape)
    conn.execute("insert into notes (id, body) values (1, 'one'), (2, 'two'), (3, 'three')")
    drain(conn, settings)
    assert_current(conn, shape, [1, 2, 3])

    # Dropped: the cascade takes the trigger whose WHEN clause calls it. Until it comes back the
    # target is named as broken, never clean.
    conn.execute("drop function note_text(notes) cascade")
    broken = health.broken_targets(conn)
    assert [(b.target, b.problem) for b in broken] == [(target, "content function dropped")], broken
    assert "note_text" in broken[0].detail and "notes" in broken[0].label

    # Re-created under the same name and signature, with another body: the target is bound to it,
    # its triggers are back, and every row is queued (the drain re-embeds those whose input changed).
    conn.execute("create function note_text(n notes) returns text language sql immutable as $$ select upper(n.body) $$")
    assert health.broken_targets(conn) == []
    fn = conn.execute("select content_fn from autoembed.targets where id = %s", (target,)).fetchone()[0]
    assert fn == conn.execute("select 'note_text(notes)'::regprocedure::oid").fetchone()[0]
    assert queued_ids(conn) == {1, 2, 3}
    drain(conn, settings)
    assert_current(conn, shape, [1, 2, 3])

    # The input comparison is back: an UPDATE clears/queues the row as before the drop.
    conn.execute("update notes set body = 'uno' where id = 1")
    assert queued_ids(conn) == {1}
    drain(conn, settings)
    assert_current(conn, shape, [1, 2, 3])
    assert "broken" not in api_status_text(conn)


def api_status_text(conn) -> str:
    from autoembed_dagster.cli import main
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status"]) == 0
    return out.getvalue()


def test_content_function_dropped_shows_in_status_and_checks(conn, fake_openai, settings):
    make_table(conn, "chunk")
    conn.execute("drop function note_text(notes) cascade")
    text = api_status_text(conn)
    assert "broken" in text and "notes" in text and "content function dropped" in text, text

    from autoembed_dagster.core.drain import pipeline_resolver
    from autoembed_dagster.core.pipelines import discover_pipelines
    from autoembed_dagster.defs.checks import evaluate

    [p] = discover_pipelines(conn, [])
    outcomes = evaluate(conn, p, pipeline_resolver([p]))
    assert outcomes and not any(o.passed for o in outcomes)
    assert all("content function dropped" in o.description for o in outcomes), outcomes


@pytest.mark.parametrize("shape", ["column", "chunk", "supabase"])
def test_dropped_queue_is_recreated_and_writes_keep_working(conn, fake_openai, settings, shape):
    if shape == "supabase":
        conn.execute("""
            create table notes (id integer primary key, body text, embedding halfvec(1536));
            create function note_text(n notes) returns text language sql immutable as $$ select n.body $$;
            create trigger q after insert or update on notes for each row
                execute function util.queue_embeddings('note_text', 'embedding');
        """)
    else:
        make_table(conn, shape)
    conn.execute("insert into notes (id, body) values (1, 'one')")
    conn.execute("select pgmq.drop_queue('embedding_jobs')")

    conn.execute("insert into notes (id, body) values (2, 'two'), (3, 'three')")  # does not fail
    conn.execute("update notes set body = 'uno' where id = 1")
    assert queued_ids(conn) == {1, 2, 3}
    repairs = health.repairs(conn)
    assert any("embedding_jobs" in r.what and "re-created" in r.what for r in repairs), repairs
    assert "re-created" in api_status_text(conn)
    drain(conn, settings)
    assert_current(conn, "column" if shape == "supabase" else shape, [1, 2, 3])


def test_supabase_key_column_renamed_writes_keep_working(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('A', 'first')")
    drain(conn, settings)
    conn.execute("alter table documents rename column id to doc_id")
    conn.execute("insert into documents (title, content) values ('B', 'second')")
    conn.execute("update documents set content = 'changed' where doc_id = 1")
    assert conn.execute("select count(*) from documents where embedding is null").fetchone()[0] == 2
    stats = drain(conn, settings)
    assert stats.dead_lettered == 0
    for doc_id, text in conn.execute("select doc_id, embedding_input(d) from documents d").fetchall():
        vec = conn.execute("select embedding from documents where doc_id = %s", (doc_id,)).fetchone()[0]
        assert vec is not None and np.allclose(np.array(vec.to_list(), dtype=np.float32),
                                               fake_vector(text, DIMS), atol=2e-3)
