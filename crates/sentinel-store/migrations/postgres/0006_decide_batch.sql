-- Concurrent central decisions on one session, in one transaction: a replica queues the calls that
-- arrive while one of that session's transactions is running, and sends them together. Each call
-- still holds the session's advisory lock (and its windows') for its check and its write, so a
-- batch decides exactly as the same calls one after another would; but the lock, the round trip
-- and the commit's WAL flush are paid once per batch instead of once per call.
--
-- `sentinel_lock_all` takes advisory locks in sorted order, each once, as `sentinel_decide` does:
-- every writer of the shared counters (a batch, a settle, the sweeper) locks through it, so none
-- waits on another in a cycle.
CREATE FUNCTION sentinel_lock_all(p_locks BIGINT[]) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    k BIGINT;
BEGIN
    FOR k IN SELECT DISTINCT x FROM unnest(p_locks) AS u(x) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
END;
$$;

-- `p_calls` is a JSON array of objects with the arguments of `sentinel_decide`, by name without
-- the `p_` prefix. The answer is one row per call, `n` its position from 0.
CREATE FUNCTION sentinel_decide_batch(p_calls JSONB)
RETURNS TABLE (n INT, outcome TEXT, idx INT, amount BIGINT, halt_kind TEXT, halt_target TEXT, halt_reason TEXT, halt_actor TEXT, halt_at BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    c JSONB;
    i INT := 0;
BEGIN
    -- Every lock of the whole batch first, sorted: two replicas' batches never deadlock. The
    -- per-call locks taken again below are already held (advisory locks nest).
    PERFORM sentinel_lock_all(ARRAY(
        SELECT l.v::BIGINT FROM jsonb_array_elements(p_calls) AS e(c), jsonb_array_elements_text(e.c -> 'locks') AS l(v)));

    FOR c IN SELECT e.c FROM jsonb_array_elements(p_calls) WITH ORDINALITY AS e(c, o) ORDER BY e.o LOOP
        RETURN QUERY SELECT i, d.* FROM sentinel_decide(
            ARRAY(SELECT v::BIGINT FROM jsonb_array_elements_text(c -> 'locks') AS t(v)),
            c ->> 'agent',
            c ->> 'run',
            (c ->> 'now_ns')::BIGINT,
            ARRAY(SELECT v FROM jsonb_array_elements_text(c -> 'win_keys') WITH ORDINALITY AS t(v, o) ORDER BY o),
            ARRAY(SELECT v::BIGINT FROM jsonb_array_elements_text(c -> 'win_max') WITH ORDINALITY AS t(v, o) ORDER BY o),
            ARRAY(SELECT v::BIGINT FROM jsonb_array_elements_text(c -> 'win_ns') WITH ORDINALITY AS t(v, o) ORDER BY o),
            ARRAY(SELECT v FROM jsonb_array_elements_text(c -> 'budget_keys') WITH ORDINALITY AS t(v, o) ORDER BY o),
            ARRAY(SELECT v::BIGINT FROM jsonb_array_elements_text(c -> 'budget_limits') WITH ORDINALITY AS t(v, o) ORDER BY o),
            (c ->> 'reserve')::BOOLEAN,
            c ->> 'id',
            c ->> 'session',
            c ->> 'action',
            (c ->> 'digest')::BIGINT,
            (c ->> 'cost')::BIGINT,
            (c ->> 'created_at')::BIGINT,
            (c ->> 'expires_at')::BIGINT,
            c ->> 'version') AS d;
        i := i + 1;
    END LOOP;
END;
$$;
