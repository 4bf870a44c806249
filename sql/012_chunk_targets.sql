-- Chunk targets: an enrolled table whose documents are embedded as chunks into its chunk table
-- (sql/011) instead of a vector column. Registered in autoembed.targets with `chunk_table` (by oid),
-- `chunk_tokens`, `chunk_overlap` and no embedding column (sql/002); the drain resolves a message's
-- target id against this registry and writes only the registered chunk table (core/drain/chunked.py).
--
-- Triggers (the names of the column targets' own, so autoembed.unenroll / uninstall_triggers drop
-- them and a table has one kind of enrolment at a time); the writing role needs rights on its own
-- table only:
--   autoembed_enqueue_insert  AFTER INSERT statement (transition table): every new row, one send;
--   autoembed_enqueue_update  AFTER UPDATE row, WHEN the input changed (compared in the writer's
--                             context, the content function bound by oid): that row.
-- No clearing trigger: a stale chunk set stays until the drain swaps the new one in whole, and
-- search_chunks(content_function => ...) skips it meanwhile. Deleted rows lose their chunks, a
-- changed key moves them and a TRUNCATE truncates them: the parent's triggers (sql/015).

-- Register (or update) the chunk target of `tbl` in autoembed.targets; returns its id. SECURITY
-- DEFINER (the registry is writable by nobody else); the caller must own the table.
create or replace function autoembed.register_chunk_target(tbl regclass, content_function text, fn regprocedure,
                                                           chunk_rel regclass, key_column text, queue text,
                                                           chunk_tokens integer, chunk_overlap integer)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    key_attnum smallint;
    parent record;
    result bigint;
begin
    if (select c.relkind from pg_class c where c.oid = tbl) not in ('r', 'p') then
        raise exception 'autoembed: % is not a table', tbl using errcode = 'wrong_object_type';
    end if;
    perform autoembed.require_owner(tbl, 'enroll it');
    key_attnum := autoembed.check_registration(tbl, content_function, fn, key_column, queue);  -- (sql/005)
    select * into parent from autoembed.chunk_parent(chunk_rel);
    if parent.parent is distinct from tbl or parent.key_column is distinct from key_column then
        raise exception 'autoembed: % is not a chunk table of %.% (it references %)', chunk_rel, tbl,
            quote_ident(key_column), coalesce(parent.parent::text, 'no table')
            using errcode = 'invalid_table_definition';
    end if;
    if chunk_tokens is null or chunk_tokens < 8 then
        raise exception 'autoembed: chunk tokens must be at least 8, got %', quote_nullable(chunk_tokens)
            using errcode = 'invalid_parameter_value', hint = 'pass --chunk-tokens 8 or more (e.g. 256)';
    end if;
    if chunk_overlap is null or chunk_overlap < 0 or chunk_overlap > chunk_tokens / 2 then
        raise exception 'autoembed: chunk overlap % is not between 0 and half of chunk tokens %',
            quote_nullable(chunk_overlap), chunk_tokens
            using errcode = 'invalid_parameter_value', hint = format('pass --chunk-overlap 0..%s', chunk_tokens / 2);
    end if;
    if exists (select 1 from autoembed.targets r where r.relid = tbl and r.origin = 'enroll' and r.chunk_table is null) then
        raise exception 'autoembed: % is enrolled with an embedding column: a table has one kind of enrolment', tbl
            using errcode = 'object_in_use', hint = 'unenroll it first (select autoembed.unenroll(...))';
    end if;
    insert into autoembed.targets as t (relid, key_column, key_attnum, key_type, embedding_column, embedding_attnum,
                                        content_function, content_fn, queue, origin, chunk_table, chunk_tokens,
                                        chunk_overlap)
    values (tbl, key_column, key_attnum,
            (select format_type(a.atttypid, a.atttypmod) from pg_attribute a where a.attrelid = tbl and a.attnum = key_attnum),
            (select c.relname from pg_class c where c.oid = chunk_rel), null, content_function, fn, queue, 'enroll',
            chunk_rel, chunk_tokens, chunk_overlap)
    on conflict (chunk_table) where chunk_table is not null do update
        set key_column = excluded.key_column, key_attnum = excluded.key_attnum, key_type = excluded.key_type,
            embedding_column = excluded.embedding_column, content_function = excluded.content_function,
            content_fn = excluded.content_fn, queue = excluded.queue, chunk_tokens = excluded.chunk_tokens,
            chunk_overlap = excluded.chunk_overlap, updated_at = now()
    returning t.id into result;
    perform autoembed.install_input_function(result);
    return result;
end;
$$;

-- Queue jobs for the documents `keys` (exact key texts) of chunk target `target_id`: messages of up
-- to 200 keys, each naming the target by id (the drain trusts nothing else of it) and, for people
-- reading the queue, the chunk table ("embeddingColumn" and "chunkTable"). Internal: called by the
-- definer functions below only.
create or replace function autoembed.send_chunk_keys(target_id bigint, keys text[])
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
begin
    if coalesce(cardinality(keys), 0) = 0 then
        return 0;
    end if;
    select r.queue, autoembed.integer_key(ka.atttypid) as integer_keys,
           jsonb_build_object('schema', n.nspname, 'table', c.relname, 'contentFunction', r.content_function,
                              'embeddingColumn', ch.relname, 'chunkTable', ch.relname, 'target', r.id,
                              'keyColumn', ka.attname) as header
      into t
      from autoembed.targets r
      join pg_class c on c.oid = r.relid
      join pg_namespace n on n.oid = c.relnamespace
      join pg_class ch on ch.oid = r.chunk_table
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.id = target_id;
    if not found then
        raise warning 'autoembed: chunk target % is gone or lost its key column or chunk table: nothing enqueued; enroll the table again',
            target_id;
        return 0;
    end if;
    perform autoembed.send_jobs(t.queue, autoembed.key_messages(keys, t.integer_keys, t.header));
    return cardinality(keys);
