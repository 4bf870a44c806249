-- Tables registered by Supabase's `util.queue_embeddings` triggers get the state-cleanup triggers
-- of enrolled tables (autoembed_forget_delete / _truncate, sql/004 forget_rows): without them the
-- embedding_state records of deleted rows would stay forever. Their owner opted in by creating the
-- enqueue triggers; these two only delete the project's own records. Called by `autoembed db init`
-- and at the start of each drain (a target registers when its trigger first fires), so it waits at
-- most 2 s for the table's lock and tries again next time. Returns the tables it adopted.
create or replace function autoembed.adopt_state_cleanup()
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    tbl regclass;
    adopted integer := 0;
    was text := current_setting('lock_timeout');
begin
    -- (autoembed_state_key, sql/022: a table adopted before it was made gets it now)
    for tbl in select distinct r.relid::regclass from autoembed.targets r
               where r.origin = 'trigger'
                 and not (exists (select 1 from pg_trigger tr
                                  where tr.tgrelid = r.relid and tr.tgname = 'autoembed_forget_delete')
                          and (r.embedding_attnum is null or to_regprocedure('autoembed.move_state_key()') is null
                               or exists (select 1 from pg_trigger tr
                                          where tr.tgrelid = r.relid and tr.tgname = 'autoembed_state_key'))) loop
        begin
            perform set_config('lock_timeout', '2s', true);
            perform autoembed.install_forget_triggers(tbl);
            adopted := adopted + 1;
        exception when lock_not_available or insufficient_privilege or duplicate_object then
            raise notice 'autoembed: state cleanup of % not installed yet: %', tbl, sqlerrm;
        end;
    end loop;
    perform set_config('lock_timeout', was, true);
    return adopted;
end;
$$;

revoke execute on function autoembed.adopt_state_cleanup() from public;

select autoembed.adopt_state_cleanup();
