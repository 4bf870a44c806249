-- Chunk targets: an enrolled table whose documents are embedded as chunks into its chunk table
-- (sql/011) instead of a vector column. Registered in autoembed.targets with `chunk_table` (by oid),
-- `chunk_tokens`, `chunk_overlap` and no embedding column (sql/002); the drain resolves a message's
-- target id against this registry and writes only the registered chunk table (core/drain/chunked.py).
--
-- Triggers (the names of the column targets' own, so autoembed.unenroll / uninstall_triggers drop
-- them and a table has one kind of enrolment at a time):
--   autoembed_enqueue_insert  AFTER INSERT statement: every new row;
--   autoembed_enqueue_update  AFTER UPDATE statement, old and new transition tables: the rows whose
--                             input changed, compared set-wise in the writer's context.
-- No clearing trigger: a stale chunk set stays until the drain swaps the new one in whole, and
-- search_chunks(content_function => ...) skips it meanwhile. Deleted rows lose their chunks by the
-- chunk table's foreign key (on delete cascade).

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
    if fn is null then
        raise exception 'autoembed: content function % taking a row of % does not exist',
            quote_literal(content_function), tbl using errcode = 'undefined_function';
    end if;
    perform autoembed.check_content_function(tbl, fn);
    key_attnum := autoembed.check_key_column(tbl, key_column);
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
    perform autoembed.check_queue_name(queue);
    if not exists (select 1 from pgmq.meta m where m.queue_name = queue) then
        perform pgmq.create(queue);
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
    return autoembed.send_chunk_keys(target_id, autoembed.key_texts(keys));
end;
$$;

-- What the statement trigger of a chunk target needs, for the table `tbl` it fires on: the key
-- column and content function (current names). SECURITY DEFINER (the writer has no rights on the
-- registry); only inside a trigger. NULL when `arg` names no chunk target of `tbl`.
create or replace function autoembed.chunk_trigger_target(tbl oid, arg text,
                                                          out key_column text, out fn text)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if pg_trigger_depth() = 0 then
        raise exception 'autoembed.chunk_trigger_target is called by the triggers of chunk targets only'
            using errcode = 'insufficient_privilege';
    end if;
    if arg !~ '^[0-9]{1,18}$' then
        return;
    end if;
    select ka.attname::text, p.oid::regproc::text into key_column, fn
      from autoembed.targets r
      join pg_class c on c.oid = r.relid
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
      join pg_proc p on p.oid = r.content_fn and p.pronargs = 1 and p.proargtypes[0] = c.reltype
     where r.id = arg::bigint and r.relid = tbl and r.chunk_table is not null;
end;
$$;

-- Send the jobs a chunk target's trigger found. SECURITY DEFINER; only inside a trigger, for a
-- table the acting role may write and for that table's own chunk target.
create or replace function autoembed.queue_chunk_keys(tbl oid, target_id bigint, keys text[])
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if pg_trigger_depth() = 0 then
        raise exception 'autoembed.queue_chunk_keys is called by the triggers of chunk targets only'
            using errcode = 'insufficient_privilege';
    end if;
    if not has_table_privilege(autoembed.caller_role(), tbl, 'INSERT, UPDATE') then
        raise exception 'autoembed: role % may not write %: it cannot queue its jobs', autoembed.caller_role(), tbl::regclass
            using errcode = 'insufficient_privilege';
    end if;
    if exists (select 1 from autoembed.targets r where r.id = target_id and r.relid = tbl and r.chunk_table is not null) then
        perform autoembed.send_chunk_keys(target_id, keys);
    end if;
end;
$$;

-- AFTER INSERT/UPDATE statement trigger of a chunk target (argument: the target id). Runs as the
-- writer: it calls the content function (as a column target's WHEN clause does) to compare the
-- input of the old and new rows set-wise, so re-saves and changes to other columns queue nothing.
-- A key that changed counts as a new row. A broken registration warns and queues nothing: the
-- user's write goes on.
create or replace function autoembed.queue_chunk_jobs()
returns trigger
language plpgsql
as $$
declare
    t record;
    keys text[];
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return null;
    end if;
    t := autoembed.chunk_trigger_target(TG_RELID, TG_ARGV[0]);
    if t.fn is null then
        raise warning 'autoembed: the chunk trigger on % names no chunk target of this table (%): nothing enqueued; enroll the table again',
            TG_RELID::regclass, quote_nullable(TG_ARGV[0]);
        return null;
    end if;
    if TG_OP = 'INSERT' then
        execute format('select autoembed.key_texts(array(select n.%I from autoembed_new n))', t.key_column) into keys;
    else
        execute format(
            'select autoembed.key_texts(array(select n.%1$I from autoembed_new n left join autoembed_old o on o.%1$I = n.%1$I
                                              where o.%1$I is null or %2$s(o) is distinct from %2$s(n)))',
            t.key_column, t.fn) into keys;
    end if;
    if cardinality(keys) > 0 then
        perform autoembed.queue_chunk_keys(TG_RELID, TG_ARGV[0]::bigint, keys);
    end if;
    return null;
end;
$$;

-- Enrol `tbl` as a chunk target: create (or check) its chunk table <table>_chunks with the given
-- vector type and size, register it, install the two statement triggers and queue every row that
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
    execute format(
        'create trigger autoembed_enqueue_insert after insert on %s referencing new table as autoembed_new '
        'for each statement execute function autoembed.queue_chunk_jobs(%L)', tbl, target_id);
    execute format(
        'create trigger autoembed_enqueue_update after update on %s '
        'referencing old table as autoembed_old new table as autoembed_new '
        'for each statement execute function autoembed.queue_chunk_jobs(%L)', tbl, target_id);
    if enqueue_backlog then
        execute format('select autoembed.enqueue_chunk_keys($1, array(select t.%1$I from %2$s t
                        where not exists (select 1 from %3$s c where c.%1$I = t.%1$I)))', key_column, tbl, chunks)
            into backlog
            using target_id;
    end if;
    return backlog;
end;
$$;
