-- Re-embeds through the provider's Batch API (core/migrate/batch_backfill.py): every batch submitted, and
-- the rows it carries, so a restart, a second CLI or the Dagster sensor see the same state and no
-- row is submitted twice while a batch holding it is open. Idempotent: applied by every `db init`.

create table if not exists autoembed.embedding_batches (
    id               bigint generated always as identity primary key,
    pipeline         text        not null,
    migration_id     bigint,                -- autoembed.model_migrations.id (null: written in place)
    schema_name      text        not null,
    table_name       text        not null,
    embedding_column text        not null,  -- the column the vectors go to (a migration's shadow column)
    content_function text        not null,
    key_column       text        not null,
    queue            text        not null,  -- where its dead letters go (the pipeline's queue)
    model            text        not null,  -- provider:model:dimensions, as embedding_state records it
    shard            integer,               -- the shard it was submitted for (null: the whole table)
    shards           integer,
    attempt          integer     not null default 1,  -- 2+: a resubmission of rows a batch did not return
    -- preparing (recorded, not yet created at the provider), the provider's statuses (validating,
    -- in_progress, finalizing, completed, failed, expired, cancelling, cancelled), then collected.
    status           text        not null default 'preparing',
    input_file_id    text,
    batch_id         text unique,
    output_file_id   text,
    error_file_id    text,
    row_count        integer     not null,
    input_bytes      bigint      not null default 0,
    tokens           bigint      not null default 0,  -- counted at submission; the provider's usage once collected
    completed_lines  integer     not null default 0,  -- the provider's request_counts
    failed_lines     integer     not null default 0,
    written          integer     not null default 0,  -- collected: vectors written
    stale            integer     not null default 0,  -- collected: rows edited after submission (result dropped)
    resubmit         integer     not null default 0,  -- collected: rows left to a later batch or the direct path
    dead             integer     not null default 0,  -- collected: rows dead-lettered with the provider's reason
    error            text,
    created_at       timestamptz not null default now(),
    submitted_at     timestamptz,
    updated_at       timestamptz not null default now(),
    collected_at     timestamptz
);

create index if not exists embedding_batches_open
    on autoembed.embedding_batches (schema_name, table_name, embedding_column) where status <> 'collected';

create table if not exists autoembed.embedding_batch_rows (
    batch        bigint not null references autoembed.embedding_batches (id) on delete cascade,
    row_id       text   not null,    -- the key as text
    content_hash bytea  not null,    -- of the input submitted
    -- pending (in the batch), written, stale, current (written meanwhile by another path),
    -- retry (not returned: to be submitted again), direct (embedded by the direct fallback), dead
    status       text   not null default 'pending',
    error        text,
    primary key (batch, row_id)
);

create index if not exists embedding_batch_rows_row on autoembed.embedding_batch_rows (row_id);

-- Whether collecting the batch that completes the migration promotes it (the `backfill` job's
-- `promote` config, carried from the shard run that submitted it to the collect run).
alter table autoembed.embedding_batches add column if not exists promote boolean not null default true;
