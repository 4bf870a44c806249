"""`autoembed`: database set-up, status, drain, search, enrol, dead letters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .core import api
from .core.pipelines import split_table
from .core.targets.catalog import sql_name
from .core.config import ConfigError, Settings
from .core.db.server import database_url, psql_path, require_project, stop_embedded


def _cmd_db(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.action == "url":
        print(database_url(settings, create=False))
    elif args.action == "init":
        done = api.init(database_url(settings))
        print(f"database ready ({'pgmq from the pgmq wheel SQL' if done['pgmq'] == 'sql' else 'pgmq ' + done['pgmq']}; "
              f"{sum(1 for k in done if k.endswith('.sql'))} SQL files applied)")
    elif args.action == "psql":
        url = database_url(settings, create=False)
        psql = psql_path()
        sys.stdout.flush()
        os.execv(psql, [psql, "-v", "ON_ERROR_STOP=1", url, *args.psql_args])
    elif args.action == "stop":
        if settings.database_url:
            print("AUTOEMBED_DATABASE_URL is set: not stopping a server this tool does not own", file=sys.stderr)
            return 1
        require_project(settings)
        print(stop_embedded(settings))
    return 0


def _refuse_unproducible_size(args: argparse.Namespace) -> None:
    """Enrolling a column the default model cannot fill would dead-letter every row: refuse it."""
    from .core.pipelines import Pipeline
    from .core.targets.catalog import TargetKey, resolve

    schema, table = split_table(args.table, args.table)
    with api.session() as conn:
        target = resolve(conn, TargetKey(schema, table, args.content_function, args.column, args.key))
    spec = Pipeline(name="enroll", schema=schema, table=table, content_function=args.content_function,
                    embedding_column=args.column, key_column=args.key).spec(column_dimensions=target.dimensions)
    if spec.dimensions != target.dimensions:
        column = f"{target.vector_type}({target.dimensions})"
        raise ConfigError(
            f"{args.table}.{args.column} is {column} but the model {spec.identity_key} makes {spec.dimensions} "
            f"dimensions: alter the column to {target.vector_type}({spec.dimensions}), choose a model that makes "
            f"{target.dimensions} (AUTOEMBED_PROVIDER / AUTOEMBED_MODEL, or `provider`/`model` in the pipeline's "
            "defs.yaml), or pass --force to enrol it anyway")


def _cmd_enroll(args: argparse.Namespace) -> int:
    if args.chunk_tokens is not None:
        # The chunk table is created at the model's size: nothing to refuse (chunking checks the window).
        from .core.targets.splitter import CLI_NAMES

        n = api.enroll(args.table, args.content_function, key_column=args.key, queue=args.queue,
                       backlog=not args.no_backlog, chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_overlap,
                       size_names=CLI_NAMES)
        schema, table = split_table(args.table, args.table, "")
        chunks = sql_name(*filter(None, (schema, f"{table}_chunks")))
        print(f"{args.table} enrolled for chunks of at most {args.chunk_tokens} tokens "
              f"(overlap {args.chunk_overlap}) in {chunks}; "
              f"{n} existing rows queued for embedding")
        return 0
    if args.chunk_overlap:
        raise ConfigError("--chunk-overlap needs --chunk-tokens N (the chunk size)")
    if not args.force:
        _refuse_unproducible_size(args)
    n = api.enroll(args.table, args.content_function, args.column, key_column=args.key,
                   queue=args.queue, backlog=not args.no_backlog)
    print(f"{args.table} enrolled; {n} existing rows queued for embedding")
    return 0


def _warn_if_other_projects_env() -> None:
    from .demo.runner import warn_if_other_projects_env

    warn_if_other_projects_env()


def _cmd_status(args: argparse.Namespace) -> int:
    from .core.migrate import backfill_control

    _warn_if_other_projects_env()

    rows = api.status(queue=args.queue)
    targets = api.targets_health()
    dead = api.dead_letters(queue=args.queue, limit=10)
    broken, repaired = api.schema_problems()
    with api.session() as conn:
        holds = backfill_control.held_pipelines(conn)
    if args.json:
        print(json.dumps({"queues": [r.__dict__ for r in rows],
                          "backfills": [{"pipeline": h.pipeline, "state": h.state, "lift": h.lift} for h in holds],
                          "broken_targets": [{**b.__dict__, "label": b.label} for b in broken],
                          "repairs": [r.__dict__ for r in repaired],
                          "targets": [_target_json(t, h) for t, h in targets],
                          "chunk_targets": [_target_json(t, h) for t, h in targets if t.chunked],
                          "dead_letters": dead}, indent=2, default=str))
        return 0
    print(_table(["queue", "messages", "rows", "visible", "in flight", "retrying", "oldest s", "dead"],
                 [[r.queue_name, r.depth, r.rows, r.visible, r.in_flight, r.retrying, f"{r.oldest_age_seconds:.1f}",
                   r.dead_letters] for r in rows]))
    if targets:
        # Every target, both shapes, from core.health.target_health (rows: a chunk set's documents;
        # missing: no vector / no chunk set; tokens: a chunk set's chunk size / overlap).
        print()
        print(_table(["target", "tokens", "rows", "current", "missing", "stale", "dead", "model"],
                     [[h.table, f"{target.chunk_tokens}/{target.chunk_overlap}" if target.chunked else "-",
                       h.embeddable, h.current, h.missing, h.stale, h.dead_letters, h.model]
                      for target, h in targets], left=(0, 7)))
        for target, h in targets:
            if h.unreadable:
                print(f"  {h.table}: {h.unreadable} row(s) whose content function raises, e.g. {h.unreadable_error}")
    if broken:
        print("\nbroken targets (not kept current until fixed):")
        for b in broken:
            print(f"  target {b.target} {b.label}: {b.problem}: {b.detail}")
    if repaired:
        print("\nrepaired by autoembed:")
        for r in repaired:
            print(f"  {r.at:%Y-%m-%d %H:%M:%S} {r.what}")
    if holds:
        print()
        print(_table(["backfill", "state"], [[h.pipeline, f"{h.state}: {h.lift}"] for h in holds], left=(0, 1)))
    if dead:
        print("\nlatest dead letters:")
        for d in dead:
            print(f"  #{d['msg_id']} {d['schema_name']}.{d['table_name']} id={d['row_id']} "
                  f"after {d['attempts']} attempt(s): {d['error']}")
    return 0


def _target_json(t, h) -> dict:
    return {**h.__dict__, "shape": "chunks" if t.chunked else "column", "chunk_table": t.chunk_table,
            "chunk_tokens": t.chunk_tokens, "chunk_overlap": t.chunk_overlap, "coverage": round(h.coverage, 6)}


def _table(header: list[str], rows: list[list], left: tuple[int, ...] = (0,)) -> str:
    """Columns as wide as their longest value (a long queue or table name does not push the rest out
    of line): the columns in `left` left-aligned, the others right-aligned, two spaces apart."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in cells)


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
    """One path for both shapes: name the target, search it, print the hits (a chunk set's hits
    carry their best chunk: the matching passage)."""
    _warn_if_other_projects_env()
    if args.pipeline:
        from .core.drain import pipeline_resolver

        p = _pipeline_named(args.pipeline)
        where = dict(table=p.table, schema=p.schema, content_function=p.content_function, key_column=p.key_column)
        chunked = p.chunked
        how = (dict(embedder_settings=p.embedder_settings()) if chunked
               else dict(embedding_column=p.embedding_column, resolver=pipeline_resolver([p])))
    elif args.table:
        schema, table = split_table(args.table, args.table, args.schema)
        where = dict(table=table, schema=schema, content_function=args.content_function, key_column=args.key)
        chunked = bool(args.chunks)
        how = {} if chunked else dict(embedding_column=args.column)
    else:
        raise ConfigError("name what to search: --pipeline NAME (a defs/<name>/defs.yaml) or --table TABLE")
    hits = (api.search_chunks if chunked else api.search)(args.query, k=args.k, **where, **how)
    if not hits:
        print(f"no embedded {'chunks' if chunked else 'rows'} yet: run `autoembed drain`")
    label = sql_name(where["schema"], where["table"])
    for rank, hit in enumerate(hits, 1):
        text = " ".join(hit.input.split())
        if hit.chunk_index is None:
            print(f"{rank}. [{hit.distance:.3f}] {label} id={hit.id}: {text[:100]}")
        else:
            print(f"{rank}. [{hit.distance:.3f}] {label} id={hit.id} chunk {hit.chunk_index}: "
                  f"{text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def _cmd_dead(args: argparse.Namespace) -> int:
    if args.purge:
        from .core.health import orphaned_dead_letters, purge_dead_letters

        with api.session() as conn:
            orphans = orphaned_dead_letters(conn, args.queue, args.ids or None)
            if not orphans:
                print(f"no dead letter of {args.queue} is orphaned: nothing to purge")
                return 0
            for d in orphans[:args.limit]:
                print(f"#{d.msg_id} {d.target}: {d.why}")
            if not args.yes:
                if not sys.stdin.isatty():
                    raise ConfigError(f"{len(orphans)} dead letter(s) would be deleted: pass --yes to confirm")
                if input(f"delete these {len(orphans)} dead letter(s)? [y/N] ").strip().lower() not in ("y", "yes"):
                    print("nothing deleted")
                    return 1
            n = purge_dead_letters(conn, args.queue, [d.msg_id for d in orphans])
        print(f"{n} dead letter(s) deleted")
        return 0
    if args.retry:
        n = api.retry_dead_letters(queue=args.queue, ids=args.ids or None)
        print(f"{n} dead letter(s) put back on {args.queue}")
        return 0
    for d in api.dead_letters(queue=args.queue, limit=args.limit):
        print(f"#{d['msg_id']} {d['schema_name']}.{d['table_name']} id={d['row_id']} "
              f"({d['attempts']} attempts, {d['failed_at']:%Y-%m-%d %H:%M:%S}): {d['error']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.runner import run_demo

    extra = {} if args.modules is None else {"modules": args.modules}
    return run_demo(rows=args.rows, ui=not args.no_ui, port=args.port, timeout=args.timeout, keep_db=args.keep_db,
                    dagster_home=args.dagster_home, **extra)


def _cmd_dev(args: argparse.Namespace) -> int:
    from .demo.runner import run_dagster_dev

    return run_dagster_dev(port=args.port, workspace=args.workspace, keep_db=args.keep_db)


def _cmd_dagster_env(args: argparse.Namespace) -> int:
    from .demo.runner import print_dagster_env

    return print_dagster_env()


def _all_pipelines():
    """The project's declared pipelines (its defs.yaml files), then the tables registered in the
    database but declared nowhere."""
    from .components.declarations import declared_pipelines
    from .core.pipelines import discover_pipelines

    declared = declared_pipelines()
    with api.session() as conn:
        return declared, discover_pipelines(conn, declared)


def _pipeline_named(name: str):
    declared, discovered = _all_pipelines()
    for p in (*declared, *discovered):
        if p.name == name:
            return p
    names = ", ".join(q.name for q in (*declared, *discovered)) or "none"
    raise ConfigError(f"no pipeline {name!r} (known: {names}); declare one with "
                      f"`dg scaffold defs autoembed_dagster.EmbeddingPipeline {name} --table TABLE`")


def _cmd_pipelines(args: argparse.Namespace) -> int:
    declared, discovered = _all_pipelines()
    rows = [(p, "declared") for p in declared] + [(p, "discovered") for p in discovered]
    if args.json:
        print(json.dumps([{**p.__dict__, "origin": origin, "model": p.code_version()} for p, origin in rows], indent=2))
        return 0
    for p, origin in rows:
        target = f"{p.chunk_table} ({p.chunk_tokens}/{p.chunk_overlap} tokens)" if p.chunked else p.embedding_column
        print(f"{p.name:<20} {p.qualified_table}.{target:<24} queue {p.queue:<16} "
              f"{p.code_version()}  ({origin})")
    return 0


def _pct(ratio: float) -> str:
    return "100%" if ratio >= 1 else f"{ratio:.1%}"


def _stopped_line(p, total_stopped: str | None, stopped_shards: list[int]) -> str | None:
    """Said once at the end: which shards a pause or the window's end stopped, and how they go on."""
    if not total_stopped:
        return None
    return (f"stopped: {total_stopped}; shard(s) {', '.join(map(str, stopped_shards))} not finished: they continue "
            f"where they stopped on the next `autoembed backfill {p.name}`")


def _cmd_backfill(args: argparse.Namespace) -> int:
    """One path for both shapes (core.migrate.reembed, as the Dagster `backfill` job); the Batch API
    is its own path (`_batch_backfill`)."""
    from tqdm import tqdm

    from .core.migrate import backfill_control
    from .core.migrate.reembed import reembed_of

    p = _pipeline_named(args.pipeline)
    if args.pause or args.resume:
        with api.session() as conn:
            if args.pause:
                backfill_control.pause(conn, p.name)
                print(f"backfill of {p.name} paused: running shards stop after their page; new ones are refused "
                      f"until `autoembed backfill {p.name} --resume`")
            elif backfill_control.resume(conn, p.name):
                print(f"backfill of {p.name} resumed: run `autoembed backfill {p.name}` (or launch the Dagster "
                      "`backfill` job) to continue the stopped shards where they stopped; nothing restarts by itself")
            else:
                print(f"backfill of {p.name} was not paused: nothing to resume")
        return 0
    try:
        reembed = reembed_of(p, args.via or p.backfill_via)  # a chunked pipeline is refused --via batch
        if reembed.via == "batch":
            return _batch_backfill(args, p, reembed)
        unit = reembed.noun[:-1]  # "row", "document"
        bar = None

        def on_plan(plan, cov):
            nonlocal bar
            print(f"{p.name}: {plan.spec.key} ({plan.mode}): {plan.reason}; {cov.current}/{cov.embeddable} "
                  f"{reembed.noun} current")
            bar = tqdm(total=cov.missing, unit=unit, desc="re-embedding", disable=args.quiet or None)

        def on_page(stats, units):
            if bar is not None:
                bar.update(units)
                bar.set_postfix(shard=stats.shard, written=stats.written, refresh=False)

        with api.session() as conn:
            try:
                result = reembed.run(conn, only=args.shards, promote=not args.no_promote, batch_rows=args.batch_rows,
                                     on_plan=on_plan, on_page=on_page)
            finally:
                if bar is not None:
                    bar.close()
    except backfill_control.BackfillHeld as held:
        print(f"autoembed: {held} (nothing started; exit status {backfill_control.REFUSED_EXIT})", file=sys.stderr)
        return backfill_control.REFUSED_EXIT
    if result.plan.mode == "skip":
        print(f"nothing to do: {result.plan.reason}", file=sys.stderr)
        return 1
    for s in result.shards:
        print(f"  shard {s.shard}/{s.shards}: {s.summary(with_stop=False)}")
    cov = result.coverage
    print(f"{result.total.summary(with_stop=False)}\ncoverage of {result.plan.spec.identity_key} in "
          f"{reembed.written_to(result.plan)}: {_pct(cov.ratio)} ({cov.current}/{cov.embeddable}"
          f"{'' if reembed.noun == 'rows' else ' ' + reembed.noun})")
    if result.promotion is not None:
        print(reembed.promoted_line(result))
    stopped = _stopped_line(p, result.total.stopped, result.stopped_shards)
    if stopped:
        print(stopped, file=sys.stderr)
    for error in result.total.errors:
        print(f"  error: {error}", file=sys.stderr)
    if result.total.retryable_failures or result.total.busy:
        return 1  # rows to embed on the next run: the provider failed them, or the application held them
    return backfill_control.STOPPED_EXIT if stopped else 0


def _batch_backfill(args: argparse.Namespace, p, reembed) -> int:
    """`autoembed backfill P --via batch`: the provider's Batch API (core.migrate.reembed.BatchReembed).
    Ctrl-C leaves the batches running; the same command again collects them."""
    from tqdm import tqdm

    from .core.migrate import batch_backfill as bb

    if args.shards:
        raise ConfigError("--shards is for --via direct: a batch re-embed submits every row of the table")
    if args.fallback:
        reembed.fallback = args.fallback
    bar = None

    def on_plan(shard_plan, cov):
        nonlocal bar
        print(f"{p.name}: {shard_plan.spec.key} ({shard_plan.mode}) through the Batch API: {shard_plan.reason}")
        bar = tqdm(total=cov.missing, unit="row", desc="collected", disable=args.quiet or None)

    def on_progress(pr):
        if bar is not None:
            bar.n = min(pr.collected_rows, bar.total or pr.collected_rows)
            bar.set_postfix(submitted=pr.submitted, validating=pr.by_status.get("validating", 0),
                            in_progress=pr.by_status.get("in_progress", 0) + pr.by_status.get("finalizing", 0),
                            refresh=False)
            bar.refresh()

    with api.session() as conn:
        try:
            result = reembed.run(conn, promote=not args.no_promote, on_plan=on_plan, on_page=on_progress)
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            try:  # a fresh connection: the interrupted one may be mid-statement
                with api.session() as fresh:
                    left = [b.batch_id or f"record {b.id}" for b in bb.batches(fresh, pipeline=p.name, open_only=True)]
            except Exception:  # noqa: BLE001 - the message below matters more than the list
                left = ["?"]
            print(f"\ninterrupted: {len(left)} batch(es) left running at the provider ({', '.join(left)}); run "
                  f"`autoembed backfill {p.name} --via batch` again to collect them", file=sys.stderr)
            return 130
        finally:
            if bar is not None:
                bar.close()
        records = {c.batch: bb.get_batch(conn, c.batch) for c in result.collected}
    if result.plan.mode == "skip":
        print(f"nothing to do: {result.plan.reason}", file=sys.stderr)
        return 1
    for c in result.collected:
        b = records[c.batch]
        cost, saving = b.cost() if b else (None, None)
        priced = f", ~${cost:.4f} (saved ~${saving:.4f} against direct calls)" if cost is not None else ""
        print(f"  batch {b.batch_id if b else c.batch} ({c.status}): {c.written} written, {c.stale} stale, "
              f"{c.resubmit} resubmitted, {c.direct} direct, {c.dead} dead-lettered; {c.tokens} tokens{priced}")
    cov = result.coverage
    print(f"{result.summary()}\ncoverage of {result.plan.spec.identity_key} in {result.plan.column}: "
          f"{_pct(cov.ratio)} ({cov.current}/{cov.embeddable})")
    if result.promotion is not None:
        print(reembed.promoted_line(result))
    for c in result.collected:
        for error in c.errors:
            print(f"  error: {error}", file=sys.stderr)
    return 0 if cov.complete else 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    """One path for both shapes (core.migrate.reembed, as the Dagster `model_migration` job)."""
    from .core.migrate import backfill_control
    from .core.migrate.reembed import reembed_of

    p = _pipeline_named(args.pipeline)
    with api.session() as conn:
        r = reembed_of(p).migration_action(conn, args.action.replace("-", "_"), force=args.force)
        held = backfill_control.hold(conn, p.name) if r.status == "backfilling" else None
    if args.json:
        print(json.dumps({**r.info, "backfill": held.state if held else None}))
    else:
        print(r.line + (f"; backfill {held.state}: {held.lift}" if held else ""))
        if r.promoted:
            print(r.promoted)
    return 0  # a state that does not allow the action raised MigrationError (exit 1)


def _cmd_deploy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .components.declarations import project_root
    from .deploy import scaffold

    root = Path(args.project).resolve() if args.project else project_root()
    for path in scaffold(root, image=args.image, force=args.force):
        print(f"wrote {path}")
    print("next: README 'Deploy to Kubernetes' (docker build, the secrets, helm upgrade --install with the image tag)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoembed", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens; show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database set-up")
    db.add_argument("action", choices=["url", "init", "psql", "stop"],
                    help="url: print the connection URL; init: start/attach and apply sql/; psql: a psql session "
                         "on it (stdin works: `autoembed db psql <<'SQL'`); stop: stop the embedded server")
    db.add_argument("psql_args", nargs=argparse.REMAINDER, help="with psql: more psql arguments (e.g. -c 'select 1')")
    db.set_defaults(func=_cmd_db)

    en = sub.add_parser("enroll", help="keep a table's embedding column in sync")
    en.add_argument("table", help="the table, `name` or `schema.name`")
    en.add_argument("--content-function", default="embedding_input",
                    help="SQL function taking a row and returning the text to embed (default: embedding_input)")
    en.add_argument("--column", default="embedding", help="the vector column (default: embedding)")
    en.add_argument("--key", default="id", help="the key column (default: id)")
    en.add_argument("--queue", default="embedding_jobs", help="pgmq queue of the jobs (default: embedding_jobs)")
    en.add_argument("--no-backlog", action="store_true", help="do not queue existing rows")
    en.add_argument("--force", action="store_true",
                    help="enrol even when the default model cannot make vectors of the column's size")
    en.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                    help="long documents: embed chunks of at most N tokens into <table>_chunks (no --column)")
    en.add_argument("--chunk-overlap", type=int, default=0, metavar="M",
                    help="with --chunk-tokens: repeat up to M tokens of the previous chunk (default: 0)")
    en.set_defaults(func=_cmd_enroll)

    st = sub.add_parser("status", help="queue depth, in flight, dead letters")
    st.add_argument("--queue", help="only this queue (default: all)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_cmd_status)

    dr = sub.add_parser("drain", help="embed queued jobs until the queue is empty")
    dr.add_argument("--idle-timeout", type=float, default=0.0, help="then wait this long for more work")
    dr.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    dr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dr.set_defaults(func=_cmd_drain)

    se = sub.add_parser("search", help="semantic search")
    se.add_argument("query", help="the text to search for")
    se.add_argument("--pipeline", help="a declared (defs/<name>/defs.yaml) or discovered pipeline: its table, "
                                       "column, content function and model")
    se.add_argument("--table", help="or a table, `name` or `schema.name` (with the flags below)")
    se.add_argument("--schema", default="public", help="schema of --table when it has none (default: public)")
    se.add_argument("--content-function", default="embedding_input", help="with --table (default: embedding_input)")
    se.add_argument("--column", default="embedding", help="with --table (default: embedding)")
    se.add_argument("--key", default="id", help="with --table (default: id)")
    se.add_argument("-k", type=int, default=5, help="how many rows (default: 5)")
    se.add_argument("--chunks", action="store_true",
                    help="with --table: search its chunk table (<table>_chunks): rows ranked by their best chunk, "
                         "with that passage (a chunked --pipeline does this by itself)")
    se.set_defaults(func=_cmd_search)

    dl = sub.add_parser("dead-letters", help="list dead letters, or --retry them")
    dl.add_argument("--queue", default="embedding_jobs", help="the queue (default: embedding_jobs)")
    dl.add_argument("--retry", action="store_true", help="put them back on the queue (after fixing the cause)")
    dl.add_argument("--purge", action="store_true",
                    help="delete the dead letters that cannot apply any more (their table or column is gone, "
                         "e.g. a shadow column after an abort); asks first")
    dl.add_argument("--yes", action="store_true", help="with --purge: do not ask")
    dl.add_argument("--ids", type=int, nargs="*", help="only these message ids")
    dl.add_argument("--limit", type=int, default=50, help="list at most this many (default: 50)")
    dl.set_defaults(func=_cmd_dead)

    dm = sub.add_parser("demo", help="the whole stack offline: Postgres, a docstring corpus, Dagster, search")
    dm.add_argument("--rows", type=int, default=1200, help="documents to load (default 1200: about a minute to embed on 2 cores)")
    dm.add_argument("--modules", type=int, default=None, metavar="N",
                    help="whole-module documents to load, embedded as chunks (default 16: ~300 chunks; 0 for none)")
    dm.add_argument("--no-ui", action="store_true", help="no webserver: drain, search, then stop")
    dm.add_argument("--port", type=int, default=3000, help="port of the Dagster UI")
    dm.add_argument("--timeout", type=float, default=900.0, help="give up waiting for the drain after this many seconds")
    dm.add_argument("--keep-db", action="store_true", help="leave the embedded Postgres running at exit")
    dm.add_argument("--dagster-home", default=None, help="Dagster instance directory (default: DAGSTER_HOME when set, else the project's own .autoembed/dagster_home)")
    dm.set_defaults(func=_cmd_demo)

    de = sub.add_parser("dagster-env", help="print the exports `dagster dev -w workspace.yaml` needs (eval them)")
    de.set_defaults(func=_cmd_dagster_env)

    bf = sub.add_parser("backfill", help="re-embed a pipeline with the model its defs.yaml names, shard by shard "
                                         "(a model change: zero-downtime migration)",
                        epilog="exit status: 0 done; 1 errors (rows left to retry); 2 bad input; "
                               "3 refused, nothing ran: the backfill is paused (--resume) or outside its "
                               "AUTOEMBED_BACKFILL_WINDOW; 4 a pause or the window's end stopped shards part-way")
    bf.add_argument("pipeline", help="pipeline name (its defs/<name>/defs.yaml; the model is the one it names)")
    bf.add_argument("--shards", type=int, nargs="*", help="only these shards (default: all)")
    bf.add_argument("--batch-rows", type=int, help="rows per provider request")
    bf.add_argument("--no-promote", action="store_true", help="do not promote the migration when it is complete")
    bf.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bf.add_argument("--via", choices=["direct", "batch"], default=None,
                    help="direct: /v1/embeddings (default, unless the defs.yaml says `backfill: {via: batch}`); "
                         "batch: the provider's Batch API at half the price, results within 24 h (Ctrl-C leaves "
                         "the batches running; run the command again to collect them)")
    bf.add_argument("--fallback", choices=["resubmit", "direct"], default=None,
                    help="--via batch: rows a batch did not return (expired, failed, missing) are submitted again "
                         "(default) or embedded directly")
    pause = bf.add_mutually_exclusive_group()
    pause.add_argument("--pause", action="store_true",
                       help="pause the pipeline's backfill everywhere (running shards stop after their page)")
    pause.add_argument("--resume", action="store_true",
                       help="lift --pause; nothing restarts by itself: the stopped shards continue where they "
                            "stopped on the next `autoembed backfill PIPELINE` (or Dagster `backfill` job launch)")
    bf.set_defaults(func=_cmd_backfill)

    mg = sub.add_parser("migrate", help="a pipeline's model migration: status, promote, rollback, drop-old, abort")
    mg.add_argument("pipeline", help="pipeline name (its defs/<name>/defs.yaml)")
    mg.add_argument("action", choices=["status", "promote", "rollback", "drop-old", "abort"], help="what to do")
    mg.add_argument("--force", action="store_true", help="promote below 100%% coverage / drop-old whatever the config says")
    mg.add_argument("--json", action="store_true", help="machine-readable output")
    mg.set_defaults(func=_cmd_migrate)

    pl = sub.add_parser("pipelines", help="the project's pipelines: declared (defs.yaml) and discovered (SQL only)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_cmd_pipelines)

    dp = sub.add_parser("deploy", help="Kubernetes: `deploy scaffold` writes a Dockerfile, .dockerignore and Helm "
                                       "values.yaml into your Dagster project")
    dp.add_argument("action", choices=["scaffold"], help="scaffold: write the files (README: Deploy to Kubernetes)")
    dp.add_argument("--project", default=None,
                    help="the Dagster project's folder (default: the project at or above the current folder)")
    dp.add_argument("--image", default=None,
                    help="the image repository, e.g. registry.example.com/my-project (default: one under "
                         "registry.example.com named after the code location)")
    dp.add_argument("--force", action="store_true", help="overwrite files that exist")
    dp.set_defaults(func=_cmd_deploy)

    dv = sub.add_parser("dev", help="`dagster dev` on this project's data: starts Postgres, prepares Dagster's "
                                    "storage, sets the environment (no eval needed)")
    dv.add_argument("--port", type=int, default=3000, help="port of the Dagster UI (default: 3000)")
    dv.add_argument("-w", "--workspace", default=None,
                    help="workspace.yaml to load (default: the project's, else its definitions module)")
    dv.add_argument("--keep-db", action="store_true",
                    help="leave the embedded Postgres running at exit when this command started it")
    dv.set_defaults(func=_cmd_dev)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader (e.g. `head`) has gone: stop quietly, and keep Python from complaining again
        # when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
