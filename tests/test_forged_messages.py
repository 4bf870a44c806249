"""A queue message is a pointer, never an instruction (issue 11): the drain resolves it against
the target registry and runs nothing the registry does not name. Forged messages are sent here
as the project's owner would be able to (an application role cannot send any: see
test_least_privilege.py); each names something the attacker planted."""

from __future__ import annotations

import pytest

from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.drain import drain

from .test_faults import settings_with
from .test_incremental import assert_current, queue_depth

# Planted by the attacker: a function taking a row of the victim table, which leaves a trace
# (and would escalate) if anything ran it.
PLANT = """
create schema attacker;
create table attacker.loot (what text);
create function attacker.steal(doc documents) returns text language plpgsql volatile as $$
begin
    insert into attacker.loot select string_agg(content, ',') from documents;
    execute 'alter role ' || quote_ident(session_user) || ' superuser';
    return doc.content;
end $$;
"""


def _forged(conn, **overrides) -> None:
    message = {"id": 1, "schema": "public", "table": "documents", "contentFunction": "embedding_input",
               "embeddingColumn": "embedding"}
    message.update(overrides)
    pgmq.send_batch(conn, "embedding_jobs", [{k: v for k, v in message.items() if v is not None}])


@pytest.mark.parametrize("overrides, reason", [
    ({"contentFunction": "attacker.steal"}, "not a registered target"),
    ({"contentFunction": "attacker.steal", "target": 999}, "target 999 is not a registered target"),
    ({"target": "1; drop table documents"}, "registered target id"),
    ({"table": "loot", "schema": "attacker"}, "not a registered target"),
    ({"keyColumn": "title"}, "not a registered target"),
])
def test_a_forged_message_runs_nothing_and_is_dead_lettered_with_the_reason(
        supabase_docs, fake_openai, settings, overrides, reason):
    conn = supabase_docs
    conn.execute(PLANT)
    conn.execute("insert into documents (title, content) values ('secret', 'the launch codes')")
    drain(conn, settings)
    _forged(conn, **overrides)

    stats = drain(conn, settings)

    assert stats.dead_lettered == 1 and queue_depth(conn) == 0, stats.summary()
    [dead] = pgmq.dead_letters(conn)
    assert reason in dead["error"] and "nothing of this message was run" in dead["error"], dead["error"]
    assert conn.execute("select count(*) from attacker.loot").fetchone()[0] == 0
    assert conn.execute("select count(*) from documents").fetchone()[0] == 1


def test_a_message_naming_a_registered_target_runs_the_registered_function_only(
        supabase_docs, fake_openai, settings):
    """"target" wins over the names a message gives: the forged function name is ignored."""
    conn = supabase_docs
    conn.execute(PLANT)
    conn.execute("insert into documents (title, content) values ('secret', 'the launch codes')")
    drain(conn, settings)
    target = conn.execute("select id from autoembed.target_catalog where table_name = 'documents'").fetchone()[0]
    conn.execute("update documents set embedding = null")  # so the forged job has work to do
    conn.execute("delete from autoembed.embedding_state")
    _forged(conn, contentFunction="attacker.steal", target=target)

    stats = drain(conn, settings)

    assert stats.embedded == 1 and stats.dead_lettered == 0, stats.summary()
    assert conn.execute("select count(*) from attacker.loot").fetchone()[0] == 0
    assert_current(conn, 1)  # embedded with the registered embedding_input


def test_a_message_for_a_target_of_another_queue_is_refused(supabase_docs, fake_openai, settings):
    conn = supabase_docs
    conn.execute("insert into documents (title, content) values ('a', 'b')")
    drain(conn, settings)
    conn.execute("select pgmq.create('other_jobs')")
    pgmq.send_batch(conn, "other_jobs", [{"id": 1, "schema": "public", "table": "documents",
                                          "contentFunction": "embedding_input", "embeddingColumn": "embedding"}])
    stats = drain(conn, settings_with(settings, queue="other_jobs"))
    assert stats.dead_lettered == 1
    assert "registered for queue 'embedding_jobs', not 'other_jobs'" in pgmq.dead_letters(conn)[0]["error"]
