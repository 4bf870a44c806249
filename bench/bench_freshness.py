"""Freshness: from the writer's COMMIT to the row's vector being visible to a reader.

  active : a drain (`autoembed drain --idle-timeout`, a separate process: LISTEN/NOTIFY) is
           running while a writer commits single-row INSERTs at a steady rate;
  idle   : the same drain has been idle (waiting on LISTEN) for 1.5-3 s when one row arrives;
  cold   : no drain is running; one is started after the commit (process start, imports,
           connect, first batch) — the part of a Dagster-launched run that is ours.
Target: p50 <= 2 s with an active drain.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np

from common import ROOT, connect, create_docs, embedded_server, fake_provider, fresh_db, header, line


class Watcher:
    """Polls for newly embedded rows every `interval` s and records when each was first seen."""

    def __init__(self, url: str, interval: float = 0.005) -> None:
        self.url, self.interval = url, interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with connect(self.url) as c:
            while not self._stop.is_set():
                now = time.perf_counter()
                for (i,) in c.execute("select id from docs where embedding is not null and not (id = any(%s))",
                                      (list(self.seen),)).fetchall():
                    self.seen[i] = now
                time.sleep(self.interval)

    def wait_for(self, ids, timeout: float) -> None:
        end = time.perf_counter() + timeout
        while time.perf_counter() < end and not all(i in self.seen for i in ids):
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_drain(url: str, idle_timeout: float) -> subprocess.Popen:
    env = {**os.environ, "AUTOEMBED_DATABASE_URL": url}
    return subprocess.Popen([sys.executable, "-m", "autoembed_dagster.cli", "drain", "-q",
                             "--idle-timeout", str(idle_timeout)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def pct(values: list[float]) -> str:
    a = np.array(values) * 1000
    return f"p50 {np.percentile(a, 50):6.0f} ms   p99 {np.percentile(a, 99):6.0f} ms   (n={len(a)})"


def insert(c, i: int) -> float:
    c.execute("insert into docs values (%s, %s, %s)", (i, f"title {i}", f"row {i} " + "lorem ipsum " * 20))
    return time.perf_counter()  # autocommit: returned after COMMIT


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=20.0, help="active writer: rows per second")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--idle-samples", type=int, default=8)
    ap.add_argument("--cold-samples", type=int, default=3)
    args = ap.parse_args(argv)
    header("freshness: commit -> vector visible")
    results = {}
    with embedded_server() as server, fake_provider():
        url = fresh_db(server)
        with connect(url) as c:
            create_docs(c)
            c.execute("select autoembed.enroll('docs', 'docs_input', 'embedding')")
            watcher = Watcher(url)
            next_id = 1
            # active
            drain = start_drain(url, idle_timeout=60)
            time.sleep(3.0)  # process start-up, imports, LISTEN
            committed: dict[int, float] = {}
            end = time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                committed[next_id] = insert(c, next_id)
                next_id += 1
                time.sleep(max(0.0, 1 / args.rate - (time.perf_counter() - t0)))
            watcher.wait_for(committed, 30)
            lat = [watcher.seen[i] - t for i, t in committed.items() if i in watcher.seen]
            assert len(lat) == len(committed), f"{len(committed) - len(lat)} rows never got a vector"
            results["active"] = lat
            line(f"active drain, {args.rate:.0f} commits/s for {args.seconds:.0f} s", pct(lat))
            # idle (same drain, quiet gaps)
            lat = []
            for _ in range(args.idle_samples):
                time.sleep(random.uniform(1.5, 3.0))
                t = insert(c, next_id)
                watcher.wait_for([next_id], 30)
                lat.append(watcher.seen[next_id] - t)
                next_id += 1
            results["idle"] = lat
            line("drain idle on LISTEN, then one row", pct(lat))
            drain.terminate()
            drain.wait(30)
            # cold
            lat = []
            for _ in range(args.cold_samples):
                t = insert(c, next_id)
                p = start_drain(url, idle_timeout=0)
                watcher.wait_for([next_id], 60)
                lat.append(watcher.seen[next_id] - t)
                p.wait(60)
                next_id += 1
            results["cold"] = lat
            line("no drain running: start one after the commit", pct(lat))
            watcher.stop()
    p50 = float(np.percentile(results["active"], 50))
    line("target p50 <= 2 s with an active drain", "met" if p50 <= 2.0 else "MISSED")
    return results


if __name__ == "__main__":
    main()
