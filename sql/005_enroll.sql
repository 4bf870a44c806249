-- Enrol a table: validate everything up front (clear errors naming the offending value), install
-- the project's own triggers (BEFORE clear + AFTER statement enqueue), and enqueue the backlog of
-- rows that have no vector yet. Idempotent: enrolling again replaces the triggers.
create or replace function autoembed.enroll(
    tbl regclass,
    content_function text,
    embedding_column text,
    key_column text default 'id',
    queue text default 'embedding_jobs',
    enqueue_backlog boolean default true
)
returns bigint
language plpgsql
as $$
declare
    fn regprocedure := autoembed.content_function(tbl, content_function);
    schema_name text;
    table_name text;
    backlog bigint := 0;
    messages jsonb[];
begin
    select n.nspname, c.relname into schema_name, table_name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = tbl;
    if fn is null then
        raise exception 'autoembed: content function % taking a row of % does not exist',
            quote_literal(content_function), tbl using errcode = 'undefined_function';
    end if;
    if not exists (select 1 from autoembed.vector_column(tbl, embedding_column)) then
        raise exception 'autoembed: % has no vector/halfvec column %', tbl, quote_literal(embedding_column)
            using errcode = 'undefined_column';
    end if;
    if not exists (select 1 from pg_attribute where attrelid = tbl and attname = key_column
                   and not attisdropped and attnum > 0) then
        raise exception 'autoembed: % has no key column %', tbl, quote_literal(key_column)
            using errcode = 'undefined_column';
    end if;
    if not exists (select 1 from pgmq.meta m where m.queue_name = queue) then
        perform pgmq.create(queue);
    end if;

    execute format('drop trigger if exists autoembed_clear on %s', tbl);
    execute format('drop trigger if exists autoembed_enqueue_insert on %s', tbl);
    execute format('drop trigger if exists autoembed_enqueue_update on %s', tbl);
    execute format(
        'create trigger autoembed_clear before update on %s for each row '
        'when (current_setting(''autoembed.draining'', true) is distinct from ''on'') '
        'execute function autoembed.clear_on_change(%L, %L)', tbl, content_function, embedding_column);
    execute format(
        'create trigger autoembed_enqueue_insert after insert on %s referencing new table as autoembed_new '
        'for each statement execute function autoembed.queue_embeddings_bulk(%L, %L, %L, %L)',
        tbl, content_function, embedding_column, key_column, queue);
    execute format(
        'create trigger autoembed_enqueue_update after update on %s '
        'referencing old table as autoembed_old new table as autoembed_new '
        'for each statement execute function autoembed.queue_embeddings_bulk(%L, %L, %L, %L)',
        tbl, content_function, embedding_column, key_column, queue);

    if enqueue_backlog then
        execute format(
            $q$select autoembed.job_messages(ids, $1, $2, $3, $4,
                                             case when $5 = 'id' then '{}'::jsonb
                                                  else jsonb_build_object('keyColumn', $5) end),
                      cardinality(ids)
               from (select array(select t.%1$I from %2$s t where t.%3$I is null) as ids) backlog$q$,
            key_column, tbl, embedding_column)
            into messages, backlog
            using schema_name, table_name, content_function, embedding_column, key_column;
    end if;
    if coalesce(cardinality(messages), 0) > 0 then
        perform pgmq.send_batch(queue, messages);
        perform pg_notify('autoembed', queue);
    end if;
    return backlog;
end;
$$;

create or replace function autoembed.unenroll(tbl regclass)
returns void
language plpgsql
as $$
begin
    execute format('drop trigger if exists autoembed_clear on %s', tbl);
    execute format('drop trigger if exists autoembed_enqueue_insert on %s', tbl);
    execute format('drop trigger if exists autoembed_enqueue_update on %s', tbl);
end;
$$;

-- Tables enrolled before the clear trigger had its WHEN clause: the drain's own UPDATE of the
-- vectors entered the trigger function once per row (measured: 40% of that UPDATE). Re-created
-- from Postgres's own definition with the clause added; a no-op once every trigger has it.
do $$
declare
    t record;
begin
    for t in select tr.tgrelid::regclass as tbl, pg_get_triggerdef(tr.oid) as def
             from pg_trigger tr
             where tr.tgname = 'autoembed_clear' and tr.tgqual is null
               and tr.tgfoid = 'autoembed.clear_on_change'::regproc
    loop
        execute format('drop trigger autoembed_clear on %s', t.tbl);
        execute replace(t.def, ' FOR EACH ROW EXECUTE ',
                        ' FOR EACH ROW WHEN (current_setting(''autoembed.draining'', true) is distinct from ''on'') EXECUTE ');
    end loop;
end;
$$;
