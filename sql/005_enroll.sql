-- Enrolment: register a target (validated up front, with errors naming the offending value and the
-- fix), install the project's triggers, and enqueue the backlog of rows that have no vector yet.
-- Idempotent: enrolling again replaces the triggers and updates the registration.

-- A queue name pgmq keeps as given: pgmq lower-cases its table names (q_<lower(name)>), so a
-- mixed-case name would break every statement that quotes it; at most 47 characters (pgmq's limit).
create or replace function autoembed.check_queue_name(queue text)
returns text
language plpgsql
immutable
as $$
#variable_conflict use_variable
begin
    if queue is null or queue !~ '^[a-z_][a-z0-9_]{0,46}$' then
        raise exception 'autoembed: queue name % is not a valid pgmq queue name', quote_nullable(queue)
            using errcode = 'invalid_parameter_value',
                  hint = format('use lower-case letters, digits and _ (at most 47 characters, not starting with a digit), e.g. %L',
                                left(regexp_replace(lower(coalesce(queue, '')), '[^a-z0-9_]', '_', 'g'), 47));
    end if;
    return queue;
end;
$$;

-- The key column of a target: it must exist, be NOT NULL, have a unique index on exactly it, and be
-- of a type whose text round-trips (key_type_ok). Returns its attnum.
create or replace function autoembed.check_key_column(tbl regclass, key_column text)
returns smallint
language plpgsql
stable
as $$
#variable_conflict use_variable
declare
    att pg_attribute;
    is_unique boolean;
    fix constant text := 'add a primary key (or a unique not null column) and pass it as the key column (autoembed enroll --key)';
begin
    select a.* into att from pg_attribute a
    where a.attrelid = tbl and a.attname = key_column and a.attnum > 0 and not a.attisdropped;
    if not found then
        raise exception 'autoembed: % has no key column %', tbl, quote_literal(key_column)
            using errcode = 'undefined_column', hint = fix;
    end if;
    if not autoembed.key_type_ok(att.atttypid) then
        raise exception 'autoembed: key column % of % is of type %, whose text form does not round-trip exactly',
            quote_ident(key_column), tbl, format_type(att.atttypid, att.atttypmod)
            using errcode = 'datatype_mismatch',
                  hint = 'keys may be smallint, integer, bigint, numeric, text, varchar, char(n), uuid, date, timestamp or timestamptz (or domains over them): '
                         || fix;
    end if;
    is_unique := exists (select 1 from pg_index i
                         where i.indrelid = tbl and i.indisunique and i.indnkeyatts = 1
                           and i.indkey[0] = att.attnum and i.indexprs is null and i.indpred is null);
    if not is_unique or not att.attnotnull then
        raise exception 'autoembed: key column % of % is %', quote_ident(key_column), tbl,
            concat_ws(' and ', case when not is_unique then 'not unique (no primary key or unique index on exactly it)' end,
                      case when not att.attnotnull then 'nullable (not NOT NULL)' end)
            using errcode = 'invalid_table_definition', hint = fix;
    end if;
    return att.attnum;
end;
$$;

-- Whether `tbl` has a util.queue_embeddings trigger with exactly these (effective) arguments: the
-- arguments the table's owner set, which is what registers a Supabase-style target.
create or replace function autoembed.has_queue_trigger(tbl oid, content_function text, embedding_column text,
                                                       key_column text, queue text)
returns boolean
language sql
stable
as $$
    select exists (
        select 1 from pg_trigger tr
        cross join lateral (select autoembed.trigger_args(tr.tgargs, tr.tgnargs) as a) x
        where tr.tgrelid = tbl and tr.tgfoid = 'util.queue_embeddings()'::regprocedure
          and x.a[1] = content_function and x.a[2] = embedding_column
          and coalesce(x.a[3], 'id') = key_column and coalesce(x.a[4], 'embedding_jobs') = queue)
$$;

-- The content function `fn` of a target of `tbl`: it must take a row of the table, be owned by the
-- table's owner or a superuser (the drain runs it, so nobody but the owner may choose what it
-- runs) and be IMMUTABLE or STABLE (the content hash relies on equal input giving equal text).
create or replace function autoembed.check_content_function(tbl regclass, fn regprocedure)
returns void
language plpgsql
stable
as $$
declare
    rel pg_class;
    proc pg_proc;
begin
    select c.* into rel from pg_class c where c.oid = tbl;
    select p.* into proc from pg_proc p where p.oid = fn;
    if proc.pronargs <> 1 or proc.proargtypes[0] <> rel.reltype then
        raise exception 'autoembed: content function % does not take a row of %', fn, tbl
            using errcode = 'undefined_function';
    end if;
    if proc.proowner <> rel.relowner and not (select r.rolsuper from pg_roles r where r.oid = proc.proowner) then
        raise exception 'autoembed: content function % is owned by %, not by %, the owner of %', fn,
            proc.proowner::regrole, rel.relowner::regrole, tbl
            using errcode = 'insufficient_privilege',
                  hint = format('the drain runs this function, so only the table''s owner may choose it: alter function %s owner to %s',
                                fn, rel.relowner::regrole);
    end if;
    if proc.provolatile = 'v' then
        raise exception 'autoembed: content function % is VOLATILE', fn
            using errcode = 'invalid_function_definition',
                  hint = format('equal input must give equal text (the content hash relies on it): alter function %s immutable (or stable)', fn);
    end if;
