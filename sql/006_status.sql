-- Queue inspection: depth (messages) and the rows they cover, oldest message age, messages in
-- flight (claimed, visibility timeout running), messages waiting for a retry, dead letters.
-- (Dropped first when it predates the rows column: a function's result type cannot be replaced.)
do $$
begin
    if exists (select 1 from pg_proc where oid = to_regprocedure('autoembed.queue_status()')
               and not ('rows' = any(proargnames))) then
        drop view if exists autoembed.queues;
        drop function autoembed.queue_status();
    end if;
end
$$;

create or replace function autoembed.queue_status()
returns table (
    queue_name text,
    depth bigint,
    rows bigint,
    visible bigint,
    in_flight bigint,
    retrying bigint,
    oldest_age_seconds double precision,
    dead_letters bigint
)
language plpgsql
stable
-- Counts only: SECURITY DEFINER so that a dashboard role needs EXECUTE on this (revoked from
-- PUBLIC below), not the right to read the queues.
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    q record;
begin
    -- pgmq names a queue's table q_<lower(name)>: ask pgmq, so a mixed-case queue created before
    -- enrolment refused such names cannot break the status of every queue.
    for q in select m.queue_name from pgmq.meta m order by m.queue_name loop
        return query execute format(
            $s$select $1::text,
                      count(*),
                      coalesce(sum(autoembed.message_rows(message)), 0)::bigint,
                      count(*) filter (where vt <= clock_timestamp()),
                      count(*) filter (where vt > clock_timestamp() and read_ct > 0),
                      (select count(*) from autoembed.message_errors e where e.queue_name = $1),
                      coalesce(extract(epoch from clock_timestamp() - min(enqueued_at)), 0)::double precision,
                      (select count(*) from autoembed.dead_letters d where d.queue_name = $1)
               from pgmq.%I$s$, pgmq.format_table_name(q.queue_name, 'q'))
            using q.queue_name;
    end loop;
end;
$$;

revoke execute on function autoembed.queue_status() from public;

create or replace view autoembed.queues as select * from autoembed.queue_status();

create or replace view autoembed.dead_letter_jobs as
select queue_name, msg_id, message ->> 'schema' as schema_name, message ->> 'table' as table_name,
       message ->> 'id' as row_id, message ->> 'embeddingColumn' as embedding_column,
       attempts, error, failed_at, message
from autoembed.dead_letters;

-- Put dead letters back on their queue (after fixing the cause). Returns how many were re-queued.
create or replace function autoembed.retry_dead_letters(queue text default 'embedding_jobs', ids bigint[] default null)
returns bigint
language plpgsql
as $$
declare
    messages jsonb[];
begin
    with gone as (
        delete from autoembed.dead_letters d
        where d.queue_name = queue and (ids is null or d.msg_id = any(ids))
        returning d.message
    )
    select array(select message from gone) into messages;
    perform autoembed.send_jobs(queue, messages);
    return coalesce(cardinality(messages), 0);
end;
$$;
