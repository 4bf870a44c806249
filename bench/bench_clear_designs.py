"""Designs for clearing the stale vector of a bulk UPDATE, side by side (issue 26, "Bulk UPDATE").

The project's column target today (`enrolled`): a BEFORE UPDATE row trigger whose generated
plpgsql function compares the content function of OLD and NEW inside an exception block and sets
the vector NULL when it changed (sql/004 install_compare_function), an AFTER UPDATE statement
trigger over the new transition table that queues the rows whose vector is NULL, and row triggers
enabled REPLICA that local writes skip. The other set-ups change one thing each, on the same
table, so each row says what that thing costs or saves; the ones marked "unsafe" break a rule of
the project and are references, not candidates:

  statement  the set-wise design: no row trigger; one AFTER UPDATE statement trigger over both
             transition tables compares the inputs (one exception block per statement, every row
             of the new table queued if it raises) and clears with a second UPDATE of the rows
             whose input changed
  when       unsafe: the comparison in the row trigger's WHEN clause (a content function that
             raises fails the application's write) and a function that only clears
  prefilter  unsafe: `enrolled` behind a WHEN that some column other than the vector changed; the
             trigger then depends on every column (DROP COLUMN and ALTER COLUMN TYPE of any
             column are refused while the table is enrolled)
  row_image  `enrolled` behind a WHEN `not (old *= new)` (whole-row image equality, no column
             dependency): it reads the vector's TOAST chunks of both rows
  no_replica `enrolled` without the REPLICA row triggers (what they cost a local write)
  no_clear   unsafe: no clear trigger at all (the stale vector stays): what queueing alone costs

The floor decomposition (`--decompose`, on by default): every trigger of the table dropped, then
one piece alone, each doing nothing, so what the trigger machinery costs before any work:

  empty_row    a BEFORE UPDATE row trigger (plpgsql, the same WHEN) that returns NEW
  block_row    the same with an empty exception block (one subtransaction per row: what a content
               function that may raise costs to call safely, before calling it)
  empty_stmt   an AFTER UPDATE statement trigger with the new transition table (as the enqueue
               trigger has) that returns NULL

Any design that clears per row and queues per statement pays at least empty_row + empty_stmt over
the floor; one that calls the content function safely, block_row + empty_stmt. The bench prints
those sums next to the goals.

A real change of the input of every row (`change`; its floor `floor` is the plain table's UPDATE
that sets the vector NULL itself) and a re-save (`resave`, `title = title`; its floor is the plain
UPDATE). Each statement runs right after a checkpoint, in a transaction rolled back; figures are
the server process's CPU time (/proc schedstat), medians of the rounds.

    python bench/bench_clear_designs.py [--rows 20000] [--rounds 5] [--designs enrolled,statement,...]
"""

from __future__ import annotations

import argparse
import statistics

from bench_write_path import backend_cpu, fill_with_vectors, setup
from common import connect, embedded_server, fresh_db, header, line

REPLICA = ("autoembed_replica_update", "autoembed_replica_keep", "autoembed_replica_insert", "autoembed_forget_row")


def clear_function(conn, t: str) -> str:
    return conn.execute("select tgfoid::regprocedure::text from pg_trigger where tgname = 'autoembed_clear'"
                        " and tgrelid = %s::regclass", (t,)).fetchone()[0]


def rewhen(conn, t: str, when: str, function: str | None = None) -> None:
    """Re-create autoembed_clear with another WHEN clause (and function)."""
    function = function or clear_function(conn, t)
    conn.execute(f"""drop trigger autoembed_clear on {t};
        create trigger autoembed_clear before update on {t} for each row
        when (current_setting('autoembed.draining', true) is distinct from 'on' and new.embedding is not null {when})
        execute function {function};
        alter table {t} enable always trigger autoembed_clear""")


def d_statement(conn, t: str) -> None:
    conn.execute(f"""drop trigger autoembed_clear on {t};
        create function {t}_statement() returns trigger language plpgsql as $b$
        declare
            keys bigint[];
        begin
            if current_setting('autoembed.draining', true) = 'on' then
                return null;
            end if;
            begin
                keys := array(select n.id from autoembed_old o join autoembed_new n on n.id = o.id
                              where n.embedding is not null and {t}_input(o) is distinct from {t}_input(n));
            exception when others then
                keys := array(select n.id from autoembed_new n where n.embedding is not null);
            end;
            if cardinality(keys) > 0 then
                perform set_config('autoembed.draining', 'on', true);  -- (our own UPDATE: no trigger work)
                update {t} set embedding = null where id = any(keys);
                perform set_config('autoembed.draining', '', true);
                perform autoembed.send_keys(autoembed.target_of('{t}', 'embedding'), keys::text[]);
            end if;
            return null;
        end $b$;
        create trigger autoembed_aclear after update on {t} referencing old table as autoembed_old
            new table as autoembed_new for each statement execute function {t}_statement()""")


def d_when(conn, t: str) -> None:
    conn.execute(f"create function {t}_clear() returns trigger language plpgsql as "
                 "$b$ begin NEW.embedding := null; return NEW; end $b$")
    rewhen(conn, t, f"and {t}_input(old) is distinct from {t}_input(new)", f"{t}_clear()")


def _only(conn, t: str, create: str) -> None:
    """Every trigger of `t` dropped, then `create` (its function named {t}_piece)."""
    for (name,) in conn.execute("select tgname from pg_trigger where tgrelid = %s::regclass and not tgisinternal",
                                (t,)).fetchall():
        conn.execute(f"drop trigger {name} on {t}")
    conn.execute(create.format(t=t))


