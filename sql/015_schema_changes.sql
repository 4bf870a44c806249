-- The schema changes under an enrolled table (README "When the schema changes"): a content
-- function dropped and re-created, a queue dropped, a table dropped, a key that is no longer
-- unique. What the project repairs by itself it records in autoembed.repairs; what it cannot, it
-- names in autoembed.broken_targets (read by `autoembed status`, the Dagster checks and the drain).

-- What the project repaired by itself, newest last (shown by `autoembed status`).
create table if not exists autoembed.repairs (
    id          bigint      generated always as identity primary key,
    target_id   bigint,     -- NULL for a queue
    what        text        not null,
    repaired_at timestamptz not null default now()
);
revoke all on autoembed.repairs from public;

-- The content function's schema and name, kept while it exists: a function dropped and created
-- again (`drop function f(t) cascade; create function f(t) ...`) is found again by them.
alter table autoembed.targets add column if not exists fn_schema text;
alter table autoembed.targets add column if not exists fn_name text;


-- embedding_state records a column target's vectors under its table's and column's names; the
-- registry keeps the names they are recorded under, so a rename (of the schema, the table or the
-- column) moves the records with it instead of leaving every row looking stale (a backfill then
-- re-sent unchanged rows). Filled at registration; autoembed.follow_state_names moves them.
alter table autoembed.targets add column if not exists state_schema text;
alter table autoembed.targets add column if not exists state_table text;
alter table autoembed.targets add column if not exists state_column text;

create or replace function autoembed.remember_function_name()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    named record;
begin
    select n.nspname::text as nsp, p.proname::text as name into named
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace where p.oid = NEW.content_fn;
    if found then
        NEW.fn_schema := named.nsp;
        NEW.fn_name := named.name;
    end if;
    if TG_OP = 'INSERT' and NEW.embedding_attnum is not null then
        select n.nspname::text, c.relname::text, a.attname::text into NEW.state_schema, NEW.state_table, NEW.state_column
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
          join pg_attribute a on a.attrelid = c.oid and a.attnum = NEW.embedding_attnum
         where c.oid = NEW.relid;
    end if;
    return NEW;
end;
$$;

create or replace trigger remember_function_name before insert or update of content_fn on autoembed.targets
    for each row execute function autoembed.remember_function_name();

update autoembed.targets t set fn_schema = n.nspname, fn_name = p.proname
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where p.oid = t.content_fn and (t.fn_schema, t.fn_name) is distinct from (n.nspname::text, p.proname::text);

update autoembed.targets r set state_schema = n.nspname, state_table = c.relname, state_column = a.attname
  from pg_class c join pg_namespace n on n.oid = c.relnamespace, pg_attribute a
 where c.oid = r.relid and a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped
   and r.state_schema is null;

-- Move the embedding_state records of column targets whose schema, table or column was renamed to
-- the current names (records already under those names that the move would collide with are
-- leftovers of a dropped object of that name: replaced). Inside a model migration's transaction
-- (autoembed.migrating) it does nothing: the migration moves its records itself (a promotion's or
-- rollback's recorded names that went stale then name no records, and are simply re-recorded the
-- next time). Run by the event trigger
-- autoembed_follow_state_names (ALTER TABLE / ALTER SCHEMA, when db init ran as a superuser) and at
-- the start of every drain. Returns the targets whose records moved.
create or replace function autoembed.follow_state_names()
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
    moved integer := 0;
