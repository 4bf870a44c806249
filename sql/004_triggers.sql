-- Triggers that put embedding jobs into pgmq. They only enqueue (and clear the stale vector):
-- no HTTP, no model, nothing that can make the user's write fail or wait.
--
-- Trust: the writing role needs rights on its own table only. Everything that touches the queue,
-- the registry or embedding_state runs in SECURITY DEFINER functions owned by the project's owner,
-- with search_path pinned and every name qualified. Those functions never call a user's content
-- function: comparing the input of OLD and NEW happens in the writer's own context (a WHEN clause,
-- or util.queue_embeddings, which is not a definer), and the definer functions get only the table
-- (TG_RELID, or a table oid they check) and keys. A message they send is built from the registry.

-- Supabase's trigger function, same call shape: util.queue_embeddings(content_function,
-- embedding_column), plus optional key column (default 'id') and queue (default 'embedding_jobs').
-- Works as an AFTER row trigger (Supabase's guide: clearing costs a second row write) and as a
-- BEFORE row trigger (clearing happens in NEW, no second write). It runs as the writer (it calls
-- the content function), and enqueues through autoembed.queue_embedding_job: the writing role
-- needs USAGE on schema autoembed (and nothing else of the project). A bad trigger argument raises
-- a WARNING and the job is still enqueued without a target, so the drain dead-letters it with a
-- reason instead of the user's write failing.
create or replace function util.queue_embeddings()
returns trigger
language plpgsql
as $$
#variable_conflict use_variable
declare
    content_function text := TG_ARGV[0];
    embedding_column text := TG_ARGV[1];
    key_column text := coalesce(TG_ARGV[2], 'id');
    queue text := coalesce(TG_ARGV[3], 'embedding_jobs');
    fn regprocedure;
    has_column boolean;
    registered record;
begin
    -- The drain's own vector writes must not re-enqueue.
    if current_setting('autoembed.draining', true) = 'on' or TG_LEVEL <> 'ROW' then
        return case when TG_WHEN = 'BEFORE' then NEW else null end;
    end if;

    fn := autoembed.content_function(TG_RELID, content_function);
    has_column := exists (select 1 from autoembed.vector_column(TG_RELID, embedding_column));
    if fn is null or not has_column then
        -- Renamed since the target was registered from these arguments: follow the registry
        -- (column by attnum, function by oid), so the stale vector is still cleared.
        select r.* into registered
        from autoembed.registered_trigger_target(TG_RELID, content_function, embedding_column) r;
        if registered.fn is not null then
            fn := coalesce(fn, registered.fn);
            embedding_column := case when has_column then embedding_column else registered.embedding_column end;
            has_column := exists (select 1 from autoembed.vector_column(TG_RELID, embedding_column));
        end if;
    end if;
    if not exists (select 1 from pg_attribute a where a.attrelid = TG_RELID and a.attname = key_column
                   and a.attnum > 0 and not a.attisdropped) then
        -- The key column was renamed since the trigger was created: follow the registry (the key by
        -- attnum), so the application's write goes on and the row is still queued.
        key_column := autoembed.registered_trigger_key(TG_RELID, content_function, TG_ARGV[1]);
        if key_column is null then
            raise warning 'autoembed: % has no key column % (renamed?) and no registered target to follow: nothing enqueued; recreate the trigger with the key column''s name',
                TG_RELID::regclass, quote_literal(coalesce(TG_ARGV[2], 'id'));
            return case when TG_WHEN = 'BEFORE' then NEW else null end;
        end if;
    end if;
    if fn is null then
        raise warning 'autoembed: content function % (taking a row of %) does not exist; job enqueued, it will be dead-lettered',
            quote_literal(content_function), TG_RELID::regclass;
    end if;
    if not has_column then
        raise warning 'autoembed: % has no vector/halfvec column %; job enqueued, it will be dead-lettered',
            TG_RELID::regclass, quote_literal(embedding_column);
    end if;

    if TG_OP = 'UPDATE' and fn is not null then
        -- Re-saves and changes to columns the input does not use cost nothing. A content function
        -- that raises for this row must not fail the application's write: the row counts as
        -- changed (its vector is cleared, it is queued) and the drain dead-letters it with the error.
        begin
            if autoembed.input_of(fn, OLD) is not distinct from autoembed.input_of(fn, NEW) then
                return case when TG_WHEN = 'BEFORE' then NEW else null end;
            end if;
        exception when others then
            -- (unless only the vector changed: the clearing UPDATE of AFTER mode fires this again)
            if has_column and to_jsonb(OLD) - embedding_column = to_jsonb(NEW) - embedding_column then
                return case when TG_WHEN = 'BEFORE' then NEW else null end;
            end if;
        end;
    end if;

    -- Clear the now-stale vector so search never returns a vector of old content.
    if TG_OP = 'UPDATE' and has_column then
        if TG_WHEN = 'BEFORE' then
            NEW := autoembed.with_null_column(NEW, embedding_column);
        else
            execute format('update %I.%I set %I = null where %I = ($1).%I and %I is not null',
                           TG_TABLE_SCHEMA, TG_TABLE_NAME, embedding_column, key_column, key_column,
                           embedding_column)
                using NEW;
        end if;
    end if;

    if key_column = 'id' then
        -- Supabase's key, in static SQL: planned once per session and table (a dynamic statement is
        -- planned for every row).
        perform autoembed.queue_embedding_job(TG_RELID, content_function, fn, embedding_column, key_column, queue, NEW.id);
    else
        execute format('select autoembed.queue_embedding_job($1, $2, $3, $4, $5, $6, ($7).%I)', key_column)
            using TG_RELID, content_function, fn, embedding_column, key_column, queue, NEW;
    end if;
    return case when TG_WHEN = 'BEFORE' then NEW else null end;
