"""Drain throughput (queued → written) against the physical limit of writing the same vectors
into the same table, without and with an HNSW index.

The drain: Drainer.run() over N queued jobs (pgmq claim, read input, embed through the real
openai client against the instant fake provider, hash-guarded staged write + message delete in
one transaction per batch). The limit: the same vectors written with no queue, no provider, no
guard — a numpy-built binary COPY into a temp stage + one UPDATE per batch of the same size
(what the drain has to do at the least), and a binary COPY of new rows. Drain and bare write take
turns (medians of --rounds).
Targets (no index): >= 2,000 rows/s and >= 50% of the bare staged update.
"""

from __future__ import annotations

import argparse
import statistics
import struct

import numpy as np

from common import (Timer, body_sql, connect, create_docs, embedded_server, fake_provider, fresh_db, header,
                    line, timed_threads)
from cpu import CpuMeter

from autoembed_dagster.core.config import Settings
from autoembed_dagster.core.db.server import conninfo_of
from autoembed_dagster.core.drain import Drainer


def load(conn, n: int, table: str = "docs") -> None:
    conn.execute(f"select autoembed.enroll('{table}', '{table}_input', 'embedding', enqueue_backlog => false)")
    conn.execute(f"insert into {table} select g, 'title ' || g, {body_sql()} from generate_series(1, {n}) g")
    conn.execute(f"vacuum analyze {table}")
    conn.execute("vacuum analyze pgmq.q_embedding_jobs")


def drain(url: str, settings: Settings, pipeline: bool = True, writers: int = 1) -> tuple[float, int]:
    results = []

    def one():
        with connect(url) as c:
            results.append(Drainer(c, settings, pipeline=pipeline).run().embedded)

    return timed_threads(one, writers), sum(results)


def _payload(ids: np.ndarray, vecs: np.ndarray, extra: bytes = b"") -> bytes:
    n, d = vecs.shape
    half = vecs.astype(">f2")
    head = struct.pack(">ihh", 4 + 2 * d, d, 0)
    parts = [b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)]
    nfields = 2 + (2 if extra else 0)
    for k, v in zip(ids, half):
        parts.append(struct.pack(">hiq", nfields, 8, int(k)) + extra + head + v.tobytes())
    parts.append(b"\xff\xff")
    return b"".join(parts)


def bare_staged_update(conn, table: str, ids: np.ndarray, vecs: np.ndarray, batch: int,
                       cpu: list | None = None) -> float:
    """Seconds; `cpu`: gets the measurement's CPU seconds (CpuMeter.seconds) appended."""
    conn.execute("create temp table if not exists bare_stage (k bigint, v halfvec) on commit delete rows")
    meter = CpuMeter(conninfo_of(conn)) if cpu is not None else None
    with Timer() as t:
        for s in range(0, len(ids), batch):
            with conn.transaction():
                with conn.cursor().copy("copy bare_stage (k, v) from stdin with (format binary)") as cp:
                    cp.write(_payload(ids[s:s + batch], vecs[s:s + batch]))
                conn.execute(f"update {table} t set embedding = s.v from bare_stage s "
                             f"where t.id = s.k and t.id = any(%s)", (ids[s:s + batch].tolist(),), prepare=False)
    if meter is not None:
        cpu.append(meter.seconds())
    return t.seconds


def bare_array_update(conn, table: str, ids: np.ndarray, vecs: np.ndarray, batch: int) -> float:
    """The same writes through the target's write function (sql/019: one binary array of
    vectors per batch, written with the table owner's rights): what the drain does now, vs the
    staged COPY + UPDATE it did before. The target stays enrolled (its triggers skip the
    drain's writes, as in the drain)."""
    from autoembed_dagster.core.targets.vectors import vector_array, write_as_owner

    half = vecs.astype(">f2")
    d = vecs.shape[1]
    head = struct.pack(">hh", d, 0)
    values = [head + v.tobytes() for v in half]
    keys = [str(int(k)) for k in ids]
    with Timer() as t:
        for s in range(0, len(ids), batch):
            with conn.transaction():
                conn.execute("set local autoembed.draining = 'on'")
                write_as_owner(conn, "write_vector_rows", table, "embedding", "id",
                               "%s::regclass, %s, %s, %s::text[], %b",
                               (table, "embedding", "id", keys[s:s + batch], vector_array(conn, "halfvec", values[s:s + batch])))
    return t.seconds