end;
$$;

-- The one generator of the functions a target runs with its table owner's rights (input_<id>
-- below, write_<id>: sql/019): autoembed.<name>(<params>) returns <returns>, plpgsql, SECURITY
-- DEFINER with search_path pinned, owned by the table's owner, its body (`decls`, `stmts`) after a
-- preamble that refuses to run as anyone but that owner (the owner may ALTER its own function,
-- e.g. to SECURITY INVOKER with SET role: every check is schema-qualified, operators included;
-- and the ALTER is followed: sql/008). `identity`: the argument types (for ALTER FUNCTION);
-- `what`: what it does, for the refusal. Internal (called by the SECURITY DEFINER installers).
create or replace function autoembed.install_owner_function(target_id bigint, name text, params text, identity text,
                                                            returns text, attributes text, decls text, stmts text,
                                                            what text)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
begin
    select r.relid, pg_get_userbyid(c.relowner)::text as owner into t
      from autoembed.targets r join pg_class c on c.oid = r.relid where r.id = target_id;
    if not found then
        return null;
    end if;
    execute format($f$
        create or replace function autoembed.%1$I(%2$s)
        returns %3$s
        language plpgsql
        %4$s
        security definer
        set search_path = pg_catalog, pg_temp
        as $b$
        %5$s
        begin
            if current_user operator(pg_catalog.<>) %6$L::pg_catalog.name
               or (pg_catalog.current_setting('role') operator(pg_catalog.=) %6$L
                   and session_user operator(pg_catalog.<>) %6$L::pg_catalog.name) then
                raise exception using message = %7$L, errcode = 'insufficient_privilege';
            end if;
            %8$s
        end
        $b$
    $f$, name, params, returns, attributes, coalesce('declare ' || decls, ''), t.owner,
       format('autoembed: autoembed.%s %s as %s, the owner of %s, only (by SECURITY DEFINER): run autoembed db init to re-create it',
              name, what, quote_ident(t.owner), t.relid::regclass),
       stmts);
    begin
        perform set_config('autoembed.installing_input', 'on', true);  -- (not followed: sql/008)
        execute format('alter function autoembed.%I(%s) owner to %I', name, identity, t.owner);
        perform set_config('autoembed.installing_input', '', true);
    exception when insufficient_privilege then
        raise exception 'autoembed: cannot give autoembed.%(%) to %, the owner of %: %', name, identity,
            quote_ident(t.owner), t.relid::regclass, sqlerrm
            using errcode = 'insufficient_privilege',
                  hint = 'run autoembed db init (and enrol) as a superuser: content functions run, and vectors are written, with their table owner''s rights through functions that role owns';
    end;
    return format('autoembed.%I', name);
end;
$$;
revoke execute on function autoembed.install_owner_function(bigint, text, text, text, text, text, text, text, text) from public;

