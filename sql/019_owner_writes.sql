-- Vectors are written with their table owner's rights: the drain's (and the backfill's, and a model
-- migration's) writes to an owner's table (a target's vector column, a chunk target's chunk
-- tables) go through autoembed.write_<target>, a generated SECURITY DEFINER function owned by the
-- table's owner, so the triggers the owner put on those tables run as the owner, never as the drain
-- (a superuser on the zero-config default). Generated with the target's input function
-- (sql/005 install_input_function calls install_write_function): at registration, at `db init`
-- for older targets (below), after a promotion swapped targets, after re-binding and after an
-- ALTER TABLE of the table (an owner change).
--
-- The callers (core/drain/outcome.py write_as_owner: the drain, backfills, model migrations) ask
-- autoembed.owner_writer which function writes a table (one check path for both shapes), call it,
-- and put back their search_path in the same statement: an owner's trigger may change session
-- settings (SET ROLE and SET SESSION AUTHORIZATION are refused inside a SECURITY DEFINER function,
-- so its rights stay the owner's), and the caller's next statements must resolve names as before.
-- The stale-write guard stays the caller's: it locks the rows and checks their input hash before
-- it writes (core/drain/settle.py, core/targets/chunks.py).

-- Vectors arrive as arrays of the vector type (binary, in the column's own type): only pgvector's
-- vector and halfvec are accepted, never a type of the caller's (its casts would run as the owner).
create or replace function autoembed.vector_array_types()
returns oid[]
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select array(select t.typarray from pg_type t join pg_extension e on e.extnamespace = t.typnamespace
                  where e.extname = 'vector' and t.typname in ('vector', 'halfvec'))
$$;

-- The parent table and key column of chunk table `chunk_table` (autoembed.chunk_parent, which reads
-- the registry: SECURITY DEFINER, it returns names only).
create or replace function autoembed.chunk_table_key(chunk_table regclass, out parent oid, out key_column text)
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select p.parent::oid, p.key_column from autoembed.chunk_parent(chunk_table) p
$$;

-- The search_path the owner's triggers run with while a write function writes (set local before
-- its INSERT/UPDATE/DELETE, put back when the function returns): the session's default, as when
-- the drain wrote the table itself, so a trigger naming its tables unqualified still finds them.
-- (Only the owner's code runs under it, with the owner's rights.)
create or replace function autoembed.set_trigger_search_path()
returns void
language sql
volatile
as $$  -- (no SET clause: it would put the path back on return; every name is qualified)
    select null::void from (select pg_catalog.set_config('search_path', s.reset_val, true)
                            from pg_catalog.pg_settings s where s.name operator(pg_catalog.=) 'search_path') x
$$;

-- The one body of a vector column write: set column `embedding_column` of `tbl` for the rows whose
-- key (column `key_column`) is one of `keys`, to the vector at the same position. Runs with the
-- rights of its caller: the target's write function (the owner), or a caller that owns the table.
drop function if exists autoembed.write_vector_rows(oid, smallint, smallint, text[], anyarray);
create or replace function autoembed.write_vector_rows(tbl regclass, embedding_column text, key_column text,
                                                       keys text[], vectors anyarray)
returns bigint
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    col text;
    key text;
    key_type text;
    written bigint;
begin
    if pg_typeof(vectors)::oid <> all (autoembed.vector_array_types()) then
        raise exception 'autoembed: vectors must be an array of vector or halfvec, not %', pg_typeof(vectors)
            using errcode = 'datatype_mismatch';
    end if;
    select e.attname, k.attname, format_type(k.atttypid, k.atttypmod) into col, key, key_type
      from pg_attribute e, pg_attribute k
     where e.attrelid = tbl and e.attname = embedding_column and e.attnum > 0 and not e.attisdropped
       and k.attrelid = tbl and k.attname = key_column and k.attnum > 0 and not k.attisdropped;
    if col is null then
        raise exception 'autoembed: % has no column % or key column % any more', tbl, embedding_column, key_column
            using errcode = 'undefined_column';
    end if;
    perform autoembed.set_trigger_search_path();
    -- The key array lets the planner probe the key index instead of hashing the whole table.
    execute format('update %1$s t set %2$I = v.v from unnest($1, $2) v(k, v)
                    where t.%3$I = v.k::%4$s and t.%3$I = any($1::%4$s[])', tbl, col, key, key_type)
        using keys, vectors;
    get diagnostics written = row_count;
    return written;
end;
$$;

-- The one body of a chunk set write into `chunk_table` (a chunk table of the target's parent: the
-- live one, or a model change's shadow): the chunk sets of documents `keys` are replaced by the
-- rows (ck key, ci index, ct text, ch chunk hash, csh source hash), each row's vector taken from
-- (vh hash, vv vector) or, for a hash not given, from a row of the table with that hash under
-- `model` (read before the old sets are deleted: they may hold it). A document with a hash found
-- in neither is not written (returned in `lost`: it waits for the next round). Returns the new rows
-- (`written`, by ctid). When the table's primary key is deferrable (chunk tables made since), the
-- new rows go in FIRST, with the key check deferred, and the old ones stay until
-- autoembed.drop_old_chunk_rows (after the caller's stale-write guard): meanwhile no row an
-- application's DELETE or key change of the parent reaches (through the parent's triggers, which
-- delete or move its chunks) is locked by the write, so they never wait for it. Otherwise the old
-- sets are deleted first (`deleted`). Runs with the rights of its caller (as write_vector_rows).
create or replace function autoembed.write_chunk_rows(chunk_table regclass, keys text[], ck text[], ci integer[],
                                                      ct text[], ch bytea[], csh bytea[], vh bytea[], vv anyarray,
                                                      model text, splitter text,
                                                      out deleted bigint, out inserted bigint, out lost text[],
                                                      out written tid[])
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    key text;
    key_type text;
    vector_array oid;
    rh bytea[];
    rv vv%type;
    kept text[];
    pk text;
begin
    select p.key_column, format_type(a.atttypid, a.atttypmod) into key, key_type
      from autoembed.chunk_table_key(chunk_table) p
      join pg_attribute a on a.attrelid = chunk_table and a.attname = p.key_column and not a.attisdropped;
    select t.typarray into vector_array from pg_attribute a join pg_type t on t.oid = a.atttypid
     where a.attrelid = chunk_table and a.attname = 'embedding' and not a.attisdropped;
    if key is null or vector_array is null then
        raise exception 'autoembed: % is not a chunk table', chunk_table using errcode = 'wrong_object_type';
    end if;
    if pg_typeof(vv)::oid <> vector_array or pg_typeof(vv)::oid <> all (autoembed.vector_array_types()) then
        raise exception 'autoembed: vectors for % must be an array of its embedding type, not %', chunk_table,
            pg_typeof(vv) using errcode = 'datatype_mismatch';
    end if;
    -- Vectors reused by hash, read before the old sets are deleted.
    execute format('select array_agg(x.h), array_agg(x.v)
                    from (select distinct on (c.chunk_hash) c.chunk_hash as h, c.embedding as v from %s c
                          where c.model = $1 and c.chunk_hash = any($2) order by c.chunk_hash) x', chunk_table)
        into rh, rv
        using model, array(select h from unnest(ch) h except select h from unnest(vh) h);
    rh := coalesce(rh, '{}');
    lost := array(select distinct s.k from unnest(ck, ch) s(k, h)
                  where not s.h = any(vh) and not s.h = any(rh) order by 1);
    kept := array(select k from unnest(keys) k where not k = any(lost));
    pk := autoembed.deferrable_chunk_key(chunk_table);
    perform autoembed.set_trigger_search_path();
    deleted := 0;
    if pk is not null then
        execute format('set constraints %s deferred', pk);
    else
        execute format('delete from %1$s c where c.%2$I = any($1::%3$s[])', chunk_table, key, key_type) using kept;
        get diagnostics deleted = row_count;
    end if;
    execute format(
        'with n as (
             insert into %1$s (%2$I, chunk_index, chunk, embedding, chunk_hash, source_hash, model, splitter)
             select s.k::%3$s, s.i, s.c, v.v, s.h, s.sh, $8, $9
             from unnest($1, $2, $3, $4, $5) s(k, i, c, h, sh)
             join (select distinct on (u.h) u.h, u.v
                   from (select * from unnest($6, $7) union all select * from unnest($10, $11)) u(h, v)) v
               on v.h = s.h
             where s.k = any($12)
             returning ctid)
         select array_agg(n.ctid) from n', chunk_table, key, key_type)
        into written
        using ck, ci, ct, ch, csh, vh, vv, model, splitter, rh, coalesce(rv, vv[0:-1]), kept;
    written := coalesce(written, '{}');
    inserted := cardinality(written);
end;
$$;

-- The primary key of chunk table `chunk_table` as SET CONSTRAINTS names it, when it is deferrable
-- (chunk tables made since sql/019, and older ones db init converted); else NULL.
create or replace function autoembed.deferrable_chunk_key(chunk_table regclass)
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select format('%I.%I', n.nspname, k.conname) from pg_constraint k join pg_namespace n on n.oid = k.connamespace
    where k.conrelid = chunk_table and k.contype = 'p' and k.condeferrable
$$;

-- The second half of a chunk set write (autoembed.write_chunk_rows): delete the old rows of the
-- documents `keys` (every row of theirs but the new ones, `keep`), then check the deferred key.
-- Returns the rows deleted. Runs with the rights of its caller.
create or replace function autoembed.drop_old_chunk_rows(chunk_table regclass, keys text[], keep tid[])
returns bigint
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    key text;
    key_type text;
    pk text := autoembed.deferrable_chunk_key(chunk_table);
    deleted bigint;
begin
    select p.key_column, format_type(a.atttypid, a.atttypmod) into key, key_type
      from autoembed.chunk_table_key(chunk_table) p
      join pg_attribute a on a.attrelid = chunk_table and a.attname = p.key_column and not a.attisdropped;
    if key is null then
        raise exception 'autoembed: % is not a chunk table', chunk_table using errcode = 'wrong_object_type';
    end if;
    perform autoembed.set_trigger_search_path();
    execute format('delete from %1$s c where c.%2$I = any($1::%3$s[]) and not c.ctid = any($2)', chunk_table, key,
                   key_type) using keys, keep;
    get diagnostics deleted = row_count;
    if pk is not null then
        execute format('set constraints %s immediate', pk);
    end if;
    return deleted;
end;
$$;

-- The writers of a target's shape: the bodies above, each with the columns that name its target
-- among its arguments (a column target: the table, its vector column and key column; a chunk
-- target: the chunk table, whose parent is the target's table).
create or replace function autoembed.writer_bodies(chunked boolean, out body text, out target_args text)
returns setof record
language sql
immutable
as $$
    select * from (values ('write_vector_rows', '$1, $2, $3')) v where not chunked
    union all
    select * from (values ('write_chunk_rows', '$1, null, null'), ('drop_old_chunk_rows', '$1, null, null')) v where chunked
$$;

-- The checks of a write function of target `target_id` (below), run as the table's owner before
-- it writes: `rel` (with `embedding_column` and `key_column` for a column target) is what the
-- target writes (the table's vector column; a chunk table of the target's table), and the caller
-- (autoembed.caller_role: the session's role) may write it itself and is the project's writer: it
-- may write autoembed.embedding_state (the drain's role, README "Roles and grants"; an
-- application's role may not), so the owner's triggers never run on an application's behalf.
-- SECURITY DEFINER (the registry); raises, or returns nothing.
create or replace function autoembed.check_writer(target_id bigint, rel regclass, embedding_column text, key_column text)
returns void
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    r autoembed.targets;
    may boolean;
begin
    select * into r from autoembed.targets t where t.id = target_id;
    if r.chunk_table is not null then
        if (select p.parent from autoembed.chunk_table_key(rel) p) is distinct from r.relid then
            raise exception using message = format('autoembed: %s is not a chunk table of %s', rel, r.relid::regclass),
                                  errcode = 'insufficient_privilege';
        end if;
        may := has_table_privilege(autoembed.caller_role(), rel, 'INSERT')
               and has_table_privilege(autoembed.caller_role(), rel, 'DELETE');
    else
        if r.relid is distinct from rel
           or (select a.attnum from pg_attribute a where a.attrelid = rel and a.attname = embedding_column
                                                     and not a.attisdropped) is distinct from r.embedding_attnum
           or (select a.attnum from pg_attribute a where a.attrelid = rel and a.attname = key_column
                                                     and not a.attisdropped) is distinct from r.key_attnum then
            raise exception using message = format('autoembed: %s.%s keyed by %s is not what target %s writes',
                                                   rel, quote_ident(embedding_column), quote_ident(key_column), target_id),
                                  errcode = 'insufficient_privilege';
        end if;
        may := has_column_privilege(autoembed.caller_role(), r.relid, r.embedding_attnum, 'UPDATE');
    end if;
    if not (may and has_table_privilege(autoembed.caller_role(), 'autoembed.embedding_state', 'INSERT')) then
        raise exception using message = format(
            'autoembed: role %s may not write %s through its owner: it writes vectors only for the drain''s role',
            autoembed.caller_role(), r.relid::regclass), errcode = 'insufficient_privilege';
    end if;
end;
$$;

-- The write functions of target `target_id`, autoembed.write_<id> (see the top of this file): one
-- overload per body of its shape (autoembed.writer_bodies), with the body's own arguments and
-- result, that runs the body with the owner's rights after autoembed.check_writer. Made by the
-- generator of input_<id> (sql/005 install_owner_function, which refuses to run as anyone but the
-- owner), by install_input_function, with the input function; write functions of targets that
-- are gone, and overloads a target's shape does not have, are dropped here. Anyone may call them
-- (the drain's least-privilege role too: README "Roles and grants"); they check their caller
-- themselves. Needs a superuser (to give the functions to the table's owner).
create or replace function autoembed.install_write_function(target_id bigint)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    name text := format('write_%s', target_id);
    chunked boolean;
    w record;
    gone text;
begin
    select r.chunk_table is not null into chunked from autoembed.targets r where r.id = target_id;
    for gone in select p.oid::regprocedure::text from pg_proc p
                where p.pronamespace = 'autoembed'::regnamespace and p.proname ~ '^write_[0-9]+$'
                  and (not exists (select 1 from autoembed.targets r where r.id = substr(p.proname, 7)::bigint)
                       or (p.proname = name and pg_get_function_identity_arguments(p.oid) not in (
                               select pg_get_function_identity_arguments(format('autoembed.%I', b.body)::regproc)
                               from autoembed.writer_bodies(chunked) b))) loop
        execute format('drop function %s', gone);
    end loop;
    if chunked is null then
        return null;
    end if;
    for w in select b.target_args, f.oid, f.proname, f.pronargs, f.prorettype = 'record'::regtype as outs,
                    array(select quote_ident(a.n) from unnest(f.proargnames, f.proargmodes) a(n, m) where a.m = 'o') as outs_names
               from autoembed.writer_bodies(chunked) b
               join pg_proc f on f.oid = format('autoembed.%I', b.body)::regproc loop
        perform autoembed.install_owner_function(target_id, name, pg_get_function_arguments(w.oid),
            pg_get_function_identity_arguments(w.oid), pg_get_function_result(w.oid), 'volatile', null,
            format('perform autoembed.check_writer(%s, %s);
            %s autoembed.%I(%s);', target_id, w.target_args,
                   case when w.outs then format('select * into %s from', array_to_string(w.outs_names, ', '))
                        else 'return' end,
                   w.proname, (select string_agg('$' || i, ', ') from generate_series(1, w.pronargs) i)),
            'writes vectors');
    end loop;
    return format('autoembed.%I', name);
end;
$$;
revoke execute on function autoembed.install_write_function(bigint) from public;

-- The write function of target `target_id` that runs body `body`, when it is intact (SECURITY
-- DEFINER, owned by the table's owner, search_path pinned); else NULL.
create or replace function autoembed.intact_writer(target_id bigint, body text)
returns text
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select format('autoembed.%I', w.proname)
    from autoembed.targets r
    join pg_class c on c.oid = r.relid
    join pg_proc w on w.pronamespace = 'autoembed'::regnamespace and w.proname = format('write_%s', r.id)
    join pg_proc b on b.oid = format('autoembed.%I', body)::regproc
    where r.id = target_id
      and pg_get_function_identity_arguments(w.oid) = pg_get_function_identity_arguments(b.oid)
      and w.prosecdef and w.proowner = c.relowner
      and 'search_path=pg_catalog, pg_temp' = any(w.proconfig)
$$;

-- The target that writes `rel` (see owner_writer), by the registry; NULL when none does.
drop function if exists autoembed.write_function(oid, smallint);
drop function if exists autoembed.write_vectors(regclass, text, text, text[], anyarray);
drop function if exists autoembed.write_chunks(regclass, text[], text[], integer[], text[], bytea[], bytea[], bytea[], anyarray, text, text);
drop function if exists autoembed.drop_old_chunks(regclass, text[], tid[]);
create or replace function autoembed.write_function(rel regclass, embedding_column text, key_column text)
returns bigint
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select r.id
    from autoembed.targets r
    where case when $2 is null  -- ($2, $3: the arguments; targets has columns of these names)
               then r.chunk_table is not null and r.relid = (select k.parent from autoembed.chunk_table_key($1) k)
               else r.relid = $1 and r.chunk_table is null
                    and r.embedding_attnum = (select a.attnum from pg_attribute a where a.attrelid = $1
                                                 and a.attname = $2 and not a.attisdropped)
                    and r.key_attnum = (select a.attnum from pg_attribute a where a.attrelid = $1
                                           and a.attname = $3 and not a.attisdropped) end
    order by r.id
    limit 1
$$;

-- Which function writes `rel` with body `body` (autoembed.writer_bodies: write_vector_rows for a
-- vector column `embedding_column` keyed by `key_column` of table `rel`; write_chunk_rows and
-- drop_old_chunk_rows for chunk table `rel`), for every caller and both shapes: the registered
-- target's write function (the table owner's rights), when it is intact; else, for a caller that
-- owns the table (no target of it registered, e.g. a table it syncs itself: its triggers run
-- with its own rights anyway), the body itself; else an error naming what to run. SECURITY
-- INVOKER (the owner test is the caller's); autoembed.write_function reads the registry.
create or replace function autoembed.owner_writer(rel regclass, embedding_column text, key_column text, body text)
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    fn text;
begin
    if not exists (select 1 from autoembed.writer_bodies(embedding_column is null) b where b.body = owner_writer.body) then
        raise exception 'autoembed: % writes no % (one of autoembed.writer_bodies)', body,
            coalesce('vector column ' || embedding_column, 'chunk table') using errcode = 'invalid_parameter_value';
    end if;
    fn := autoembed.intact_writer(autoembed.write_function(rel, embedding_column, key_column), body);
    if fn is not null then
        return fn;
    elsif (select c.relowner from pg_class c where c.oid = rel) = (select r.oid from pg_roles r where r.rolname = current_user) then
        return format('autoembed.%I', body);
    end if;
    raise exception using errcode = 'insufficient_privilege', message = format(
        'autoembed: no write function for %s (autoembed.write_<target>): enrol its table, or run autoembed db init; '
        'vectors are written with the table owner''s rights only', rel || coalesce('.' || quote_ident(embedding_column), ''));
end;
$$;

-- Chunk tables made before sql/019 get a deferrable primary key (see write_chunk_rows): rebuilt
-- once, here (the table is locked while its key index is built). A table that cannot be changed
-- keeps its key: its chunk sets are written as before (the old rows deleted first).
do $$
declare
    k record;
begin
    for k in select ct.chunk_table::regclass as chunks, c.conname, c.conkey,
                    (select array_agg(quote_ident(a.attname) order by x.i) from unnest(c.conkey) with ordinality x(n, i)
                       join pg_attribute a on a.attrelid = c.conrelid and a.attnum = x.n) as cols
               from autoembed.chunk_tables ct
               join pg_constraint c on c.conrelid = ct.chunk_table and c.contype = 'p' and not c.condeferrable loop
        begin
            execute format('alter table %s drop constraint %I, add constraint %I primary key (%s) deferrable initially immediate',
                           k.chunks, k.conname, k.conname, array_to_string(k.cols, ', '));
            -- (a deferrable key is no replica identity: see create_chunk_table, sql/011)
            execute format('alter table %s replica identity full', k.chunks);
        exception when others then
            raise warning 'autoembed: could not make the primary key of % deferrable: %; an application''s DELETE of a row waits for the write of its chunk set',
                k.chunks, sqlerrm;
        end;
    end loop;
end
$$;

-- A chunk table another role made for a table (a model change's shadow, made by whoever ran the
-- backfill) belongs to the table's owner: its write function writes it with the owner's rights.
do $$
declare
    k record;
begin
    for k in select ct.chunk_table::regclass as chunks, pg_get_userbyid(p.relowner) as owner
               from autoembed.chunk_tables ct
               join pg_class c on c.oid = ct.chunk_table
               join pg_class p on p.oid = ct.parent
              where c.relowner <> p.relowner loop
        begin
            execute format('alter table %s owner to %I', k.chunks, k.owner);
        exception when others then
            raise warning 'autoembed: could not give % to %, the owner of its table: %', k.chunks, k.owner, sqlerrm;
        end;
    end loop;
end
$$;

-- Targets registered before input and write functions (or before these versions of them): both
-- are made here, by one generator (install_input_function makes them from now on).
do $$
declare
    target_id bigint;
begin
    for target_id in select r.id from autoembed.targets r order by r.id loop
        begin
            perform autoembed.install_input_function(target_id);
        exception when others then
            raise warning 'autoembed: no input or write function for target %: %; the drain refuses its jobs until db init runs as a superuser',
                target_id, sqlerrm;
        end;
    end loop;
end
$$;

-- Chunk targets enrolled before a key change queued the new key (sql/005 install_target_triggers:
-- the UPDATE row triggers fire when the key changed, too): their triggers are re-created.
select autoembed.upgrade_target_triggers(array(
    select r.id
      from autoembed.targets r
      join pg_trigger tr on tr.tgrelid = r.relid and tr.tgname in ('autoembed_chunk_changed', 'autoembed_replica_update')
     where r.chunk_table is not null
       and pg_get_triggerdef(tr.oid) not like '%old.% IS DISTINCT FROM new.%'
     group by r.id
     order by r.id), 'do not queue the new key of a row whose key changed');
