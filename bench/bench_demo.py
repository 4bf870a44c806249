"""`autoembed demo`: from the Dagster UI answering to the first vector visible, and where the
time goes (the demo's own start-up order, the daemon's first sensor tick, the run's launch).

Runs the real command (`python -m autoembed_dagster.cli demo`) against a database of the bench's
embedded server (AUTOEMBED_DATABASE_URL), with its own DAGSTER_HOME and Dagster database, and
stops it (its whole process group) as soon as the first vector is visible.

    python bench/bench_demo.py [--samples 2] [--rows 1200] [--modules 16] [--first-rows 0,default]
    python bench/bench_demo.py --trees /path/before,/path/after   # our code before/after, in turn
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg

from common import ROOT, embedded_server, header, line, process_group, source_trees

FIRST_VECTOR = """select exists (select 1 from autoembed_demo.stdlib_docs where embedding is not null)
                   or exists (select 1 from autoembed_demo.stdlib_modules_chunks where embedding is not null)"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def first_vector(url: str) -> bool:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as c:
            return bool(c.execute(FIRST_VECTOR).fetchone()[0])
    except psycopg.Error:
        return False  # the demo has not created its tables yet


def sample(server: str, n: int, rows: int, modules: int, first_rows: str | None, tree: Path = ROOT,
           label: str = "") -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="autoembed-demo-bench-"))
    db = f"demo_bench_{os.getpid()}_{n}"
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"drop database if exists {db} with (force)")
        c.execute(f"create database {db}")
    from autoembed_dagster.core.db.server import with_database

    url = with_database(server, db)
    port = free_port()
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": url, "AUTOEMBED_HOME": str(tmp / "home"),
           "AUTOEMBED_DAGSTER_DATABASE": f"dagster_{db}", "PYTHONPATH": str(tree)}
    if first_rows is not None:
        env["AUTOEMBED_DEMO_FIRST_ROWS"] = first_rows
    marks: dict[str, float] = {}
    out = open(tmp / "demo.out", "w")
    t0 = time.time()
    with process_group([sys.executable, "-m", "autoembed_dagster.cli", "demo", "--rows", str(rows), "--modules",
                        str(modules), "--port", str(port), "--timeout", "300", "--dagster-home", str(tmp / "dh")],
                       cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL) as demo:
        deadline = t0 + 300
        while "vector" not in marks:
            assert demo.poll() is None, (tmp / "demo.out").read_text()[-3000:]
            assert time.time() < deadline, (tmp / "demo.out").read_text()[-3000:]
            if "ui" not in marks and ui_ready(port):
                marks["ui"] = time.time()
            if first_vector(url):
                marks["vector"] = time.time()
            time.sleep(0.05)
        while "ui" not in marks and time.time() < deadline:  # the vector came first: wait for the UI
            if ui_ready(port):
                marks["ui"] = time.time()
            time.sleep(0.05)
        dagster_url = with_database(server, f"dagster_{db}")
        with psycopg.connect(dagster_url, autocommit=True) as d:
            (run_id,) = d.execute("select run_id from runs where pipeline_name like 'drain_%' order by id limit 1").fetchone()
            events = dict(d.execute(
                "select dagster_event_type, min(extract(epoch from timestamp)) from event_logs "
                "where run_id = %s and dagster_event_type is not null group by 1", (run_id,)).fetchall())
            (first_tick,) = d.execute("select min(extract(epoch from timestamp)) from job_ticks").fetchone() or (None,)
    out.close()
    for k, v in (("run_enqueued", "PIPELINE_ENQUEUED"), ("run_starting", "PIPELINE_STARTING"),
                 ("run_start", "PIPELINE_START"), ("step_start", "STEP_START")):
        if v in events:
            marks[k] = float(events[v])
    if first_tick is not None:
        marks["first_sensor_tick"] = float(first_tick)
    order = sorted(marks.items(), key=lambda kv: kv[1])
    label = f"[{label}first rows {first_rows or 'default'}] sample {n}"
    line(f"{label}: after the command started", ", ".join(f"{k} +{v - t0:.1f}" for k, v in order) + " s")
    line(f"{label}: UI ready -> first vector", f"{marks['vector'] - marks['ui']:.2f} s")
    return {k: v - t0 for k, v in marks.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1200, help="the demo's --rows (its default)")
    ap.add_argument("--modules", type=int, default=16, help="the demo's --modules (its default)")
    ap.add_argument("--first-rows", default=None,
                    help="AUTOEMBED_DEMO_FIRST_ROWS settings to compare, sampled in turn (0: every row in one "
                         "statement, the before; default: the demo's own, its first rows in a statement of their own)"
                         " (default: 0,default; with --trees: default)")
    ap.add_argument("--trees", default=None,
                    help="comma-separated source trees to compare (e.g. the before and after of a change): the "
                         "demo run from each (PYTHONPATH=<tree>), sampled in turn (default: this tree)")
    args = ap.parse_args(argv)
    trees = source_trees(args.trees)
    first_rows = args.first_rows or ("default" if args.trees else "0,default")
    settings = [(i, None if f.strip() == "default" else f.strip()) for i in range(len(trees))
                for f in first_rows.split(",")]
    if args.trees:
        for i, tree in enumerate(trees):
            line(f"[tree {i}]", str(tree))
    header(f"autoembed demo: UI ready -> first vector visible ({args.samples} samples per setting)")
    gaps: dict[tuple[int, str | None], list[float]] = {s: [] for s in settings}

    def label(i: int) -> str:
        return f"tree {i}, " if args.trees else ""

    with embedded_server() as server:
        k = 0
        for _ in range(args.samples):
            for i, f in settings:
                k += 1
                m = sample(server, k, args.rows, args.modules, f, trees[i], label(i))
                gaps[(i, f)].append(m["vector"] - m["ui"])
    out = {}
    for (i, f), g in gaps.items():
        out[(str(trees[i]), f or "default") if args.trees else (f or "default")] = statistics.median(g)
        line(f"[{label(i)}first rows {f or 'default'}] median UI ready -> first vector",
             f"{statistics.median(g):.2f} s (samples {', '.join(f'{x:.1f}' for x in g)})")
    if len(gaps) == 2:
        (sa, a), (sb, b) = gaps.items()
        line(f"median UI ready -> first vector, [{label(sb[0])}first rows {sb[1] or 'default'}] / "
             f"[{label(sa[0])}first rows {sa[1] or 'default'}]", f"{statistics.median(b) / statistics.median(a):.2f}x")
    return out


if __name__ == "__main__":
    main()
