"""The drain: claim jobs from pgmq, embed the rows' current input, write vectors.

One batch goes through four stages, each in its own module:

- claims   take messages from pgmq with a visibility timeout and keep them (heartbeat; core.queue.claims);
- jobs     turn each message into one job per row, resolved against the target it names;
- read     read the rows' current input: skip what needs no provider call;
- embed    call the provider, encode the vectors for COPY;
- settle   ONE transaction: write vectors whose rows still have that input (SKIP LOCKED: the
           application never waits for the drain), delete / dead-letter / put back messages.

`loop.Drainer` orders them (pipelined: batch N+1 is claimed and embedded while N is written). A
crash anywhere loses nothing: claimed messages reappear when their visibility timeout ends, and a
claim is never counted as an attempt. Plain Python: the CLI, the Python API, Dagster runs, the
backfill and the benchmarks all call it.

May import: core.config, core.db, core.embed, core.targets, core.queue.
"""

from ..embed.base import ProviderConfigError
from .loop import Drainer, completed, drain
from .resolvers import EmbedderResolver, default_resolver, pipeline_resolver, resolve_embedder
from .stats import UNKNOWN_TABLE, DrainStats, TableKey, TableStats

__all__ = [
    "UNKNOWN_TABLE",
    "DrainStats",
    "Drainer",
    "EmbedderResolver",
    "ProviderConfigError",
    "TableKey",
    "TableStats",
    "completed",
    "default_resolver",
    "drain",
    "pipeline_resolver",
    "resolve_embedder",
]