-- The content function of target `target_id` with its table owner's rights: the generated function
-- autoembed.input_<id>(row) (SECURITY DEFINER, owned by the table's owner, search_path pinned)
-- that returns the content function's text of a row (declared anyelement and checked, so that it
-- does not depend on the table's row type: DROP TABLE goes on as before). The drain, backfills, status, checks and
-- search call it instead of the content function itself (target_catalog.input_function), so a
-- content function never runs with the rights of whoever reads the input (the drain is a superuser
-- on the zero-config default). It refuses to run
--   * as anyone but the table's owner (the owner may ALTER its own function, e.g. to SECURITY
--     INVOKER with SET role: every check is schema-qualified, operators included);
--   * for a role that may not read the table (autoembed.caller_role: the session's role);
-- and runs the content function in a subtransaction it rolls back (keeping the text): whatever the
-- function changed (a session setting such as search_path, a write) is undone before the caller's
-- next statement. Its setting autoembed.content_fn records the content function it calls
-- (target_catalog.input_function checks it). Made at registration, after a promotion swapped the
-- targets' functions, at `db init` for older targets (sql/019) and after an
-- ALTER TABLE of the table (an owner change: autoembed.follow_renames). Internal (the registration
-- functions call it); it needs a superuser as the project's owner (to give the function to the
-- table's owner). Returns the function's name.
create or replace function autoembed.install_input_function(target_id bigint)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    t record;
    name text := format('input_%s', target_id);
begin
    select r.relid, c.reltype::regtype::text as rowtype, c.reltype::oid as reltype,
           r.content_fn::regproc::text as fn, r.content_fn::oid::text as content_fn
      into t
      from autoembed.targets r
      join pg_class c on c.oid = r.relid
      join pg_proc p on p.oid = r.content_fn
     where r.id = target_id;
    if not found then
        return null;
    end if;
    perform autoembed.install_owner_function(target_id, name, 'rec anyelement', 'anyelement', 'text',
        format('stable set autoembed.content_fn = %L', t.content_fn), 'result text;',
        format($b$
            if pg_catalog.pg_typeof(rec)::pg_catalog.oid operator(pg_catalog.<>) %5$s::pg_catalog.oid then
                raise exception using message = pg_catalog.format('autoembed: %%s takes a row of %%s, not %%s', %4$L,
                                                                   %2$L, pg_catalog.pg_typeof(rec)),
                                      errcode = 'datatype_mismatch';
            end if;
            if not pg_catalog.has_table_privilege(autoembed.caller_role(), %1$s::pg_catalog.oid, 'SELECT') then
                raise exception using message = pg_catalog.format('autoembed: role %%s may not read %%s: it cannot read its content',
                                                                   autoembed.caller_role(), %2$L),
                                      errcode = 'insufficient_privilege';
            end if;
            begin
                result := %3$s(rec)::text;
                raise sqlstate 'AEIN0';  -- undo whatever the content function changed; keep its text
            exception when sqlstate 'AEIN0' then
                null;
            end;
            return result;
        $b$, t.relid::oid, t.relid::regclass::text, t.fn, format('autoembed.%I', name), t.reltype),
        format('runs the content function %s', t.fn));
    -- Vectors are written with the same owner's rights, by functions made with this one (sql/019).
    if to_regprocedure('autoembed.install_write_function(bigint)') is not null then
        perform autoembed.install_write_function(target_id);
    end if;
    return format('autoembed.%I', name);
end;
$$;
revoke execute on function autoembed.install_input_function(bigint) from public;

-- The checks of every registration, whatever the target's shape (register_target below): the
-- content function `fn` (resolved by the caller from
-- `content_function`) exists and passes check_content_function, the key column passes
-- check_key_column, the queue name is valid, and the queue exists (created when missing).
-- Returns the key column's attnum. Called by the SECURITY DEFINER registrations only.
create or replace function autoembed.check_registration(tbl regclass, content_function text, fn regprocedure,
                                                        key_column text, queue text)
returns smallint
language plpgsql
as $$
#variable_conflict use_variable
declare
    key_attnum smallint;
begin
    if fn is null then
        raise exception 'autoembed: content function % taking a row of % does not exist',
            quote_literal(content_function), tbl using errcode = 'undefined_function';
    end if;
    key_attnum := autoembed.check_key_column(tbl, key_column);
    perform autoembed.check_content_function(tbl, fn);
    perform autoembed.check_queue_name(queue);
    if not exists (select 1 from pgmq.meta m where m.queue_name = queue) then
        perform pgmq.create(queue);
    end if;
    return key_attnum;
end;
$$;
revoke execute on function autoembed.check_registration(regclass, text, regprocedure, text, text) from public;

-- Register (or update) a target of `tbl` in autoembed.targets, whatever its shape; returns its id.
--   a vector column: `embedding_column` (a vector/halfvec column of the table), no chunk table;
--   a chunk set (sql/012): `chunk_rel` (the table's chunk table, sql/011), `chunk_tokens` and
--     `chunk_overlap`; its embedding_column records the chunk table's name.
-- SECURITY DEFINER: the registry is writable by nobody else. Who may register:
--   origin 'enroll' / 'migration': a role that owns the table (or a superuser);
--   origin 'trigger' (column targets): anyone whose write fires a util.queue_embeddings trigger
--     with exactly these arguments on the table (the owner created it: its arguments are the
--     registration).
-- A table has one kind of enrolment at a time. The content function `fn` (resolved by the caller
-- from `content_function`) must take a row of the table, be IMMUTABLE or STABLE (the content hash
-- relies on equal input giving equal text) and be owned by the table's owner or a superuser: the
-- drain runs it, so nobody but the owner may choose what it runs (check_registration). Creates the
-- queue when missing.
drop function if exists autoembed.register_target(regclass, text, regprocedure, text, text, text, text);
drop function if exists autoembed.register_chunk_target(regclass, text, regprocedure, regclass, text, text, integer, integer);
create or replace function autoembed.register_target(tbl regclass, content_function text, fn regprocedure,
                                                     embedding_column text, key_column text, queue text,
                                                     origin text, chunk_rel regclass default null,
                                                     chunk_tokens integer default null,
                                                     chunk_overlap integer default null)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    rel pg_class;
    chunked boolean := chunk_rel is not null;
    parent record;
    emb_attnum smallint;
    key_attnum smallint;
    result bigint;
begin
    select c.* into rel from pg_class c where c.oid = tbl;
    if not found or rel.relkind not in ('r', 'p') then
        raise exception 'autoembed: % is not a table', tbl using errcode = 'wrong_object_type';
    end if;
    if origin = 'trigger' and not chunked then
        if not autoembed.has_queue_trigger(tbl, content_function, embedding_column, key_column, queue) then
            raise exception 'autoembed: % has no util.queue_embeddings(%, %, %, %) trigger', tbl,
                quote_literal(content_function), quote_literal(embedding_column), quote_literal(key_column),
                quote_literal(queue) using errcode = 'insufficient_privilege';
        end if;
    elsif origin = 'enroll' or (origin = 'migration' and not chunked) then
        perform autoembed.require_owner(tbl, 'enroll it');
        if exists (select 1 from autoembed.targets r where r.relid = tbl and (r.chunk_table is not null) <> chunked
                                                        and (r.chunk_table is not null or r.origin = 'enroll')) then
            raise exception 'autoembed: % is enrolled %: a table has one kind of enrolment', tbl,
                case when chunked then 'with an embedding column' else 'as a chunk target' end
                using errcode = 'object_in_use', hint = 'unenroll it first (select autoembed.unenroll(...))';
        end if;
    else
        raise exception 'autoembed: unknown target origin %', quote_nullable(origin);
    end if;
    if chunked then
        select * into parent from autoembed.chunk_parent(chunk_rel);
        if parent.parent is distinct from tbl or parent.key_column is distinct from key_column then
            raise exception 'autoembed: % is not a chunk table of %.% (it references %)', chunk_rel, tbl,
                quote_ident(key_column), coalesce(parent.parent::text, 'no table')
                using errcode = 'invalid_table_definition';
        end if;
        if chunk_tokens is null or chunk_tokens < 8 then
            raise exception 'autoembed: chunk tokens must be at least 8, got %', quote_nullable(chunk_tokens)
                using errcode = 'invalid_parameter_value', hint = 'pass --chunk-tokens 8 or more (e.g. 256)';
        end if;
        if chunk_overlap is null or chunk_overlap < 0 or chunk_overlap > chunk_tokens / 2 then
            raise exception 'autoembed: chunk overlap % is not between 0 and half of chunk tokens %',
                quote_nullable(chunk_overlap), chunk_tokens
                using errcode = 'invalid_parameter_value', hint = format('pass --chunk-overlap 0..%s', chunk_tokens / 2);
        end if;
        embedding_column := (select c.relname::text from pg_class c where c.oid = chunk_rel);
    else
        select a.attnum into emb_attnum
        from pg_attribute a join pg_type t on t.oid = a.atttypid
        where a.attrelid = tbl and a.attname = embedding_column and a.attnum > 0 and not a.attisdropped
          and t.typname in ('vector', 'halfvec')
          and t.typnamespace = (select e.extnamespace from pg_extension e where e.extname = 'vector');
        if emb_attnum is null then
            raise exception 'autoembed: % has no vector/halfvec column %', tbl, quote_literal(embedding_column)
                using errcode = 'undefined_column';
        end if;
    end if;
    key_attnum := autoembed.check_registration(tbl, content_function, fn, key_column, queue);
    -- (one statement for both shapes: a column target is (relid, embedding_attnum), a chunk target
    -- its chunk table; the one that conflicts is updated)
    insert into autoembed.targets as t (relid, key_column, key_attnum, key_type, embedding_column, embedding_attnum,
                                        content_function, content_fn, queue, origin, chunk_table, chunk_tokens,
                                        chunk_overlap)
    values (tbl, key_column, key_attnum,
            (select format_type(a.atttypid, a.atttypmod) from pg_attribute a where a.attrelid = tbl and a.attnum = key_attnum),
            embedding_column, emb_attnum, content_function, fn, queue, origin, chunk_rel, chunk_tokens, chunk_overlap)
    on conflict do nothing
    returning t.id into result;
    if result is null then
        update autoembed.targets t
           set key_column = key_column, key_attnum = key_attnum,
               key_type = (select format_type(a.atttypid, a.atttypmod) from pg_attribute a
                            where a.attrelid = tbl and a.attnum = key_attnum),
               embedding_column = embedding_column, content_function = content_function, content_fn = fn,
               queue = queue, origin = origin, chunk_tokens = chunk_tokens, chunk_overlap = chunk_overlap,
               updated_at = now()
         where case when chunked then t.chunk_table = chunk_rel else t.relid = tbl and t.embedding_attnum = emb_attnum end
        returning t.id into result;
    end if;
    perform autoembed.install_input_function(result);
    return result;
end;
$$;

-- The registered target of column `embedding_column` of `tbl` (current name), or NULL.
create or replace function autoembed.target_of(tbl regclass, embedding_column text)
returns bigint
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select r.id from autoembed.targets r
    join pg_attribute a on a.attrelid = r.relid and a.attnum = r.embedding_attnum and not a.attisdropped
    where r.relid = target_of.tbl and a.attname = target_of.embedding_column
$$;

-- Queue jobs for rows `keys` of a target, whatever its shape (enrolment's backlog, a migration's
-- re-queue). SECURITY DEFINER: the caller's role must own the target's table. The caller reads the
-- keys itself (with its own rights); this only converts them (key_texts, never with a cast the
-- table's owner wrote) and sends (autoembed.send_keys, sql/004). Returns the rows queued.
create or replace function autoembed.enqueue_keys(target_id bigint, keys anyarray)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    tbl oid := (select r.relid from autoembed.targets r where r.id = target_id);
begin
    if tbl is null then
        raise exception 'autoembed: no target %', target_id using errcode = 'undefined_object';
    end if;
    perform autoembed.require_owner(tbl, 'queue its rows');
    perform autoembed.require_key_type((select e.typelem from pg_type e where e.oid = pg_typeof(keys)));
    perform autoembed.send_keys(target_id, autoembed.key_texts(keys));
    return coalesce(cardinality(keys), 0);
end;
$$;

-- (the chunk targets' name for it, kept for callers of an earlier version)
create or replace function autoembed.enqueue_chunk_keys(target_id bigint, keys anyarray)
returns bigint
language sql
as $$
    select autoembed.enqueue_keys(target_id, keys)
$$;

-- The generated functions of targets that are gone (unregistered, or their table dropped: sql/015
-- follow_schema_changes): clear_target_<id>, input_changed_<id> (sql/004) and input_<id> (above),
-- with what depends on them (their triggers).
create or replace function autoembed.drop_generated_functions()
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    name text;
begin
    for name in select p.oid::regprocedure::text from pg_proc p
                where p.pronamespace = 'autoembed'::regnamespace and p.proname ~ '^(clear_target|input|input_changed)_[0-9]+$'
                  and not exists (select 1 from autoembed.targets r where r.id = substring(p.proname from '[0-9]+$')::bigint) loop
        execute format('drop function %s cascade', name);
    end loop;
end;
$$;
revoke execute on function autoembed.drop_generated_functions() from public;

-- Remove registrations of `tbl` (of one column, or every 'enroll' one when NULL). Owner only.
create or replace function autoembed.unregister_targets(tbl regclass, embedding_column text default null)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    gone bigint;
begin
    perform autoembed.require_owner(tbl, 'unregister its targets');
    delete from autoembed.targets r
    where r.relid = tbl
      and (case when embedding_column is null then r.origin = 'enroll'
                else r.embedding_attnum = (select a.attnum from pg_attribute a where a.attrelid = tbl
                                           and a.attname = embedding_column and not a.attisdropped) end);
    get diagnostics gone = row_count;
    perform autoembed.drop_generated_functions();
    return gone;
end;
$$;

-- Swap the columns (and content functions) of the targets of two columns of `tbl` (names after a
-- model migration renamed them), so that each target id keeps its role: "the column search uses"
-- and "the other one". Messages queued for the live target keep going to the live column. Owner only.
create or replace function autoembed.swap_targets(tbl regclass, column_a text, column_b text)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    a autoembed.targets;
    b autoembed.targets;
begin
    perform autoembed.require_owner(tbl, 'change its targets');
    select r.* into a from autoembed.targets r where r.relid = tbl and r.embedding_attnum =
        (select at.attnum from pg_attribute at where at.attrelid = tbl and at.attname = column_a and not at.attisdropped);
    select r.* into b from autoembed.targets r where r.relid = tbl and r.embedding_attnum =
        (select at.attnum from pg_attribute at where at.attrelid = tbl and at.attname = column_b and not at.attisdropped);
    if a.id is null or b.id is null then
        return;  -- nothing registered to swap (e.g. a table with neither enrolment nor trigger)
    end if;
    update autoembed.targets set embedding_attnum = -embedding_attnum where id = a.id;  -- unique (relid, attnum)
    update autoembed.targets
        set embedding_attnum = a.embedding_attnum, embedding_column = column_a, content_function = a.content_function,
            content_fn = a.content_fn, updated_at = now()
        where id = b.id;
    update autoembed.targets
        set embedding_attnum = b.embedding_attnum, embedding_column = column_b, content_function = b.content_function,
            content_fn = b.content_fn, updated_at = now()
        where id = a.id;
    perform autoembed.swap_state(a.id, b.id);  -- the records follow the columns (sql/022)
    perform autoembed.install_input_function(a.id);
    perform autoembed.install_input_function(b.id);
end;
$$;

-- ALTER TABLE tbl ENABLE <mode> TRIGGER name (mode 'always' or 'replica'), which the event trigger
-- autoembed.follow_renames (sql/008) must not take for a user's ALTER TABLE: it would re-create the
-- triggers being enabled, and enable them again, without end. The transaction-local setting
-- autoembed.enabling_triggers tells it so.
create or replace function autoembed.set_trigger_mode(tbl regclass, trigger_name text, mode text)
returns void
language plpgsql
as $$
begin
    if mode not in ('always', 'replica') then
        raise exception 'autoembed: trigger mode % is not always or replica', quote_nullable(mode);
    end if;
    perform set_config('autoembed.enabling_triggers', 'on', true);
    execute format('alter table %s enable %s trigger %I', tbl, mode, trigger_name);
    perform set_config('autoembed.enabling_triggers', 'off', true);
end;
$$;

-- The triggers of an enrolled target (re-created from the registry's target `target_id`), for both
-- shapes, run with the caller's own rights (creating triggers needs the table's owner). The
-- generated autoembed.install_compare_function (sql/004) compares the input of OLD and NEW in the
-- writer's context (a content function raising for the row counts as a change, never fails the
-- write).
--   a column target:
--     autoembed_clear           BEFORE UPDATE row, WHEN the row holds a vector and the drain is not
--                               the writer: the generated function sets the vector to NULL when the
--                               input changed;
--     autoembed_enqueue_insert/_update  AFTER statement, transition tables: one send_batch each
--                               (autoembed.queue_embeddings_bulk, sql/004);
--     autoembed_forget_*        embedding_state of gone rows goes too (install_forget_triggers).
--   a chunk target (sql/012 autoembed.queue_chunk_jobs; no clearing: a stale chunk set stays until
--   the drain swaps the new one in whole, and search_chunks skips it meanwhile):
--     autoembed_enqueue_insert  AFTER INSERT statement (transition table): every new row, one send;
--     autoembed_chunk_changed   AFTER UPDATE row, WHEN the generated function says the input
--                               changed: notes the row's key (the key column by its current name);
--     autoembed_enqueue_update  AFTER UPDATE statement: sends the keys noted;
--     autoembed_chunks_*        the chunk tables go with the rows (install_chunk_follow_triggers, sql/015).
--   both: the REPLICA row triggers for rows that arrive by logical replication (install_replica_triggers).
-- A target registered by util.queue_embeddings triggers, or a migration's shadow column, has no
-- triggers of ours (its triggers name the function by name): nothing is done for it. Called by
-- enrolment, and to repair or upgrade a target's triggers (sql/008, 014, 015, 016).
create or replace function autoembed.install_target_triggers(target_id bigint)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    p record;
    compare regprocedure;
    enqueue text;
begin
    select * into p from autoembed.target_parts(target_id);
    if p.tbl is null or p.key_column is null or not p.chunked and (p.embedding_column is null or p.origin <> 'enroll') then
        if p.origin in ('trigger', 'migration') then
            return;
        end if;
        raise exception 'autoembed: % is not an enrolled target with a key column and an embedding column or a chunk table',
            target_id using errcode = 'undefined_object';
    end if;
    perform autoembed.uninstall_triggers(p.tbl);
    compare := autoembed.install_compare_function(target_id);
    enqueue := case when p.chunked then 'queue_chunk_jobs' else 'queue_embeddings_bulk' end;
    execute format(
        'create trigger autoembed_enqueue_insert after insert on %s referencing new table as autoembed_new '
        'for each statement execute function autoembed.%I(%L)', p.tbl, enqueue, target_id);
    if p.chunked then
        -- (a changed key queues the new key too: the pending job of the old one finds no row, and
        -- the chunk set the row took along may be of an older input)
        execute format(
            'create trigger autoembed_chunk_changed after update on %1$s for each row '
            'when (old.%4$I is distinct from new.%4$I or %2$s(old, new)) '
            'execute function autoembed.queue_chunk_jobs(%3$L, %4$L)',
            p.tbl, compare::oid::regproc, target_id, p.key_column);
        execute format(
            'create trigger autoembed_enqueue_update after update on %s '
            'for each statement execute function autoembed.queue_chunk_jobs(%L)', p.tbl, target_id);
    else
        execute format(
            'create trigger autoembed_clear before update on %1$s for each row '
            'when (current_setting(''autoembed.draining'', true) is distinct from ''on'' and new.%2$I is not null) '
            'execute function %3$s', p.tbl, p.embedding_column, compare);
        execute format(
            'create trigger autoembed_enqueue_update after update on %s referencing new table as autoembed_new '
            'for each statement execute function autoembed.queue_embeddings_bulk(%L)', p.tbl, target_id);
        -- A replicated UPDATE clears the stale vector too (see install_replica_triggers).
        perform autoembed.set_trigger_mode(p.tbl, 'autoembed_clear', 'always');
        perform autoembed.install_forget_triggers(p.tbl);
    end if;
    perform autoembed.install_replica_triggers(p.tbl, target_id, p.embedding_column, p.key_column, compare);
    if p.chunked then
        perform autoembed.install_chunk_follow_triggers(p.tbl, p.key_column);  -- (sql/015)
    end if;
end;
$$;

-- (an earlier version's entry points: the registry has the rest)
create or replace function autoembed.install_triggers(tbl regclass, target_id bigint, fn regprocedure,
                                                      embedding_column text)
returns void
language sql
as $$
    select autoembed.install_target_triggers(target_id)
$$;
drop function if exists autoembed.install_chunk_triggers(bigint);
drop function if exists autoembed.reinstall_target_triggers(bigint);

-- db init's upgrades of the triggers an earlier version installed (sql/014, 016): the triggers of
-- targets `ids` re-created from the registry, each on its own. A table whose triggers this role
-- cannot change (db init run by a role that does not own it) keeps its old ones, which serve as
-- before, and a warning says what they lack (`lacking`) and what to run.
create or replace function autoembed.upgrade_target_triggers(ids bigint[], lacking text)
returns void
language plpgsql
as $$
declare
    target_id bigint;
begin
    foreach target_id in array coalesce(ids, '{}') loop
        begin
            perform autoembed.install_target_triggers(target_id);
        exception when others then
            raise warning 'autoembed: could not upgrade the triggers of target % (%): %; until then they %: enroll it again as its owner (autoembed enroll)',
                target_id, (select r.relid::regclass from autoembed.targets r where r.id = target_id), sqlerrm, lacking;
        end;
    end loop;
end;
$$;

-- The state cleanup of a table's targets: AFTER DELETE / TRUNCATE statement triggers calling
-- autoembed.forget_rows (sql/004), which finds every target of the table itself. Installed by
-- enrolment, and for tables with Supabase's triggers by autoembed.adopt_state_cleanup (sql/013).
-- Idempotent (create or replace): adopting a table again completes what it lacks.
create or replace function autoembed.install_forget_triggers(tbl regclass)
returns void
language plpgsql
as $$
begin
    execute format(
        'create or replace trigger autoembed_forget_delete after delete on %s referencing old table as autoembed_old '
        'for each statement execute function autoembed.forget_rows()', tbl);
    execute format(
        'create or replace trigger autoembed_forget_truncate after truncate on %s '
        'for each statement execute function autoembed.forget_rows()', tbl);
    -- Logical replication's apply worker fires TRUNCATE triggers enabled ALWAYS, and row triggers
    -- only (see install_replica_triggers): a replicated DELETE forgets its row in a row trigger.
    perform autoembed.set_trigger_mode(tbl, 'autoembed_forget_truncate', 'always');
    execute format(
        'create or replace trigger autoembed_forget_row after delete on %s '
        'for each row execute function autoembed.forget_rows()', tbl);
    perform autoembed.set_trigger_mode(tbl, 'autoembed_forget_row', 'replica');
    perform autoembed.install_state_key_trigger(tbl);  -- a changed key takes its record along (sql/022)
end;
$$;

-- Rows that arrive by logical replication (the table is a subscriber's). The apply worker and the
-- initial table copy of a subscription run with session_replication_role = replica: they fire
-- row triggers enabled REPLICA or ALWAYS only, never the statement triggers that enqueue local
-- writes, nor the chunk tables' foreign key cascade (checked on PostgreSQL 18: the initial copy
-- fires row and statement INSERT triggers, the apply worker row triggers and TRUNCATE triggers).
-- So every enrolled table also gets these row triggers, enabled REPLICA: a local write never fires
-- them (it costs a skipped trigger per row), a replicated one fires them instead of the statement
-- triggers, one job per row (the apply worker applies a remote transaction in one local one):
--   autoembed_replica_insert     AFTER INSERT: the row's job (its vector, if one came, is replaced
--                                by this database's drain);
--   autoembed_replica_update     AFTER UPDATE, WHEN a column target's vector is NULL now (the
--                                ALWAYS-enabled clear trigger cleared it, or it had none), WHEN a
--                                chunk target's input changed: the row's job;
--   autoembed_replica_keep       (column targets) BEFORE UPDATE, WHEN a vector came with the row
--                                and the input did not change (autoembed_clear, ALWAYS, cleared it
--                                otherwise): keeps this database's own vector (or none);
--   autoembed_replica_delete     (chunk targets) AFTER DELETE: the row's chunks go (a column
--                                target's state goes by install_forget_triggers' autoembed_forget_row);
--   autoembed_replica_rekey      (chunk targets) AFTER UPDATE, WHEN the key changed: the chunks follow.
-- No option: enrolment before or after the subscription is created works the same. Called by
-- install_target_triggers, with the caller's rights (the table's owner).
-- What install_target_triggers gives it: the target's table, id, embedding column's current name
-- (NULL for a chunk target), key column's current name and generated compare function.
drop function if exists autoembed.install_replica_triggers(bigint);
create or replace function autoembed.install_replica_triggers(tbl regclass, target_id bigint, col text,
                                                              key_column text, compare regprocedure)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    name text;
    names constant text[] := '{autoembed_replica_insert,autoembed_replica_update,autoembed_replica_keep,autoembed_replica_delete,autoembed_replica_rekey}';
begin
    for name in select tr.tgname from pg_trigger tr where tr.tgrelid = tbl and tr.tgname = any(names) loop
        execute format('drop trigger %I on %s', name, tbl);
    end loop;
    execute format('create trigger autoembed_replica_insert after insert on %s for each row '
                   'execute function autoembed.queue_replicated_row(%L)', tbl, target_id);
    if col is null then
        -- Whether the input changed, compared in the writer's context by the target's generated
        -- function (a content function that raises counts as a change; sql/004), as local writes do.
        -- (or its key changed: see autoembed_chunk_changed in install_target_triggers)
        execute format('create trigger autoembed_replica_update after update on %1$s for each row '
                       'when (old.%4$I is distinct from new.%4$I or %2$s(old, new)) '
                       'execute function autoembed.queue_replicated_row(%3$L)',
                       tbl, compare::oid::regproc, target_id, key_column);
        execute format('create trigger autoembed_replica_delete after delete on %s for each row '
                       'execute function autoembed.cascade_replicated_chunks()', tbl);
        execute format('create trigger autoembed_replica_rekey after update on %1$s for each row '
                       'when (old.%2$I is distinct from new.%2$I) execute function autoembed.cascade_replicated_chunks()',
                       tbl, key_column);
    else
        execute format('create trigger autoembed_replica_update after update on %s for each row '
                       'when (new.%I is null) execute function autoembed.queue_replicated_row(%L)', tbl, col, target_id);
        -- A vector that came with the row and is not ours. It runs after autoembed_clear (BEFORE
        -- triggers fire in name order, and a WHEN clause sees what the triggers before it made of
        -- the row): when the input changed, the clear trigger has already set it NULL, so what
        -- remains to keep is a vector for unchanged input. (pgvector's = named by its schema: the
        -- pinned search_path of a definer re-creating the triggers does not find it.)
        execute format('create trigger autoembed_replica_keep before update on %1$s for each row '
                       'when (new.%2$I is not null and (old.%2$I is null or not (new.%2$I operator(%3$s.=) old.%2$I))) '
                       'execute function autoembed.keep_replicated_vector(%4$L)',
                       tbl, col, (select e.extnamespace::regnamespace::text from pg_extension e where e.extname = 'vector'),
                       target_id);
    end if;
    for name in select tr.tgname from pg_trigger tr where tr.tgrelid = tbl and tr.tgname = any(names) loop
        perform autoembed.set_trigger_mode(tbl, name, 'replica');
    end loop;
end;
$$;

create or replace function autoembed.uninstall_triggers(tbl regclass)
returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    name text;
begin
    for name in select tr.tgname from pg_trigger tr
                where tr.tgrelid = tbl and tr.tgname in ('autoembed_clear', 'autoembed_enqueue_insert', 'autoembed_enqueue_update',
                                                         'autoembed_forget_delete', 'autoembed_forget_truncate',
                                                         'autoembed_forget_row', 'autoembed_replica_insert',
                                                         'autoembed_replica_update', 'autoembed_replica_keep',
                                                         'autoembed_replica_delete', 'autoembed_replica_rekey',
                                                         'autoembed_chunk_changed', 'autoembed_state_key') loop  -- (a chunk target's, sql/012)
        execute format('drop trigger %I on %s', name, tbl);
    end loop;
end;
$$;

-- Enrolment, one path for both target shapes (the public entry points enroll and enroll_chunks
-- below pass their arguments on): a chunk target first gets its chunk table <table>_chunks (or
-- has it checked: sql/011 create_chunk_table, with the given vector type and size); then the
-- target is registered (register_target: validated up front, errors naming the offending value
-- and the fix), its triggers installed (install_target_triggers), and the rows that have no vector
-- (no chunk set) yet queued. Idempotent: enrolling again replaces the triggers and updates the
-- registration. Run as the table's owner. Returns the rows queued.
create or replace function autoembed.enroll_target(
    tbl regclass,
    content_function text,
    key_column text,
    queue text,
    enqueue_backlog boolean,
    embedding_column text default null,
    chunk_tokens integer default null,
    chunk_overlap integer default null,
    vector_type text default null,
    dimensions integer default null
)
returns bigint
language plpgsql
as $$
#variable_conflict use_variable
declare
    -- Resolved here, with the caller's search_path: the caller owns the table.
    fn regprocedure := autoembed.content_function(tbl, content_function);
    chunks regclass;
    target_id bigint;
    backlog bigint := 0;
begin
    if embedding_column is null then
        chunks := autoembed.create_chunk_table(tbl, key_column, vector_type, dimensions);
    end if;
    target_id := autoembed.register_target(tbl, content_function, fn, embedding_column, key_column, queue, 'enroll',
                                           chunks, chunk_tokens, chunk_overlap);
    perform autoembed.install_target_triggers(target_id);
    if enqueue_backlog then
        execute format('select autoembed.enqueue_keys($1, array(select t.%1$I from %2$s t where %3$s))', key_column, tbl,
                       case when chunks is null then format('t.%I is null', embedding_column)
                            else format('not exists (select 1 from %s c where c.%2$I = t.%2$I)', chunks, key_column) end)
            into backlog
            using target_id;
    end if;
    return backlog;
end;
$$;

-- Enrol `tbl` with its vector column `embedding_column`.
create or replace function autoembed.enroll(
    tbl regclass,
    content_function text,
    embedding_column text,
    key_column text default 'id',
    queue text default 'embedding_jobs',
    enqueue_backlog boolean default true
)
returns bigint
language sql
as $$
    select autoembed.enroll_target(tbl, content_function, key_column, queue, enqueue_backlog, coalesce(embedding_column, ''))
$$;

-- Enrol `tbl` as a chunk target (sql/012): its documents are split into chunks of `chunk_tokens`
-- tokens (`chunk_overlap` shared between neighbours), embedded into its chunk table <table>_chunks.
create or replace function autoembed.enroll_chunks(
    tbl regclass,
    content_function text,
    chunk_tokens integer,
    chunk_overlap integer default 0,
    key_column text default 'id',
    queue text default 'embedding_jobs',
    vector_type text default 'halfvec',
    dimensions integer default 1536,
    enqueue_backlog boolean default true
)
returns bigint
language sql
as $$
    select autoembed.enroll_target(tbl, content_function, key_column, queue, enqueue_backlog, null, chunk_tokens,
                                   chunk_overlap, vector_type, dimensions)
$$;

create or replace function autoembed.unenroll(tbl regclass)
returns void
language plpgsql
as $$
#variable_conflict use_variable
begin
    perform autoembed.uninstall_triggers(tbl);
    perform autoembed.unregister_targets(tbl);
end;
$$;
