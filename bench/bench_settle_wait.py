"""The application never waits for a drain: the longest wait of the application's UPDATE of a
document's row while the drain settles that document's new chunk set (1, 100 and 4,000 chunks,
HNSW index on the chunk table, as enrolment makes it); and of its DELETE, key change and SELECT
... FOR UPDATE of that row, issued once per round while the drain is inside the chunk write
(caught by polling pg_stat_activity; a 1-chunk write is mostly too quick to catch: the rounds
caught are counted).

The document's new input is queued; the project's drain (Drainer.run: claim, read, split, embed
through the real openai client against the instant fake provider, settle) runs in a thread while
the application updates the same row (a column the input does not read) every 5 ms in autocommit,
timing every statement, and the longest time it was seen waiting for a lock (the rest of a slow
statement, on a loaded machine, is mostly WAL I/O behind the drain's writes). Baseline in the same
run: the same loop with no drain running. The settle writes the new set without any lock on the
parent row, deletes the old set under KEY SHARE (which the UPDATE does not wait for) and takes the
FOR UPDATE stale-write guard only for the last statements and the commit (core/targets/chunks.py
write): the lock wait stays a few milliseconds however large the set.

For comparison, the same UPDATE of one row of a vector column's batch while the drain writes it
(--column-batch rows, HNSW index).

And the same for a backfill page of --column-batch rows (core.migrate.backfill: write_page, in
slices by core.targets.writes.Slicer like the drain's settle), against the same page written in
one transaction in the same run (the slicer's first slice made the whole page: the code before).

    python bench/bench_settle_wait.py [--sizes 1,100,4000] [--rounds 3] [--kinds ...] [--column-batch 500]
"""

from __future__ import annotations

import argparse
import threading
import time

from common import connect, embedded_server, fake_provider, fresh_db, header, line

from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.drain import Drainer
from autoembed_dagster.core.drain.settle import BUSY_RETRY_SECONDS

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def body(chunks: int, round_: int) -> str:
    """A text of about `chunks` chunks of at most 32 tokens (one sentence of 12 words each)."""
    return "\n\n".join(" ".join(WORDS[(i * 7 + j + round_) % len(WORDS)] for j in range(12)) + f" {round_}.{i}."
                       for i in range(chunks))


def app_loop(url: str, stop: threading.Event, pids: list[int] | None = None) -> list[float]:
    waits = []
    with connect(url) as app:
        if pids is not None:
            pids.append(app.info.backend_pid)
        while not stop.is_set():
            t0 = time.perf_counter()
            app.execute("update docs set views = views + 1 where id = 1")
            waits.append(time.perf_counter() - t0)
            time.sleep(0.005)  # an application writing the row often, not holding it all the time
    return waits


def lock_waits(url: str, stop: threading.Event, pids: list[int]) -> float:
    """The longest time the application's backend (`pids`, once known) was seen waiting for a
    lock (pg_locks.waitstart, polled every millisecond): what the drain's locks cost it, apart from
    the rest of a slow statement (on a loaded machine, mostly WAL I/O: the drain's chunk set and
    its vector index entries are megabytes of WAL the application's commit flushes behind)."""
    longest = 0.0
    with connect(url) as probe:
        while not stop.is_set():
            if pids:
                row = probe.execute("""select extract(epoch from clock_timestamp() - min(l.waitstart))
                                       from pg_locks l where l.pid = %s and not l.granted""", (pids[0],)).fetchone()
                longest = max(longest, float(row[0] or 0.0))
            time.sleep(0.001)
    return longest


def settle_round(url: str, chunks: int, round_: int) -> tuple[float, float, float]:
    """(longest application wait, drain seconds, longest lock wait) of one settle of a new set."""
    with connect(url) as conn:
        conn.execute("update docs set body = %s where id = 1", (body(chunks, round_),))
    stop = threading.Event()
    result: dict = {}
    pids: list[int] = []
    app = threading.Thread(target=lambda: result.setdefault("waits", app_loop(url, stop, pids)))
    probe = threading.Thread(target=lambda: result.setdefault("locked", lock_waits(url, stop, pids)))
    app.start()
    probe.start()
    t0 = time.perf_counter()
    with connect(url) as dc:
        stats = Drainer(dc, Settings.from_env()).run()
    seconds = time.perf_counter() - t0
    stop.set()
    app.join()
    probe.join()
    if stats.embedded != 1:
        raise RuntimeError(f"the drain did not write the document: {stats.summary()}")
    return max(result["waits"]), seconds, result["locked"]


