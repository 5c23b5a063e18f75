-- One round trip per central decision: lock every counter the call touches (sorted, so no
-- deadlock), check halts, windows and budgets in the order of the decision contract, and on success
-- write the reservation, its window slots and its spend. Advisory locks are held until the end of
-- the calling transaction.
CREATE FUNCTION sentinel_decide(
    p_locks         BIGINT[],
    p_agent         TEXT,
    p_run           TEXT,
    p_now_ns        BIGINT,
    p_win_keys      TEXT[],
    p_win_max       BIGINT[],
    p_win_ns        BIGINT[],
    p_budget_keys   TEXT[],
    p_budget_limits BIGINT[],
    p_reserve       BOOLEAN,
    p_id            TEXT,
    p_session       TEXT,
    p_action        TEXT,
    p_digest        BIGINT,
    p_cost          BIGINT,
    p_created_at    BIGINT,
    p_expires_at    BIGINT,
    p_version       TEXT
) RETURNS TABLE (outcome TEXT, idx INT, amount BIGINT, halt_kind TEXT, halt_target TEXT, halt_reason TEXT, halt_actor TEXT, halt_at BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    k     BIGINT;
    i     INT;
    h     RECORD;
    nth   BIGINT;
    spent BIGINT;
BEGIN
    FOREACH k IN ARRAY (SELECT COALESCE(array_agg(x ORDER BY x), '{}') FROM (SELECT DISTINCT unnest(p_locks) AS x) s) LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;

    SELECT * INTO h FROM halts
     WHERE (kind = 'agent' AND target = p_agent) OR (kind = 'run' AND target = p_run)
     ORDER BY kind LIMIT 1;
    IF FOUND THEN
        RETURN QUERY SELECT 'halted'::TEXT, 0, 0::BIGINT, h.kind, h.target, h.reason, h.actor, h.at;
        RETURN;
    END IF;

    FOR i IN 1 .. COALESCE(array_length(p_win_keys, 1), 0) LOOP
        SELECT w.at_ns INTO nth FROM window_events w
         WHERE w.key = p_win_keys[i] AND w.at_ns > p_now_ns - p_win_ns[i]
         ORDER BY w.at_ns DESC OFFSET p_win_max[i] - 1 LIMIT 1;
        IF FOUND THEN
            RETURN QUERY SELECT 'window'::TEXT, i - 1, GREATEST(nth + p_win_ns[i] - p_now_ns, 0), NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
            RETURN;
        END IF;
    END LOOP;

    IF p_cost > 0 THEN
        FOR i IN 1 .. COALESCE(array_length(p_budget_keys, 1), 0) LOOP
            SELECT COALESCE((SELECT s.micros FROM spend s WHERE s.key = p_budget_keys[i]), 0) INTO spent;
            IF spent + p_cost > p_budget_limits[i] THEN
                RETURN QUERY SELECT 'budget'::TEXT, i - 1, spent, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
                RETURN;
            END IF;
        END LOOP;
    END IF;

    IF p_reserve THEN
        INSERT INTO reservations (id, agent_id, run_id, session_id, action, args_digest, cost_micros, actual_micros,
                                  state, at_ns, created_at, expires_at, settled_at, policy_version)
        VALUES (p_id, p_agent, p_run, p_session, p_action, p_digest, p_cost, NULL,
                'reserved', p_now_ns, p_created_at, p_expires_at, NULL, p_version);
        INSERT INTO window_events (key, reservation_id, at_ns, expires_ns)
        SELECT u.key, p_id, p_now_ns, p_now_ns + MAX(u.ns)
          FROM UNNEST(p_win_keys, p_win_ns) AS u(key, ns) GROUP BY u.key;
        IF p_cost <> 0 THEN
            INSERT INTO spend (key, micros)
            SELECT u.k, p_cost FROM UNNEST(ARRAY[
                'a' || chr(31) || p_session || chr(31) || p_action,
                'r' || chr(31) || p_session || chr(31) || p_run,
                's' || chr(31) || p_session]) AS u(k) ORDER BY u.k
            ON CONFLICT (key) DO UPDATE SET micros = spend.micros + EXCLUDED.micros;
        END IF;
    END IF;
    RETURN QUERY SELECT 'passed'::TEXT, 0, 0::BIGINT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
END;
$$;
