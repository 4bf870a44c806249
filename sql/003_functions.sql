-- Helpers shared by the triggers, the drain and the status views.

-- The content function `fn` (a name, optionally schema-qualified, as given in trigger arguments)
-- taking one row of `tbl`, or NULL when there is none. Never raises on hostile text: the name is
-- parsed with parse_ident and looked up in the catalog, never spliced into SQL.
create or replace function autoembed.content_function(tbl regclass, fn text)
returns regprocedure
language plpgsql
stable
as $$
declare
    parts text[];
    row_type text := (select format_type(reltype, null) from pg_class where oid = tbl);
begin
    begin
        parts := parse_ident(fn);
    exception when others then
        return null;
    end;
    if array_length(parts, 1) = 1 then
        return to_regprocedure(format('%I(%s)', parts[1], row_type));
    elsif array_length(parts, 1) = 2 then
        return to_regprocedure(format('%I.%I(%s)', parts[1], parts[2], row_type));
    end if;
    return null;
end;
$$;

-- The embedding column's element type and size: ('halfvec', 1536), or no row when `col` is not a
-- vector/halfvec column of `tbl`.
create or replace function autoembed.vector_column(tbl regclass, col text)
returns table (type_name text, dimensions integer)
language sql
stable
as $$
    select t.typname::text, nullif(a.atttypmod, -1)
    from pg_attribute a
    join pg_type t on t.oid = a.atttypid
    where a.attrelid = tbl and a.attname = col and not a.attisdropped and a.attnum > 0
      and t.typname in ('vector', 'halfvec');
$$;

-- The text the content function makes of one row (NULL on NULL input).
create or replace function autoembed.input_of(fn regprocedure, rec anyelement)
returns text
language plpgsql
stable
as $$
declare
    result text;
begin
    execute format('select %s($1)::text', fn::oid::regproc) into result using rec;
    return result;
end;
$$;

-- The content hash the drain stores and compares: the same expression on both sides.
create or replace function autoembed.content_hash(input text)
returns bytea
language sql
immutable
parallel safe
as $$ select sha256(convert_to(input, 'UTF8')) $$;

