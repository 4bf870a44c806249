"""One bad row fails alone (README "What a bad row does"), for both target shapes: a vector the
column cannot hold, a key that is not one of the key column's, a write the database refuses for
one row, a content function that raises for one row. That row is a dead letter with a reason
naming the key, the value and the cause; the rest of its batch is written in the same run, the run
succeeds; status and the checks report it; the application's own write of that row succeeds.
Real Postgres, real pgmq, the real openai client against tests/fake_openai.py."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from autoembed_dagster.core import api
from autoembed_dagster.core.queue import pgmq
from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.drain import Drainer, drain, pipeline_resolver
from autoembed_dagster.core.queue.claims import Claims
from autoembed_dagster.core.pipelines import Pipeline

ROWS = 20
BAD = 7
CHUNKS = Pipeline(name="items", schema="public", table="items", content_function="item_text", chunk_tokens=64)
COLUMN = Pipeline(name="items", schema="public", table="items", content_function="item_text")
_roles = itertools.count()


def settings_with(settings: Settings, **kw) -> Settings:
    return Settings(**{**settings.__dict__, **kw})


# The content function raises for a row whose body says so: a plpgsql RAISE naming the row.
ITEMS = """
create table items (id integer primary key, body text not null{vector});
create function item_text(i items) returns text language plpgsql immutable as $$
begin
    if i.body like '%RAISE%' then
        raise exception 'item % cannot be read', i.id;
    end if;
    return i.body;
end;
$$;
"""


def make_items(conn, shape: str, rows: int = ROWS, table: str = "items", marker: str = "") -> None:
    """`rows` rows in one INSERT (one queue message for all), row BAD's body ending in `marker`."""
    # (another table gets an item_text of its own: an overload taking its row type)
    conn.execute(ITEMS.replace("items", table).replace("{vector}", ", embedding halfvec(1536)" if shape == "column" else ""))
    if shape == "column":
        api.enroll(table, "item_text", url=conn.info.dsn, backlog=False)
    else:
        api.enroll(table, "item_text", chunk_tokens=64, url=conn.info.dsn, backlog=False)
    conn.execute(f"insert into {table} select g, 'item number ' || g || ' of the list'"
                 f" || case when g = {BAD} then %s else '' end from generate_series(1, {rows}) g", (marker,))


def raise_for(conn, row_id: int) -> None:
    """The content function now raises for row `row_id` too (replaced: no trigger of the table fires)."""
    conn.execute(f"""create or replace function item_text(i items) returns text language plpgsql immutable as $$
                     begin
                         if i.id = {int(row_id)} or i.body like '%RAISE%' then
                             raise exception 'item % cannot be read', i.id;
                         end if;
                         return i.body;
                     end;
                     $$""")


def written(conn, shape: str, table: str = "items") -> set[int]:
    """Rows (documents) that hold their vector (chunk set)."""
    query = (f"select id from {table} where embedding is not null" if shape == "column"
             else f"select distinct id from {table}_chunks")
    return {r[0] for r in conn.execute(query).fetchall()}


def dead(conn) -> dict[str, str]:
    return {d["row_id"]: d["error"] for d in pgmq.dead_letters(conn)}


def queued(conn) -> int:
    return pgmq.status(conn, "embedding_jobs")[0].rows


@pytest.fixture(params=["column", "chunks"])
def shape(request, conn, fake_openai):
    return request.param


# -- a vector the column cannot hold ---------------------------------------------------------------
@pytest.mark.parametrize(("kind", "cause"), [
    ("huge", "component 1000000.0 (index 1) is out of halfvec's range (±65504)"),
    ("nan", "non-finite value (nan) at component 0"),
    ("short", "1535-dim vector, expected 1536"),
])
def test_a_bad_vector_is_its_rows_dead_letter_and_the_batch_is_written(conn, shape, fake_openai, settings,
                                                                      kind, cause):
    make_items(conn, shape, marker=" BADVEC")
    fake_openai.corrupt("BADVEC", kind)
    # One try only: before, the whole response (all 20 rows) was dead-lettered, or every run crashed.
    stats = drain(conn, settings_with(settings, max_attempts=1))
    assert stats.dead_lettered == 1 and stats.embedded == ROWS - 1, stats.summary()
    assert written(conn, shape) == set(range(1, ROWS + 1)) - {BAD}
    reasons = dead(conn)
    assert list(reasons) == [str(BAD)] and cause in reasons[str(BAD)], reasons
    assert f"key {BAD}" in reasons[str(BAD)] or f"id='{BAD}'" in reasons[str(BAD)], reasons  # names the row
    assert queued(conn) == 0


