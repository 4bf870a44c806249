"""Cold start: one row committed while only `dagster-daemon` runs (no drain run alive) -> its
vector visible, through the project's real Dagster path (workspace.yaml's code location, the
queue sensor, the run queue, the default run launcher, the drain op), with where the time goes:

  commit -> run created   : waiting for the sensor daemon's loop (Dagster evaluates sensors every
                            5 s at the most often, whatever minimum_interval_seconds says) + the
                            sensor's evaluation and the run's creation
  created -> started      : the run queue's dequeue (dequeue_interval_seconds) + the launch: a new
                            process, `import dagster`, the code location's load, the run's start
  started -> visible      : the drain op: connection, target lookup, first provider call, write

Each sample waits until the previous drain run has ended (its idle timeout, 30 s) and then a
random 0-5 s, so the commit lands anywhere in the sensor loop; then `--trickle` rows are written
one by one while that run is alive (it listens: commit -> visible in well under a second, and no
second run starts). The provider is the instant fake. `--waits 0,default` measures the queue
sensor without its LISTEN wait (it only polls: the before) and with it: one daemon each (own
databases), sampled in turn, so that the machine's load hits both alike. Each daemon is stopped
with its whole process group (code servers, run workers).
`--trees a,b` compares source trees instead (the before and after of a change to our code): one
daemon per tree (PYTHONPATH=<tree>, its workspace.yaml and dagster.yaml, run in <tree>), with the
default wait unless --waits says otherwise, sampled in turn.
Also prints the import and load time of the code location (what every run worker pays), per tree.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, connect, embedded_server, fake_provider, fresh_db, header, line, process_group, source_trees

BIN = Path(sys.executable).parent

DOCS = """
create table documents (id bigint primary key generated always as identity, title text not null,
                        content text not null, embedding halfvec(1536));
create function embedding_input(doc documents) returns text language sql immutable
    as $$ select '# ' || doc.title || E'\\n\\n' || doc.content $$;
select autoembed.enroll('documents', 'embedding_input', 'embedding', enqueue_backlog => false);
"""
ACTIVE = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED")
_homes = itertools.count()  # one Dagster database per daemon


def code_load_seconds(tree: Path = ROOT) -> tuple[float, float]:
    """(import, load) of `tree`'s code location in a fresh interpreter, as a run worker does them."""
    out = subprocess.run([sys.executable, "-c", (
        "import time; t0 = time.perf_counter(); import autoembed_dagster.definitions as d; "
        "t1 = time.perf_counter(); d.defs(); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")],
        cwd=tree, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(tree)})
    a, b = out.stdout.split()[-2:]
    return float(a), float(b)


def runs(dconn) -> list[tuple]:
    """Drain runs of the lane: (run_id, status, create_timestamp, start_time, end_time), newest first."""
    return dconn.execute(
        "select r.run_id, r.status, extract(epoch from r.create_timestamp at time zone 'UTC'), r.start_time, r.end_time "
        "from runs r where r.pipeline_name = 'drain_embedding_jobs' order by r.id desc").fetchall()