begin
    if current_setting('autoembed.migrating', true) = 'on' then
        return 0;
    end if;
    for t in select r.id, n.nspname::text as nsp, c.relname::text as rel, a.attname::text as col,
                    r.state_schema, r.state_table, r.state_column
               from autoembed.targets r
               join pg_class c on c.oid = r.relid
               join pg_namespace n on n.oid = c.relnamespace
               join pg_attribute a on a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped
              where (n.nspname::text, c.relname::text, a.attname::text)
                    is distinct from (r.state_schema, r.state_table, r.state_column)
              order by r.id loop
        if t.state_schema is not null then
            delete from autoembed.embedding_state s
             where s.schema_name = t.nsp and s.table_name = t.rel and s.embedding_column = t.col
               and exists (select 1 from autoembed.embedding_state o
                            where o.schema_name = t.state_schema and o.table_name = t.state_table
                              and o.embedding_column = t.state_column and o.row_id = s.row_id);
            update autoembed.embedding_state s set schema_name = t.nsp, table_name = t.rel, embedding_column = t.col
             where s.schema_name = t.state_schema and s.table_name = t.state_table
               and s.embedding_column = t.state_column;
            moved := moved + 1;
        end if;
        update autoembed.targets set state_schema = t.nsp, state_table = t.rel, state_column = t.col where id = t.id;
    end loop;
    return moved;
end;
$$;
revoke execute on function autoembed.follow_state_names() from public;

create or replace function autoembed.follow_state_names_event()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform autoembed.follow_state_names();
end;
$$;

