"""Loading the code location (what every Dagster run worker does before its first step, and every
code server) imports only what a sensor tick or a drain needs at once: the provider client
(openai, tiktoken), the re-embed and Batch API paths and pandas are imported by the code that
calls them. A module-level import of one of them fails here (no timing: the modules themselves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAZY = ("openai", "tiktoken", "pandas", "autoembed_dagster.core.migrate.reembed",
        "autoembed_dagster.core.migrate.batch_backfill")

LOAD = f"""
import json, sys
import autoembed_dagster.definitions as d
d.defs()
from autoembed_dagster.core.embed import native_dimensions, size_problem
# what a declaration is checked with, for OpenAI's models too
size_problem("openai", "text-embedding-3-small", 512)
native_dimensions("openai", "text-embedding-ada-002")
print(json.dumps(sorted(m for m in sys.modules if any(m == x or m.startswith(x + ".") for x in {LAZY!r}))))
"""


def test_loading_the_code_location_leaves_the_provider_client_and_reembed_paths_unimported():
    proc = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