end;
$$;
revoke execute on function autoembed.send_chunk_keys(bigint, text[]) from public;

-- Enrolment's backlog (and a re-queue): jobs for rows `keys` of a chunk target. The caller's role
-- must own the table; it reads the keys itself, with its own rights.
create or replace function autoembed.enqueue_chunk_keys(target_id bigint, keys anyarray)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform autoembed.require_owner((select r.relid from autoembed.targets r where r.id = target_id
                                     and r.chunk_table is not null), 'queue its rows');
    perform autoembed.require_key_type((select e.typelem from pg_type e where e.oid = pg_typeof(keys)));
    return autoembed.send_chunk_keys(target_id, autoembed.key_texts(keys));
end;
$$;

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
    perform autoembed.send_chunk_keys(TG_ARGV[0]::bigint, keys);
    return null;
end;
$$;

-- A chunk target as autoembed.install_chunk_triggers needs it (the registry is readable by nobody
-- but the project): its table, content function and key column's current name. SECURITY DEFINER;
-- the acting role must own the table (a superuser's event trigger, sql/008, does).
create or replace function autoembed.chunk_target_parts(target_id bigint,
                                                        out tbl regclass, out fn regprocedure, out key_column text)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    select r.relid::regclass, r.content_fn::regprocedure, ka.attname::text into tbl, fn, key_column
      from autoembed.targets r
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.id = target_id and r.chunk_table is not null;
    if tbl is not null then
        perform autoembed.require_owner(tbl, 'change its triggers');
    end if;
end;
$$;

-- (Re)create the enqueue triggers of chunk target `target_id` from the registry: the key column by
-- its current name (the row trigger names it), the content function by oid. Called by enrolment and,
-- after an ALTER TABLE of the table (a renamed key column), by the event trigger
-- autoembed.follow_renames (sql/008), run as the table's owner or a superuser.
create or replace function autoembed.install_chunk_triggers(target_id bigint)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    tbl regclass;
    fn regprocedure;
    key_column text;
    name text;
begin
    select p.tbl, p.fn, p.key_column into tbl, fn, key_column from autoembed.chunk_target_parts(target_id) p;
    if tbl is null then
        raise exception 'autoembed: % is not a chunk target with a key column', target_id
            using errcode = 'undefined_object';
    end if;
    for name in select tr.tgname from pg_trigger tr
                where tr.tgrelid = tbl and tr.tgname in ('autoembed_enqueue_insert', 'autoembed_chunk_changed',
                                                         'autoembed_enqueue_update') loop
        execute format('drop trigger %I on %s', name, tbl);
    end loop;
    execute format(
        'create trigger autoembed_enqueue_insert after insert on %s referencing new table as autoembed_new '
        'for each statement execute function autoembed.queue_chunk_jobs(%L)', tbl, target_id);
    -- The WHEN function compares the content function of OLD and NEW in the writer's context; one
    -- that raises for the row counts as a change (autoembed.install_changed_function).
    execute format(
        'create trigger autoembed_chunk_changed after update on %1$s for each row '
        'when (%2$s(old, new)) execute function autoembed.queue_chunk_jobs(%3$L, %4$L)',
        tbl, autoembed.install_changed_function(target_id)::oid::regproc, target_id, key_column);
    execute format(
        'create trigger autoembed_enqueue_update after update on %s '
        'for each statement execute function autoembed.queue_chunk_jobs(%L)', tbl, target_id);
    perform autoembed.install_replica_triggers(target_id);  -- rows arriving by logical replication (sql/005)
    perform autoembed.install_chunk_follow_triggers(tbl, key_column);  -- the chunks go with the rows (sql/015)
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

-- Enrol `tbl` as a chunk target: create (or check) its chunk table <table>_chunks with the given
-- vector type and size, register it, install its triggers and queue every row that
-- has no chunk set yet. Idempotent. Returns the rows queued. Run as the table's owner.
create or replace function autoembed.enroll_chunks(
    tbl regclass,
    content_function text,
    chunk_tokens integer,
    chunk_overlap integer default 0,
    key_column text default 'id',
    queue text default 'embedding_jobs',
    vector_type text default 'halfvec',
    dimensions integer default 1536,
    enqueue_backlog boolean default true
)
returns bigint
language plpgsql
as $$
#variable_conflict use_variable
declare
    fn regprocedure := autoembed.content_function(tbl, content_function);
    chunks regclass;
    target_id bigint;
    backlog bigint := 0;
begin
    chunks := autoembed.create_chunk_table(tbl, key_column, vector_type, dimensions);
    target_id := autoembed.register_chunk_target(tbl, content_function, fn, chunks, key_column, queue,
                                                 chunk_tokens, chunk_overlap);
    perform autoembed.uninstall_triggers(tbl);
    perform autoembed.install_chunk_triggers(target_id);
    if enqueue_backlog then
        execute format('select autoembed.enqueue_chunk_keys($1, array(select t.%1$I from %2$s t
                        where not exists (select 1 from %3$s c where c.%1$I = t.%1$I)))', key_column, tbl, chunks)
            into backlog
            using target_id;
    end if;
    return backlog;
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
