"""Write-path overhead: what the triggers add to the user's INSERTs.

Same table, same rows, three set-ups: no trigger; Supabase's guide (util.queue_embeddings AFTER
row triggers); the project's own triggers (autoembed.enroll: BEFORE row clear + AFTER statement
triggers with transition tables, one pgmq.send_batch per statement, one message per 200 rows).
The single-row kinds add `enroll_send`: the same triggers on a queue created after `db init`, whose
one message per statement goes through pgmq.send (format() + EXECUTE) instead of the static INSERT
autoembed.send_one makes for the default queue (sql/018): the before/after of that change in one run.
Bulk = one INSERT ... SELECT
of N rows; single-row = N autocommit INSERTs of one row each (each commit waits for the disk);
single_cpu = the same N one-row INSERT statements in one DO loop, rolled back (no commits): the
triggers' own time per statement, steady where the commits' disk waits are not.
Bulk UPDATE = one UPDATE of every row of a table of N rows that all have a vector: a real change
of the input (`body`), and a re-save that changes nothing the input reads (`title = title`); each
runs in a transaction that is rolled back, so every round updates the same table. The real change
has a fourth set-up, `plain_clear`: the plain table's UPDATE that clears the vector itself (the
floor of any clearing: the vector's TOAST chunks are deleted), and the enroll/floor ratio.
Targets: <= 1.3x bulk, <= 1.5x single-row, <= 2x bulk UPDATE. A bulk ratio is the median of the
rounds' own ratios (each round runs every set-up once, in turn): a 100k-row INSERT moves +-20%
between rounds with the disk, and the pairing cancels that drift.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import psutil

from common import Timer, body_sql, connect, embedded_server, fresh_db, header, line

from autoembed_dagster.core.queue import pgmq

SUPABASE_TRIGGERS = """
create trigger embed_on_insert after insert on {t} for each row
    execute function util.queue_embeddings('{t}_input', 'embedding');
create trigger embed_on_update after update of title, body on {t} for each row
    execute function util.queue_embeddings('{t}_input', 'embedding');