KINDS = ("delete", "key update", "for update")


def in_write(probe, pid: int) -> bool:
    """Whether the drain is inside the chunk write: it holds the document's advisory lock (taken
    right before the write) and runs the write's statement (sql/019's write function, autoembed.write_<id>;
    before it, the staging COPY, INSERT and DELETE under KEY SHARE), not yet the guard."""
    row = probe.execute(
        """select a.query from pg_stat_activity a where a.pid = %s and a.state = 'active'
           and exists (select 1 from pg_locks l where l.pid = a.pid and l.locktype = 'advisory' and l.granted)""",
        (pid,)).fetchone()
    query = (row[0] if row else "").lower()
    return any(w in query for w in ("autoembed.write_", "copy ", "insert into", "delete from"))


def timed_statement(app, kind: str) -> float:
    """Seconds the application's `kind` statement on the document's row took."""
    t0 = time.perf_counter()
    if kind == "delete":
        app.execute("delete from docs where id = 1")
    elif kind == "key update":
        app.execute("update docs set id = 2 where id = 1")
    else:
        with app.transaction():
            app.execute("select 1 from docs where id = 1 for update")
    return time.perf_counter() - t0


def put_back(conn, kind: str) -> None:
    """The document's row as it was before `kind`."""
    if kind == "delete":
        conn.execute("insert into docs (id, body) values (1, 'start')")
    elif kind == "key update":
        conn.execute("update docs set id = 1 where id = 2")


def statement_round(url: str, chunks: int, round_: int, kind: str) -> tuple[float, bool, float]:
    """(how long the application's `kind` statement on the document's row took, whether it was
    issued while the drain was inside the write of its new chunk set, the longest it waited for a
    lock). A key change moves the document's chunk set (the parent's trigger): thousands of rows
    and their vector index entries, seconds of the statement's own work, whether a drain runs or not."""
    with connect(url) as conn:
        conn.execute("update docs set body = %s where id = 1", (body(chunks, round_),))
    result: dict = {}
    with connect(url) as dc, connect(url) as probe, connect(url) as app:
        pid = dc.info.backend_pid
        worker = threading.Thread(target=lambda: result.setdefault("stats", Drainer(dc, Settings.from_env()).run()))
        worker.start()
        inside = False
        while worker.is_alive() and not inside:
            inside = in_write(probe, pid)
        stop = threading.Event()
        locks = threading.Thread(target=lambda: result.setdefault("locked", lock_waits(url, stop, [app.info.backend_pid])))
        locks.start()
        wait = timed_statement(app, kind)
        stop.set()
        locks.join()
        worker.join()
    with connect(url) as conn:  # the row back as it was, its set written
        put_back(conn, kind)
        time.sleep(BUSY_RETRY_SECONDS + 0.2)  # (a job the guard found busy is taken up again after this)
        Drainer(conn, Settings.from_env()).run()
    return wait, inside, result["locked"]


def statement_baseline(url: str, kind: str, rounds: int = 5) -> float:
    """The longest `kind` statement with no drain running (the row put back after each)."""
    worst = 0.0
    with connect(url) as app:
        for _ in range(rounds):
            worst = max(worst, timed_statement(app, kind))
            put_back(app, kind)
    with connect(url) as conn:
        Drainer(conn, Settings.from_env()).run()
    return worst


