"""`autoembed`: database set-up, status, drain, search, enrol, dead letters."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .core import api
from .core.config import ConfigError, Settings
from .core.database import database_url, require_project, stop_embedded


def _cmd_db(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.action == "url":
        print(database_url(settings, create=False))
    elif args.action == "init":
        done = api.init(database_url(settings))
        print(f"database ready ({'pgmq from the pgmq wheel SQL' if done['pgmq'] == 'sql' else 'pgmq ' + done['pgmq']}; "
              f"{sum(1 for k in done if k.endswith('.sql'))} SQL files applied)")
    elif args.action == "stop":
        if settings.database_url:
            print("AUTOEMBED_DATABASE_URL is set: not stopping a server this tool does not own", file=sys.stderr)
            return 1
        require_project(settings)
        print(stop_embedded(settings))
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    n = api.enroll(args.table, args.content_function, args.column, key_column=args.key,
                   queue=args.queue, backlog=not args.no_backlog)
    print(f"{args.table} enrolled; {n} existing rows queued for embedding")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    rows = api.status(queue=args.queue)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    print(f"{'queue':<24}{'messages':>9}{'rows':>9}{'visible':>9}{'in flight':>11}{'retrying':>10}"
          f"{'oldest s':>10}{'dead':>7}")
    for r in rows:
        print(f"{r.queue_name:<24}{r.depth:>9}{r.rows:>9}{r.visible:>9}{r.in_flight:>11}{r.retrying:>10}"
              f"{r.oldest_age_seconds:>10.1f}{r.dead_letters:>7}")
    dead = api.dead_letters(queue=args.queue, limit=10)
    if dead:
        print("\nlatest dead letters:")
        for d in dead:
            print(f"  #{d['msg_id']} {d['schema_name']}.{d['table_name']} id={d['row_id']} "
                  f"after {d['attempts']} attempt(s): {d['error']}")
    return 0


def _cmd_drain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    settings = Settings.from_env()
    url = database_url(settings, create=False)
    depth = sum(r.rows for r in api.status(url, settings.queue))
    bar = tqdm(total=depth, unit="row", disable=args.quiet or None, desc="draining")

    def on_batch(batch, total):
        if batch.rows:
            if bar.n + batch.rows > (bar.total or 0):
                bar.total = bar.n + batch.rows
            bar.update(batch.rows)
            bar.set_postfix(embedded=total.embedded, dead=total.dead_lettered, refresh=False)

    try:
        stats = api.drain(url, settings, idle_timeout=args.idle_timeout, time_budget=args.time_budget,
                          on_batch=on_batch)
    finally:
        bar.close()
    print(stats.summary())
    for error in stats.errors:
        print(f"  error: {error}", file=sys.stderr)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    hits = api.search(args.query, table=args.table, schema=args.schema, content_function=args.content_function,
                      embedding_column=args.column, key_column=args.key, k=args.k)
    if not hits:
        print("no embedded rows yet: run `autoembed drain`")
    for rank, hit in enumerate(hits, 1):
        first = " ".join(hit.input.split())[:100]
        print(f"{rank}. [{hit.distance:.3f}] {args.table} id={hit.id}: {first}")
    return 0


def _cmd_dead(args: argparse.Namespace) -> int:
    if args.retry:
        n = api.retry_dead_letters(queue=args.queue, ids=args.ids or None)
        print(f"{n} dead letter(s) put back on {args.queue}")
        return 0
    for d in api.dead_letters(queue=args.queue, limit=args.limit):
        print(f"#{d['msg_id']} {d['schema_name']}.{d['table_name']} id={d['row_id']} "
              f"({d['attempts']} attempts, {d['failed_at']:%Y-%m-%d %H:%M:%S}): {d['error']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(rows=args.rows, ui=not args.no_ui, port=args.port, timeout=args.timeout, keep_db=args.keep_db,
                    dagster_home=args.dagster_home)


def _cmd_dagster_env(args: argparse.Namespace) -> int:
    from .demo import print_dagster_env

    return print_dagster_env()


def _pipeline_named(name: str):
    from .core.pipelines import load_pipelines, pipelines_path

    pipelines = load_pipelines()
    for p in pipelines:
        if p.name == name:
            return p
    raise ConfigError(f"no pipeline {name!r} in {pipelines_path()} (declared: {', '.join(q.name for q in pipelines) or 'none'})")


def _cmd_backfill(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .core.backfill import resolve_spec, run_backfill

    p = _pipeline_named(args.pipeline)
    bar = None

    def on_plan(shard_plan, cov):
        nonlocal bar
        print(f"{p.name}: {shard_plan.spec.key} ({shard_plan.mode}): {shard_plan.reason}")
        bar = tqdm(total=cov.missing, unit="row", desc="re-embedding", disable=args.quiet or None)

    def on_batch(stats, rows):
        if bar is not None:
            bar.update(rows)
            bar.set_postfix(shard=stats.shard, embedded=stats.embedded, refresh=False)

    with api.session() as conn:
        spec = resolve_spec(conn, p, provider=args.provider, model=args.model, dimensions=args.dimensions,
                            content_function=args.content_function)
        try:
            result = run_backfill(conn, p, spec, only=args.shards, promote_when_complete=not args.no_promote,
                                  batch_rows=args.batch_rows, on_batch=on_batch, on_plan=on_plan)
        finally:
            if bar is not None:
                bar.close()
    if result.plan.mode == "skip":
        print(f"nothing to do: {result.plan.reason}", file=sys.stderr)
        return 1
    for r in result.shards:
        print(f"  shard {r.stats.shard}/{r.stats.shards}: {r.stats.summary()}")
    cov = result.coverage
    print(f"{result.total.summary()}\ncoverage of {spec.identity_key} in {result.plan.column}: "
          f"{cov.ratio:.1%} ({cov.current}/{cov.embeddable})")
    if result.promotion is not None:
        print(f"promoted: {p.embedding_column} now holds {spec.identity_key} (old vectors in "
              f"{result.promotion.migration.old_column} until `autoembed migrate {p.name} drop-old`)")
    for error in result.total.errors:
        print(f"  error: {error}", file=sys.stderr)
    return 0 if not result.total.retryable_failures else 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .core import migration as mig
    from .core.backfill import migration_action
    from .core.targets import resolve

    p = _pipeline_named(args.pipeline)
    with api.session() as conn:
        m = mig.get_migration(conn, p.schema, p.table, p.embedding_column)
        if m is None:
            print(json.dumps({"status": "none"}) if args.json else f"{p.name}: no model migration in flight")
            return 0 if args.action == "status" else 1
        m, _, _ = migration_action(conn, p, m, args.action.replace("-", "_"), force=args.force)
        cov = mig.coverage(conn, resolve(conn, m.shadow_key if m.status == "backfilling" else m.live_key), m.model_key)
    info = {"migration": m.id, "status": m.status, "model": m.spec.key, "old_model": m.old_model,
            "column": m.embedding_column, "shadow_column": m.shadow_column, "coverage": round(cov.ratio, 6),
            "rows_current": cov.current, "rows_with_input": cov.embeddable}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{p.name}: migration {m.id} to {m.spec.key} is {m.status}; coverage {cov.ratio:.1%} "
              f"({cov.current}/{cov.embeddable})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoembed", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database set-up")
    db.add_argument("action", choices=["url", "init", "stop"])
    db.set_defaults(func=_cmd_db)

    en = sub.add_parser("enroll", help="keep a table's embedding column in sync")
    en.add_argument("table")
    en.add_argument("--content-function", default="embedding_input")
    en.add_argument("--column", default="embedding")
    en.add_argument("--key", default="id")
    en.add_argument("--queue", default="embedding_jobs")
    en.add_argument("--no-backlog", action="store_true", help="do not queue existing rows")
    en.set_defaults(func=_cmd_enroll)

    st = sub.add_parser("status", help="queue depth, in flight, dead letters")
    st.add_argument("--queue")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    dr = sub.add_parser("drain", help="embed queued jobs until the queue is empty")
    dr.add_argument("--idle-timeout", type=float, default=0.0, help="then wait this long for more work")
    dr.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    dr.add_argument("-q", "--quiet", action="store_true")
    dr.set_defaults(func=_cmd_drain)

    se = sub.add_parser("search", help="semantic search")
    se.add_argument("query")
    se.add_argument("--table", required=True)
    se.add_argument("--schema", default="public")
    se.add_argument("--content-function", default="embedding_input")
    se.add_argument("--column", default="embedding")
    se.add_argument("--key", default="id")
    se.add_argument("-k", type=int, default=5)
    se.set_defaults(func=_cmd_search)

    dl = sub.add_parser("dead-letters", help="list dead letters, or --retry them")
    dl.add_argument("--queue", default="embedding_jobs")
    dl.add_argument("--retry", action="store_true")
    dl.add_argument("--ids", type=int, nargs="*")
    dl.add_argument("--limit", type=int, default=50)
    dl.set_defaults(func=_cmd_dead)

    dm = sub.add_parser("demo", help="the whole stack offline: Postgres, a docstring corpus, Dagster, search")
    dm.add_argument("--rows", type=int, default=1200, help="documents to load (default 1200: about a minute to embed on 2 cores)")
    dm.add_argument("--no-ui", action="store_true", help="no webserver: drain, search, then stop")
    dm.add_argument("--port", type=int, default=3000, help="port of the Dagster UI")
    dm.add_argument("--timeout", type=float, default=900.0, help="give up waiting for the drain after this many seconds")
    dm.add_argument("--keep-db", action="store_true", help="leave the embedded Postgres running at exit")
    dm.add_argument("--dagster-home", default=None, help="Dagster instance directory (default: dagster_home/)")
    dm.set_defaults(func=_cmd_demo)

    de = sub.add_parser("dagster-env", help="print the exports `dagster dev -w workspace.yaml` needs (eval them)")
    de.set_defaults(func=_cmd_dagster_env)

    bf = sub.add_parser("backfill", help="re-embed a pipeline shard by shard (a model change: zero-downtime migration)")
    bf.add_argument("pipeline", help="pipeline name (autoembed.toml)")
    bf.add_argument("--provider", help="target model's provider (default: the pipeline's)")
    bf.add_argument("--model", help="target model (default: the pipeline's)")
    bf.add_argument("--dimensions", type=int, help="target size (default: the pipeline's)")
    bf.add_argument("--content-function", help="target input function (default: the pipeline's)")
    bf.add_argument("--shards", type=int, nargs="*", help="only these shards (default: all)")
    bf.add_argument("--batch-rows", type=int, help="rows per provider request")
    bf.add_argument("--no-promote", action="store_true", help="do not promote the migration when it is complete")
    bf.add_argument("-q", "--quiet", action="store_true")
    bf.set_defaults(func=_cmd_backfill)

    mg = sub.add_parser("migrate", help="a pipeline's model migration: status, promote, rollback, drop-old, abort")
    mg.add_argument("pipeline", help="pipeline name (autoembed.toml)")
    mg.add_argument("action", choices=["status", "promote", "rollback", "drop-old", "abort"])
    mg.add_argument("--force", action="store_true", help="promote below 100%% coverage / drop-old whatever the config says")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(func=_cmd_migrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError) as exc:
        print(f"autoembed: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # psycopg errors etc.: one readable line, not a traceback
        if args.verbose:
            raise
        print(f"autoembed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
