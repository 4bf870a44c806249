-- Chunk targets: an enrolled table whose documents are embedded as chunks into its chunk table
-- (sql/011) instead of a vector column. Registered in autoembed.targets with `chunk_table` (by oid),
-- `chunk_tokens`, `chunk_overlap` and no embedding column (sql/002); the drain resolves a message's
-- target id against this registry and writes only the registered chunk table (core/drain/chunked.py).
--
-- Enrolment, registration and the triggers are the column targets' own, one path for both shapes
-- (sql/005 enroll_target, register_target, install_target_triggers; the generated compare
-- function, sql/004): the trigger names are the same, so autoembed.unenroll / uninstall_triggers
-- drop them and a table has one kind of enrolment at a time. What is a chunk target's own is here:
-- its enqueue trigger function (queue_chunk_jobs), where its row trigger notes the keys, and the
-- chunk tables of a model change. No clearing trigger: a stale chunk set stays until the drain
-- swaps the new one in whole, and search_chunks(content_function => ...) skips it meanwhile.
-- Deleted rows lose their chunks, a changed key moves them and a TRUNCATE truncates them: the
-- parent's triggers (sql/015).

-- The key column of chunk target `arg` (a trigger argument) on table `tbl`, or NULL with a warning
-- (the user's write goes on, nothing is enqueued), also when the column's type is no longer a key
-- type (the definer converts keys to text: never with a cast the table's owner wrote).
create or replace function autoembed.chunk_trigger_key(tbl oid, arg text)
returns text
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    key_column text;
begin
    if arg ~ '^[0-9]{1,18}$' then
        select ka.attname::text into key_column
          from autoembed.targets r
          join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
         where r.id = arg::bigint and r.relid = tbl and r.chunk_table is not null
           and autoembed.key_type_ok(ka.atttypid);
    end if;
    if key_column is null then
        raise warning 'autoembed: a chunk trigger on % names no chunk target of this table (%): nothing enqueued; enroll the table again',
            tbl::regclass, quote_nullable(arg);
    end if;
    return key_column;
end;
$$;
revoke execute on function autoembed.chunk_trigger_key(oid, text) from public;

-- The keys a chunk target's row trigger noted until its statement trigger sends them, per
-- transaction (xid) and target. Owned by the project: nobody else may read, write or put a trigger
-- on it (a temp table here, pg_temp.autoembed_chunk_changes, let a writer who created it first with
-- a trigger of its own run that trigger with the definer's rights). Unlogged: nothing here outlives
-- the statement that wrote it, but a crash.
create unlogged table if not exists autoembed.chunk_changes (
    xid    xid8   not null,
    target bigint not null,
    k      text   not null
);
create index if not exists chunk_changes_xid on autoembed.chunk_changes (xid, target);
revoke all on autoembed.chunk_changes from public;
-- Notes of transactions that ended without their statement trigger (say, the owner disabled it).
delete from autoembed.chunk_changes c where c.xid < pg_snapshot_xmin(pg_current_snapshot());

-- The enqueue triggers of a chunk target (first argument: the target id). SECURITY DEFINER, and
-- they read only keys: they call no user function, so the writing role needs rights on its own
-- table only. They touch nothing a caller can create: every table is the project's and
-- schema-qualified, keys are converted to text only when their type is a key type.
--   AFTER INSERT statement (transition table autoembed_new): every new row, in one send;
--   AFTER UPDATE row (arguments: target id, key column), fired only WHEN the input changed (its
--     WHEN clause compares the content function of OLD and NEW in the writer's context, through
--     autoembed.input_changed_<id>: a function that raises for the row counts as a change and
--     never fails the write; a re-save or a change to another column costs no call here): notes
--     the row's key in autoembed.chunk_changes under the transaction's id;
--   AFTER UPDATE statement: takes (deletes) the keys the row trigger noted and sends them in one
--     send (a bulk UPDATE is grouped like a column target's, 200 rows a message). Row triggers
--     fire before it, in the same (sub)transaction.
-- The key settings are pinned (as autoembed.key_texts does) so a key's text is canonical.
create or replace function autoembed.queue_chunk_jobs()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC'
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
as $$
declare
    key_column text;
    key_type regtype;
    keys text[];
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return null;
    end if;
    if TG_LEVEL = 'ROW' then
        if TG_ARGV[1] = 'id' then  -- the usual key in static SQL: planned once per session and table
            key_type := pg_typeof(NEW.id);
        else
            execute format('select pg_typeof(($1).%I)', TG_ARGV[1]) into key_type using NEW;
        end if;
        if not (key_type = any ('{int2,int4,int8,numeric,text,varchar,bpchar,uuid,date,timestamp,timestamptz}'::regtype[])
                or autoembed.key_type_ok(key_type)) then
            raise warning 'autoembed: the key column % of % is of type %, not a key type: nothing enqueued; enroll the table again',
                quote_ident(TG_ARGV[1]), TG_RELID::regclass, key_type;
            return null;
        end if;
        if TG_ARGV[1] = 'id' then
            insert into autoembed.chunk_changes values (pg_current_xact_id(), TG_ARGV[0]::bigint, NEW.id::text);
        else
            execute format('insert into autoembed.chunk_changes values (pg_catalog.pg_current_xact_id(), $1, ($2).%I::text)',
                           TG_ARGV[1])
                using TG_ARGV[0]::bigint, NEW;
        end if;
        return null;
    end if;
    key_column := autoembed.chunk_trigger_key(TG_RELID, TG_ARGV[0]);
    if TG_OP = 'UPDATE' then
        -- (taken even when the target is gone, so nothing stays behind)
        with noted as (delete from autoembed.chunk_changes c
                       where c.xid = pg_current_xact_id_if_assigned() and c.target = TG_ARGV[0]::bigint
                       returning c.k)
        select array(select distinct k from noted) into keys;
    end if;
    if key_column is null then
        return null;
    elsif TG_OP = 'INSERT' then
        execute format('select array(select n.%I::text from autoembed_new n)', key_column) into keys;
    end if;
    perform autoembed.send_keys(TG_ARGV[0]::bigint, keys);
    return null;
end;
$$;

-- After the parent's key column was renamed: the chunk tables of target `target_id` (the live one, a
-- model change's shadow and retired table: autoembed.chunk_tables_of) rename their key column the same way, since the drain and search
-- name both by one name. Called by autoembed.follow_renames (sql/008).
create or replace function autoembed.follow_chunk_key_column(target_id bigint)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    parent oid;
    key_name text;
    chunk record;
begin
    select r.relid, ka.attname::text into parent, key_name
      from autoembed.targets r
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.id = target_id and r.chunk_table is not null;
    for chunk in
        select t.tbl, (select p.key_column from autoembed.chunk_parent(t.tbl) p) as col
          from autoembed.chunk_tables_of(parent::regclass) t(tbl)
    loop
        if chunk.col <> key_name then
            execute format('alter table %s rename column %I to %I', chunk.tbl, chunk.col, key_name);
        end if;
    end loop;
end;
$$;

-- Swap a chunk target's live chunk table for `incoming` (autoembed.swap_chunk_tables, sql/011:
-- the live one is renamed `retired_name`) and point the registry's chunk target at the new live
-- table, in the caller's transaction, so queued jobs go on to the table search reads. SECURITY
-- DEFINER (the registry); the caller must own the parent table. Returns the retired table.
create or replace function autoembed.swap_chunk_target(live regclass, incoming regclass, retired_name text)
returns regclass
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    retired regclass;
begin
    perform autoembed.require_owner((select parent from autoembed.chunk_parent(live)), 'swap its chunk tables');
    retired := autoembed.swap_chunk_tables(live, incoming, retired_name);
    update autoembed.targets r set chunk_table = incoming, updated_at = now() where r.chunk_table = live;
    return retired;
end;
$$;

-- Promote a chunk target's shadow chunk table (a backfill to another model wrote it): the live
-- table is kept as <live>__old (refused while one exists). Returns the old table.
create or replace function autoembed.promote_chunk_target(live regclass, shadow regclass)
returns regclass
language sql
as $$
    select autoembed.swap_chunk_target(live, shadow, autoembed.old_chunk_name(live))
$$;

-- Undo a promotion while <live>__old exists: the live table becomes the shadow again
-- (`shadow_name`, where the drain and the backfill write until the next promotion) and the old
-- table is live again. Returns the table that is the shadow now.
create or replace function autoembed.rollback_chunk_target(live regclass, shadow_name text)
returns regclass
language plpgsql
as $$
declare
    old regclass := autoembed.old_chunk_table(live);
begin
    if old is null then
        raise exception '% has no old chunk table (dropped, or never promoted): nothing to roll back to', live
            using errcode = 'undefined_table';
    end if;
    perform autoembed.swap_chunk_target(live, old, shadow_name);
    return live;
end;
$$;
