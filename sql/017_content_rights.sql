-- Content functions run with their table owner's rights (sql/005 install_input_function; targets
-- registered before that get their input function at the end of sql/019, with their write
-- functions, from the same generator).

-- The input function (sql/005 install_input_function) of content function `fn` on table `tbl`:
-- the one of the first target of the table registered with `fn`, or `fn` itself when it is such
-- an input function; NULL when none is registered (then nothing runs it: enrol the table). SECURITY DEFINER (the registry is
-- the project's); it returns a name only.
create or replace function autoembed.input_function(tbl oid, fn oid)
returns text
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select c.input_function
    from autoembed.target_catalog c join autoembed.targets r on r.id = c.id
    where r.relid = tbl and c.input_function is not null
      and (r.content_fn = fn
           or exists (select 1 from pg_proc p where p.oid = fn and p.pronamespace = 'autoembed'::regnamespace
                                                and c.input_function = format('autoembed.%I', p.proname)))
    order by r.id
    limit 1
$$;