end;
$$;

-- The target registered from util.queue_embeddings arguments (content function, column, as they
-- were given) under its current column name and function: what a trigger whose arguments went
-- stale by a rename still clears and queues for. No row when there is none.
create or replace function autoembed.registered_trigger_target(tbl oid, content_function text, embedding_column text)
returns table (embedding_column text, fn regprocedure)
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select a.attname::text, r.content_fn::regprocedure
    from autoembed.targets r
    join pg_attribute a on a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped
    where r.relid = registered_trigger_target.tbl and r.origin in ('trigger', 'migration')
      and r.content_function = registered_trigger_target.content_function
      and r.embedding_column = registered_trigger_target.embedding_column
      and exists (select 1 from pg_proc p where p.oid = r.content_fn)
$$;

-- The current name of the key column of the target registered from util.queue_embeddings
-- arguments (content function, column, as given): what a trigger whose key argument went stale by
-- a rename follows. NULL when there is none.
create or replace function autoembed.registered_trigger_key(tbl oid, content_function text, embedding_column text)
returns text
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select ka.attname::text
    from autoembed.targets r
    join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
    where r.relid = registered_trigger_key.tbl and r.origin in ('trigger', 'migration')
      and r.content_function = registered_trigger_key.content_function
      and r.embedding_column = registered_trigger_key.embedding_column
    limit 1
$$;

-- Enqueue the job of one row for util.queue_embeddings. SECURITY DEFINER: it never runs the
-- content function (`fn` is only compared with the registry). The target is registered from the
-- trigger's own arguments the first time (autoembed.register_target checks that such a trigger
-- exists on the table: its arguments were set by the table's owner); a caller must be inside a
-- trigger and its role must be allowed to write the table, so a role cannot queue jobs for a table
-- it may not write.
create or replace function autoembed.queue_embedding_job(tbl oid, content_function text, fn regprocedure,
                                                         embedding_column text, key_column text, queue text,
                                                         key anyelement)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    t record;
    target_id bigint;
    header jsonb;
    integer_key boolean;