def app_waits_during(url: str, row: int, write) -> tuple[float, float, object]:
    """Run `write()` while an application session updates row `row` of `notes` (another column)
    again and again: (longest UPDATE, longest lock wait of it, what `write` returned)."""
    stop = threading.Event()
    result: dict = {}
    pids: list[int] = []

    def app() -> None:
        waits = []
        with connect(url) as a:
            pids.append(a.info.backend_pid)
            while not stop.is_set():
                t0 = time.perf_counter()
                a.execute("update notes set views = views + 1 where id = %s", (row,))
                waits.append(time.perf_counter() - t0)
                time.sleep(0.005)
        result["waits"] = waits

    threads = [threading.Thread(target=app),
               threading.Thread(target=lambda: result.setdefault("locked", lock_waits(url, stop, pids)))]
    for t in threads:
        t.start()
    try:
        written = write()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return max(result["waits"]), result["locked"], written


def column_batch(url: str, rows: int, rounds: int) -> dict:
    """For comparison, a vector column (HNSW index): the application's UPDATE of one row (another
    column) of a `rows`-row batch while the drain writes the batch's vectors. The drain writes the
    batch in slices (core.targets.writes.Slicer), each holding its rows FOR UPDATE from its
    stale-write guard to its commit: the application's UPDATE of a row waits for its slice's write,
    not the whole batch's."""
    with connect(url) as conn:
        conn.execute("""create table notes (id integer primary key, views integer not null default 0, body text,
                                            embedding halfvec(1536));
                        create function notes_input(n notes) returns text language sql immutable as $$ select n.body $$;
                        select autoembed.enroll('notes', 'notes_input', 'embedding');
                        create index on notes using hnsw (embedding halfvec_cosine_ops)""")
        conn.execute("insert into notes (id, body) select g, 'note ' || g from generate_series(1, %s) g", (rows,))
    with connect(url) as dc:
        Drainer(dc, Settings.from_env()).run()
    worst = locked = 0.0
    for _ in range(rounds):
        with connect(url) as conn:
            conn.execute("update notes set body = body || ' again'")

        def run_drain() -> None:
            with connect(url) as dc:
                Drainer(dc, Settings.from_env()).run()

        wait, lock, _ = app_waits_during(url, rows // 2, run_drain)
        worst, locked = max(worst, wait), max(locked, lock)
    line(f"{rows:,}-row batch of a vector column (HNSW): longest UPDATE of one of its rows",
         f"{worst * 1000:.1f} ms (of it waiting for a lock: {locked * 1000:.1f} ms)")
    return {"rows": rows, "longest_wait_ms": worst * 1000, "longest_lock_wait_ms": locked * 1000}


def backfill_page(url: str, rows: int, rounds: int) -> dict:
    """The application's UPDATE of one row (another column) of a `rows`-row backfill page of the
    vector column (`notes`, made by column_batch) while the backfill writes it: in slices (each
    its own transaction), and, in the same run, the page in one transaction (the slicer's first
    slice set to the whole page, not adapted)."""
    from autoembed_dagster.core.migrate.backfill import run_backfill
    from autoembed_dagster.core.pipelines import Pipeline
    from autoembed_dagster.core.targets.catalog import resolve
    from autoembed_dagster.core.targets.writes import Slicer

    p = Pipeline(name="notes", schema="public", table="notes", content_function="notes_input", shards=1)
    out: dict = {}
    for label, start, adaptive in (("one transaction", rows, False), ("slices", Slicer.START_ROWS, True)):
        worst = locked = 0.0
        before = (Slicer.START_ROWS, Slicer.ADAPTIVE)
        Slicer.START_ROWS, Slicer.ADAPTIVE = start, adaptive
        try:
            for r in range(rounds):
                with connect(url) as conn:
                    conn.execute("update notes set body = body || ' page'")
                    conn.execute("select pgmq.purge_queue('embedding_jobs')")  # the backfill alone writes them

                def run_page():
                    with connect(url) as bc:
                        spec = p.spec(column_dimensions=resolve(bc, p.live_key).dimensions)
                        return run_backfill(bc, p, spec, batch_rows=rows).total

                wait, lock, total = app_waits_during(url, rows // 2, run_page)
                if total.embedded < rows - 1:  # (the row the application updates may be found changed)
                    raise RuntimeError(f"the backfill did not write the page: {total.summary()}")
                worst, locked = max(worst, wait), max(locked, lock)
        finally:
            Slicer.START_ROWS, Slicer.ADAPTIVE = before
        out[label] = {"longest_wait_ms": worst * 1000, "longest_lock_wait_ms": locked * 1000}
    whole, sliced = out["one transaction"], out["slices"]
    line(f"{rows:,}-row backfill page of a vector column (HNSW) in one transaction: longest UPDATE of one of its rows",
         f"{whole['longest_wait_ms']:.1f} ms (of it waiting for a lock: {whole['longest_lock_wait_ms']:.1f} ms)")
    line("the same page in slices: longest UPDATE of one of its rows",
         f"{sliced['longest_wait_ms']:.1f} ms (of it waiting for a lock: {sliced['longest_lock_wait_ms']:.1f} ms; "
         f"{sliced['longest_wait_ms'] / max(whole['longest_wait_ms'], 1e-3):.2f}x one transaction)")
    return {"rows": rows, **out}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,100,4000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="statements timed during the write, besides UPDATE")
    ap.add_argument("--column-batch", type=int, default=500,
                    help="rows of the vector-column batch timed for comparison (0: none)")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    sizes = [int(s) for s in args.sizes.split(",")]
    header("the application's UPDATE of a document's row while the drain settles its chunk set")
    out: dict = {}
    with embedded_server() as server, fake_provider():
        url = fresh_db(server)
        with connect(url) as conn:
            conn.execute("""create table docs (id integer primary key, views integer not null default 0, body text);
                            create function docs_input(d docs) returns text language sql immutable
                                as $$ select d.body $$;
                            insert into docs (id, body) values (1, 'start');
                            select autoembed.enroll_chunks('docs', 'docs_input', 32, 0)""")
        with connect(url) as dc:
            Drainer(dc, Settings.from_env()).run()
        stop = threading.Event()
        base: dict = {}
        t = threading.Thread(target=lambda: base.setdefault("waits", app_loop(url, stop)))
        t.start()
        time.sleep(2.0)
        stop.set()
        t.join()
        baseline = max(base["waits"])
        line("baseline: longest UPDATE, no drain running", f"{baseline * 1000:.1f} ms")
        out["baseline_ms"] = baseline * 1000
        for n in sizes:
            worst, locked, seconds = 0.0, 0.0, []
            for r in range(args.rounds):
                wait, s, lock = settle_round(url, n, r + 1)
                worst, locked = max(worst, wait), max(locked, lock)
                seconds.append(s)
            with connect(url) as conn:
                have = conn.execute("select count(*) from docs_chunks where id = 1").fetchone()[0]
            line(f"{have:,}-chunk set: longest UPDATE during the settle",
                 f"{worst * 1000:.1f} ms ({worst / baseline:.1f}x baseline; of it waiting for a lock: "
                 f"{locked * 1000:.1f} ms; drain {max(seconds):.2f} s)")
            out[n] = {"chunks": have, "longest_wait_ms": worst * 1000, "longest_lock_wait_ms": locked * 1000,
                      "drain_s": max(seconds)}
        for kind in kinds:
            base_ms = statement_baseline(url, kind) * 1000
            line(f"baseline: longest {kind.upper()}, no drain running", f"{base_ms:.1f} ms")
            out[kind] = {"baseline_ms": base_ms}
            for n in sizes:
                waits = [statement_round(url, n, 100 + r, kind) for r in range(args.rounds)]
                worst = max(w for w, _, _ in waits)
                locked = max(lock for _, _, lock in waits)
                caught = sum(1 for _, inside, _ in waits if inside)
                line(f"{n:,}-chunk set: longest {kind.upper()} during the settle",
                     f"{worst * 1000:.1f} ms (of it waiting for a lock: {locked * 1000:.1f} ms; "
                     f"{caught} of {len(waits)} issued inside the write)")
                out[kind][n] = {"longest_wait_ms": worst * 1000, "longest_lock_wait_ms": locked * 1000,
                                "caught": caught}
        if args.column_batch:
            out["column_batch"] = column_batch(url, args.column_batch, args.rounds)
            out["backfill_page"] = backfill_page(url, args.column_batch, args.rounds)
    return out


if __name__ == "__main__":
    main()