"""


def setup(conn, variant: str) -> str:
    t = f"w_{variant}"
    conn.execute(f"""
        create table {t} (id bigint primary key, title text not null, body text not null, embedding halfvec(1536));
        create function {t}_input(d {t}) returns text language sql immutable
            as $$ select '# ' || d.title || E'\\n\\n' || d.body $$;
    """)
    if variant == "supabase":
        conn.execute(SUPABASE_TRIGGERS.format(t=t))
    elif variant == "enroll":
        conn.execute(f"select autoembed.enroll('{t}', '{t}_input', 'embedding', enqueue_backlog => false)")
    elif variant == "enroll_send":  # its own queue, created after db init: its sends go through pgmq.send
        conn.execute(f"select autoembed.enroll('{t}', '{t}_input', 'embedding', 'id', '{SEND_QUEUE}', false)")
    return t


SEND_QUEUE = "send_path"  # enroll_send's queue: the single-row baseline through pgmq.send (sql/018)


def queued_rows(conn, queue: str = "embedding_jobs") -> int:
    return pgmq.status(conn, queue)[0].rows


def reset(conn, table: str) -> None:
    conn.execute(f"truncate {table}")
    queue = SEND_QUEUE if table.endswith("_enroll_send") else "embedding_jobs"
    conn.execute("select pgmq.purge_queue(%s)", (queue,))
    conn.execute(f"vacuum analyze {table}")
    conn.execute(f"vacuum pgmq.q_{queue}")
    conn.execute("checkpoint")


def bulk(conn, table: str, n: int, step: int = 1) -> float:
    with Timer() as t:
        conn.execute(f"insert into {table} (id, title, body) select g, 'title ' || g, {body_sql()} "
                     f"from generate_series(1, {n * step}, {step}) g")
    return t.seconds


def bulk_gapped(conn, table: str, n: int) -> float:
    """Every other key: the enroll trigger cannot send ranges and lists the keys."""
    return bulk(conn, table, n, step=2)


UPDATES = {"update_change": "update {t} set body = body || '!'", "update_resave": "update {t} set title = title"}
# The floor of a real change: the plain table's UPDATE clearing the vector itself. Clearing a TOASTed
# vector deletes its TOAST chunks (two per halfvec(1536) row), whatever does the clearing.
CLEAR_FLOOR = "update {t} set body = body || '!', embedding = null"


def fill_with_vectors(conn, table: str, n: int) -> None:
    """n rows that all have a vector (written as the drain writes: its triggers skip it)."""
    reset(conn, table)
    conn.execute(f"insert into {table} (id, title, body) select g, 'title ' || g, {body_sql()} "
                 f"from generate_series(1, {n}) g")
    with conn.transaction():
        conn.execute("set local autoembed.draining = 'on'")
        conn.execute(f"update {table} set embedding = array_fill(0.01, array[1536])::halfvec")
    conn.execute("select pgmq.purge_queue('embedding_jobs')")
    conn.execute(f"vacuum analyze {table}")


def bulk_update(conn, table: str, statement: str, expected_jobs: int, warm: bool = False) -> tuple[float, float]:
    """One UPDATE of every row, timed, then rolled back (the table is the same for every round).
    `warm`: read every vector first, so the TOAST pages that clearing deletes from are in shared
    buffers (a table whose vectors were just read or written). Otherwise they are wherever the
    previous statements left them: three 20k-row tables' TOAST (80 MB each) do not fit in the
    embedded server's 128 MB, and a clearing UPDATE costs 1.5x or 4x a plain one by that alone.
    Returns (wall seconds, the server process's CPU seconds)."""
    if warm:
        conn.execute(f"select sum(vector_dims(embedding)) from {table}")
    # Every round starts right after a checkpoint: the first change of a page after one writes the
    # whole page to the WAL, and rounds that did and did not follow one were 1x and 4x apart.
    conn.execute("checkpoint")
    with conn.transaction(force_rollback=True):
        cpu_before = backend_cpu(conn)
        with Timer() as t:
            conn.execute(statement.format(t=table))
        cpu = backend_cpu(conn) - cpu_before
        queued = queued_rows(conn)
        assert queued == expected_jobs, f"{table} {statement}: {queued} jobs queued, expected {expected_jobs}"
    conn.execute(f"vacuum {table}")
    conn.execute("vacuum pgmq.q_embedding_jobs")
    return t.seconds, cpu


def backend_cpu(conn) -> float:
    """CPU seconds the connection's server process has run: unlike the wall clock, barely moved
    by other work on a shared machine. Linux's schedstat counts nanoseconds; elsewhere psutil's
    user + system time (10 ms ticks: for statements of 100+ ms)."""
    pid = conn.info.backend_pid
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


def single(conn, table: str, n: int, start: int = 1) -> float:
    body = "row {} " + "lorem ipsum dolor sit amet " * 8
    q = f"insert into {table} (id, title, body) values (%s, %s, %s)"
    with Timer() as t:
        for i in range(start, start + n):
            conn.execute(q, (i, f"title {i}", body.format(i)))
    return t.seconds


def single_cpu(conn, table: str, n: int) -> float:
    """n single-row INSERT statements in one DO loop, in a transaction that is rolled back: what the
    statement triggers cost per statement without the commits (whose disk waits make the
    autocommit figures noisy on a shared machine)."""
    with conn.transaction(force_rollback=True):
        with Timer() as t:
            conn.execute(f"do $$ begin for i in 1..{int(n)} loop "
                         f"insert into {table} (id, title, body) values (i, 'title ' || i, 'row ' || i || ' lorem ipsum'); "
                         "end loop; end $$")
        queue = SEND_QUEUE if table.endswith("_enroll_send") else "embedding_jobs"
        queued = queued_rows(conn, queue)
    expected = 0 if table.endswith("_plain") else n
    assert queued == expected, f"{table}: {queued} jobs queued, expected {expected}"
    conn.execute(f"vacuum {table}")
    conn.execute(f"vacuum pgmq.q_{queue}")
    return t.seconds


def single_interleaved(conn, tables: dict[str, str], n: int, chunk: int = 500) -> dict[str, float]:
    """Commit latency drifts (checkpoints, disk): the variants take turns every `chunk` commits,
    so drift hits all of them alike. Returns total seconds per variant."""
    for table in tables.values():
        reset(conn, table)
    total = {v: 0.0 for v in tables}
    for start in range(1, n + 1, chunk):
        for variant, table in tables.items():
            total[variant] += single(conn, table, min(chunk, n + 1 - start), start)
    return total


def report(results: dict, times: dict[str, list[float]], kind: str, n: int) -> None:
    """Print and record each variant's rate and its median per-round ratio to the plain table."""
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for variant in times:
        rounds = [t / p for t, p in zip(times[variant], times["plain"])]
        ratio = statistics.median(rounds)
        results.setdefault(variant, {})[kind] = ratio
        results[variant][f"{kind}_rate"] = n / med[variant]
        each = " ".join(f"{r:.2f}" for r in rounds) if variant != "plain" else ""
        line(f"{kind:<13} {variant:<11} {n / med[variant]:>10,.0f} rows/s", f"{ratio:.2f}x   {each}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bulk", type=int, default=100_000)
    ap.add_argument("--single", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--update", type=int, default=20_000, help="rows of the bulk UPDATE table")
    ap.add_argument("--update-cache", choices=("warm", "as-is"), default="warm",
                    help="read a table's vectors before each timed UPDATE (warm), or not (as-is: bimodal)")
    ap.add_argument("--kinds", default="bulk,bulk_gapped,single,single_cpu,update",
                    help="which measurements to run (comma-separated; default all)")
    args = ap.parse_args(argv)
    header(f"write-path overhead ({args.bulk:,} rows bulk, {args.single:,} single-row inserts, "
           f"{args.update:,}-row bulk UPDATEs ({args.update_cache} TOAST cache), median of {args.repeat})")
    results: dict[str, dict[str, float]] = {}
    with embedded_server() as server:
        url = fresh_db(server)
        with connect(url) as conn:
            tables = {v: setup(conn, v) for v in ("plain", "supabase", "enroll")}
            # single-row kinds only: the same trigger whose one message goes through pgmq.send
            # (format() + EXECUTE) instead of autoembed.send_one's static INSERT (sql/018)
            single_tables = {**tables, "enroll_send": setup(conn, "enroll_send")}
            kinds = set(args.kinds.split(","))
            for kind, fn, n in (("bulk", bulk, args.bulk), ("bulk_gapped", bulk_gapped, args.bulk),
                                ("single", single, args.single), ("single_cpu", single_cpu, args.single)):
                if kind not in kinds:
                    continue
                variants = single_tables if kind.startswith("single") else tables
                times: dict[str, list[float]] = {v: [] for v in variants}
                if kind == "single_cpu":  # (its rounds roll back: the tables stay empty)
                    for table in variants.values():
                        reset(conn, table)
                for _ in range(args.repeat):
                    if kind == "single":
                        for variant, secs in single_interleaved(conn, variants, n).items():
                            times[variant].append(secs)
                        queued = queued_rows(conn)
                        assert queued == 2 * n, f"{queued} jobs queued, expected {2 * n}"
                        continue
                    if kind == "single_cpu":
                        for variant, table in variants.items():
                            times[variant].append(single_cpu(conn, table, n))
                        continue
                    for variant, table in tables.items():  # interleaved: drift hits all alike
                        reset(conn, table)
                        times[variant].append(fn(conn, table, n))
                        queued = queued_rows(conn)
                        expected = 0 if variant == "plain" else n
                        assert queued == expected, f"{variant}: {queued} jobs queued, expected {expected}"
                report(results, times, kind, n)
                if kind == "single_cpu":
                    for variant in ("supabase", "enroll", "enroll_send"):
                        extra = [(t - p) / n * 1e6 for t, p in zip(times[variant], times["plain"])]
                        results[variant]["single_cpu_us"] = statistics.median(extra)
                        line(f"single_cpu    {variant}: trigger time per statement",
                             f"{statistics.median(extra):.0f} us   " + " ".join(f"{e:.0f}" for e in extra))
        # Bulk UPDATEs of a table whose rows all have a vector.
        with connect(url) if "update" in kinds else contextlib.nullcontext() as conn:
            for table in tables.values() if conn else ():
                fill_with_vectors(conn, table, args.update)
            for kind in UPDATES if conn else ():
                variants = {v: (t, UPDATES[kind]) for v, t in tables.items()}
                if kind == "update_change":
                    variants["plain_clear"] = (tables["plain"], CLEAR_FLOOR)
                times = {v: [] for v in variants}
                cpu = {v: [] for v in variants}
                for _ in range(args.repeat):
                    for variant, (table, statement) in variants.items():
                        expected = args.update if kind == "update_change" and not variant.startswith("plain") else 0
                        wall, used = bulk_update(conn, table, statement, expected, args.update_cache == "warm")
                        times[variant].append(wall)
                        cpu[variant].append(used)
                report(results, times, kind, args.update)
                measures = [("", times)]
                if min(min(c) for c in cpu.values()) > 0:  # (too short a statement shows 0 ticks)
                    report(results, cpu, f"{kind}_cpu", args.update)  # (the rate: rows per server CPU second)
                    measures.append(("_cpu", cpu))
                if "plain_clear" in times:
                    for what, measured in measures:
                        over = [e / f for e, f in zip(measured["enroll"], measured["plain_clear"])]
                        results["enroll"][f"update_change{what}_vs_floor"] = statistics.median(over)
                        line(f"update_change{what} enroll / plain_clear (the floor)",
                             f"{statistics.median(over):.2f}x   " + " ".join(f"{r:.2f}" for r in over))
        # What one message per row would cost at the least (why bulk statements group rows): the
        # same number of messages inserted straight into pgmq's queue table, no trigger at all.
        with connect(url) as conn:
            floors = []
            if "bulk" not in results.get("plain", {}):
                args.repeat = 0
            for _ in range(args.repeat):
                conn.execute("select pgmq.purge_queue('embedding_jobs')")
                conn.execute("vacuum pgmq.q_embedding_jobs")
                with Timer() as t:
                    conn.execute(
                        "insert into pgmq.q_embedding_jobs (vt, message) select clock_timestamp(), "
                        "jsonb_build_object('id', g, 'schema', 'public', 'table', 'w_plain', "
                        "'contentFunction', 'w_plain_input', 'embeddingColumn', 'embedding') "
                        f"from generate_series(1, {args.bulk}) g")
                floors.append(t.seconds)
            if floors:
                queue_only = statistics.median(floors)
                plain = args.bulk / (results["plain"]["bulk_rate"])
                results["floor"] = {"bulk": (plain + queue_only) / plain}
                line("bulk   one message per row, no trigger (reference)", f"{results['floor']['bulk']:.2f}x")
    target = {"bulk": 1.3, "single": 1.5, "update_change": 2.0, "update_resave": 2.0}
    # Supabase's row trigger (one pgmq.send per row) is a peer on bulk statements, not a target.
    for variant in ("enroll", "enroll_send"):
        if "single" in results.get(variant, {}):
            line(f"single {variant}: ratio to plain per round (median)", f"{results[variant]['single']:.2f}x")
    for variant, kind in (("enroll", "bulk"), ("enroll", "single"), ("supabase", "single"),
                          ("enroll", "update_change"), ("enroll", "update_resave")):
        if kind not in results.get(variant, {}):
            continue
        r = results[variant][kind]
        line(f"target {kind} <= {target[kind]}x, {variant}", "met" if r <= target[kind] else "MISSED")
    return results


if __name__ == "__main__":
    main()