begin
    if pg_trigger_depth() = 0 then
        raise exception 'autoembed.queue_embedding_job is called by util.queue_embeddings triggers only'
            using errcode = 'insufficient_privilege';
    end if;
    if not has_table_privilege(autoembed.caller_role(), tbl, 'INSERT, UPDATE') then
        raise exception 'autoembed: role % may not write %: it cannot queue its jobs', autoembed.caller_role(), tbl::regclass
            using errcode = 'insufficient_privilege';
    end if;
    -- (before anything converts the key: a key of the caller's own type would run its own cast here)
    perform autoembed.require_key_type(pg_typeof(key));
    -- One query per row (this runs for every row written): the target and its message header (the
    -- table's names from the catalog caches, as autoembed.live_target).
    select r.id, r.content_fn, r.queue, r.origin, ka.attname as key_name,
           jsonb_build_object('schema', o.object_names[1], 'table', o.object_names[2], 'contentFunction', r.content_function,
                              'embeddingColumn', a.attname, 'target', r.id, 'keyColumn', ka.attname) as header
    into t
    from autoembed.targets r
    join pg_attribute a on a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped
    cross join lateral pg_identify_object_as_address('pg_class'::regclass, r.relid, 0) o
    left join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
    where r.relid = tbl and a.attname = embedding_column;
    if found and t.content_fn = fn and t.queue = queue and t.key_name = key_column then
        target_id := t.id;
        header := t.header;
    elsif not found or t.origin = 'trigger' then
        begin
            target_id := autoembed.register_target(tbl, content_function, fn, embedding_column, key_column, queue,
                                                   'trigger');
        exception when others then
            raise warning 'autoembed: %; the job is enqueued without a target, it will be dead-lettered', sqlerrm;
        end;
    else
        raise warning 'autoembed: the trigger arguments (%, %, %, %) of % disagree with its % target %; the job is enqueued without a target, it will be dead-lettered',
            content_function, embedding_column, key_column, queue, tbl::regclass, t.origin, t.id;
    end if;
    if header is not null then
        null;
    elsif target_id is not null then
        header := (autoembed.live_target(target_id)).header;
    else
        header := jsonb_build_object('schema', (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace
                                                where c.oid = tbl),
                                     'table', (select c.relname from pg_class c where c.oid = tbl),
                                     'contentFunction', content_function, 'embeddingColumn', embedding_column,
                                     'keyColumn', key_column);
    end if;
    -- (a domain key arrives as its base type; an integer's text needs no pinned settings, and
    -- key_texts' pinned settings cost a sixth of this function)
    integer_key := pg_typeof(key) = any ('{int2,int4,int8}'::regtype[]);
    perform autoembed.send_jobs(queue, autoembed.key_messages(case when integer_key then array[key::text]
                                                                   else autoembed.key_texts(array[key]) end,
                                                              integer_key, header));
end;
$$;

-- Supabase's clear_column, without hstore: a BEFORE UPDATE row trigger that sets the column to NULL.
create or replace function util.clear_column()
returns trigger
language plpgsql
as $$
#variable_conflict use_variable
declare
    clear_column text := TG_ARGV[0];
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return NEW;
    end if;
    return pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(clear_column, null));
end;
$$;

-- BEFORE UPDATE row trigger function of tables enrolled by older versions (content function,
-- column): db init re-enrols them (sql/008); one that could not be clears on every update, which
-- is wasteful but never leaves a stale vector. Enrolled tables now get a function of their own
-- (autoembed.install_compare_function).
create or replace function autoembed.clear_on_change()
returns trigger
language plpgsql
as $$
begin
    return pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(TG_ARGV[1], null));
end;
$$;

-- A target as the functions that (re)create its triggers need it (the registry is readable by the
-- project's owner only), for both shapes: its table, content function (NULL when it is gone or no
-- longer takes a row of the table), embedding column's current name (NULL for a chunk target, or
-- when the column is gone), whether it is a chunk target, its key column's current name and its
-- origin. SECURITY DEFINER; the acting role must own the table (a superuser's event trigger,
-- sql/008, does). No row's values (all NULL) for an unknown target.
drop function if exists autoembed.replica_trigger_target(bigint);
drop function if exists autoembed.chunk_target_parts(bigint);
create or replace function autoembed.target_parts(target_id bigint, out tbl regclass, out fn regprocedure,
                                                  out embedding_column text, out chunked boolean,
                                                  out key_column text, out origin text)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    select r.relid::regclass, p.oid::regprocedure, ea.attname::text, r.chunk_table is not null, ka.attname::text, r.origin
      into tbl, fn, embedding_column, chunked, key_column, origin
      from autoembed.targets r
      join pg_class c on c.oid = r.relid
      left join pg_proc p on p.oid = r.content_fn and p.pronargs = 1 and p.proargtypes[0] = c.reltype
      left join pg_attribute ea on ea.attrelid = r.relid and ea.attnum = r.embedding_attnum and not ea.attisdropped
      left join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.id = target_id;
    if tbl is not null then
        perform autoembed.require_owner(tbl, 'change its triggers');
    end if;