class Setting:
    """One daemon (own DAGSTER_HOME, Dagster database and data database) running source tree
    `tree`, whose queue sensor's LISTEN wait is `wait` seconds (AUTOEMBED_SENSOR_WAIT; 0: the
    sensor only polls)."""

    def __init__(self, stack: contextlib.ExitStack, server: str, wait: float, tree: Path = ROOT, label: str = ""):
        from autoembed_dagster.demo.runner import dagster_storage_url

        self.wait = wait
        self.tree = tree
        self.label = f"[{label}wait {wait:g} s]"
        self.results: dict[str, list[float]] = {"total": [], "to_created": [], "to_started": [], "to_visible": [],
                                                "run": [], "trickle": []}
        self.home = Path(tempfile.mkdtemp(prefix="autoembed-cold-"))
        stack.callback(shutil.rmtree, self.home, ignore_errors=True)
        url = fresh_db(server)
        storage = dagster_storage_url(server, f"dagster_cold_{os.getpid()}_{int(wait * 1000)}_{next(_homes)}")
        shutil.copy(tree / "dagster_home" / "dagster.yaml", self.home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "DAGSTER_POSTGRES_URL": storage,
               "AUTOEMBED_DATABASE_URL": url, "PYTHONPATH": str(tree), "AUTOEMBED_SENSOR_WAIT": str(wait)}
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], check=True, capture_output=True, env=env)
        self.conn = stack.enter_context(connect(url))
        self.dconn = stack.enter_context(connect(storage.replace("postgresql+psycopg2://", "postgresql://")))
        log = stack.enter_context(open(self.home / "daemon.log", "wb"))
        self.daemon = stack.enter_context(process_group(
            [str(BIN / "dagster-daemon"), "run", "-w", str(tree / "workspace.yaml")], cwd=tree, env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        self.conn.execute(DOCS)

    def alive(self) -> None:
        assert self.daemon.poll() is None, (self.home / "daemon.log").read_text()[-3000:]

    def visible(self, row_id: int) -> float:
        deadline = time.time() + 180
        while self.conn.execute("select embedding is null from documents where id = %s", (row_id,)).fetchone()[0]:
            assert time.time() < deadline, (self.home / "daemon.log").read_text()[-3000:]
            self.alive()
            time.sleep(0.01)
        return time.time()

    def write(self) -> tuple[int, float]:
        (row_id,) = self.conn.execute("insert into documents (title, content) values ('t', 'cold') returning id").fetchone()
        return row_id, time.time()

    def idle(self) -> bool:
        return not any(r[1] in ACTIVE for r in runs(self.dconn))

    def sample(self, n: int, trickle: int) -> None:
        """One cold start (the previous drain run has ended), then `trickle` rows while its run lives."""
        while not self.idle():
            self.alive()
            time.sleep(0.2)
        time.sleep(random.uniform(0, 5))  # the commit lands anywhere in the daemon's 5 s sensor loop
        before = {r[0] for r in runs(self.dconn)}
        row_id, t0 = self.write()
        t1 = self.visible(row_id)
        new = [r for r in runs(self.dconn) if r[0] not in before]
        assert len(new) == 1, new
        _, _, created, started, _ = new[0]
        # run: created -> visible, the run's own part (start-up + op), free of where the commit fell in the sensor loop
        parts = (t1 - t0, float(created) - t0, float(started) - float(created), t1 - float(started), t1 - float(created))
        label = f"{self.label} " + ("warm-up (not counted)" if n == 0 else f"sample {n}")
        events = dict(self.dconn.execute(
            "select dagster_event_type, min(extract(epoch from timestamp)) from event_logs "
            "where run_id = %s and dagster_event_type is not null group by 1", (new[0][0],)).fetchall())
        steps = ["PIPELINE_ENQUEUED", "PIPELINE_DEQUEUED", "PIPELINE_STARTING", "PIPELINE_START", "STEP_START"]  # (RUN_* events keep their old names)
        marks = [(k, float(events[k])) for k in steps if k in events]
        line(f"{label}: run events after the commit",
             ", ".join(f"{k.lower().replace('pipeline_', 'run_')} +{v - t0:.2f}" for k, v in marks) + " s")
        line(f"{label}: total / to run created / to run started / to visible",
             " / ".join(f"{p:.2f}" for p in parts[:4]) + " s")
        # A trickle while that run is alive (it listens until its idle timeout).
        lat = []
        for _ in range(trickle if n else 0):
            time.sleep(random.uniform(0.3, 1.5))
            row_id, t = self.write()
            lat.append(self.visible(row_id) - t)
        if lat:
            line(f"{label}: trickle, {len(lat)} rows while the run is alive", " ".join(f"{x:.2f}" for x in lat) + " s")
            more = [r for r in runs(self.dconn) if r[0] not in before]
            assert len(more) == 1, f"the trickle started another drain run: {more}"
        if n:
            for key, p in zip(self.results, parts):
                self.results[key].append(p)
            self.results["trickle"] += lat


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--trickle", type=int, default=3, help="rows written one by one after each cold sample")
    ap.add_argument("--waits", default=None,
                    help="queue sensor LISTEN waits to compare (0: the sensor only polls, the before; default: "
                         "defs/sensors.py's DEFAULT_SENSOR_WAIT): one daemon each, sampled in turn "
                         "(default: 0,default; with --trees: default)")
    ap.add_argument("--trees", default=None,
                    help="comma-separated source trees to compare (e.g. the before and after of a change): one "
                         "daemon per tree and wait, PYTHONPATH=<tree>, sampled in turn (default: this tree)")
    args = ap.parse_args(argv)
    from autoembed_dagster.defs.sensors import DEFAULT_SENSOR_WAIT

    trees = source_trees(args.trees)
    waits_arg = args.waits or ("default" if args.trees else "0,default")
    waits = [DEFAULT_SENSOR_WAIT if w.strip() == "default" else float(w) for w in waits_arg.split(",")]
    header(f"cold start: commit -> vector visible, only dagster-daemon running ({args.samples} samples per setting)")
    for i, tree in enumerate(trees):
        imp, load = code_load_seconds(tree)
        line(f"code location{f' [tree {i}] {tree}' if args.trees else ''}: import / load "
             "(a run worker's start-up, fresh interpreter)", f"{imp:.2f} s / {load:.2f} s")
    out = {}
    with embedded_server() as server, fake_provider(), contextlib.ExitStack() as stack:
        settings = [Setting(stack, server, w, tree, f"tree {i}, " if args.trees else "")
                    for i, tree in enumerate(trees) for w in waits]
        for n in range(args.samples + 1):  # sample 0 warms each daemon's code server: not counted
            for setting in settings:  # in turn: a change in the machine's load hits every setting alike
                setting.sample(n, args.trickle)
        for setting in settings:
            r = setting.results
            med = {k: statistics.median(v) if v else float("nan") for k, v in r.items()}
            line(f"{setting.label} median: total / to run created / to run started / to visible",
                 " / ".join(f"{med[k]:.2f}" for k in ("total", "to_created", "to_started", "to_visible")) + " s"
                 + (f" (totals {min(r['total']):.2f}-{max(r['total']):.2f})" if r["total"] else ""))
            line(f"{setting.label} median: run created -> visible (the run's own part)", f"{med['run']:.2f} s")
            if r["trickle"]:
                line(f"{setting.label} trickle while the run is alive: p50 / max",
                     f"{med['trickle']:.2f} / {max(r['trickle']):.2f} s")
            out[(str(setting.tree), setting.wait) if args.trees else setting.wait] = med
    if len(settings) == 2 and settings[0].results["total"]:
        for key, what in (("total", "total"), ("run", "run created -> visible")):
            a, b = (statistics.median(s.results[key]) for s in settings)
            line(f"median {what}, {settings[1].label} / {settings[0].label}", f"{b / a:.2f}x")
    return out


if __name__ == "__main__":
    main()
