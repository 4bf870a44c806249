-- Chunk tables: long documents embedded as chunks (core/targets/chunks.py plans and writes them).
--
-- <schema>.<table>_chunks holds, per parent row, its chunk set: the parent's key (no foreign key:
-- autoembed.chunk_tables and the parent's triggers keep it with the rows, sql/015), chunk_index, the exact chunk text that was embedded, its vector, the chunk's
-- hash, and what the set was made from (source_hash = the parent's content hash, model, splitter).
-- A document's chunk set is replaced whole in one transaction, so every row of a set carries the
-- same source_hash/model/splitter: "current" = they match the parent's input and the pipeline.

-- The vector index of a chunk table: HNSW with the cosine operator class of its vector type (what
-- search_chunks orders by), unless the embedding already has an index. Returns the index, or NULL
-- when there is one already or the size is past HNSW's limit (vector 2000, halfvec 4000: search
-- stays exact). Enrolment and a model change's shadow get it at creation (the promotion renames
-- tables, so it moves with its table).
create or replace function autoembed.ensure_chunk_vector_index(chunk_table regclass)
returns regclass
language plpgsql
as $$
declare
    vtype text;
    dims integer;
    before regclass[];
    made regclass;
begin
    select t.typname::text, a.atttypmod into vtype, dims
      from pg_attribute a join pg_type t on t.oid = a.atttypid
     where a.attrelid = chunk_table and a.attname = 'embedding' and a.attnum > 0 and not a.attisdropped;
    if vtype is null or exists (
        select 1 from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
         where i.indrelid = chunk_table and a.attname = 'embedding') then
        return null;
    end if;
    if dims > (array[2000, 4000])[(vtype = 'halfvec')::int + 1] then  -- vector, halfvec
        raise notice '%: no HNSW index for %(%) (past pgvector''s limit): chunk search is an exact scan',
            chunk_table, vtype, dims;
        return null;
    end if;
    before := array(select indexrelid::regclass from pg_index where indrelid = chunk_table);
    -- Unnamed: Postgres picks a free name, so a promoted shadow's index never collides.
    execute format('create index on %s using hnsw (embedding %I)', chunk_table, vtype || '_cosine_ops');
    select i.indexrelid::regclass into made from pg_index i
     where i.indrelid = chunk_table and not (i.indexrelid::regclass = any(before));
    return made;
end;
$$;

-- Create (or check) the chunk table of `tbl`; returns it. Idempotent; an existing table of
-- another shape is an error naming what differs.
create or replace function autoembed.create_chunk_table(
    tbl regclass,
    key_column text,
    vector_type text,
    dimensions integer,
    chunk_table text default null
)
returns regclass
language plpgsql
as $$
declare
    nsp text;
    rel text;
    key_type text;
    name text;
    existing regclass;
    have record;
    max_dims integer;
