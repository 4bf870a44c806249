"""Re-embedding and model changes, written once over the target's shape.

- `reembed`: the one interface (`Reembed`, `reembed_of(pipeline)`) the CLI and the Dagster layer
  call for both shapes: the configured model, whether a backfill is needed, its launch, one
  shard's run, a whole backfill, the migration actions; the Batch API is a strategy under it
  (`reembed_of(p, via="batch")`, vector columns only);
- `shards`: what every shape's backfill does the same way: a shard's pages in key order with the
  pause and window checked per page (`walk_pages`), `ShardStats` and its summary, the shard loop
  and the promotion of a complete shadow (`run_shards`);
- `migration`: the one flow of a model change of any shape (`step`: which action each state
  allows, the locked transaction, the promotion's coverage check, the messages) over the shape's
  steps (core.targets.shapes.ModelChange), and a vector column's migration record (start,
  promote, rollback, drop-old, abort);
- per shape, only what differs: `backfill` (a vector column: where a shard writes, its page scan
  and write; `ColumnBackfill`), `chunk_backfill` (a chunk set: `ChunkSetBackfill`) and
  `chunk_migration` (a chunk set's model change: its state and actions, through `step`);
- `backfill_control`: pause, resume and the time window of a pipeline's backfill;
- `batch_backfill`: submit, poll and collect through the provider's Batch API (a column's pages).

May import: everything of core below it (config, pipelines, db, embed, targets, queue, drain,
health). Only the CLI, the Python API's callers and the Dagster layer import it."""