# -- a key that is not one of the key column's -----------------------------------------------------
def test_a_key_out_of_its_types_range_is_its_own_dead_letter(conn, shape, fake_openai, settings):
    make_items(conn, shape, rows=3)
    body = conn.execute("select message from pgmq.q_embedding_jobs limit 1").fetchone()[0]
    conn.execute("select pgmq.purge_queue('embedding_jobs')")
    forged = {k: v for k, v in body.items() if k not in ("id", "ids", "idRange")}
    pgmq.send_batch(conn, "embedding_jobs", [{**forged, "id": 1, "ids": [1, 3_000_000_000, 2]}])
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 1), stats.summary()
    assert written(conn, shape) == {1, 2}
    reasons = dead(conn)
    assert "3000000000 is out of integer's range" in reasons["3000000000"], reasons


# -- the database refuses one row's write ----------------------------------------------------------
REFUSALS = {
    # a trigger of the user's raising for one row (on the chunk table for chunk targets)
    "trigger": """create function refuse() returns trigger language plpgsql as $$
                  begin if NEW.id = {bad} then raise exception 'row {bad} refused by a trigger'; end if;
                  return NEW; end $$;
                  create trigger refuse before insert or update on {table} for each row execute function refuse();""",
    "check": "alter table {table} add constraint no_{bad} check ({cond}) not valid",
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_write_refused_for_one_row_dead_letters_it_and_writes_the_others_in_the_same_run(
        conn, shape, fake_openai, settings, refusal):
    make_items(conn, shape)
    table = "items" if shape == "column" else "items_chunks"
    cond = f"id <> {BAD} or embedding is null" if shape == "column" else f"id <> {BAD}"
    conn.execute(REFUSALS[refusal].format(bad=BAD, table=table, cond=cond))
    stats = drain(conn, settings)  # the run goes on: it raised before, and every run after it too
    assert stats.dead_lettered == 1 and stats.embedded == ROWS - 1, stats.summary()
    assert written(conn, shape) == set(range(1, ROWS + 1)) - {BAD}
    reason = dead(conn)[str(BAD)]
    assert f"key {BAD}" in reason and ("refused by a trigger" in reason if refusal == "trigger"
                                       else "CheckViolation" in reason), reason
    assert queued(conn) == 0
    assert drain(conn, settings).dead_lettered == 0  # nothing repeats run after run


@pytest.fixture
def drain_role(conn):
    """A role for the drain, used through SET ROLE; its rights: grant_all()."""
    name = f"drainer_{conn.info.backend_pid}_{next(_roles)}"
    conn.execute(f"create role {name} nologin")
    yield name
    conn.execute("reset role")
    conn.execute(f"drop owned by {name} cascade")
    conn.execute(f"drop role {name}")


def test_a_revoked_grant_on_one_table_dead_letters_its_rows_and_the_other_table_is_written(
        conn, fake_openai, settings, drain_role):
    make_items(conn, "column", rows=5)
    make_items(conn, "column", rows=5, table="others")
    for schema in ("autoembed", "pgmq", "public"):  # everything, ...
        conn.execute(f"grant usage on schema {schema} to {drain_role}")
        conn.execute(f"grant select, insert, update, delete on all tables in schema {schema} to {drain_role}")
        conn.execute(f"grant usage, select on all sequences in schema {schema} to {drain_role}")
        conn.execute(f"grant execute on all functions in schema {schema} to {drain_role}")
    conn.execute(f"revoke update on others from {drain_role}")  # ... but the UPDATE of one table
    conn.execute(f"set role {drain_role}")
    try:
        stats = Drainer(conn, settings, pipeline=False).run()
    finally:
        conn.execute("reset role")
    assert (stats.embedded, stats.dead_lettered) == (5, 5), stats.summary()
    assert written(conn, "column") == set(range(1, 6)) and written(conn, "column", "others") == set()
    assert all("InsufficientPrivilege" in e and "others" in e for e in dead(conn).values()), dead(conn)


# -- a content function that raises for one row ---------------------------------------------------
def test_a_raising_content_function_never_fails_the_applications_write(conn, shape, fake_openai, settings):
    make_items(conn, shape)
    drain(conn, settings)
    assert written(conn, shape) == set(range(1, ROWS + 1))
    # The application's UPDATE of the row succeeds (the triggers' comparison raised before) ...
    conn.execute("update items set body = 'RAISE now' where id = %s", (BAD,))
    conn.execute("update items set body = 'a new text' where id = 3")
    conn.execute("update items set body = body where id = 4")  # a re-save: nothing queued
    # ... its stale vector is gone at once, and it is queued.
    if shape == "column":
        assert written(conn, shape) == set(range(1, ROWS + 1)) - {BAD, 3}
    assert queued(conn) == 2
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (1, 1), stats.summary()
    reason = dead(conn)[str(BAD)]
    assert f"key {BAD}" in reason and f"item {BAD} cannot be read" in reason, reason
    if shape == "column":
        assert BAD not in written(conn, shape)


def test_status_and_the_checks_report_a_row_whose_content_function_raises(conn, shape, fake_openai, settings,
                                                                         capsys):
    from autoembed_dagster.cli import main
    from autoembed_dagster.defs.checks import evaluate

    make_items(conn, shape)
    drain(conn, settings)
    raise_for(conn, BAD)
    p = CHUNKS if shape == "chunks" else COLUMN
    outcomes = {o.name: o for o in evaluate(conn, p, pipeline_resolver([p]))}
    assert not outcomes["dead_letters"].passed
    assert (f"1 row(s) whose content function raises (key {BAD}: item {BAD} cannot be read)"
            in outcomes["dead_letters"].description), outcomes["dead_letters"].description
    assert outcomes["coverage"].passed  # the other rows are current; the bad one is reported, not hidden
    if shape == "chunks":
        assert main(["status"]) == 0
        assert f"1 row(s) whose content function raises, e.g. key {BAD}: item {BAD} cannot be read" \
            in capsys.readouterr().out


# -- the re-embed (backfill) pages -----------------------------------------------------------------
def test_a_backfill_page_with_bad_rows_writes_the_others(conn, shape, fake_openai, settings):
    from autoembed_dagster.core.migrate.backfill import run_backfill
    from autoembed_dagster.core.migrate.chunk_backfill import run_chunk_backfill
    from autoembed_dagster.core.targets.catalog import resolve

    make_items(conn, shape, marker=" BADVEC")
    conn.execute("select pgmq.purge_queue('embedding_jobs')")  # the re-embed alone
    raise_for(conn, 3)
    fake_openai.corrupt("BADVEC", "huge")
    if shape == "chunks":
        result = run_chunk_backfill(conn, replace(CHUNKS, shards=1))
        assert result.total.failed == 2 and result.total.written == ROWS - 2, result.total.summary()
    else:
        p = replace(COLUMN, shards=1)
        spec = p.spec(column_dimensions=resolve(conn, p.live_key).dimensions)
        result = run_backfill(conn, p, spec)
        assert result.total.failed == 2 and result.total.embedded == ROWS - 2, result.total.summary()
    assert written(conn, shape) == set(range(1, ROWS + 1)) - {3, BAD}
    errors = " | ".join(result.total.errors)
    assert "item 3 cannot be read" in errors and "out of halfvec's range" in errors, errors


# -- the safety net for messages claimed again and again --------------------------------------------
def test_the_safety_net_counts_drains_that_died_not_claims_given_back(conn, fake_openai, settings):
    make_items(conn, "column", rows=2)
    ids = [m for (m,) in conn.execute("select msg_id from pgmq.q_embedding_jobs order by msg_id").fetchall()]
    assert len(ids) == 1  # one message for both rows (one INSERT statement)
    # Given back unused 30 times (drains that stopped before taking it up): no attempt at all.
    for _ in range(30):
        claims = Claims("embedding_jobs", 30, 1)
        assert [m.msg_id for m in claims.next_chunk(conn)] == ids
        claims.give_back(conn)
    stats = drain(conn, settings)
    assert (stats.embedded, stats.dead_lettered) == (2, 0), stats.summary()

    # A message that failed once, then was claimed by 15 drains that died holding it (read, never
    # settled nor given back): dead-lettered, with what is known.
    conn.execute("update items set body = 'changed' where id = 1")
    (msg_id,) = conn.execute("select msg_id from pgmq.q_embedding_jobs").fetchone()
    conn.execute("""insert into autoembed.message_errors (queue_name, msg_id, error, attempts)
                    values ('embedding_jobs', %s, 'HTTP 500 after 2 retries: upstream exploded', 1)""", (msg_id,))
    for _ in range(1 + 15):  # the failed attempt's claim, then 15 dead drains
        conn.execute("select * from pgmq.read('embedding_jobs', 0, 1)")
    stats = drain(conn, settings)
    assert stats.dead_lettered == 1, stats.summary()
    reason = dead(conn)["1"]
    assert "15 drains died holding it" in reason and "the last: HTTP 500 after 2 retries" in reason, reason


# -- what a user sees: the CLI summary and the Dagster run's metadata --------------------------------
def test_the_drain_run_succeeds_and_counts_the_dead_letters(conn, fake_openai, settings, db_url, capsys):
    import dagster as dg

    from autoembed_dagster.cli import main
    from autoembed_dagster.defs.autoembed import build_defs

    make_items(conn, "column")
    conn.execute("alter table items add constraint no_7 check (id <> 7 or embedding is null) not valid")
    assert main(["drain", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{ROWS - 1} embedded" in out and "1 dead-lettered" in out, out

    conn.execute("update items set body = body || ' again'")
    defs = build_defs([COLUMN])
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("drain_embedding_jobs").execute_in_process(instance=instance)
    assert result.success
    outputs = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    meta = outputs[-1].event_specific_data.metadata
    assert meta["rows_dead_lettered"].value == 1 and meta["rows_embedded"].value == ROWS - 1, meta


def test_supabases_trigger_never_fails_the_write_of_a_row_whose_content_function_raises(conn, fake_openai,
                                                                                        settings):
    conn.execute(ITEMS.replace("{vector}", ", embedding halfvec(1536)"))
    conn.execute("""create trigger embed after insert or update on items for each row
                    execute function util.queue_embeddings('item_text', 'embedding')""")
    conn.execute("insert into items select g, 'item ' || g from generate_series(1, 3) g")
    drain(conn, settings)
    conn.execute("update items set body = 'RAISE now' where id = 2")  # raised before
    assert conn.execute("select embedding is null from items where id = 2").fetchone()[0]
    assert drain(conn, settings).dead_lettered == 1
    assert "item 2 cannot be read" in dead(conn)["2"]


def test_db_init_replaces_triggers_that_called_the_content_function_in_their_when_clause(conn, shape,
                                                                                        fake_openai, settings):
    from autoembed_dagster.core.db.schema import init_db

    make_items(conn, shape)
    drain(conn, settings)
    # What enrolment installed before: the content function compared in the WHEN clause.
    if shape == "column":
        conn.execute("""drop trigger autoembed_clear on items;
                        create trigger autoembed_clear before update on items for each row
                        when (new.embedding is not null and item_text(old) is distinct from item_text(new))
                        execute function autoembed.clear_target_1()""")
    else:
        conn.execute("""drop trigger autoembed_chunk_changed on items;
                        create trigger autoembed_chunk_changed after update on items for each row
                        when (item_text(old) is distinct from item_text(new))
                        execute function autoembed.queue_chunk_jobs('1', 'id')""")
    with pytest.raises(Exception, match="item 7 cannot be read"):
        with conn.transaction():
            conn.execute("update items set body = 'RAISE now' where id = %s", (BAD,))
    init_db(conn)
    conn.execute("update items set body = 'RAISE now' where id = %s", (BAD,))
    assert drain(conn, settings).dead_lettered == 1


def test_column_search_skips_a_row_whose_content_function_raises(conn, fake_openai, settings, db_url):
    """A column target's search showed each hit's input through the content function: one row
    raising failed the whole search. That row is skipped, the others are found."""
    make_items(conn, "column")
    drain(conn, settings)
    raise_for(conn, BAD)
    hits = api.search("item number 7 of the list", table="items", content_function="item_text", k=ROWS, url=db_url)
    assert sorted(int(h.id) for h in hits) == sorted(set(range(1, ROWS + 1)) - {BAD})
    assert all(h.input.startswith("item number") for h in hits)
    conn.execute("create or replace function item_text(i items) returns text language plpgsql immutable"
                 " as $$ begin return i.body; end $$")
    hits = api.search("item number 7 of the list", table="items", content_function="item_text", k=ROWS, url=db_url)
    assert sorted(int(h.id) for h in hits) == list(range(1, ROWS + 1))
