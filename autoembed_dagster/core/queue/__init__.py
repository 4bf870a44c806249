"""The job queue: pgmq's SQL functions called through psycopg (`pgmq`), and a drain's claim on the
messages it read: visibility timeouts kept alive by a heartbeat, returned or deleted (`claims`).

May import: core.config, core.db, core.embed, core.targets (a message's row count)."""
