-- Upgrade: tables enrolled before enrolment installed the replica triggers (sql/005
-- install_replica_triggers: rows arriving by logical replication) get them, with the rest of their
-- triggers re-created from the registry (no backlog). Idempotent: a no-op once done. A table whose
-- triggers cannot be re-created (db init run by a role that does not own it) keeps its triggers,
-- which serve local writes as before; the warning says what to run.
do $$
declare
    t record;
begin
    for t in
        select tr.tgrelid::regclass as tbl, r.id, r.chunk_table is not null as chunked,
               r.content_fn::regprocedure as fn, ea.attname::text as col
        from pg_trigger tr
        join autoembed.targets r on r.id::text = (autoembed.trigger_args(tr.tgargs, tr.tgnargs))[1]
                                and r.relid = tr.tgrelid
        left join pg_attribute ea on ea.attrelid = r.relid and ea.attnum = r.embedding_attnum and not ea.attisdropped
        where tr.tgname = 'autoembed_enqueue_insert' and tr.tgnargs = 1
          and not exists (select 1 from pg_trigger q where q.tgrelid = tr.tgrelid and q.tgname = 'autoembed_replica_insert')
    loop
        begin
            if t.chunked then
                perform autoembed.install_chunk_triggers(t.id);
            else
                perform autoembed.install_triggers(t.tbl, t.id, t.fn, t.col);
            end if;
        exception when others then
            raise warning 'autoembed: could not add the replica triggers of %: %; rows replicated into it are not queued until it is enrolled again (autoembed enroll)',
                t.tbl, sqlerrm;
        end;
    end loop;
end;
$$;
