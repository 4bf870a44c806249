-- One bad row fails alone (README "What a bad row does").

-- The input of one row by `call` (a statement `select <content function>($1)::text` built by
-- core.health from the target's validated names), or the error it raises: the slow path of the
-- health scans (status, the Dagster checks, coverage), taken only when the one-statement scan
-- failed because the content function raises for some row. Runs with the caller's rights.
create or replace function autoembed.try_input(call text, r anyelement, out input text, out error text)
returns record
language plpgsql
stable
as $$
begin
    execute call into input using r;
exception when others then
    error := sqlerrm;
end;
$$;

-- Triggers installed before a content function raising for one row stopped failing the
-- application's write (their WHEN clause called the content function itself): installed again
-- from the registry, once. A table whose triggers cannot be changed by this role keeps its old
-- ones, with a warning (enroll it again as its owner).
select autoembed.upgrade_target_triggers(array(
    select distinct r.id
      from autoembed.targets r
      join pg_trigger tr on tr.tgrelid = r.relid
     where (tr.tgname = 'autoembed_clear' and r.chunk_table is null
            and exists (select 1 from pg_proc p where p.pronamespace = 'autoembed'::regnamespace
                        and p.proname = format('clear_target_%s', r.id))
            and pg_get_triggerdef(tr.oid) like '%(old.*) IS DISTINCT FROM %(new.*)%')
        or (tr.tgname = 'autoembed_chunk_changed' and r.chunk_table is not null
            and pg_get_triggerdef(tr.oid) like '%(old.*) IS DISTINCT FROM %(new.*)%')
     order by r.id), 'fail the write of a row whose content function raises');

-- Claims a drain gave back unused (the claims it still held when it stopped: rows the application
-- kept locked, messages no batch took up): not attempts. The safety net for messages claimed again
-- and again (core.drain.loop) counts the claims of drains that stopped without settling or giving
-- back, i.e. that died holding them. Rows of messages gone from the queue are pruned by the drain.
create table if not exists autoembed.message_returns (
    queue_name text   not null,
    msg_id     bigint not null,
    returned   integer not null default 0,
    primary key (queue_name, msg_id)
);
revoke all on autoembed.message_returns from public;