def bare_copy_new(conn, table: str, ids: np.ndarray, vecs: np.ndarray, batch: int) -> float:
    conn.execute(f"create table {table}_copy (like {table} including indexes)")
    title = b"t"
    extra = struct.pack(">i", len(title)) + title + struct.pack(">i", len(title)) + title
    with Timer() as t:
        for s in range(0, len(ids), batch):
            with conn.transaction():
                with conn.cursor().copy(f"copy {table}_copy (id, title, body, embedding) from stdin with (format binary)") as cp:
                    cp.write(_payload(ids[s:s + batch], vecs[s:s + batch], extra))
    conn.execute(f"drop table {table}_copy")
    return t.seconds


def vectors_of(conn, table: str) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute(f"select id, embedding from {table} order by id").fetchall()
    assert all(r[1] is not None for r in rows), "some rows were not embedded"
    return np.array([r[0] for r in rows]), np.stack([r[1].to_numpy() for r in rows]).astype(np.float32)


def warm_up(server: str, settings: Settings) -> None:
    """Imports, the openai client, tiktoken and the server's caches: not what is measured."""
    url = fresh_db(server, "warm")
    with connect(url) as conn:
        create_docs(conn)
        load(conn, 1000)
    drain(url, settings)
    drain(url, settings, pipeline=False)


def requeue(conn, table: str = "docs") -> None:
    """Every row back to "no vector, never embedded", with its jobs queued again (same input)."""
    conn.execute(f"select autoembed.unenroll('{table}')")
    conn.execute(f"update {table} set embedding = null")
    conn.execute("delete from autoembed.embedding_state")
    conn.execute(f"vacuum analyze {table}")
    conn.execute(f"select autoembed.enroll('{table}', '{table}_input', 'embedding')")
    conn.execute("vacuum analyze pgmq.q_embedding_jobs")


def bare_round(conn, ids: np.ndarray, vecs: np.ndarray, batch: int, table: str = "docs",
               cpu: list | None = None) -> float:
    conn.execute(f"select autoembed.unenroll('{table}')")  # the bare write runs without triggers
    conn.execute(f"update {table} set embedding = null")
    conn.execute(f"vacuum analyze {table}")
    return bare_staged_update(conn, table, ids, vecs, batch, cpu)


def cpu_per_row(d: dict[str, float], n: int) -> float:
    """µs of CPU per row: this process, the provider and the server's own processes."""
    return (d["py"] + d["provider"] + d["pg"]) / n * 1e6


