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
    return NEW;
end;
$$;

create or replace trigger remember_function_name before insert or update of content_fn on autoembed.targets
    for each row execute function autoembed.remember_function_name();

update autoembed.targets t set fn_schema = n.nspname, fn_name = p.proname
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where p.oid = t.content_fn and (t.fn_schema, t.fn_name) is distinct from (n.nspname::text, p.proname::text);

-- Re-create queue `queue` when it is gone (pgmq.drop_queue, or its table dropped): called by
-- autoembed.send_jobs before it sends (so the writer's statement goes on and its jobs are kept), by
-- the drain at its start and by `autoembed db init` (sql/022). The jobs the queue held went with
-- it: what they were for is queued again (autoembed.requeue_missing: every row of its targets
-- without a vector, every row of its chunk targets). Records the repair. Returns whether it had to.
create or replace function autoembed.restore_queue(queue text)
returns boolean
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    t record;
    queued bigint := 0;
    failed text[] := '{}';
begin
    if to_regclass('pgmq.' || quote_ident('q_' || lower(queue))) is not null then
        return false;
    end if;
    perform pgmq.create(queue);
    for t in select r.id, r.relid::regclass as tbl from autoembed.targets r where r.queue = queue order by r.id loop
        begin
            queued := queued + autoembed.requeue_missing(t.id);
        exception when others then
            failed := failed || format('target %s (%s): %s', t.id, t.tbl, sqlerrm);
        end;
    end loop;
    insert into autoembed.repairs (what) values (format(
        'queue %s was dropped: re-created; %s rows of its targets without a vector (every row of a chunk target) queued again%s',
        quote_literal(queue), queued,
        case when cardinality(failed) > 0
             then format(' (not queued: %s; a backfill fills them)', array_to_string(failed, '; ')) else '' end));
    raise warning 'autoembed: queue % was dropped: re-created, % rows queued again', quote_literal(queue), queued;
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
    select r.relid::regclass as tbl, ka.attname::text as key_column
      into c
      from autoembed.targets r
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
     where r.id = target_id
       and autoembed.key_type_ok(ka.atttypid);  -- (converted to text here: never by the owner's own cast)
    if not found then
        return 0;
    end if;
    execute format('select autoembed.key_texts(array(select t.%I from %s t))', c.key_column, c.tbl) into keys;
    return autoembed.send_keys(target_id, keys);
end;
$$;
revoke execute on function autoembed.requeue_rows(bigint) from public;

-- Queue what a lost job may have been for, of target `target_id`: a column target's rows whose
-- vector is NULL (a changed input clears it: a row with a vector has its current one), every row of
-- a chunk target (the drain compares each document's hash: unchanged ones cost nothing). Reads only
-- the key and vector columns. Internal: autoembed.restore_queue calls it.
create or replace function autoembed.requeue_missing(target_id bigint)
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
    select r.relid::regclass as tbl, ka.attname::text as key_column, ea.attname::text as col,
           r.chunk_table is not null as chunked
      into c
      from autoembed.targets r
      join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
      left join pg_attribute ea on ea.attrelid = r.relid and ea.attnum = r.embedding_attnum and not ea.attisdropped
     where r.id = target_id
       and autoembed.key_type_ok(ka.atttypid);
    if not found or c.chunked then
        return autoembed.requeue_rows(target_id);
    end if;
    if c.col is null then
        return 0;
    end if;
    execute format('select autoembed.key_texts(array(select t.%I from %s t where t.%I is null))', c.key_column, c.tbl, c.col)
       into keys;
    if coalesce(cardinality(keys), 0) = 0 then
        return 0;
    end if;
    return autoembed.send_keys(target_id, keys);
end;
$$;
revoke execute on function autoembed.requeue_missing(bigint) from public;

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
            perform autoembed.install_input_function(t.id);
            perform autoembed.install_target_triggers(t.id);
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

-- The event triggers of schema changes, one function (when db init ran as a superuser; without
-- them the drain's start does the same, core/targets/catalog.py):
--   autoembed_follow_drops (DROP TABLE / DROP SCHEMA): a dropped table's registrations (and so
--     their embedding_state records: sql/022's foreign key) and generated functions go too (a table
--     created later may get the same oid, and would otherwise inherit them);
--   autoembed_follow_functions (CREATE FUNCTION): targets whose content function is gone are bound
--     to the new one when it has the same schema, name and argument (rebind_content_functions);
-- (Renames need none for the state: embedding_state is keyed by target, sql/022.)
drop function if exists autoembed.forget_dropped_tables();
create or replace function autoembed.follow_schema_changes()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    d record;
begin
    if TG_EVENT = 'sql_drop' then
        for d in select o.objid, o.address_names from pg_event_trigger_dropped_objects() o
                 where o.classid = 'pg_class'::regclass and o.objsubid = 0 and o.object_type = 'table' loop
            delete from autoembed.chunk_tables ct where ct.chunk_table = d.objid or ct.parent = d.objid;
            delete from autoembed.targets r where r.relid = d.objid;
            perform autoembed.drop_generated_functions();
        end loop;
    elsif TG_TAG = 'CREATE FUNCTION' then
        if exists (select 1 from autoembed.targets r join pg_class c on c.oid = r.relid
                   where not exists (select 1 from pg_proc p where p.oid = r.content_fn and p.pronargs = 1
                                                             and p.proargtypes[0] = c.reltype)) then
            perform autoembed.rebind_content_functions();
        end if;
    end if;
end;
$$;

select autoembed.ensure_event_trigger('autoembed_follow_functions', 'ddl_command_end', '{CREATE FUNCTION}',
                                      'autoembed.follow_schema_changes()');
drop event trigger if exists autoembed_follow_state_names;  -- (an earlier version's: renames moved the state)
select autoembed.ensure_event_trigger('autoembed_follow_drops', 'sql_drop', '{DROP TABLE,DROP SCHEMA}',
                                      'autoembed.follow_schema_changes()');
-- (an earlier version's event trigger functions, one per event trigger)
drop function if exists autoembed.follow_state_names_event();
drop function if exists autoembed.follow_drops();
drop function if exists autoembed.follow_functions();


-- The triggers enrolment gives target `target_id`'s table (those a write needs to stay current).
-- SECURITY DEFINER: autoembed.broken_targets calls it for the drain's and the dashboard's roles,
-- which may not read the registry; it returns trigger names only.
create or replace function autoembed.expected_triggers(target_id bigint)
returns text[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select case when r.chunk_table is not null
                then array['autoembed_enqueue_insert', 'autoembed_chunk_changed', 'autoembed_enqueue_update',
                           'autoembed_chunks_delete', 'autoembed_chunks_key', 'autoembed_chunks_truncate']
                when r.origin = 'enroll' then array['autoembed_clear', 'autoembed_enqueue_insert', 'autoembed_enqueue_update']
                else array[]::text[] end
    from autoembed.targets r where r.id = target_id
$$;

-- Enrolled targets whose triggers were dropped (a trigger, or an object of ours they called, dropped
-- with CASCADE): re-created from the registry, and recorded. Run at the start of every drain (not
-- by an event trigger: enrolment itself drops and re-creates them). Returns the targets repaired.
create or replace function autoembed.restore_target_triggers()
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
    restored integer := 0;
begin
    for t in select distinct b.target_id, b.detail from autoembed.broken_targets b where b.problem = 'triggers missing'
              order by 1 loop
        begin
            perform autoembed.install_target_triggers(t.target_id);
            insert into autoembed.repairs (target_id, what) values (t.target_id, 'target ' || t.target_id || ': '
                || replace(t.detail, 'the next drain re-creates them when its role owns the table; else enroll the table again',
                           're-created'));
            restored := restored + 1;
        exception when others then
            raise warning 'autoembed: could not re-create the triggers of target %: %', t.target_id, sqlerrm;
        end;
    end loop;
    return restored;
end;
$$;
revoke execute on function autoembed.restore_target_triggers() from public;

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
    (case when t.origin = 'enroll' and exists (select 1 from pg_proc p where p.oid = t.content_fn)
               and exists (select 1 from unnest(autoembed.expected_triggers(t.id)) e(name)
                           where not exists (select 1 from pg_trigger tr where tr.tgrelid = t.relid and tr.tgname = e.name))
          then 'triggers missing' end,
     format('triggers of %s were dropped (%s): the next drain re-creates them when its role owns the table; else enroll the table again',
            c.oid::regclass, array_to_string(array(
                select e.name from unnest(autoembed.expected_triggers(t.id)) e(name)
                where not exists (select 1 from pg_trigger tr where tr.tgrelid = t.relid and tr.tgname = e.name)), ', '))),
    (case when to_regclass('pgmq.' || quote_ident('q_' || lower(t.queue))) is null then 'queue dropped' end,
     format('queue %s is gone: the next write or drain re-creates it', quote_literal(t.queue)))
) b(problem, detail)
where b.problem is not null;
revoke all on autoembed.broken_targets from public;

-- A chunk table goes with its parent's rows and follows its key. It used to hang on the parent by a
-- foreign key (ON DELETE CASCADE), which refused the application's TRUNCATE of the parent ("cannot
-- truncate a table referenced in a foreign key constraint": checked before any trigger fires, and
-- whether or not the key is NOT ENFORCED once the parent has triggers) and its key changes (no ON
-- UPDATE). Now autoembed.chunk_tables says whose chunk table it is, and three triggers on the parent
-- do what the foreign key did and more: an AFTER DELETE statement trigger deletes the gone rows'
-- chunks, an AFTER UPDATE row trigger (WHEN the key changed) moves a row's chunks to its new key,
-- an AFTER TRUNCATE trigger truncates the chunk tables.

-- Record `chunk` as the chunk table of `parent` (key column `key_column` of the chunk table). SECURITY
-- DEFINER (the registry); the caller must own the parent, and the chunk table must be its owner's.
create or replace function autoembed.register_chunk_table(chunk regclass, parent regclass, key_column text)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    attnum smallint;
begin
    perform autoembed.require_owner(parent, 'register its chunk table');
    if (select c.relowner from pg_class c where c.oid = chunk) <> (select c.relowner from pg_class c where c.oid = parent) then
        raise exception 'autoembed: % is not owned by the owner of %', chunk, parent using errcode = 'insufficient_privilege';
    end if;
    select a.attnum into attnum from pg_attribute a
     where a.attrelid = chunk and a.attname = key_column and a.attnum > 0 and not a.attisdropped;
    if attnum is null then
        raise exception 'autoembed: % has no column %', chunk, quote_ident(key_column) using errcode = 'undefined_column';
    end if;
    insert into autoembed.chunk_tables as ct (chunk_table, parent, key_attnum) values (chunk, parent, attnum)
    on conflict (chunk_table) do update set parent = excluded.parent, key_attnum = excluded.key_attnum;
end;
$$;

-- The chunk tables of `parent`: the live one, a model change's shadow and retired one (registered in
-- autoembed.chunk_tables, or made before it: a single-column foreign key to the parent), each of the
-- parent's owner and with a chunk table's columns.
create or replace function autoembed.chunk_tables_of(parent regclass)
returns setof regclass
language sql
stable
as $$
    select x.chunk::regclass from (
        select ct.chunk_table as chunk from autoembed.chunk_tables ct where ct.parent = chunk_tables_of.parent
        union
        select k.conrelid from pg_constraint k
         where k.contype = 'f' and k.confrelid = chunk_tables_of.parent and cardinality(k.conkey) = 1
    ) x
    join pg_class ch on ch.oid = x.chunk
    join pg_class pa on pa.oid = chunk_tables_of.parent
    where ch.relowner = pa.relowner
      and (select count(*) from pg_attribute c where c.attrelid = x.chunk and not c.attisdropped
             and c.attname in ('chunk_index', 'chunk', 'chunk_hash', 'source_hash')) = 4
    order by x.chunk
$$;

-- The triggers that keep the chunk tables of `parent` (key column `key_column`) with its rows (see
-- above), and their function: generated in the table's schema, owned by the table's owner and
-- SECURITY DEFINER as that owner, so a writer who may delete, update or truncate the table needs no
-- right on its chunk tables, and nothing runs with the project's rights. Called when a chunk table
-- is made (create_chunk_table) and by install_target_triggers (enrolment, the key-rename event trigger).
create or replace function autoembed.install_chunk_follow_triggers(parent regclass, key_column text)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    nsp text;
    owner regrole;
    fname text := format('autoembed_chunks_follow_%s', parent::oid);
    fn regprocedure;
    name text;
begin
    for name in select tr.tgname from pg_trigger tr
                where tr.tgrelid = parent and tr.tgname in ('autoembed_chunks_delete', 'autoembed_chunks_key',
                                                            'autoembed_chunks_truncate') loop
        execute format('drop trigger %I on %s', name, parent);
    end loop;
    select n.nspname::text, c.relowner::regrole into nsp, owner
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = parent;
    execute format($f$
        create or replace function %1$I.%2$I() returns trigger
        language plpgsql
        security definer
        set search_path = pg_catalog, pg_temp
        as $b$
        -- Generated by autoembed (install_chunk_follow_triggers): keeps the chunk tables of a table with its rows.
        declare
            chunks regclass;
            k text;
        begin
            for chunks in select autoembed.chunk_tables_of(TG_RELID) loop
                k := (select p.key_column from autoembed.chunk_parent(chunks) p);
                if TG_OP = 'TRUNCATE' then
                    execute format('truncate %%s', chunks);
                elsif TG_OP = 'DELETE' then
                    execute format('delete from %%s c using autoembed_old o where c.%%2$I = o.%%2$I', chunks, k);
                else
                    execute format('update %%s set %%2$I = ($2).%%2$I where %%2$I = ($1).%%2$I', chunks, k)
                        using OLD, NEW;
                end if;
            end loop;
            return null;
        end;
        $b$
    $f$, nsp, fname);
    fn := format('%I.%I()', nsp, fname)::regprocedure;
    if (select p.proowner from pg_proc p where p.oid = fn) <> owner then
        execute format('alter function %s owner to %s', fn, owner);
    end if;
    execute format('revoke all on function %s from public', fn);
    execute format(
        'create trigger autoembed_chunks_delete after delete on %s referencing old table as autoembed_old '
        'for each statement execute function %s', parent, fn);
    execute format(
        'create trigger autoembed_chunks_key after update on %1$s for each row '
        'when (old.%2$I is distinct from new.%2$I) execute function %3$s', parent, key_column, fn);
    execute format('create trigger autoembed_chunks_truncate after truncate on %s for each statement execute function %s',
                   parent, fn);
    -- Logical replication's apply worker fires TRUNCATE triggers enabled ALWAYS; a replicated
    -- DELETE or key change moves the chunks by the REPLICA row triggers of sql/005
    -- (autoembed_replica_delete / _rekey).
    perform autoembed.set_trigger_mode(parent, 'autoembed_chunks_truncate', 'always');
end;
$$;

-- Chunk tables made before: registered, the parent's triggers installed, then the foreign key
-- dropped (one step per chunk table: all or nothing).
do $$
declare
    k record;
begin
    for k in select c.conname, c.conrelid::regclass as chunks, c.confrelid::regclass as parent,
                    a.attname::text as col, pa.attname::text as parent_col
               from pg_constraint c
               join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
               join pg_attribute pa on pa.attrelid = c.confrelid and pa.attnum = c.confkey[1]
              where c.contype = 'f' and cardinality(c.conkey) = 1
                and c.conrelid in (select autoembed.chunk_tables_of(c.confrelid)) loop
        begin
            perform autoembed.register_chunk_table(k.chunks, k.parent, k.col);
            perform autoembed.install_chunk_follow_triggers(k.parent, k.parent_col);
            execute format('alter table %s drop constraint %I', k.chunks, k.conname);
        exception when others then
            raise warning 'autoembed: could not let % follow the rows of % (TRUNCATE and key changes of it stay refused): %; enroll the table again',
                k.chunks, k.parent, sqlerrm;
        end;
    end loop;
end;
$$;
