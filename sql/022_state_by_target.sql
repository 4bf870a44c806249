-- autoembed.embedding_state keyed by the registered target (autoembed.targets.id), not by the
-- schema, table and column names it had (sql/002 creates it so on a new database). A rename of the
-- schema, the table, the embedding or key column changes nothing; a registration that goes (its
-- table dropped, a model migration's old or aborted shadow column unregistered) takes its records
-- along (the foreign key's ON DELETE CASCADE). A model migration's promotion and rollback swap the
-- records of the live and shadow targets with the columns (autoembed.swap_state, called by
-- autoembed.swap_targets).

-- A database of the old layout: its records are carried over to the target that holds that column
-- now (the names the records were filed under, sql/015's state_* columns where they are known, else
-- the current names). Records of no registered target were unreachable already: they go.
do $$
declare
    recorded_names boolean := exists (select 1 from pg_attribute a where a.attrelid = 'autoembed.targets'::regclass
                                       and a.attname = 'state_schema' and not a.attisdropped);
    moved bigint;
    left_behind bigint;
begin
    if not exists (select 1 from pg_attribute a where a.attrelid = 'autoembed.embedding_state'::regclass
                   and a.attname = 'schema_name' and not a.attisdropped) then
        return;
    end if;
    alter table autoembed.embedding_state rename to embedding_state_by_names;
    alter index if exists autoembed.embedding_state_pkey rename to embedding_state_by_names_pkey;
    create table autoembed.embedding_state (
        target_id    bigint      not null,
        row_id       text        not null,
        content_hash bytea       not null,
        model        text        not null,
        embedded_at  timestamptz not null default now(),
        primary key (target_id, row_id)
    );
    execute format($q$
        insert into autoembed.embedding_state (target_id, row_id, content_hash, model, embedded_at)
        select r.id, s.row_id, s.content_hash, s.model, s.embedded_at
          from autoembed.embedding_state_by_names s
          join (select r.id, n.nspname::text as nsp, c.relname::text as rel, a.attname::text as col %s
                  from autoembed.targets r
                  join pg_class c on c.oid = r.relid
                  join pg_namespace n on n.oid = c.relnamespace
                  join pg_attribute a on a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped) r
            on (s.schema_name, s.table_name, s.embedding_column) = (%s)
        on conflict do nothing$q$,
        case when recorded_names then ', r.state_schema, r.state_table, r.state_column' else '' end,
        case when recorded_names then 'coalesce(r.state_schema, r.nsp), coalesce(r.state_table, r.rel), coalesce(r.state_column, r.col)'
             else 'r.nsp, r.rel, r.col' end);
    get diagnostics moved = row_count;
    select count(*) - moved into left_behind from autoembed.embedding_state_by_names;
    -- (CASCADE: the guard triggers of model migrations in flight name the old columns; re-installed below)
    drop table autoembed.embedding_state_by_names cascade;
    raise notice 'autoembed: embedding_state keyed by target now: % records kept, % of no registered target dropped',
        moved, left_behind;
end;
$$;

-- Both layouts' leftovers of sql/015: records moved on renames (no longer needed: renames change
-- nothing), and the names they were filed under.
drop event trigger if exists autoembed_follow_state_names;
drop function if exists autoembed.follow_state_names_event();
drop function if exists autoembed.follow_state_names();
alter table autoembed.targets drop column if exists state_schema;
alter table autoembed.targets drop column if exists state_table;
alter table autoembed.targets drop column if exists state_column;

delete from autoembed.embedding_state s where not exists (select 1 from autoembed.targets r where r.id = s.target_id);
-- (DEFERRABLE: autoembed.swap_state parks one target's records under a transient id.)
do $$
begin
    if not exists (select 1 from pg_constraint k where k.conrelid = 'autoembed.embedding_state'::regclass
                   and k.conname = 'embedding_state_target' and k.condeferrable) then
        alter table autoembed.embedding_state drop constraint if exists embedding_state_target;
        alter table autoembed.embedding_state add constraint embedding_state_target
            foreign key (target_id) references autoembed.targets (id) on delete cascade
            deferrable initially immediate;
    end if;
end;
$$;

-- The target whose records sit under `target_id` for the column now named `column_name` of table
-- `schema_name`.`table_name` (a column target's embedding column, or a chunk target's chunk table),
-- or NULL. What the drain, the backfill, coverage and health pass when they look records up by the
-- names they resolved (wrapped in a scalar subquery: evaluated once per statement). SECURITY
-- DEFINER: the registry is the project's owner's; it returns an id only.
create or replace function autoembed.state_target(schema_name text, table_name text, column_name text)
returns bigint
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select r.id from autoembed.targets r
      join pg_class c on c.oid = r.relid
      join pg_namespace n on n.oid = c.relnamespace
      left join pg_attribute a on a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped
      left join pg_class ch on ch.oid = r.chunk_table
     where n.nspname = state_target.schema_name and c.relname = state_target.table_name
       and coalesce(a.attname, ch.relname) = state_target.column_name
     order by r.id
     limit 1
$$;

-- Exchange the records of targets `a` and `b` (a model migration's promotion or rollback: the live
-- target takes the other column, so the records follow the vectors they describe). The primary key
-- is checked row by row, so `a`'s records wait under the transient id -a meanwhile (the foreign
-- key, deferred for that instant, is checked again before this returns).
create or replace function autoembed.swap_state(a bigint, b bigint)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    set constraints autoembed.embedding_state_target deferred;
    update autoembed.embedding_state s set target_id = -swap_state.a where s.target_id = swap_state.a;
    update autoembed.embedding_state s set target_id = swap_state.a where s.target_id = swap_state.b;
    update autoembed.embedding_state s set target_id = swap_state.b where s.target_id = -swap_state.a;
    set constraints autoembed.embedding_state_target immediate;
end;
$$;
revoke execute on function autoembed.swap_state(bigint, bigint) from public;

-- A column target's key changes (UPDATE of its key column): the row keeps its vector (sql/004's
-- clear trigger compares the input only), and now its record too, under the new key. Else a
-- backfill found no record for the new key and embedded the row again. AFTER UPDATE row trigger,
-- WHEN the key changed (no cost otherwise), enabled ALWAYS (a key change that arrives by logical
-- replication moves the record too). It reads the key column of each target from the registry (by
-- attnum: a renamed key column is followed). Two rows that exchange keys in one statement collide:
-- their records are dropped (the next backfill embeds them again; a record never describes another
-- row's vector).
create or replace function autoembed.move_state_key()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    t record;
    keys text[];
begin
    for t in select r.id, ka.attname::text as key_column from autoembed.targets r
               join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
              where r.relid = TG_RELID and r.embedding_attnum is not null and autoembed.key_type_ok(ka.atttypid) loop
        execute format('select autoembed.key_texts(array[($1).%1$I, ($2).%1$I])', t.key_column) into keys using OLD, NEW;
        continue when keys[1] is not distinct from keys[2];
        begin
            update autoembed.embedding_state s set row_id = keys[2] where s.target_id = t.id and s.row_id = keys[1];
        exception when unique_violation then
            delete from autoembed.embedding_state s where s.target_id = t.id and s.row_id = any(keys);
        end;
    end loop;
    return null;
end;
$$;

-- The key column (current name) of `tbl`'s column targets, or NULL. SECURITY DEFINER: the
-- registry is the project owner's; it returns a column name only. (Not autoembed.target_parts: its
-- owner check would refuse autoembed.adopt_state_cleanup, sql/013, which the drain's role runs.)
create or replace function autoembed.state_key_column(tbl regclass)
returns text
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select ka.attname::text from autoembed.targets r
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.relid = state_key_column.tbl and r.embedding_attnum is not null
     order by r.origin = 'migration', r.id
     limit 1
$$;

-- Install it on `tbl` (a table with column targets), with the caller's rights (the table's owner):
-- by install_forget_triggers (sql/005: enrolment, and Supabase-triggered tables' state cleanup).
create or replace function autoembed.install_state_key_trigger(tbl regclass)
returns void
language plpgsql
as $$
declare
    key_column text := autoembed.state_key_column(tbl);
begin
    if key_column is null then
        return;
    end if;
    execute format('create or replace trigger autoembed_state_key after update on %s for each row '
                   'when (old.%2$I is distinct from new.%2$I) execute function autoembed.move_state_key()',
                   tbl, key_column);
    perform autoembed.set_trigger_mode(tbl, 'autoembed_state_key', 'always');
end;
$$;

-- Tables enrolled before, without it: their triggers made again from the registry, each table on
-- its own (autoembed.upgrade_target_triggers, sql/005); tables with Supabase's triggers get it with
-- their state cleanup (autoembed.adopt_state_cleanup, sql/013, also run at every drain's start).
select autoembed.upgrade_target_triggers(array(
           select r.id from autoembed.targets r
            where r.origin = 'enroll' and r.embedding_attnum is not null
              and not exists (select 1 from pg_trigger tr where tr.tgrelid = r.relid and tr.tgname = 'autoembed_state_key')
            order by r.id),
       'keep the record of a row under its old key when the key changes (a backfill embeds it again)');
select autoembed.adopt_state_cleanup();

-- Queues dropped (pgmq.drop_queue) while `autoembed db init` was not running: re-created here, and
-- what their jobs were for queued again (autoembed.restore_queue, sql/015).
select autoembed.restore_queue(q.queue) from (select distinct r.queue from autoembed.targets r order by 1) q;

-- The guards of model migrations in flight, on their targets' records (the older layout's guards
-- named the table and went with it above).
select autoembed.install_migration_guard(m.id) from autoembed.model_migrations m
 where m.status in ('backfilling', 'promoted') order by m.id;

-- Registrations of tables dropped while no event trigger saw it (`db init` ran without a superuser:
-- sql/015's autoembed_follow_drops is missing): they go, with their records (the foreign key) and
-- generated functions. Run at the start of every drain (and by sql/008 at `db init`). Returns how
-- many went.
create or replace function autoembed.forget_gone_targets()
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    n integer;
begin
    delete from autoembed.chunk_tables ct where not exists (select 1 from pg_class c where c.oid = ct.parent);
    delete from autoembed.targets r where not exists (select 1 from pg_class c where c.oid = r.relid);
    get diagnostics n = row_count;
    if n > 0 then
        perform autoembed.drop_generated_functions();
    end if;
    return n;
end;
$$;
revoke execute on function autoembed.forget_gone_targets() from public;