end;
$$;

-- The generated function that compares the input of OLD and NEW of target `target_id`, for both
-- shapes, from one template: the content function of the two rows, compared inside an exception
-- block (a content function that raises for a row must not fail the application's write: the row
-- counts as changed, it is queued, and the drain dead-letters it with the function's error). It
-- runs as the writer and touches nothing of the project's.
--   * a column target: autoembed.clear_target_<id>(), its BEFORE UPDATE row trigger function
--     (autoembed_clear, whose WHEN clause fires it only for rows that hold a vector): `NEW.<column>
--     := null` when the input changed. A static field assignment is what makes a bulk UPDATE cheap
--     (jsonb_populate_record on a row holding a vector cost 3x more per row); measured
--     (bench/bench_write_path.py): as cheap as the comparison in the WHEN clause for a real
--     change, +20-40% for a re-save; a plpgsql function called from the WHEN clause cost 2x.
--   * a chunk target: autoembed.input_changed_<id>(old, new), the WHEN function of its row
--     triggers: true when the input changed.
-- With its content function gone (dropped, or no longer taking a row of the table) every update
-- counts as changed (never a stale vector); the drain dead-letters its jobs. Regenerated with the
-- target's triggers, and by a rename of the column or of the content function (the event trigger
-- in sql/008, when db init ran as a superuser); without that event trigger, an UPDATE after a
-- column rename fails loudly ("record new has no field") until the table is enrolled again, and
-- after a function rename every update clears and queues its row: neither leaves a stale vector.
-- SECURITY DEFINER (it creates a function in schema autoembed); only the table's owner may call it.
-- Returns the function.
drop function if exists autoembed.install_clear_function(bigint);
drop function if exists autoembed.install_changed_function(bigint);
create or replace function autoembed.install_compare_function(target_id bigint)
returns regprocedure
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    p record;
    name text;
    signature text;
    same text;
    changed text;
