-- One provider rate limit for every worker (drains, backfill shards, the CLI), and the pause flag
-- of backfills. Idempotent: applied again by every `autoembed db init`.

-- A paced schedule per (provider, model): each acquisition takes the next free slot of the request
-- schedule and of the token schedule (GCRA without burst: slots are 60/limit seconds apart, so
-- any window of the provider's holds at most its share), and a 429's Retry-After pushes both past
-- `paused_until`. One row, updated by one UPDATE per acquisition: N processes share one schedule.
create table if not exists autoembed.rate_limits (
    provider            text             not null,
    model               text             not null,
    next_request_at     timestamptz      not null default 'epoch',
    next_token_at       timestamptz      not null default 'epoch',
    paused_until        timestamptz      not null default 'epoch',
    requests_per_minute double precision,           -- the limit last used (for status only)
    tokens_per_minute   double precision,
    requests            bigint           not null default 0,  -- granted so far
    tokens              bigint           not null default 0,
    throttled           bigint           not null default 0,  -- 429s reported by workers
    primary key (provider, model)
);

-- Seconds the caller must wait before sending one request of `p_tokens` tokens (0: send now), and
-- whether a slot was reserved. While a pause is on, nothing is reserved and the pause's remaining
-- time is returned: the caller sleeps and asks again. Otherwise the caller sends after waiting.
-- A null or non-positive limit does not pace that dimension.
create or replace function autoembed.rate_limit_acquire(
    p_provider text, p_model text, p_requests_per_minute double precision,
    p_tokens_per_minute double precision, p_tokens bigint,
    out wait_seconds double precision, out reserved boolean)
language plpgsql
as $$
declare
    v_now   timestamptz := clock_timestamp();
    v_req   interval := make_interval(secs => case when p_requests_per_minute > 0
                                                   then 60.0 / p_requests_per_minute else 0 end);
    v_tok   interval := make_interval(secs => case when p_tokens_per_minute > 0
                                                   then 60.0 * greatest(p_tokens, 0) / p_tokens_per_minute else 0 end);
    v_pause timestamptz;
    v_slot  timestamptz;
begin
    if p_tokens < 0 then
        raise exception 'rate_limit_acquire: p_tokens must be >= 0, got %', p_tokens;
    end if;
    for attempt in 1..2 loop
        -- All SET expressions read the row as it was: the slot is the later of now, both
        -- schedules and the pause. Under concurrency the UPDATE re-reads the row it waited for.
        update autoembed.rate_limits l set
            next_request_at = case when l.paused_until > v_now then l.next_request_at
                                   else greatest(v_now, l.next_request_at, l.next_token_at) + v_req end,
            next_token_at   = case when l.paused_until > v_now then l.next_token_at
                                   else greatest(v_now, l.next_request_at, l.next_token_at) + v_tok end,
            requests = l.requests + (l.paused_until <= v_now)::int,
            tokens = l.tokens + case when l.paused_until > v_now then 0 else p_tokens end,
            requests_per_minute = p_requests_per_minute,
            tokens_per_minute = p_tokens_per_minute
        where l.provider = p_provider and l.model = p_model
        returning l.paused_until, l.next_request_at - v_req into v_pause, v_slot;
        if found then
            reserved := v_pause <= v_now;
            wait_seconds := greatest(extract(epoch from case when reserved then v_slot else v_pause end - v_now)::double precision, 0);
            return;
        end if;
        insert into autoembed.rate_limits (provider, model) values (p_provider, p_model)
            on conflict do nothing;
    end loop;
    raise exception 'rate_limit_acquire: no row for (%, %)', p_provider, p_model;
end;
$$;

-- A worker saw a 429 asking to wait `p_seconds`: every worker waits that long before its next
-- request (a slot already reserved is re-checked against the pause before sending).
create or replace function autoembed.rate_limit_pause(p_provider text, p_model text, p_seconds double precision)
returns void
language sql
as $$
    insert into autoembed.rate_limits as l (provider, model, paused_until, throttled)
    values (p_provider, p_model, clock_timestamp() + make_interval(secs => greatest(p_seconds, 0)), 1)
    on conflict (provider, model) do update set
        paused_until = greatest(l.paused_until, excluded.paused_until),
        throttled = l.throttled + 1;
$$;

-- Seconds left of a pause (0: none).
create or replace function autoembed.rate_limit_paused_for(p_provider text, p_model text)
returns double precision
language sql
stable
as $$
    select coalesce(max(greatest(extract(epoch from paused_until - clock_timestamp()), 0)), 0)::double precision
    from autoembed.rate_limits where provider = p_provider and model = p_model;
$$;

-- Backfills that an operator paused (`core.migrate.backfill_control`): a shard run checks it between
-- pages and stops early; resume deletes the row.
create table if not exists autoembed.backfill_pauses (
    pipeline  text        primary key,
    paused_at timestamptz not null default now(),
    reason    text
);
