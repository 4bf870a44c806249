-- The project's own schema and Supabase's `util` schema (kept for compatibility).
create schema if not exists autoembed;
create schema if not exists util;

-- What each stored vector was made from: the content hash guards against stale writes and
-- lets unchanged input skip the provider; the model says which model made it.
create table if not exists autoembed.embedding_state (
    schema_name      text        not null,
    table_name       text        not null,
    embedding_column text        not null,
    row_id           text        not null,
    content_hash     bytea       not null,
    model            text        not null,
    embedded_at      timestamptz not null default now(),
    primary key (schema_name, table_name, embedding_column, row_id)
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

-- Supabase's queue name, so a database that ran Supabase's guide keeps its queue.
do $$
begin
    if not exists (select 1 from pgmq.meta where queue_name = 'embedding_jobs') then
        perform pgmq.create('embedding_jobs');
    end if;
end
$$;
