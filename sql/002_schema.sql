-- The project's own schema and Supabase's `util` schema (kept for compatibility).
create schema if not exists autoembed;
create schema if not exists util;

-- What each stored vector was made from: the content hash guards against stale writes and
-- lets unchanged input skip the provider; the model says which model made it. Keyed by the
-- registered target (autoembed.targets.id; the foreign key and the conversion of the older layout,
-- keyed by schema/table/column names, are in sql/022): renames change nothing.
create table if not exists autoembed.embedding_state (
    target_id        bigint      not null,
    row_id           text        not null,
    content_hash     bytea       not null,
    model            text        not null,
    embedded_at      timestamptz not null default now(),
    primary key (target_id, row_id)
);

-- Messages that failed for good: the message also sits in pgmq's archive; this keeps the reason.
create table if not exists autoembed.dead_letters (
    queue_name text        not null,
    msg_id     bigint      not null,
    message    jsonb       not null,
    error      text        not null,
    attempts   integer     not null,
    failed_at  timestamptz not null default now(),
    primary key (queue_name, msg_id)
);

-- Last error of a message that will be retried (shown by `autoembed status`).
create table if not exists autoembed.message_errors (
    queue_name text        not null,
    msg_id     bigint      not null,
    error      text        not null,
    attempts   integer     not null,
    failed_at  timestamptz not null default now(),
    primary key (queue_name, msg_id)
);

-- The registry of embedding targets: what the triggers may enqueue and the only functions the
-- drain may call. One row per (table, embedding column). Tables, columns and the content function
-- are held by oid/attnum so that renames are followed; `content_function` keeps the name as it was
-- given (what Supabase-shaped messages carry). Written only by the project's SECURITY DEFINER
-- functions (enroll, the trigger registration, model migrations): nobody else has rights on it.
create table if not exists autoembed.targets (
    id               bigint      generated always as identity primary key,
    relid            oid         not null,
    key_column       text        not null,  -- name at registration (target_catalog has the current one)
    key_attnum       smallint    not null,
    key_type         text        not null,  -- format_type at registration
    embedding_column text        not null,  -- name at registration
    embedding_attnum smallint    not null,
    content_function text        not null,  -- as given to enroll / the trigger
    content_fn       oid         not null,  -- what it resolved to: the only function the drain may call
    queue            text        not null,
    origin           text        not null check (origin in ('enroll', 'trigger', 'migration')),
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    unique (relid, embedding_attnum)
);
revoke all on autoembed.targets from public;
-- Chunk targets (sql/012): the chunk table by oid and how documents are split; such a target has
-- no embedding column in its table (embedding_attnum NULL, embedding_column = the chunk table's
-- name at registration).
alter table autoembed.targets add column if not exists chunk_table oid;
alter table autoembed.targets add column if not exists chunk_tokens integer;
alter table autoembed.targets add column if not exists chunk_overlap integer;
alter table autoembed.targets alter column embedding_attnum drop not null;
create unique index if not exists targets_chunk_table on autoembed.targets (chunk_table) where chunk_table is not null;

-- Chunk tables (sql/011): whose chunk table each is (the parent by oid) and its key column (by
-- attnum), so renames are followed. Written by autoembed.register_chunk_table (sql/015) only;
-- readable by all (oids and attnums: search reads it).
create table if not exists autoembed.chunk_tables (
    chunk_table oid      primary key,
    parent      oid      not null,
    key_attnum  smallint not null
);
revoke all on autoembed.chunk_tables from public;
grant select on autoembed.chunk_tables to public;

-- Supabase's queue name, so a database that ran Supabase's guide keeps its queue. (One that targets
-- use and that was dropped is re-created by autoembed.restore_queue in sql/022, which queues its
-- lost jobs again.)
do $$
begin
    if not exists (select 1 from pgmq.meta where queue_name = 'embedding_jobs')
       and not exists (select 1 from autoembed.targets r where r.queue = 'embedding_jobs') then
        perform pgmq.create('embedding_jobs');
    end if;
end
$$;