def scenario(server: str, n: int, hnsw: bool, settings: Settings, writers: int, rounds: int = 3) -> dict[str, float]:
    """Drain and bare write take turns `rounds` times (medians): run-to-run drift (checkpoints,
    the disk) hits both alike."""
    url = fresh_db(server)
    out: dict[str, float] = {}
    label = "HNSW" if hnsw else "no index"
    with connect(url) as conn:
        create_docs(conn, hnsw=hnsw)
        load(conn, n)
        drains, bares, cpus, drain_cpu, bare_cpu = [], [], [], [], []
        ids = vecs = None
        for r in range(rounds):
            if r:
                requeue(conn)
            meter = CpuMeter(url)
            secs, done = drain(url, settings)
            used = meter.seconds()
            drain_cpu.append(used)
            cpus.append(" ".join(f"{k} {used[k]:.1f}s" for k in ("py", "pg", "provider", "other")))
            assert done == n, f"drained {done} of {n}"
            drains.append(n / secs)
            if ids is None:
                ids, vecs = vectors_of(conn, "docs")
            bares.append(n / bare_round(conn, ids, vecs, settings.read_batch, cpu=bare_cpu))
        out["drain"] = statistics.median(drains)
        out["bare_update"] = statistics.median(bares)
        line(f"[{label}] drain, pipelined ({n:,} rows, median of {rounds})",
             f"{out['drain']:8,.0f} rows/s   cpu {cpus[sorted(range(rounds), key=drains.__getitem__)[rounds // 2]]}")
        line(f"[{label}] bare staged COPY + UPDATE, batches of {settings.read_batch} (median of {rounds})",
             f"{out['bare_update']:8,.0f} rows/s")
        line(f"[{label}] each round: drain / bare", "  ".join(f"{d / b:.0%}" for d, b in zip(drains, bares)))
        # CPU per row (this process + provider + the server's own processes): what a shared,
        # loaded machine barely moves, unlike rows/s. bare / drain = the share of the drain's CPU
        # that the bare write needs too.
        dc = statistics.median(cpu_per_row(d, n) for d in drain_cpu)
        bc = statistics.median(cpu_per_row(d, n) for d in bare_cpu)
        parts = {k: statistics.median(d[k] for d in drain_cpu) / n * 1e6 for k in ("py", "pg", "provider")}
        bparts = {k: statistics.median(d[k] for d in bare_cpu) / n * 1e6 for k in ("py", "pg")}
        out["drain_cpu_us"], out["bare_cpu_us"] = dc, bc
        line(f"[{label}] CPU per row: drain / bare staged update (median of {rounds})",
             f"{dc:6.1f} us (py {parts['py']:.1f}, pg {parts['pg']:.1f}, provider {parts['provider']:.1f}) / "
             f"{bc:.1f} us (py {bparts['py']:.1f}, pg {bparts['pg']:.1f}): bare / drain {bc / dc:.0%}")
        arrays, staged = [], []
        for _ in range(rounds):  # the write alone: arrays through the write function vs staged, in turns
            conn.execute("update docs set embedding = null where embedding is not null")
            conn.execute("vacuum analyze docs")  # (as bare_round does before the staged write)
            arrays.append(n / bare_array_update(conn, "docs", ids, vecs, settings.read_batch))
            staged.append(n / bare_round(conn, ids, vecs, settings.read_batch))
            conn.execute("select autoembed.enroll('docs', 'docs_input', 'embedding', enqueue_backlog => false)")
        out["bare_array"] = statistics.median(arrays)
        line(f"[{label}] write function, one binary array per batch of {settings.read_batch} (median of {rounds})",
             f"{out['bare_array']:8,.0f} rows/s   vs staged COPY + UPDATE {statistics.median(staged):,.0f} rows/s "
             f"({out['bare_array'] / statistics.median(staged):.0%})")
        if not hnsw:
            requeue(conn)
            secs, done = drain(url, settings, pipeline=False)
            out["drain_serial"] = n / secs
            line(f"[{label}] drain, not pipelined", f"{n / secs:8,.0f} rows/s")
        if writers > 1:
            requeue(conn)
            secs, done = drain(url, settings, writers=writers)
            out["drain_parallel"] = n / secs
            line(f"[{label}] {writers} drains in parallel", f"{n / secs:8,.0f} rows/s")
        conn.execute("select autoembed.unenroll('docs')")
        conn.execute("update docs set embedding = null")
        conn.execute("vacuum analyze docs")
        secs = bare_copy_new(conn, "docs", ids, vecs, settings.read_batch)
        out["bare_copy"] = n / secs
        line(f"[{label}] bare binary COPY of new rows", f"{n / secs:8,.0f} rows/s")
    ratio = out["drain"] / out["bare_update"]
    out["ratio"] = ratio
    best = max(out.get("drain_parallel", 0), out["drain"]) / out["bare_update"]
    line(f"[{label}] drain / bare staged update", f"{ratio:8.0%}" + (f"  (best {best:.0%})" if writers > 1 else ""))
    line(f"[{label}] drain / bare COPY of new rows", f"{out['drain'] / out['bare_copy']:8.0%}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--hnsw-rows", type=int, default=3_000, help="0: skip the HNSW scenario")
    ap.add_argument("--rounds", type=int, default=3, help="drain and bare write take turns this many times")
    args = ap.parse_args(argv)
    header("drain throughput vs the bare write (halfvec(1536), instant fake provider)")
    settings = Settings.from_env()
    results = {}
    with embedded_server() as server, fake_provider():
        warm_up(server, settings)
        results["plain"] = scenario(server, args.rows, False, settings, writers=1, rounds=args.rounds)
        if args.hnsw_rows > 0:
            results["hnsw"] = scenario(server, args.hnsw_rows, True, settings, writers=2, rounds=1)
    p = results["plain"]
    line("target >= 2,000 rows/s (no index)", "met" if p["drain"] >= 2000 else "MISSED")
    line("target >= 50% of the bare write (no index)", "met" if p["ratio"] >= 0.5 else "MISSED")
    return results


if __name__ == "__main__":
    main()
