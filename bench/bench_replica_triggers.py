"""What the logical-replication triggers cost local writes.

Every enrolment installs row triggers enabled REPLICA (autoembed.install_replica_triggers,
sql/005: rows arriving by logical replication) beside the statement triggers local writes use;
local writes skip them (session_replication_role = origin). This measures that skip: the same
enrolled table with and without them (dropped after enrolment), for a bulk INSERT of N rows, a
bulk UPDATE that changes every row's input (every row has a vector first) and a bulk DELETE. Each
statement runs in a transaction that is rolled back; the figure is the server process's CPU time
(/proc schedstat: barely moved by other work on a shared machine), and the ratio the median of
the rounds' own ratios (each round runs both set-ups, in turn).

    python bench/bench_replica_triggers.py [--rows 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

from bench_write_path import backend_cpu, fill_with_vectors, setup
from common import body_sql, connect, embedded_server, fresh_db, header, line

REPLICA_TRIGGERS = ("autoembed_replica_insert", "autoembed_replica_update", "autoembed_replica_keep",
                    "autoembed_forget_row")
STATEMENTS = {
    "bulk INSERT": "insert into {t} (id, title, body) select g, 'title ' || g, " + body_sql() + " "
                   "from generate_series({n} + 1, 2 * {n}) g",
    "bulk UPDATE (input changed)": "update {t} set body = body || '!'",
    "bulk DELETE": "delete from {t}",
}


def cpu_of(conn, statement: str) -> float:
    with conn.transaction(force_rollback=True):
        before = backend_cpu(conn)
        conn.execute(statement)
        return backend_cpu(conn) - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with embedded_server() as server:
        with connect(fresh_db(server, "bench_replica")) as conn:
            tables = {"with replica triggers": setup(conn, "with"), "without": setup(conn, "without")}
            for t in tables.values():
                conn.execute(f"select autoembed.enroll('{t}', '{t}_input', 'embedding', enqueue_backlog => false)")
            for name in REPLICA_TRIGGERS:
                conn.execute(f"drop trigger {name} on w_without")
            for t in tables.values():
                fill_with_vectors(conn, t, args.rows)
            header(f"local writes on an enrolled table, {args.rows} rows: server CPU seconds (median of "
                   f"{args.rounds} rounds)")
            for label, statement in STATEMENTS.items():
                cpu = {k: [] for k in tables}
                ratios = []
                for _ in range(args.rounds):
                    for k, t in tables.items():
                        cpu[k].append(cpu_of(conn, statement.format(t=t, n=args.rows)))
                    ratios.append(cpu["with replica triggers"][-1] / cpu["without"][-1])
                line(label, "  ".join(f"{k} {statistics.median(v):.3f}s" for k, v in cpu.items())
                     + f"  ratio {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
