-- Triggers that put embedding jobs into pgmq. They only enqueue (and clear the stale vector):
-- no HTTP, no model, nothing that can make the user's write fail or wait. A bad trigger argument
-- raises a WARNING and the job is still enqueued, so the drain dead-letters it with a reason
-- instead of the user's INSERT failing.

-- Supabase's trigger function, same call shape: util.queue_embeddings(content_function,
-- embedding_column), plus optional key column (default 'id') and queue (default 'embedding_jobs').
-- Works as an AFTER row trigger (Supabase's guide: clearing costs a second row write) and as a
-- BEFORE row trigger (clearing happens in NEW, no second write).
create or replace function util.queue_embeddings()
returns trigger
language plpgsql
as $$
declare
    content_function text := TG_ARGV[0];
    embedding_column text := TG_ARGV[1];
    key_column text := coalesce(TG_ARGV[2], 'id');
    queue text := coalesce(TG_ARGV[3], 'embedding_jobs');
    fn regprocedure;
    key_value jsonb;
    has_column boolean;
    message jsonb;
    checked text;
    seen boolean := false;
begin
    -- The drain's own vector writes must not re-enqueue.
    if current_setting('autoembed.draining', true) = 'on' or TG_LEVEL <> 'ROW' then
        return case when TG_WHEN = 'BEFORE' then NEW else null end;
    end if;

    -- An INSERT needs the content function and column only to warn about them: check (and warn,
    -- and notify) once per transaction and trigger arguments, not once per row. The mark is a
    -- transaction-local setting, so it also goes away with a rolled-back savepoint.
    if TG_OP = 'INSERT' then
        checked := 'autoembed.checked_' || md5(concat_ws(chr(31), TG_RELID::oid::text, content_function,
                                                         embedding_column, key_column, queue));
        seen := current_setting(checked, true) = 'on';
    end if;

    if not seen then
        fn := autoembed.content_function(TG_RELID, content_function);
        has_column := exists (select 1 from autoembed.vector_column(TG_RELID, embedding_column));
        if fn is null then
            raise warning 'autoembed: content function % (taking a row of %) does not exist; job enqueued, it will be dead-lettered',
                quote_literal(content_function), TG_RELID::regclass;
        end if;
        if not has_column then
            raise warning 'autoembed: % has no vector/halfvec column %; job enqueued, it will be dead-lettered',
                TG_RELID::regclass, quote_literal(embedding_column);
        end if;
    end if;

    if TG_OP = 'UPDATE' and fn is not null then
        -- Re-saves and changes to columns the input does not use cost nothing.
        if autoembed.input_of(fn, OLD) is not distinct from autoembed.input_of(fn, NEW) then
            return case when TG_WHEN = 'BEFORE' then NEW else null end;
        end if;
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
        key_value := to_jsonb(NEW.id);
    else
        execute format('select to_jsonb(($1).%I)', key_column) into key_value using NEW;
    end if;
    message := autoembed.job_message(key_value, TG_TABLE_SCHEMA, TG_TABLE_NAME, content_function, embedding_column);
    if key_column <> 'id' then
        message := message || jsonb_build_object('keyColumn', key_column);
    end if;
    perform pgmq.send(queue, message);

    if not seen then
        -- One notification per transaction is enough (it is delivered at commit).
        perform pg_notify('autoembed', queue);
        if TG_OP = 'INSERT' then
            perform set_config(checked, 'on', true);
        end if;
    end if;
    return case when TG_WHEN = 'BEFORE' then NEW else null end;
end;
$$;

-- Supabase's clear_column, without hstore: a BEFORE UPDATE row trigger that sets the column to NULL.
create or replace function util.clear_column()
returns trigger
language plpgsql
as $$
declare
    clear_column text := TG_ARGV[0];
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return NEW;
    end if;
    return autoembed.with_null_column(NEW, clear_column);
end;
$$;

-- BEFORE UPDATE row trigger of enrolled tables: clears the vector only when the input changed.
-- Arguments: content function, embedding column.
create or replace function autoembed.clear_on_change()
returns trigger
language plpgsql
as $$
declare
    fn regprocedure;
begin
    -- (enroll's WHEN clause skips this function for the drain's writes; this check covers a
    -- trigger created without it)
    if current_setting('autoembed.draining', true) = 'on' then
        return NEW;
    end if;
    fn := autoembed.content_function(TG_RELID, TG_ARGV[0]);
    if fn is null then
        return NEW;
    end if;
    if autoembed.input_of(fn, OLD) is distinct from autoembed.input_of(fn, NEW) then
        return autoembed.with_null_column(NEW, TG_ARGV[1]);
    end if;
    return NEW;
end;
$$;

-- AFTER INSERT/UPDATE statement trigger of enrolled tables with transition tables named
-- autoembed_new (and autoembed_old for UPDATE): one pgmq.send_batch per statement, one message per
-- group of rows (autoembed.job_messages).
-- Arguments: content function, embedding column, key column, queue.
create or replace function autoembed.queue_embeddings_bulk()
returns trigger
language plpgsql
as $$
declare
    content_function text := TG_ARGV[0];
    embedding_column text := TG_ARGV[1];
    key_column text := TG_ARGV[2];
    queue text := TG_ARGV[3];
    fn regprocedure;
    extra jsonb := '{}';
    changed text;
    messages jsonb[];
    first_keys jsonb[];
    lo bigint;
    hi bigint;
    n bigint;
begin
    if current_setting('autoembed.draining', true) = 'on' then
        return null;
    end if;
    if TG_OP = 'INSERT' then
        -- A one-row INSERT (the common single-row write): Supabase's message, nothing else built.
        if key_column = 'id' then
            first_keys := array(select to_jsonb(k.id) from autoembed_new k limit 2);
        else
            execute format('select array(select to_jsonb(k.%I) from autoembed_new k limit 2)', key_column)
                into first_keys;
        end if;
        if cardinality(first_keys) = 0 then
            return null;
        elsif cardinality(first_keys) = 1 then
            perform pgmq.send(queue, autoembed.job_message(first_keys[1], TG_TABLE_SCHEMA, TG_TABLE_NAME,
                                                           content_function, embedding_column) || extra);
            perform pg_notify('autoembed', queue);
            return null;
        end if;
        -- Integer keys: when the statement inserted consecutive keys (one identity/serial bulk
        -- load), the messages are ranges and the keys are read once, without an array of them.
        if exists (select 1 from pg_attribute where attrelid = TG_RELID and attname = key_column
                   and atttypid in ('int8'::regtype, 'int4'::regtype, 'int2'::regtype)) then
            if key_column = 'id' then
                select min(k.id), max(k.id), count(*) into lo, hi, n from autoembed_new k;
            else
                execute format('select min(k.%1$I), max(k.%1$I), count(*) from autoembed_new k', key_column)
                    into lo, hi, n;
            end if;
            if hi - lo + 1 = n then
                perform pgmq.send_batch(queue, autoembed.range_messages(lo, hi, TG_TABLE_SCHEMA, TG_TABLE_NAME,
                                                                        content_function, embedding_column, extra));
                perform pg_notify('autoembed', queue);
                return null;
            end if;
        end if;
    end if;
    if TG_OP = 'UPDATE' then
        fn := autoembed.content_function(TG_RELID, content_function);
        changed := case when fn is null then 'true' else
            -- Transition rows are plain records: cast them so an overloaded name (one
            -- embedding_input per table, Supabase's convention) resolves to this table's function.
            format('%1$s(o::%2$s) is distinct from %1$s(n::%2$s)', fn::oid::regproc, TG_RELID::regclass) end;
        execute format(
            $q$select autoembed.job_messages(
                 array(select n.%1$I from autoembed_new n join autoembed_old o on o.%1$I = n.%1$I where %2$s),
                 $1, $2, $3, $4, $5)$q$,
            key_column, changed)
            into messages
            using TG_TABLE_SCHEMA, TG_TABLE_NAME, content_function, embedding_column, extra;
    elsif key_column = 'id' then
        -- The common case in static SQL: planned once per session and table, where the dynamic
        -- statements are planned per statement.
        messages := autoembed.job_messages(array(select n.id from autoembed_new n), TG_TABLE_SCHEMA,
                                           TG_TABLE_NAME, content_function, embedding_column);
    else
        execute format(
            $q$select autoembed.job_messages(array(select n.%1$I from autoembed_new n), $1, $2, $3, $4, $5)$q$,
            key_column)
            into messages
            using TG_TABLE_SCHEMA, TG_TABLE_NAME, content_function, embedding_column, extra;
    end if;
    -- pgmq.send_batch rejects an empty array: a statement that changed no input sends nothing.
    if cardinality(messages) > 0 then
        perform pgmq.send_batch(queue, messages);
        perform pg_notify('autoembed', queue);
    end if;
    return null;
end;
$$;