-- Re-create queue `queue` when it is gone (pgmq.drop_queue, or its table dropped): called by
-- autoembed.send_jobs before it sends (so the writer's statement goes on and its jobs are kept) and
-- by the drain at its start. Records the repair. Returns whether it had to.
create or replace function autoembed.restore_queue(queue text)
returns boolean
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if to_regclass('pgmq.' || quote_ident('q_' || lower(queue))) is not null then
        return false;
    end if;
    perform pgmq.create(queue);
    insert into autoembed.repairs (what) values (format(
        'queue %s was dropped: re-created (jobs it held were lost with it; rows still without a vector are filled by a backfill)',
        quote_literal(queue)));
    raise warning 'autoembed: queue % was dropped: re-created', quote_literal(queue);
    return true;
end;
$$;
revoke execute on function autoembed.restore_queue(text) from public;

-- Queue every row of target `target_id` (column or chunk target): after its content function was
-- re-bound, the drain re-embeds the rows whose input changed (the content hash makes the others
-- free). Reads only the key column. Internal: the event trigger and the drain's start call it.
create or replace function autoembed.requeue_rows(target_id bigint)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set row_security = off  -- (a table's policies never run with our rights: such a table is refused)
as $$
#variable_conflict use_variable
declare
    c record;
    keys text[];
begin
    select r.relid::regclass as tbl, ka.attname::text as key_column, r.chunk_table is not null as chunked
      into c
      from autoembed.targets r
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.id = target_id;
    if not found then
        return 0;
    end if;
    execute format('select autoembed.key_texts(array(select t.%I from %s t))', c.key_column, c.tbl) into keys;
    if c.chunked then
        return autoembed.send_chunk_keys(target_id, keys);
    end if;
    perform autoembed.send_jobs(l.queue, autoembed.key_messages(keys, l.integer_keys, l.header))
       from autoembed.live_target(target_id) l;
    return coalesce(cardinality(keys), 0);
end;
$$;
revoke execute on function autoembed.requeue_rows(bigint) from public;

-- (Re)install the triggers of target `target_id` from the registry, whatever its shape: the one
-- place a repair re-creates triggers (enrolment's own functions do the work: install_triggers,
-- install_chunk_triggers). A target registered by util.queue_embeddings triggers (or a migration's
-- shadow) has no triggers of ours: its trigger names the function by name.
create or replace function autoembed.reinstall_target_triggers(target_id bigint)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    t record;
begin
    select r.relid::regclass as tbl, r.content_fn::regprocedure as fn, r.origin, r.chunk_table, ea.attname::text as col
      into t
      from autoembed.targets r
      left join pg_attribute ea on ea.attrelid = r.relid and ea.attnum = r.embedding_attnum and not ea.attisdropped
     where r.id = target_id;
    if t.chunk_table is not null then
        perform autoembed.install_chunk_triggers(target_id);
    elsif t.origin = 'enroll' then
        perform autoembed.install_triggers(t.tbl, target_id, t.fn, t.col);
    end if;
end;
$$;

-- Targets whose content function is gone (dropped, with its cascade taking the trigger that
-- compared inputs) are bound to the function of the same schema, name and argument when there is
-- one again: their triggers are re-created and every row is queued (what the input may have
-- changed is re-embedded). Run by the event trigger autoembed_follow_functions at CREATE FUNCTION
-- (when db init ran as a superuser) and at the start of every drain; a target it cannot bind (no
-- such function yet, a VOLATILE one, or a caller who may not create the table's triggers) stays in
-- autoembed.broken_targets. Returns the targets bound.
create or replace function autoembed.rebind_content_functions()
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
    fn regprocedure;
    bound integer := 0;
begin
    for t in select r.id, r.relid, r.fn_schema, r.fn_name, c.reltype
               from autoembed.targets r join pg_class c on c.oid = r.relid
              where r.fn_name is not null
                and not exists (select 1 from pg_proc p where p.oid = r.content_fn and p.pronargs = 1
                                                          and p.proargtypes[0] = c.reltype)
              order by r.id loop
        fn := to_regprocedure(format('%I.%I(%s)', t.fn_schema, t.fn_name, t.reltype::regtype));
        continue when fn is null;
        begin
            perform autoembed.check_content_function(t.relid, fn);
            update autoembed.targets set content_fn = fn, updated_at = now() where id = t.id;
            perform autoembed.reinstall_target_triggers(t.id);
            perform autoembed.requeue_rows(t.id);
            insert into autoembed.repairs (target_id, what) values (t.id, format(
                'content function of %s was dropped and created again: bound to %s, triggers re-created, every row queued',
                t.relid::regclass, fn));
            bound := bound + 1;
        exception when others then
            raise warning 'autoembed: could not bind target % of % to %: %', t.id, t.relid::regclass, fn, sqlerrm;
        end;
    end loop;
    return bound;
end;
$$;
revoke execute on function autoembed.rebind_content_functions() from public;

-- A dropped table: its registrations, embedding_state records and generated clear functions go
-- too (a table created later may get the same oid, and would otherwise inherit them).
create or replace function autoembed.forget_dropped_tables()
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    d record;
    gone bigint;
begin
    for d in select o.objid, o.address_names from pg_event_trigger_dropped_objects() o
             where o.classid = 'pg_class'::regclass and o.objsubid = 0 and o.object_type = 'table' loop
        for gone in delete from autoembed.targets r where r.relid = d.objid returning r.id loop
            execute format('drop function if exists autoembed.%I()', format('clear_target_%s', gone));
        end loop;
        delete from autoembed.embedding_state s
         where s.schema_name = d.address_names[1] and s.table_name = d.address_names[2];
    end loop;
end;
$$;

create or replace function autoembed.follow_drops()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform autoembed.forget_dropped_tables();
end;
$$;

create or replace function autoembed.follow_functions()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if exists (select 1 from autoembed.targets r join pg_class c on c.oid = r.relid
               where not exists (select 1 from pg_proc p where p.oid = r.content_fn and p.pronargs = 1
                                                         and p.proargtypes[0] = c.reltype)) then
        perform autoembed.rebind_content_functions();
    end if;
end;
$$;

do $$
begin
    if (select r.rolsuper from pg_roles r where r.rolname = current_user) then
        if not exists (select 1 from pg_event_trigger e where e.evtname = 'autoembed_follow_functions') then
            create event trigger autoembed_follow_functions on ddl_command_end when tag in ('CREATE FUNCTION')
                execute function autoembed.follow_functions();
        end if;
        if not exists (select 1 from pg_event_trigger e where e.evtname = 'autoembed_follow_state_names') then
            create event trigger autoembed_follow_state_names on ddl_command_end when tag in ('ALTER TABLE', 'ALTER SCHEMA')
                execute function autoembed.follow_state_names_event();
        end if;
        if not exists (select 1 from pg_event_trigger e where e.evtname = 'autoembed_follow_drops') then
            create event trigger autoembed_follow_drops on sql_drop when tag in ('DROP TABLE', 'DROP SCHEMA')
                execute function autoembed.follow_drops();
        end if;
    end if;
end;
$$;

-- Registered targets that cannot be kept current as they stand, one row per problem, with what to
-- do. `autoembed status`, the Dagster checks and the drain read it; a target named here is never
-- reported clean.
create or replace view autoembed.broken_targets as
select t.id as target_id, n.nspname::text as schema_name, c.relname::text as table_name,
       coalesce(ch.relname::text, ea.attname::text, t.embedding_column) as vectors,
       b.problem, b.detail
from autoembed.targets t
join pg_class c on c.oid = t.relid
join pg_namespace n on n.oid = c.relnamespace
left join pg_attribute ea on ea.attrelid = t.relid and ea.attnum = t.embedding_attnum and not ea.attisdropped
left join pg_class ch on ch.oid = t.chunk_table
cross join lateral (values
    (case when not exists (select 1 from pg_proc p where p.oid = t.content_fn and p.pronargs = 1
                                                   and p.proargtypes[0] = c.reltype)
          then 'content function dropped' end,
     format('%s(%s) is gone: create it again (same name and argument) and the target follows it, or enroll the table again',
            coalesce(quote_ident(t.fn_schema) || '.' || quote_ident(t.fn_name), t.content_function),
            c.oid::regclass)),
    (case when not exists (select 1 from pg_index i where i.indrelid = t.relid and i.indisunique and i.indisvalid
                                                      and i.indnkeyatts = 1 and i.indkey[0] = t.key_attnum
                                                      and i.indpred is null)
          then 'key not unique' end,
     format('%s has no primary key or unique index on its key column %s any more: a job whose key matches several rows is dead-lettered; make the key unique again',
            c.oid::regclass, coalesce((select quote_ident(a.attname) from pg_attribute a
                                       where a.attrelid = t.relid and a.attnum = t.key_attnum and not a.attisdropped),
                                      t.key_column))),
    (case when t.origin = 'enroll'
               and not exists (select 1 from pg_trigger tr where tr.tgrelid = t.relid and tr.tgname = 'autoembed_enqueue_insert')
          then 'triggers missing' end,
     format('the enqueue triggers of %s were dropped: enroll the table again', c.oid::regclass)),
    (case when to_regclass('pgmq.' || quote_ident('q_' || lower(t.queue))) is null then 'queue dropped' end,
     format('queue %s is gone: the next write or drain re-creates it', quote_literal(t.queue)))
) b(problem, detail)
where b.problem is not null;
revoke all on autoembed.broken_targets from public;

-- A chunk table follows its parent's key: a key changed by the application moves the document's
-- chunk set with it (ON UPDATE CASCADE; before, the foreign key refused the application's UPDATE).
-- Chunk tables made before get the rule here (a chunk-shaped table whose single-column foreign key
-- references a registered table).
do $$
declare
    k record;
begin
    for k in select c.conname, c.conrelid::regclass as chunks, c.confrelid::regclass as parent,
                    a.attname::text as col, pa.attname::text as parent_col
               from pg_constraint c
               join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
               join pg_attribute pa on pa.attrelid = c.confrelid and pa.attnum = c.confkey[1]
              where c.contype = 'f' and cardinality(c.conkey) = 1 and c.confupdtype <> 'c'
                and exists (select 1 from autoembed.targets r where r.relid = c.confrelid and r.chunk_table is not null)
                and (select count(*) from pg_attribute x where x.attrelid = c.conrelid and not x.attisdropped
                       and x.attname in ('chunk_index', 'chunk', 'chunk_hash', 'source_hash')) = 4 loop
        begin
            execute format('alter table %s drop constraint %I, add constraint %I foreign key (%I) references %s (%I) '
                           'on delete cascade on update cascade', k.chunks, k.conname, k.conname, k.col, k.parent,
                           k.parent_col);
        exception when others then
            raise warning 'autoembed: could not let % follow key changes of %: %', k.chunks, k.parent, sqlerrm;
        end;
    end loop;
end;
$$;