begin
    select n.nspname, c.relname into nsp, rel
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = tbl;
    if vector_type not in ('vector', 'halfvec') then
        raise exception 'vector_type must be vector or halfvec, got %', vector_type;
    end if;
    max_dims := case vector_type when 'halfvec' then 4000 else 16000 end;  -- pgvector's limits
    if dimensions is null or dimensions < 1 or dimensions > max_dims then
        raise exception '%(%) is not a valid vector size: use 1..%', vector_type, dimensions, max_dims;
    end if;
    select format_type(a.atttypid, a.atttypmod) into key_type
    from pg_attribute a where a.attrelid = tbl and a.attname = key_column and a.attnum > 0 and not a.attisdropped;
    if key_type is null then
        raise exception '% has no column %', tbl, quote_ident(key_column);
    end if;
    if not exists (select 1 from pg_constraint k where k.conrelid = tbl and k.contype in ('p', 'u')
                   and k.conkey = array[(select attnum from pg_attribute where attrelid = tbl and attname = key_column)]) then
        raise exception 'column % of % is not its primary key or unique: a chunk table needs a unique parent key',
            quote_ident(key_column), tbl;
    end if;
    name := coalesce(chunk_table, rel || '_chunks');
    if octet_length(name) > 63 then
        raise exception 'chunk table name % is longer than 63 bytes: pass chunk_table => a shorter name', name;
    end if;
    existing := to_regclass(format('%I.%I', nsp, name));
    if existing is null then
        execute format(
            'create table %1$I.%2$I (
                 %3$I %4$s not null,
                 chunk_index integer not null check (chunk_index >= 0),
                 chunk text not null,
                 embedding %6$s(%7$s) not null,
                 chunk_hash bytea not null,
                 source_hash bytea not null,
                 model text not null,
                 splitter text not null,
                 primary key (%3$I, chunk_index))',
            nsp, name, key_column, key_type, tbl, vector_type, dimensions);
        -- No foreign key (it refused the application's TRUNCATE of the parent and its key changes):
        -- the registry says whose chunk table it is, and triggers on the parent keep the chunks
        -- with its rows (sql/015 install_chunk_follow_triggers).
        perform autoembed.register_chunk_table(format('%I.%I', nsp, name)::regclass, tbl, key_column);
        perform autoembed.install_chunk_follow_triggers(tbl, key_column);
        -- Reuse looks vectors up by chunk hash across the whole table.
        -- (Unnamed: Postgres picks a free name, so a promoted shadow's index never collides.)
        execute format('create index on %I.%I (chunk_hash)', nsp, name);
        perform autoembed.ensure_chunk_vector_index(format('%I.%I', nsp, name)::regclass);
        return format('%I.%I', nsp, name)::regclass;
    end if;
    select t.typname::text as vtype, a.atttypmod as dims,
           (select format_type(k.atttypid, k.atttypmod) from pg_attribute k
             where k.attrelid = existing and k.attname = key_column and not k.attisdropped) as ktype
      into have
      from pg_attribute a join pg_type t on t.oid = a.atttypid
     where a.attrelid = existing and a.attname = 'embedding' and not a.attisdropped;
    if have.vtype is distinct from vector_type or have.dims is distinct from dimensions or have.ktype is distinct from key_type then
        raise exception 'chunk table % exists as (% %, embedding %(%)), not (% %, embedding %(%)): drop it or pick another chunk_table',
            existing, quote_ident(key_column), have.ktype, have.vtype, have.dims,
            quote_ident(key_column), key_type, vector_type, dimensions;
    end if;
    perform autoembed.ensure_chunk_vector_index(existing);  -- a table made before chunk tables had one
    if (select p.parent from autoembed.chunk_parent(existing) p) is null then
        perform autoembed.register_chunk_table(existing, tbl, key_column);
        perform autoembed.install_chunk_follow_triggers(tbl, key_column);
    end if;
    return existing;
end;
$$;

-- Which table's chunk table a table is, and the name of its key column: autoembed.chunk_tables
-- (sql/015), or for a chunk table made before it, its foreign key.
create or replace function autoembed.chunk_parent(chunk_table regclass, out parent regclass, out key_column text)
language sql
stable
as $$
    select x.parent, x.key_column from (
        select ct.parent::regclass as parent, a.attname::text as key_column, 0 as pick
        from autoembed.chunk_tables ct
        join pg_class p on p.oid = ct.parent
        join pg_attribute a on a.attrelid = ct.chunk_table and a.attnum = ct.key_attnum and not a.attisdropped
        where ct.chunk_table = chunk_parent.chunk_table
        union all
        select k.confrelid::regclass, a.attname::text, 1
        from pg_constraint k
        join pg_attribute a on a.attrelid = k.conrelid and a.attnum = k.conkey[1]
        where k.conrelid = chunk_parent.chunk_table and k.contype = 'f' and cardinality(k.conkey) = 1
    ) x
    order by x.pick
    limit 1
$$;

-- Parent rows ranked by their best chunk (cosine distance), with that chunk. With
-- `content_function`, only chunk sets made from the parent's current input are searched (a
-- changed row's old chunks are never returned while its new ones are pending). Exact: the
-- nearest chunks are taken in growing batches until they name `k` parents (or all are seen); the
-- HNSW index on the embedding (ensure_chunk_vector_index) serves the inner ORDER BY ... LIMIT,
-- scanning iteratively (up to hnsw.max_scan_tuples, 20,000 by default, per batch).
create or replace function autoembed.search_chunks(
    chunk_table regclass,
    query vector,
    k integer default 5,
    content_function regprocedure default null
)
returns table (parent_key text, chunk_index integer, chunk text, distance double precision)
language plpgsql
stable
as $$
declare
    p record;
    vtype text;
    batch integer := greatest(k * 4, 64);
    total bigint;
    found integer;
    current_only text := '';
    -- An HNSW scan returns at most hnsw.ef_search (40) rows unless it scans iteratively
    -- (pgvector 0.8+): without that, a batch would look like "every chunk seen" and one document
    -- with many near chunks would hide the others. Set for this call only, then put back.
    iterative boolean := exists (select 1 from pg_extension where extname = 'vector'
                                 and string_to_array(extversion, '.')::int[] >= array[0, 8]);
    prior text;
begin
    if k is null or k < 1 then
        raise exception 'k must be at least 1, got %', k;
    end if;
    if iterative then
        prior := current_setting('hnsw.iterative_scan', true);
        perform set_config('hnsw.iterative_scan', 'strict_order', true);
    end if;
    select * into p from autoembed.chunk_parent(chunk_table);
    if p.parent is null then
        raise exception '% is not a chunk table (not in autoembed.chunk_tables, no foreign key to a parent table)', chunk_table;
    end if;
    select format_type(a.atttypid, a.atttypmod) into vtype from pg_attribute a
     where a.attrelid = chunk_table and a.attname = 'embedding' and not a.attisdropped;
    if content_function is not null then
        current_only := format(
            ' and c.source_hash = (select autoembed.content_hash(%s(t)::text) from %s t where t.%I = c.%I)',
            content_function::oid::regproc, p.parent, p.key_column, p.key_column);
    end if;
    -- Grow the batch of nearest chunks until it names k parents or holds every chunk. A content
    -- function that raises for a parent among them: the batches are counted again with each
    -- parent's input read through autoembed.try_input (sql/014), which catches the error: that
    -- parent's chunk set cannot be shown current and is skipped, the others are found (the final
    -- query reads the same chunks, so it runs in the mode the counting ended in).
    <<counting>>
    loop
        begin
            loop
                execute format(
                    'select count(*), count(distinct c.%1$I) filter (where true %4$s)
                     from (select c.* from %3$s c order by c.embedding <=> $1::%2$s limit $2) c',
                    p.key_column, vtype, chunk_table, current_only) into total, found using query, batch;
                exit when found >= k or total < batch;
                batch := batch * 4;
            end loop;
            exit counting;
        exception when others then
            if content_function is null or current_only like '%autoembed.try_input%' then
                raise;
            end if;
            current_only := format(
                ' and c.source_hash = (select autoembed.content_hash((autoembed.try_input(%L, t)).input)'
                ' from %s t where t.%I = c.%I)',
                format('select %s($1)::text', content_function::oid::regproc), p.parent, p.key_column, p.key_column);
        end;
    end loop;
    return query execute format(
        'select x.k, x.chunk_index, x.chunk, x.d from (
             select distinct on (c.%1$I) c.%1$I::text as k, c.chunk_index, c.chunk, c.d
             from (select c.*, c.embedding <=> $1::%2$s as d from %3$s c
                    order by c.embedding <=> $1::%2$s limit $3) c
             where true %4$s
             order by c.%1$I, c.d, c.chunk_index) x
         order by x.d, x.k limit $2',
        p.key_column, vtype, chunk_table, current_only) using query, k, batch;
    if iterative then
        perform set_config('hnsw.iterative_scan', coalesce(prior, 'off'), true);
    end if;