-- Set a column of a row value to NULL by name (Supabase's clear_column needs hstore; this does not).
create or replace function autoembed.with_null_column(rec anyelement, col text)
returns anyelement
language sql
stable
as $$ select jsonb_populate_record(rec, jsonb_build_object(col, null)) $$;

-- Message builders of versions before the target registry (keys as JSON values, no "target").
drop function if exists autoembed.job_message(jsonb, text, text, text, text);
drop function if exists autoembed.job_messages(anyarray, text, text, text, text, jsonb, integer);
drop function if exists autoembed.range_messages(bigint, bigint, text, text, text, text, jsonb, integer);

-- The base type of a (domain) type.
create or replace function autoembed.base_type(typ oid)
returns regtype
language sql
stable
as $$
    with recursive chain(oid, base, depth) as (
        select t.oid, t.typbasetype, 0 from pg_type t where t.oid = typ
        union all
        select t.oid, t.typbasetype, c.depth + 1 from chain c join pg_type t on t.oid = c.base
        where c.base <> 0 and c.depth < 32
    )
    select oid::regtype from chain order by depth desc limit 1
$$;

-- Key types whose text form round-trips exactly through `key::text` and back with btree equality
-- (with the settings key_texts pins). Floats (rounding), json (no equality), money (locale),
-- arrays and composites are not keys.
create or replace function autoembed.key_type_ok(typ oid)
returns boolean
language sql
stable
as $$
    select coalesce(autoembed.base_type(typ) = any (array['smallint', 'integer', 'bigint', 'numeric', 'text',
        'character varying', 'character', 'uuid', 'date', 'timestamp without time zone',
        'timestamp with time zone']::regtype[]), false)
$$;

-- Integer keys travel as JSON numbers (and "ids" as one comma-separated string); others as strings.
create or replace function autoembed.integer_key(typ oid)
returns boolean
language sql
stable
as $$ select coalesce(autoembed.base_type(typ) = any (array['smallint', 'integer', 'bigint']::regtype[]), false) $$;

-- The exact text of keys: the one place every trigger, enrolment and migration path converts keys,
-- with the settings that change a key's text pinned (the drain pins the same on its session).
create or replace function autoembed.key_texts(keys anyarray)
returns text[]
language sql
stable
set timezone = 'UTC'
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
as $$ select array(select k::text from unnest(keys) with ordinality u(k, i) order by i) $$;

-- Raise unless `typ` is a key type (key_type_ok): a SECURITY DEFINER function converts keys to text,
-- and a value of a caller's own type would run the caller's own cast to text with the definer's
-- rights. Key types are built in (their casts cannot be replaced) or domains over them (a domain's
-- own casts are never used). The common types are checked without the recursive lookup.
create or replace function autoembed.require_key_type(typ regtype)
returns void
language plpgsql
stable
as $$
begin
    if typ = any ('{int2,int4,int8,numeric,text,varchar,bpchar,uuid,date,timestamp,timestamptz}'::regtype[])
       or autoembed.key_type_ok(typ) then
        return;
    end if;
    raise exception 'autoembed: % is not a key type', typ
        using errcode = 'datatype_mismatch',
              hint = 'keys are smallint, integer, bigint, numeric, text, varchar, char(n), uuid, date, timestamp or timestamptz (or domains over them)';
end;
$$;

-- The role a SECURITY DEFINER function acts for: the session's role (SET ROLE, or the login role).
create or replace function autoembed.caller_role()
returns name
language sql
stable
as $$ select coalesce(nullif(current_setting('role'), 'none'), session_user)::name $$;

-- The arguments of a trigger (pg_trigger.tgargs: NUL-terminated strings in the database encoding).
create or replace function autoembed.trigger_args(tgargs bytea, nargs integer)
returns text[]
language plpgsql
immutable
as $$
declare
    result text[] := '{}';
    rest bytea := tgargs;
    pos integer;
begin
    for i in 1 .. coalesce(nargs, 0) loop
        pos := position('\x00'::bytea in rest);
        result := result || convert_from(substring(rest from 1 for pos - 1), getdatabaseencoding());
        rest := substring(rest from pos + 1);
    end loop;
    return result;
end;
$$;

-- The registered targets under their CURRENT names (tables, columns and the content function are
-- held by oid/attnum, so renames are followed). `function` is the content function as Postgres
-- prints it (what the drain splices into its SELECT); NULL when the function is gone or no longer
-- takes a row of the table. key_type is NULL when the key column is gone or its type is no longer a
-- key type; dimensions is NULL when the embedding column is gone or not a vector/halfvec column.
create or replace view autoembed.target_catalog as
select t.id,
       t.queue,
       n.nspname::text as schema_name,
       c.relname::text as table_name,
       ka.attname::text as key_column,
       case when autoembed.key_type_ok(ka.atttypid) then format_type(ka.atttypid, ka.atttypmod) end as key_type,
       ea.attname::text as embedding_column,
       t.content_function,
       p.oid::regproc::text as function,
       vt.typname::text as vector_type,
       case when vt.oid is not null then nullif(ea.atttypmod, -1) end as dimensions,
       t.origin,
       ch.relname::text as chunk_table,  -- chunk targets (sql/012): current name, NULL if dropped
       t.chunk_tokens,
       t.chunk_overlap
from autoembed.targets t
join pg_class c on c.oid = t.relid
join pg_namespace n on n.oid = c.relnamespace
left join pg_attribute ka on ka.attrelid = t.relid and ka.attnum = t.key_attnum and not ka.attisdropped
left join pg_attribute ea on ea.attrelid = t.relid and ea.attnum = t.embedding_attnum and not ea.attisdropped
left join pg_type vt on vt.oid = ea.atttypid and vt.typname in ('vector', 'halfvec')
      and vt.typnamespace = (select e.extnamespace from pg_extension e where e.extname = 'vector')
left join pg_proc p on p.oid = t.content_fn and p.pronargs = 1 and p.proargtypes[0] = c.reltype
left join pg_class ch on ch.oid = t.chunk_table;
revoke all on autoembed.target_catalog from public;

drop function if exists autoembed.message_header(bigint);

-- A target as its triggers need it, in one lean query (the common key types are checked without
-- the recursive base-type lookup): current names, whether the key column still is a key, whether
-- keys are integers, and the header every message of the target carries: Supabase's fields
-- (current names, the content function as registered) + "target" + "keyColumn". No row for an
-- unknown id; key_column/embedding_column NULL when that column is gone. The table's schema and
-- name come from the catalog caches (pg_identify_object_as_address) rather than a join of
-- pg_class and pg_namespace: this runs for every statement of every enrolled table, and the two
-- index scans were a fifth of a single-row INSERT's trigger cost.
create or replace function autoembed.live_target(target_id bigint,
                                                 out id bigint, out relid oid, out queue text, out key_column text,
                                                 out embedding_column text, out key_ok boolean, out integer_keys boolean,
                                                 out header jsonb)
language plpgsql  -- not sql: plpgsql keeps the plan
stable
as $$
begin
    select r.id, r.relid, r.queue, ka.attname::text, ea.attname::text,
           -- (false, not NULL, when the key column is gone: callers test `not key_ok`)
           coalesce(ka.atttypid = any ('{int2,int4,int8,numeric,text,varchar,bpchar,uuid,date,timestamp,timestamptz}'::regtype[])
                    or autoembed.key_type_ok(ka.atttypid), false),
           ka.atttypid = any ('{int2,int4,int8}'::regtype[]) or autoembed.integer_key(ka.atttypid),
           jsonb_build_object('schema', o.object_names[1], 'table', o.object_names[2],
                              'contentFunction', r.content_function,
                              'embeddingColumn', ea.attname, 'target', r.id, 'keyColumn', ka.attname)
    into id, relid, queue, key_column, embedding_column, key_ok, integer_keys, header
    from autoembed.targets r
    cross join lateral pg_identify_object_as_address('pg_class'::regclass, r.relid, 0) o
    left join pg_attribute ka on ka.attrelid = r.relid and ka.attnum = r.key_attnum and not ka.attisdropped
    left join pg_attribute ea on ea.attrelid = r.relid and ea.attnum = r.embedding_attnum and not ea.attisdropped
    where r.id = target_id and o.object_names is not null;
end;
$$;

-- The job messages for rows `keys` (exact key texts, see key_texts): one message per group of up
-- to `group_size` rows. A message for several rows lists them all in "ids" ("id" is the first);
-- integer keys travel as JSON numbers and "ids" as one comma-separated string, far cheaper to
-- build and parse than a JSON array; other keys as JSON strings. A group of one row is Supabase's
-- message (plus the header's extra fields). Grouping keeps a bulk statement's enqueue cheap.
create or replace function autoembed.key_messages(keys text[], integer_keys boolean, header jsonb,
                                                  group_size integer default 200)
returns jsonb[]
language plpgsql
immutable
as $$
declare
    n integer := coalesce(cardinality(keys), 0);
begin
    if n = 1 then  -- a one-row statement, the common single-row write: nothing else built
        return array[jsonb_build_object('id', case when integer_keys then to_jsonb(keys[1]::bigint) else to_jsonb(keys[1]) end)
                     || header];
    end if;
    return array(
        select jsonb_build_object('id', case when integer_keys then to_jsonb(keys[i]::bigint) else to_jsonb(keys[i]) end)
               || header
               || case when i = n then '{}'::jsonb
                       when integer_keys then jsonb_build_object('ids', array_to_string(keys[i:i + group_size - 1], ','))
                       else jsonb_build_object('ids', to_jsonb(keys[i:i + group_size - 1])) end
        from generate_series(1, n, group_size) i);
end;
$$;

-- The job messages for the integer keys lo..hi, all of them (a bulk INSERT with consecutive keys,
-- the usual case of an identity or serial key): one message per group of up to `group_size` keys,
-- each naming its keys as "idRange": [first, last]. No array of keys is built or sent.
create or replace function autoembed.range_messages(lo bigint, hi bigint, header jsonb, group_size integer default 200)
returns jsonb[]
language sql
immutable
as $$
    select array(
        select jsonb_build_object('id', i) || header
               || case when i = hi then '{}'::jsonb
                       else jsonb_build_object('idRange', jsonb_build_array(i, least(i + group_size - 1, hi))) end
        from generate_series(lo, hi, group_size) i)
$$;

-- Send job messages to a queue and wake the drains (LISTEN autoembed). Sends nothing for no
-- messages (send_batch raises on an empty array). Always through pgmq's own functions: one message
-- with pgmq.send (about half the cost of send_batch of one), more with one send_batch. A queue
-- dropped under us (pgmq.drop_queue, its table dropped) is re-created first and the repair recorded
-- (autoembed.restore_queue, sql/015): the writer's statement goes on and its jobs are kept. (A
-- catalog lookup, not an exception block: a subtransaction per statement would cost more, and
-- thousands of them in one transaction overflow the subtransaction cache of every backend.)
create or replace function autoembed.send_jobs(queue text, messages jsonb[])
returns void
language plpgsql
as $$
begin
    if coalesce(cardinality(messages), 0) = 0 then
        return;
    end if;
    if to_regclass('pgmq.' || quote_ident('q_' || lower(queue))) is null then
        perform autoembed.restore_queue(queue);
    end if;
    if cardinality(messages) = 1 then
        perform pgmq.send(queue, messages[1]);
    else
        perform pgmq.send_batch(queue, messages);
    end if;
    perform pg_notify('autoembed', queue);
end;
$$;

-- Raise unless the acting role (autoembed.caller_role) may act as the owner of table `tbl`: what
-- the SECURITY DEFINER functions that change a table's registration or queue its rows require.
create or replace function autoembed.require_owner(tbl oid, doing text)
returns void
language plpgsql
stable
as $$
begin
    if not pg_has_role(autoembed.caller_role(), (select c.relowner from pg_class c where c.oid = tbl), 'USAGE') then
        raise exception 'autoembed: only the owner of % (%) may %, not %', tbl::regclass,
            (select c.relowner::regrole from pg_class c where c.oid = tbl), doing, autoembed.caller_role()
            using errcode = 'insufficient_privilege';
    end if;
end;
$$;

-- How many rows a job message covers (see key_messages, range_messages).
-- Never raises, whatever the message holds: status views read every message.
create or replace function autoembed.message_rows(message jsonb)
returns integer
language sql
immutable
as $$
    select case
               when jsonb_typeof(message -> 'idRange' -> 0) = 'number' and jsonb_typeof(message -> 'idRange' -> 1) = 'number'
                   then least(greatest((message -> 'idRange' ->> 1)::numeric - (message -> 'idRange' ->> 0)::numeric + 1, 1),
                              2147483647)::integer
               when jsonb_typeof(message -> 'ids') = 'string'
                   then length(message ->> 'ids') - length(replace(message ->> 'ids', ',', '')) + 1
               when jsonb_typeof(message -> 'ids') = 'array' then greatest(jsonb_array_length(message -> 'ids'), 1)
               else 1
           end
$$;