begin
    select * into p from autoembed.target_parts(target_id);
    if p.tbl is null then
        raise exception 'autoembed: no target %', target_id using errcode = 'undefined_object';
    end if;
    if p.chunked then
        name := format('autoembed.%I(%s, %s)', format('input_changed_%s', target_id), p.tbl, p.tbl);
        signature := format('autoembed.%I(old %s, new %s)', format('input_changed_%s', target_id), p.tbl, p.tbl);
        same := 'return false;';
        changed := 'return true;';
    elsif p.embedding_column is null then
        raise exception 'autoembed: target % has no embedding column', target_id using errcode = 'undefined_column';
    else
        name := format('autoembed.%I()', format('clear_target_%s', target_id));
        signature := name;
        same := 'return NEW;';
        changed := format('NEW.%I := null;  -- stale: search never returns a vector of old content
                return NEW;', p.embedding_column);
    end if;
    execute format($f$
        create or replace function %1$s returns %2$s language plpgsql as $b$
        begin
            %3$s
            %4$s
        end;
        $b$
    $f$, signature, case when p.chunked then 'boolean stable' else 'trigger' end,
       case when p.fn is not null then format($c$begin
                if %1$s(OLD) is not distinct from %1$s(NEW) then
                    %2$s
                end if;
            exception when others then
                null;  -- the content function raises for this row: changed (queued), never failed
            end;$c$, p.fn::oid::regproc, same) end,
       changed);
    return name::regprocedure;
end;
$$;

-- trigger_target (the target of an enrolled table's trigger) is folded into queue_embeddings_bulk:
-- as a function returning a record it cost as much as everything else a single-row INSERT's trigger
-- does.
do $$
begin
    drop function if exists autoembed.trigger_target(oid, integer, text);
end
$$;

-- AFTER INSERT/UPDATE statement trigger of enrolled tables, with the transition table
-- autoembed_new: one pgmq.send_batch per statement, one message per group of rows. SECURITY
-- DEFINER, and it reads only keys and the vector column: it calls no user function. Argument: the
-- target id.
create or replace function autoembed.queue_embeddings_bulk()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    c record;
    header jsonb;
    integer_keys boolean;
    keys text[];
    messages jsonb[];
    lo bigint;
    hi bigint;
    n bigint;
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return null;
    end if;
    -- The target the trigger names, which must be this table's. A trigger that names none, or a
    -- target that lost its key or vector column, warns: the user's write goes on, and nothing
    -- unregistered is enqueued.
    c := autoembed.live_target(case when TG_NARGS = 1 and TG_ARGV[0] ~ '^[0-9]{1,18}$' then TG_ARGV[0]::bigint end);
    if c.id is null or c.relid <> TG_RELID then
        raise warning 'autoembed: a trigger on % names no target of this table (% arguments, the first %): nothing enqueued; run autoembed db init, or enroll the table again',
            TG_RELID::regclass, TG_NARGS, quote_nullable(TG_ARGV[0]);
        return null;
    end if;
    if not c.key_ok or c.embedding_column is null then
        raise warning 'autoembed: target % of % lost its key or embedding column (or the key type changed): nothing enqueued; enroll the table again',
            c.id, TG_RELID::regclass;
        return null;
    end if;
    header := c.header;
    integer_keys := c.integer_keys;
    if TG_OP = 'INSERT' then
        if c.key_column = 'id' and integer_keys then
            -- The usual integer key `id` in static SQL, planned once per session and table (a dynamic
            -- statement is planned for every statement: a third of a single-row INSERT's trigger
            -- cost); an integer's text needs no pinned settings.
            keys := array(select k.id::text from autoembed_new k limit 2);
        else
            execute format('select autoembed.key_texts(array(select k.%I from autoembed_new k limit 2))', c.key_column)
                into keys;
        end if;
        if cardinality(keys) = 0 then
            return null;
        elsif cardinality(keys) = 1 then
            -- A one-row INSERT (the common single-row write): one message, nothing else built.
            messages := autoembed.key_messages(keys, integer_keys, header);
        elsif integer_keys then
            -- Consecutive integer keys (one identity/serial bulk load): ranges, without an array of keys.
            execute format('select min(k.%1$I), max(k.%1$I), count(*) from autoembed_new k', c.key_column)
                into lo, hi, n;
            if hi - lo + 1 = n then
                messages := autoembed.range_messages(lo, hi, header);
            end if;
        end if;
        if messages is null then
            execute format('select autoembed.key_texts(array(select k.%I from autoembed_new k))', c.key_column)
                into keys;
            messages := autoembed.key_messages(keys, integer_keys, header);
        end if;
    else
        -- Every updated row whose vector is NULL now: the BEFORE trigger cleared it (its WHEN clause
        -- saw the input change, in the writer's context), or the row had none yet (or the writer
        -- removed it). Only the new transition table is read: a re-save of a row that has its
        -- vector queues nothing; a re-save of a row still waiting for one queues it again, which
        -- the drain's content hash makes free.
        execute format('select autoembed.key_texts(array(select n.%I from autoembed_new n where n.%I is null))',
                       c.key_column, c.embedding_column)
            into keys;
        messages := autoembed.key_messages(keys, integer_keys, header);
    end if;
    perform autoembed.send_jobs(c.queue, messages);
    return null;
end;
$$;

-- Queue jobs for rows `keys` (exact key texts, see key_texts) of target `target_id`, whatever its
-- shape: messages of up to 200 keys (key_messages), each naming the target by id (the drain
-- trusts nothing else of it) and, for people reading the queue, Supabase's fields under current
-- names; a chunk target's name its chunk table ("embeddingColumn" and "chunkTable"). A chunk
-- target that lost its key column or chunk table warns and queues nothing. Internal: the definer
-- functions call it. Returns the rows queued.
drop function if exists autoembed.send_chunk_keys(bigint, text[]);
create or replace function autoembed.send_keys(target_id bigint, keys text[])
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    l record;
    chunks text;
    chunked boolean;
begin
    if coalesce(cardinality(keys), 0) = 0 then
        return 0;
    end if;
    select t.* into l from autoembed.live_target(target_id) t;
    select r.chunk_table is not null, ch.relname::text into chunked, chunks
      from autoembed.targets r left join pg_class ch on ch.oid = r.chunk_table where r.id = target_id;
    if l.id is null or (chunked and (chunks is null or l.key_column is null)) then
        raise warning 'autoembed: target % is gone or lost its key column or chunk table: nothing enqueued; enroll the table again',
            target_id;
        return 0;
    end if;
    perform autoembed.send_jobs(l.queue, autoembed.key_messages(keys, l.integer_keys, case when chunked
        then l.header || jsonb_build_object('embeddingColumn', chunks, 'chunkTable', chunks) else l.header end));
    return cardinality(keys);
end;
$$;
revoke execute on function autoembed.send_keys(bigint, text[]) from public;

-- AFTER DELETE (transition table autoembed_old) and AFTER TRUNCATE statement trigger of enrolled
-- tables: the embedding_state records of rows that are gone go too. SECURITY DEFINER (the writer
-- has no rights on embedding_state); reads only keys. No argument: it finds every target of the
-- table (a model migration's shadow column too).
create or replace function autoembed.forget_rows()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    c autoembed.target_catalog;
    keys text[];
begin
    if TG_OP = 'TRUNCATE' then
        delete from autoembed.embedding_state s
        where s.target_id in (select r.id from autoembed.targets r where r.relid = TG_RELID);
        return null;
    end if;
    -- Every target of the table (a model migration's shadow column too), each by its own key. As a
    -- row trigger (the replica trigger autoembed_forget_row: logical replication's apply worker
    -- fires row triggers only) the gone row is OLD.
    for c in select tc.* from autoembed.target_catalog tc join autoembed.targets r on r.id = tc.id
             where r.relid = TG_RELID and tc.key_type is not null and tc.embedding_column is not null loop
        if TG_LEVEL = 'ROW' then
            execute format('select autoembed.key_texts(array[($1).%I])', c.key_column) into keys using OLD;
        else
            execute format('select autoembed.key_texts(array(select o.%I from autoembed_old o))', c.key_column)
                into keys;
        end if;
        delete from autoembed.embedding_state s where s.target_id = c.id and s.row_id = any(keys);
    end loop;
    return null;
end;
$$;

-- Rows that arrive by logical replication. The apply worker of a subscription (and its initial
-- table copy) runs with session_replication_role = replica: it fires only row triggers enabled
-- REPLICA or ALWAYS, never the statement triggers that enqueue local writes. Enrolment therefore
-- installs row triggers enabled REPLICA beside them (autoembed.install_replica_triggers, sql/005),
-- which local writes never fire. This is their enqueue function, AFTER INSERT / UPDATE of one row
-- (argument: the target id), for both shapes: a column target's job (sent when the row's vector is
-- NULL: the trigger's WHEN clause), a chunk target's document. SECURITY DEFINER, and it reads only
-- the key of NEW: it calls no user function.
create or replace function autoembed.queue_replicated_row()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    c record;
    keys text[];
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return null;
    end if;
    c := autoembed.live_target(case when TG_NARGS = 1 and TG_ARGV[0] ~ '^[0-9]{1,18}$' then TG_ARGV[0]::bigint end);
    if c.id is null or c.relid <> TG_RELID or not c.key_ok then
        raise warning 'autoembed: a replica trigger on % names no target of this table with a key column (%): nothing enqueued; enroll the table again',
            TG_RELID::regclass, quote_nullable(TG_ARGV[0]);
        return null;
    end if;
    execute format('select autoembed.key_texts(array[($1).%I])', c.key_column) into keys using NEW;
    if c.embedding_column is null and not exists (select 1 from autoembed.targets r where r.id = c.id and r.chunk_table is not null) then
        raise warning 'autoembed: target % of % lost its embedding column: nothing enqueued; enroll the table again',
            c.id, TG_RELID::regclass;
    else
        perform autoembed.send_keys(c.id, keys);
    end if;
    return null;
end;
$$;

-- BEFORE UPDATE row trigger, enabled REPLICA, of a column target (argument: the target id): a
-- replicated UPDATE whose input did not change but that carries a vector in the enrolled column
-- (the publisher publishes its own embedding column, written by its own drain) keeps the
-- subscriber's vector: the enrolled column holds only what this database's drain wrote, under its
-- model, and the two drains never overwrite each other. (An input change clears the column as a
-- local write does: the clear trigger is enabled ALWAYS.) SECURITY DEFINER (the registry); calls
-- no user function.
create or replace function autoembed.keep_replicated_vector()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    col text;
begin
    select ea.attname::text into col
    from autoembed.targets r
    join pg_attribute ea on ea.attrelid = r.relid and ea.attnum = r.embedding_attnum and not ea.attisdropped
    where TG_NARGS = 1 and TG_ARGV[0] ~ '^[0-9]{1,18}$' and r.id = TG_ARGV[0]::bigint and r.relid = TG_RELID;
    if col is null then
        return NEW;
    end if;
    return jsonb_populate_record(NEW, jsonb_build_object(col, to_jsonb(OLD) -> col));
end;
$$;

-- AFTER DELETE and AFTER UPDATE (WHEN the key changed) row triggers, enabled REPLICA, of a chunk
-- target: the chunks of a row that replication deleted go with it, and follow a replicated key
-- change. Triggers of the parent do that for local writes (sql/015 install_chunk_follow_triggers:
-- a statement trigger for DELETE, which the apply worker never fires). Every chunk table of the
-- row (the live one, a model change's shadow and retired table: autoembed.chunk_tables_of; they
-- hang on no foreign key). Runs as the writer (the apply worker runs as the table's owner, who
-- owns its chunk tables).
create or replace function autoembed.cascade_replicated_chunks()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    chunk record;
begin
    -- The table's chunk tables (sql/015 chunk_tables_of: they hang on no foreign key), each by its
    -- key column, which has the parent's key column's name.
    for chunk in
        select t.tbl, (select p.key_column from autoembed.chunk_parent(t.tbl) p) as col
          from autoembed.chunk_tables_of(TG_RELID) t(tbl)
    loop
        if TG_OP = 'DELETE' then
            execute format('delete from %s c where c.%I = ($1).%I', chunk.tbl, chunk.col, chunk.col) using OLD;
        else
            execute format('update %s c set %I = ($2).%I where c.%I = ($1).%I', chunk.tbl, chunk.col, chunk.col,
                           chunk.col, chunk.col) using OLD, NEW;
        end if;
    end loop;
    return null;
end;
$$;
