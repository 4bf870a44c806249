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
