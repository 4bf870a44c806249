-- Upgrade of databases set up before the target registry. Idempotent: a no-op once done.

-- Registrations of dropped tables (their oid could be reused by another table).
delete from autoembed.targets t where not exists (select 1 from pg_class c where c.oid = t.relid);

-- Tables enrolled by an older version: their triggers pass names (content function, column, key,
-- queue), not a target, and the clear trigger has no input comparison in its WHEN clause. Enrolled
-- again from those arguments (or from the registry), without a backlog. A table that can no longer
-- be enrolled (say, its key is not unique) keeps its old triggers, which then enqueue nothing: the
-- warning says why.
do $$
declare
    t record;
    reg record;
begin
    for t in
        select tr.tgrelid::regclass as tbl,
               (select autoembed.trigger_args(q.tgargs, q.tgnargs) from pg_trigger q
                where q.tgrelid = tr.tgrelid and q.tgnargs = 4
                  and q.tgfoid = 'autoembed.queue_embeddings_bulk()'::regprocedure limit 1) as args
        from pg_trigger tr
        where tr.tgfoid in ('autoembed.queue_embeddings_bulk()'::regprocedure, 'autoembed.clear_on_change()'::regprocedure)
          and tr.tgnargs <> 1
        group by tr.tgrelid
    loop
        begin
            if t.args is not null then
                perform autoembed.enroll(t.tbl, t.args[1], t.args[2], t.args[3], t.args[4], false);
            else
                select c.* into reg from autoembed.target_catalog c join autoembed.targets r on r.id = c.id
                where r.relid = t.tbl and r.origin = 'enroll' limit 1;
                if reg.id is null then
                    raise exception 'no registered target and no enqueue trigger to enrol it from';
                end if;
                perform autoembed.enroll(t.tbl, reg.content_function, reg.embedding_column, reg.key_column, reg.queue, false);
            end if;
        exception when others then
            raise warning 'autoembed: could not upgrade the triggers of %: %; they enqueue nothing until it is enrolled again',
                t.tbl, sqlerrm;
        end;
    end loop;
end;
$$;

-- Renames of an enrolled embedding column: the generated clear function names the column (see
-- autoembed.install_compare_function), so an ALTER TABLE regenerates the clear functions of the
-- table's targets (and a chunk target's triggers and chunk tables follow its key column). Event triggers need a superuser: when db init runs as another role there is
-- none, and an UPDATE after such a rename fails loudly until the table is enrolled again.
create or replace function autoembed.follow_renames()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    target_id bigint;
    chunked boolean;
begin
    if current_setting('autoembed.enabling_triggers', true) = 'on' then
        return;  -- autoembed enabling its own triggers (autoembed.set_trigger_mode, sql/005)
    end if;
    -- A column target's generated clear function names its column; a chunk target's row trigger and
    -- chunk tables name its key column.
    -- Both name the content function too (a renamed one: ALTER FUNCTION).
    -- Every target of an altered table or content function gets its input function again (an owner
    -- change gives it to the new owner; a renamed content function is called by its new name),
    -- and so does a target whose input or write function (sql/019) someone altered (its owner may:
    -- say, to SECURITY INVOKER): sql/005 install_input_function, whose own ALTER FUNCTION is not followed.
    if current_setting('autoembed.installing_input', true) = 'on' then
        return;
    end if;
    for target_id in
        select distinct r.id from pg_event_trigger_ddl_commands() d
        join autoembed.targets r on (d.classid = 'pg_class'::regclass and r.relid = d.objid)
                                 or (d.classid = 'pg_proc'::regclass and r.content_fn = d.objid)
                                 or (d.classid = 'pg_proc'::regclass and exists (
                                         select 1 from pg_proc w where w.oid = d.objid
                                            and w.pronamespace = 'autoembed'::regnamespace
                                            and w.proname in (format('input_%s', r.id), format('write_%s', r.id))))
    loop
        begin
            perform autoembed.install_input_function(target_id);
        exception when others then
            raise warning 'autoembed: could not re-create the input function of target %: %; run autoembed db init',
                target_id, sqlerrm;
        end;
    end loop;
    for target_id, chunked in
        select distinct r.id, r.chunk_table is not null from pg_event_trigger_ddl_commands() d
        join autoembed.targets r on (d.classid = 'pg_class'::regclass and r.relid = d.objid)
                                 or (d.classid = 'pg_proc'::regclass and r.content_fn = d.objid)
        where r.chunk_table is not null
               or exists (select 1 from pg_proc p where p.pronamespace = 'autoembed'::regnamespace
                                                    and p.proname = format('clear_target_%s', r.id))
    loop
        begin
            if chunked then
                perform autoembed.follow_chunk_key_column(target_id);
                perform autoembed.install_target_triggers(target_id);
            else
                perform autoembed.install_compare_function(target_id);
            end if;
        exception when others then
            raise warning 'autoembed: could not follow the change of the table of target %: %; enroll it again',
                target_id, sqlerrm;
        end;
    end loop;
end;
$$;

-- Event trigger `name` on `event` for the command tags `tags`, executing `fn`: created when db init
-- runs as a superuser (event triggers need one; without them the drain's start repairs what they
-- would have followed, sql/015), and re-created when an earlier version's differs (its tags or its
-- function). Used here and by sql/015.
create or replace function autoembed.ensure_event_trigger(name text, event text, tags text[], fn regprocedure)
returns void
language plpgsql
as $$
#variable_conflict use_variable
begin
    if not (select r.rolsuper from pg_roles r where r.rolname = current_user) then
        return;
    end if;
    if exists (select 1 from pg_event_trigger e where e.evtname = name
                  and (e.evtevent <> event or e.evtfoid <> fn
                       or (select array_agg(t order by t) from unnest(e.evttags) t)
                          is distinct from (select array_agg(upper(t) order by upper(t)) from unnest(tags) t))) then
        execute format('drop event trigger %I', name);
    end if;
    if not exists (select 1 from pg_event_trigger e where e.evtname = name) then
        execute format('create event trigger %I on %I when tag in (%s) execute function %s', name, event,
                       (select string_agg(quote_literal(t), ', ') from unnest(tags) t), fn);
    end if;
end;
$$;

select autoembed.ensure_event_trigger('autoembed_follow_renames', 'ddl_command_end', '{ALTER TABLE,ALTER FUNCTION}',
                                      'autoembed.follow_renames()');