def d_empty_row(conn, t: str, block: bool = False) -> None:
    body = "begin begin null; exception when others then null; end; return NEW; end" if block else "begin return NEW; end"
    _only(conn, t, f"""create function {{t}}_piece() returns trigger language plpgsql as $b$ {body} $b$;
        create trigger piece before update on {{t}} for each row
        when (current_setting('autoembed.draining', true) is distinct from 'on' and new.embedding is not null)
        execute function {{t}}_piece()""")


def d_empty_stmt(conn, t: str) -> None:
    _only(conn, t, """create function {t}_piece() returns trigger language plpgsql as $b$ begin return null; end $b$;
        create trigger piece after update on {t} referencing new table as n
        for each statement execute function {t}_piece()""")


PIECES = {
    "empty_row": d_empty_row,
    "block_row": lambda conn, t: d_empty_row(conn, t, block=True),
    "empty_stmt": d_empty_stmt,
}

DESIGNS = {
    "enrolled": lambda conn, t: None,
    "statement": d_statement,
    "when": d_when,
    "prefilter": lambda conn, t: rewhen(conn, t, "and (old.id, old.title, old.body) is distinct from (new.id, new.title, new.body)"),
    "row_image": lambda conn, t: rewhen(conn, t, "and not (old *= new)"),
    "no_replica": lambda conn, t: [conn.execute(f"drop trigger {n} on {t}") for n in REPLICA],
    "no_clear": lambda conn, t: conn.execute(f"drop trigger autoembed_clear on {t}"),
    "no_state_key": lambda conn, t: conn.execute(f"drop trigger autoembed_state_key on {t}"),
    "queue_only": lambda conn, t: [conn.execute(f"drop trigger {n} on {t}")
                                   for n in ("autoembed_clear", "autoembed_state_key", *REPLICA)],
    **PIECES,
}
GOALS = {"change": 1.25, "resave": 1.2}
STATEMENTS = {"change": "update {t} set body = body || '!'", "resave": "update {t} set title = title"}
FLOORS = {"change": "update {t} set body = body || '!', embedding = null", "resave": STATEMENTS["resave"]}


def timed(conn, statement: str, rows: int, cleared: bool) -> float:
    conn.execute("checkpoint")
    with conn.transaction(force_rollback=True):
        before = backend_cpu(conn)
        conn.execute(statement)
        used = backend_cpu(conn) - before
        if cleared:
            assert conn.execute(statement.split(" set ")[0].replace("update", "select count(*) from")
                                + " where embedding is null").fetchone()[0] == rows, statement
    return used


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    args = ap.parse_args(argv)
    designs = args.designs.split(",")
    header(f"clearing designs: {args.rows:,}-row bulk UPDATEs of rows holding halfvec(1536), server CPU, "
           f"median of {args.rounds}")
    results: dict[str, dict[str, float]] = {}
    with embedded_server() as server, connect(fresh_db(server)) as conn:
        tables = {"plain": setup(conn, "plain")}
        for d in designs:
            tables[d] = setup(conn, d)
            conn.execute(f"select autoembed.enroll('w_{d}', 'w_{d}_input', 'embedding', enqueue_backlog => false)")
            DESIGNS[d](conn, tables[d])
        for t in tables.values():
            fill_with_vectors(conn, t, args.rows)
        conn.execute("select pgmq.purge_queue('embedding_jobs')")
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for kind, statement in STATEMENTS.items():
                runs = [("floor", tables["plain"], FLOORS[kind], False)]
                if kind == "change":  # the same statement on the plain table (the vector kept): the pieces' base
                    runs.append(("bare", tables["plain"], statement, False))
                runs += [(d, tables[d], statement, kind == "change" and d not in ("no_clear", "queue_only", *PIECES))
                         for d in designs]
                for name, t, st, cleared in runs:
                    conn.execute(f"select sum(vector_dims(embedding)) from {t}")  # its TOAST in the cache
                    times.setdefault((kind, name), []).append(timed(conn, st.format(t=t), args.rows, cleared))
                    conn.execute(f"vacuum {t}")
                    conn.execute("vacuum pgmq.q_embedding_jobs")
        for kind in STATEMENTS:
            floor = times[(kind, "floor")]
            for name in ["floor", *(["bare"] if kind == "change" else []), *designs]:
                ratio = statistics.median(t / f for t, f in zip(times[(kind, name)], floor))
                results.setdefault(name, {})[kind] = ratio
                line(f"{kind:<7} {name:<11} {statistics.median(times[(kind, name)]) * 1000:8.1f} ms CPU",
                     f"{ratio:.2f}x the floor")
            r = {n: v[kind] for n, v in results.items() if kind in v}
            base = r.get("bare", 1.0)  # the pieces run the statement without clearing: added cost over that
            if "empty_stmt" in r and "empty_row" in r:
                least = 1 + (r["empty_row"] - base) + (r["empty_stmt"] - base)
                line(f"{kind:<7} floor + an empty row trigger + an empty transition-table statement trigger",
                     f"{least:.2f}x (goal {GOALS[kind]}x: "
                     f"{'this bound is under it' if least <= GOALS[kind] else 'NOT reachable by any design with both'})")
            if "empty_stmt" in r and "block_row" in r:
                least = 1 + (r["block_row"] - base) + (r["empty_stmt"] - base)
                line(f"{kind:<7} ... the row trigger with an exception block (to call the content function safely)",
                     f"{least:.2f}x (goal {GOALS[kind]}x: {'this bound is under it' if least <= GOALS[kind] else 'NOT reachable'})")
            if "no_clear" in r:
                line(f"{kind:<7} queueing alone (the enroll statement trigger, no clearing)",
                     f"{r['no_clear']:.2f}x (goal {GOALS[kind]}x)")
    return results


if __name__ == "__main__":
    main()
