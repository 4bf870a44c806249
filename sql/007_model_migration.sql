-- Model changes: shards of a table's key space for re-embed backfills, and zero-downtime model
-- migrations into a shadow column. Idempotent (re-applied by every `autoembed db init`).

-- The shard of a row: the first 32 bits (big-endian) of SHA-256 of the key's text form, modulo
-- the number of shards. Documented and stable across Postgres versions and platforms (unlike
-- hashtext), and reproducible outside the database:
--   int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:4], "big") % shards
-- In a UTF-8 database a key's text already is its UTF-8 bytes: shard_of is then one expression
-- the planner inlines (4x faster per row than a function call; a backfill page and a coverage
-- count evaluate it for every key they scan). Other databases convert the text first.
do $$
declare
    utf8_bytes text := case when (select pg_encoding_to_char(encoding) from pg_database
                                  where datname = current_database()) = 'UTF8'
                            then 'key::bytea' else 'convert_to(key, ''UTF8'')' end;
begin
    execute format($f$
        create or replace function autoembed.shard_of(key text, shards integer)
        returns integer
        language sql
        immutable
        strict
        parallel safe
        as $b$ select ((('x' || left(encode(sha256(%s), 'hex'), 8))::bit(32)::bigint %% shards))::integer $b$
    $f$, utf8_bytes);
end;
$$;

-- One row per model migration of an embedding column. The model is named by provider, model and
-- size only: API keys and base URLs stay in the environment of whoever embeds.
create table if not exists autoembed.model_migrations (
    id                   bigserial   primary key,
    schema_name          text        not null,
    table_name           text        not null,
    embedding_column     text        not null,  -- the column search uses
    shadow_column        text        not null,  -- where the new model's vectors go until promotion
    old_column           text        not null,  -- the name the old vectors keep after promotion
    key_column           text        not null,
    queue                text        not null,
    content_function     text        not null,  -- input of the new model
    old_content_function text        not null,  -- input of the old vectors
    provider             text        not null,
    model                text        not null,
    dimensions           integer     not null check (dimensions > 0),
    vector_type          text        not null check (vector_type in ('vector', 'halfvec')),
    model_key            text        not null,  -- provider:model:dimensions, as embedding_state.model
    old_model            text,                  -- model_key of the old vectors (most rows), if any
    status               text        not null default 'backfilling'
                         check (status in ('backfilling', 'promoted', 'finished', 'aborted')),
    created_at           timestamptz not null default now(),
    promoted_at          timestamptz,
    finished_at          timestamptz
);

-- At most one migration in flight per column: the shadow/old column names are fixed.
create unique index if not exists model_migrations_one_active
    on autoembed.model_migrations (schema_name, table_name, embedding_column)
    where status in ('backfilling', 'promoted');

-- Guard installed on autoembed.embedding_state for the targets of a migration in flight (one
-- trigger per migration, filtered by target in its WHEN clause so other targets pay nothing).
-- It refuses, in the writer's own transaction, a vector record whose model contradicts the
-- migration: a drain that embedded with the old model just before the promotion committed, or
-- a process running an outdated configuration, fails and retries instead of mislabelling vectors.
-- Arguments: the migration id, the live target's id, the shadow (after promotion: old) target's
-- id. Target ids keep their role through promotion and rollback (autoembed.swap_targets).
create or replace function autoembed.guard_migration_model()
returns trigger
language plpgsql
as $$
declare
    m autoembed.model_migrations;
    expected text;
    live bigint := TG_ARGV[1]::bigint;
    other bigint := TG_ARGV[2]::bigint;
begin
    if current_setting('autoembed.migrating', true) = 'on' then
        return NEW;  -- promotion/rollback moving the records themselves
    end if;
    select * into m from autoembed.model_migrations where id = TG_ARGV[0]::bigint;
    if not found then
        return NEW;
    end if;
    if m.status = 'backfilling' then
        if NEW.target_id = other then
            expected := m.model_key;
        elsif NEW.target_id = live then
            expected := m.old_model;
        end if;
    elsif m.status = 'promoted' and NEW.target_id = live then
        expected := m.model_key;
    end if;
    if expected is not null and NEW.model is distinct from expected then
        raise exception 'autoembed: %.%.% is in a model migration (%): it takes vectors of % only, not %',
            m.schema_name, m.table_name,
            case when NEW.target_id = live or m.status = 'promoted' then m.embedding_column else m.shadow_column end,
            m.status, expected, NEW.model
            using errcode = 'serialization_failure',
                  hint = 'the migration changed while this writer was embedding; its jobs are retried';
    end if;
    return NEW;
end;
$$;

-- (Re)install the guard of migration `migration_id` (backfilling or promoted) on its two targets.
-- Run by start_migration and by `db init` (sql/022) for migrations in flight.
create or replace function autoembed.install_migration_guard(migration_id bigint)
returns void
language plpgsql
as $$
declare
    m autoembed.model_migrations;
    tbl regclass;
    live bigint;
    other bigint;
begin
    select * into m from autoembed.model_migrations where id = migration_id;
    tbl := to_regclass(format('%I.%I', m.schema_name, m.table_name));
    if tbl is null or m.status not in ('backfilling', 'promoted') then
        return;
    end if;
    live := autoembed.target_of(tbl, m.embedding_column);
    other := autoembed.target_of(tbl, case when m.status = 'promoted' then m.old_column else m.shadow_column end);
    if live is null or other is null then
        return;
    end if;
    execute format('create or replace trigger %I before insert or update on autoembed.embedding_state for each row '
                   'when (new.target_id in (%s, %s)) execute function autoembed.guard_migration_model(%L, %L, %L)',
                   'autoembed_guard_' || m.id, live, other, m.id, live, other);
end;
$$;

-- Delete the queued jobs of column `embedding_column` of a table from `queue` (the jobs of a shadow
-- column a model migration's promotion, rollback or abort retires). Returns the jobs deleted.
create or replace function autoembed.purge_column_jobs(queue text, schema_name text, table_name text,
                                                       embedding_column text)
returns bigint
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    purged bigint;
begin
    execute format('delete from pgmq.%I q where q.message ->> ''schema'' = $1 and q.message ->> ''table'' = $2'
                   ' and q.message ->> ''embeddingColumn'' = $3', 'q_' || lower(queue))
        using schema_name, table_name, embedding_column;
    get diagnostics purged = row_count;
    return purged;
end;
$$;
