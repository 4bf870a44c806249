-- Upgrade: tables enrolled before enrolment installed (all of) the replica triggers (sql/005
-- install_replica_triggers: rows arriving by logical replication) get them, with the rest of their
-- triggers re-created from the registry (no backlog). Idempotent: a no-op once done. A table whose
-- triggers cannot be re-created (db init run by a role that does not own it) keeps its triggers,
-- which serve local writes as before; the warning says what to run.
-- (A development version's chunk delete trigger function; its triggers go with it and are
-- re-created below.)
drop function if exists autoembed.delete_replicated_chunks() cascade;

select autoembed.upgrade_target_triggers(array(
    select r.id
      from pg_trigger tr
      join autoembed.targets r on r.id::text = (autoembed.trigger_args(tr.tgargs, tr.tgnargs))[1]
                              and r.relid = tr.tgrelid
     where tr.tgname = 'autoembed_enqueue_insert' and tr.tgnargs = 1
       and exists (select 1 from unnest(case when r.chunk_table is null
                                             then '{autoembed_replica_insert,autoembed_replica_update,autoembed_forget_row}'::text[]
                                             else '{autoembed_replica_insert,autoembed_replica_update,autoembed_replica_delete,autoembed_replica_rekey}'::text[] end) n
                   where not exists (select 1 from pg_trigger q where q.tgrelid = tr.tgrelid and q.tgname = n))
     order by r.id), 'do not queue rows replicated into it');