end;
$$;

-- The name a promotion retires the live chunk table to (<live>__old, shortened to fit), and that
-- table if it exists (kept for rollback until dropped).
create or replace function autoembed.old_chunk_name(live regclass)
returns text
language sql
stable
as $$
    select left(c.relname, 58) || '__old' from pg_class c where c.oid = live
$$;

create or replace function autoembed.old_chunk_table(live regclass)
returns regclass
language sql
stable
as $$
    select to_regclass(format('%I.%I', n.nspname, autoembed.old_chunk_name(live)))
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = live
$$;

-- Swap two chunk tables of the same parent in one transaction: `live` is renamed `retired_name`,
-- `incoming` takes the live name (its indexes go with it). A promotion retires the live table to
-- <live>__old; a rollback retires it to the shadow name and brings <live>__old back. Returns the
-- retired table. Taking the locks may wait for running readers.
create or replace function autoembed.swap_chunk_tables(live regclass, incoming regclass, retired_name text)
returns regclass
language plpgsql
as $$
declare
    nsp text;
    live_name text;
    parent_live regclass := (select parent from autoembed.chunk_parent(live));
begin
    if parent_live is null or parent_live is distinct from (select parent from autoembed.chunk_parent(incoming)) then
        raise exception '% and % are not chunk tables of the same parent table', live, incoming;
    end if;
    select n.nspname, c.relname into nsp, live_name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = live;
    if (select relnamespace from pg_class where oid = incoming) <> (select relnamespace from pg_class where oid = live) then
        raise exception '% is not in the schema of %', incoming, live;
    end if;
    if retired_name = autoembed.old_chunk_name(live) and autoembed.old_chunk_table(live) is not null then
        raise exception '% holds the chunk sets of a previous promotion: drop it first', autoembed.old_chunk_table(live)
            using hint = 'autoembed migrate PIPELINE drop-old (or rollback)';
    elsif to_regclass(format('%I.%I', nsp, retired_name)) is not null then
        raise exception '%.% exists: drop it first', quote_ident(nsp), quote_ident(retired_name);
    end if;
    execute format('lock table %s, %s in access exclusive mode', live, incoming);
    execute format('alter table %s rename to %I', live, retired_name);
    execute format('alter table %s rename to %I', incoming, live_name);
    return format('%I.%I', nsp, retired_name)::regclass;
end;
$$;

-- Model migration of a chunk pipeline: the backfill writes the new model into a shadow chunk
-- table (create_chunk_table(..., chunk_table => '<table>_chunks__next')); promotion renames the
-- live table to <live>__old and the shadow to the live name in one transaction, so readers see
-- either the old chunk sets or the new ones. Returns the old table (kept for rollback, until
-- `autoembed migrate PIPELINE drop-old` drops it).
create or replace function autoembed.promote_chunk_table(live regclass, shadow regclass)
returns regclass
language sql
as $$
    select autoembed.swap_chunk_tables(live, shadow, autoembed.old_chunk_name(live))
$$;
