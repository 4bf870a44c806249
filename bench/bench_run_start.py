"""A Dagster run's start-up, piece by piece, for the drain job: what a run worker pays before its
first vector, measured in a fresh interpreter as the worker does it (no daemon, no run queue):

  spawn            : the new process up to its first line (interpreter, site)
  import dagster   : `import dagster`
  import location  : `import autoembed_dagster.definitions` (dagster already imported)
  load location    : its `defs()` (the defs/ folder, the components, Dagster's own metadata)
  job lookup       : the drain job resolved from the definitions
  first connection : the database, as the drain op's resource connects (pgvector adapters too)
  first provider   : the first embeddings call (provider client import, client, one request)
  next provider    : a second call (the request alone), for reference

`--trees a,b` measures each source tree (PYTHONPATH=<tree>, run in <tree>) in turn, sample after
sample, so the machine's load hits both alike; it prints medians and b/a ratios. The provider is
the bench's instant fake (`--provider local`: the local model, as `autoembed demo` uses, whose
first call loads it); the database a fresh one on the bench's embedded server.

    python bench/bench_run_start.py [--samples 7] [--trees /path/before,/path/after] [--provider local]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, embedded_server, fake_provider, fresh_db, header, line, source_trees

JOB = "drain_embedding_jobs"  # the drain job of defs/documents (queue embedding_jobs)
WORKER = f"""
import time
marks = {{"up": time.time()}}
import json, os
import dagster
marks["dagster"] = time.time()
import autoembed_dagster.definitions as d
marks["import"] = time.time()
defs = d.defs()
marks["load"] = time.time()
defs.resolve_job_def({JOB!r})
marks["job"] = time.time()
from autoembed_dagster.core.db.server import connect
with connect(os.environ["AUTOEMBED_DATABASE_URL"]) as conn:
    conn.execute("select 1")
marks["connect"] = time.time()
from autoembed_dagster.core.config import EmbedderSettings
from autoembed_dagster.core.embed import make_embedder
embedder = make_embedder(EmbedderSettings.from_env())  # the model's own size
embedder.embed(["the first row"])
marks["provider"] = time.time()
embedder.embed(["the next row"])
marks["provider2"] = time.time()
print("MARKS " + json.dumps(marks))
"""
PIECES = [("spawn", "spawn", "up"), ("import dagster", "up", "dagster"), ("import location", "dagster", "import"),
          ("load location", "import", "load"), ("job lookup", "load", "job"), ("first connection", "job", "connect"),
          ("first provider call", "connect", "provider"), ("next provider call", "provider", "provider2")]
COUNTED = [p[0] for p in PIECES if p[0] != "next provider call"]


def sample(tree: Path, env: dict[str, str]) -> dict[str, float]:
    """One run worker's start-up in `tree`: seconds per piece."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", WORKER], cwd=tree, capture_output=True, text=True, timeout=300,
                         env={**env, "PYTHONPATH": str(tree)})
    if out.returncode:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    marks = {"spawn": t0, **json.loads(out.stdout.split("MARKS ", 1)[1])}
    got = {name: marks[b] - marks[a] for name, a, b in PIECES}
    got["total"] = sum(got[k] for k in COUNTED)
    return got


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--trees", default=str(ROOT),
                    help="comma-separated source trees to compare, sampled in turn (default: this one)")
    ap.add_argument("--provider", choices=("openai", "local"), default="openai",
                    help="the first provider call's provider (openai: the instant fake server)")
    args = ap.parse_args(argv)
    trees = source_trees(args.trees)
    header(f"a run's start-up for {JOB}, per piece ({args.provider} provider, {args.samples} samples per tree, medians)")
    results: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    with embedded_server() as server, fake_provider():
        env = {**os.environ, "AUTOEMBED_DATABASE_URL": fresh_db(server), "AUTOEMBED_PROVIDER": args.provider}
        if args.provider == "local":
            env.pop("AUTOEMBED_MODEL", None)  # the fake's OpenAI model name
        for n in range(args.samples + 1):  # round 0 warms the page cache for every tree: not counted
            for tree in trees:
                got = sample(tree, env)
                if n:
                    results[tree].append(got)
    out = {}
    for i, tree in enumerate(trees):
        med = {k: statistics.median(s[k] for s in results[tree]) for k in results[tree][0]}
        out[str(tree)] = med
        line(f"[tree {i}] {tree}", "")
        for k, v in med.items():
            line(f"  {k}", f"{v:.3f} s")
    if len(trees) > 1:
        base = out[str(trees[0])]
        for i, tree in enumerate(trees[1:], 1):
            med = out[str(tree)]
            line(f"tree {i} / tree 0 (medians)", "")
            for k in med:
                line(f"  {k}", f"{med[k] / base[k]:.2f}x  ({base[k]:.3f} -> {med[k]:.3f} s)" if base[k] else "-")
    return out


if __name__ == "__main__":
    main()
