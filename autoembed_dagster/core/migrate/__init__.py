"""Re-embedding and model changes: backfill shards over a pipeline's rows (`backfill` for a vector
column, `chunk_backfill` for a chunk set), their pause and time window (`backfill_control`), and
the model migration of a column (`migration`: shadow column, promote, rollback, drop-old, abort)
and of a chunk set (`chunk_migration`). `reembed` is the one interface over both shapes
(`reembed_of(pipeline)`) that the Dagster layer is written against.

May import: everything of core below it (config, pipelines, db, embed, targets, queue, drain,
health). Only the CLI and the Dagster layer import it."""
