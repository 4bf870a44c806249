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

-- One job message: Supabase's shape. Every message autoembed sends starts from this one.
create or replace function autoembed.job_message(row_id jsonb, schema_name text, table_name text,
                                                 content_function text, embedding_column text)
returns jsonb
language sql
immutable
parallel safe
as $$
    select jsonb_build_object('id', row_id, 'schema', schema_name, 'table', table_name,
                              'contentFunction', content_function, 'embeddingColumn', embedding_column)
$$;

-- The job messages for the rows `ids` of one table: Supabase's message shape, one message per
-- group of up to `group_size` rows. A message for several rows lists them all in "ids" ("id" is
-- the first); integer keys travel as one comma-separated string, far cheaper to build and parse
-- than a JSON array of numbers. A group of one row is exactly Supabase's message. Grouping is
-- what keeps a bulk statement's enqueue cheap: one queue row per group instead of one per row.
create or replace function autoembed.job_messages(
    ids anyarray,
    schema_name text,
    table_name text,
    content_function text,
    embedding_column text,
    extra jsonb default '{}',
    group_size integer default 200
)
returns jsonb[]
language plpgsql
immutable
as $$
declare
    n integer := coalesce(cardinality(ids), 0);
    integer_keys boolean;
begin
    if n = 0 then
        return '{}';
    end if;
    integer_keys := pg_typeof(ids[1]) in ('bigint'::regtype, 'integer'::regtype, 'smallint'::regtype);
    return array(
        select autoembed.job_message(to_jsonb(ids[i]), schema_name, table_name, content_function, embedding_column)
               || extra
               || case when i = n then '{}'::jsonb
                       when integer_keys then jsonb_build_object('ids', array_to_string(ids[i:i + group_size - 1], ','))
                       else jsonb_build_object('ids', to_jsonb(ids[i:i + group_size - 1])) end
        from generate_series(1, n, group_size) i);
end;
$$;

-- The job messages for the integer keys lo..hi, all of them (a bulk INSERT with consecutive keys,
-- the usual case of an identity or serial key): one message per group of up to `group_size` keys,
-- each naming its keys as "idRange": [first, last]. No array of keys is built or sent.
create or replace function autoembed.range_messages(
    lo bigint,
    hi bigint,
    schema_name text,
    table_name text,
    content_function text,
    embedding_column text,
    extra jsonb default '{}',
    group_size integer default 200
)
returns jsonb[]
language sql
immutable
as $$
    select array(
        select autoembed.job_message(to_jsonb(i), schema_name, table_name, content_function, embedding_column)
               || extra
               || case when i = hi then '{}'::jsonb
                       else jsonb_build_object('idRange', jsonb_build_array(i, least(i + group_size - 1, hi))) end
        from generate_series(lo, hi, group_size) i)
$$;

-- How many rows a job message covers (see job_messages, range_messages).
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
