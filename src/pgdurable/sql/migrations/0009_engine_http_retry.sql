-- pgdurable schema, version 9: the engine side of HTTP steps, df.retry and df.timeout.
--
-- HTTP steps are tasks of their own kind. The worker performs the request (its egress policy
-- is the operator's, see docs/http.md) and checkpoints the response on its own connection:
-- an HTTP step is at-least-once, and carries an Idempotency-Key that is the same for every
-- attempt. Like SQL steps, an HTTP step that can run at once is handed to the worker whose
-- checkpoint created it.
--
-- df.retry and df.timeout need no tables: their state lives in the interpreter's state, and
-- their waits are timer tasks. A df.retry keeps the error of each failed attempt, one line per
-- attempt, in its df.nodes.error (spec §2.3 leaves that column unused).

ALTER TABLE df._tasks DROP CONSTRAINT _tasks_kind_check;
ALTER TABLE df._tasks ADD CONSTRAINT _tasks_kind_check
    CHECK (kind IN ('start', 'sql', 'http', 'timer', 'signal'));

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint: apply one interpreter transition and retire the task that caused it.
-- (Replaced in version 17, which carries the submitting role to new tasks.)
--
-- p_change is the transition as JSON:
--   state       the new interpreter state
--   generation  root execution number
--   writes      [{"id", "status", "result" (JSON text or null), "execution_id",
--                 "error_op" ('set' | 'append' | null), "error"}], one per node
--   tasks       [{"activation", "kind", "node_id", "payload", "run_at" (epoch s or null)}]
--   dropped     activation numbers whose tasks are abandoned (RACE losers)
--   outcome     null, or {"status": "completed"|"failed", "output": text}
-- Up to p_claim of the new SQL and HTTP tasks that can run now are leased to p_worker for
-- p_lease_seconds and returned, so the worker goes on with them without another claim.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION df._checkpoint(bigint, uuid, jsonb, uuid, integer, double precision);

CREATE FUNCTION df._checkpoint(
    p_task bigint, p_token uuid, p_change jsonb,
    p_worker uuid, p_claim integer, p_lease_seconds double precision)
RETURNS TABLE (task_id bigint, token uuid, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, kind text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_instance varchar(8);
    v_outcome  jsonb := nullif(p_change -> 'outcome', 'null'::jsonb);
    v_unclaimed integer;
    v_cancelled integer;  -- tasks withdrawn whose workers were told to cancel them
BEGIN
    DELETE FROM df._tasks t WHERE t.id = p_task AND t.token = p_token
    RETURNING t.instance_id INTO v_instance;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgdurable: task % is no longer held by this worker', p_task
            USING ERRCODE = 'PD001',
                  HINT = 'Its lease expired and another worker took it, or the instance was '
                         'cancelled. The step is rolled back.';
    END IF;

    UPDATE df.nodes n
       SET status = w.status,
           result = w.result::jsonb,
           status_details = jsonb_build_object('execution_id', w.execution_id),
           -- A df.retry's history of failed attempts, one line each.
           error = CASE w.error_op
                       WHEN 'set' THEN nullif(w.error, '')
                       WHEN 'append' THEN concat_ws(E'\n', n.error, w.error)
                       ELSE n.error END,
           updated_at = clock_timestamp()
      FROM jsonb_to_recordset(p_change -> 'writes')
           AS w(id varchar(8), status text, result text, execution_id text, error_op text,
                error text)
     WHERE n.instance_id = v_instance AND n.id = w.id;

    UPDATE df._runs r
       SET state = p_change -> 'state',
           generation = coalesce((p_change ->> 'generation')::integer, r.generation),
           output = CASE WHEN v_outcome IS NULL THEN r.output ELSE v_outcome ->> 'output' END,
           checkpoints = r.checkpoints + 1
     WHERE r.instance_id = v_instance;

    IF v_outcome IS NOT NULL THEN
        UPDATE df.instances i
           SET status = v_outcome ->> 'status',
               updated_at = clock_timestamp(),
               completed_at = CASE WHEN v_outcome ->> 'status' = 'completed'
                                   THEN clock_timestamp() END
         WHERE i.id = v_instance AND i.status NOT IN ('completed', 'failed', 'cancelled');
        -- Whatever still runs (the loser of a deciding RACE) is cancelled.
        WITH gone AS (
            DELETE FROM df._tasks t WHERE t.instance_id = v_instance RETURNING t.activation
        )
        SELECT count(pg_notify('pgdurable_cancel', v_instance || ':' || g.activation))
          INTO v_cancelled
          FROM gone g;
        RETURN;
    END IF;

    UPDATE df.instances i SET status = 'running', updated_at = clock_timestamp()
     WHERE i.id = v_instance AND i.status = 'pending';

    -- Abandoned work (RACE losers): its tasks go, and a worker running one of their
    -- statements is told to cancel it (delivered only if this transaction commits).
    WITH dropped AS (
        DELETE FROM df._tasks t
         WHERE t.instance_id = v_instance
           AND t.activation = ANY (
               ARRAY(SELECT jsonb_array_elements_text(p_change -> 'dropped'))::int[])
        RETURNING t.activation
    )
    SELECT count(pg_notify('pgdurable_cancel', v_instance || ':' || d.activation))
      INTO v_cancelled
      FROM dropped d;

    RETURN QUERY
    WITH new_task AS (
        SELECT n.activation, n.kind, n.node_id, n.payload, n.run_at,
               n.kind IN ('sql', 'http') AND n.run_at IS NULL
               AND row_number() OVER (PARTITION BY n.kind IN ('sql', 'http') AND n.run_at IS NULL
                                      ORDER BY n.activation) <= p_claim AS claimed
          FROM jsonb_to_recordset(p_change -> 'tasks')
               AS n(activation integer, kind text, node_id varchar(8), payload jsonb,
                    run_at double precision)
    ), inserted AS (
        INSERT INTO df._tasks AS t
               (instance_id, activation, kind, node_id, payload, visible_at, lease_owner,
                token, attempts)
        SELECT v_instance, n.activation, n.kind, n.node_id, n.payload,
               CASE WHEN n.claimed
                    THEN clock_timestamp() + make_interval(secs => p_lease_seconds)
                    -- A signal wait is due at once if its signal is already buffered, else at
                    -- its deadline (or never); df.signal wakes it (df._signals: migration 7).
                    WHEN n.kind = 'signal'
                    THEN CASE WHEN EXISTS (
                                  SELECT 1 FROM df._signals s
                                   WHERE s.instance_id = v_instance
                                     AND s.name = n.payload ->> 'signal_name'
                                     AND s.consumed_at IS NULL)
                              THEN clock_timestamp()
                              ELSE coalesce(to_timestamp(n.run_at), 'infinity') END
                    WHEN n.run_at IS NULL THEN clock_timestamp()
                    ELSE to_timestamp(n.run_at) END,
               CASE WHEN n.claimed THEN p_worker END,
               CASE WHEN n.claimed THEN gen_random_uuid() END,
               CASE WHEN n.claimed THEN 1 ELSE 0 END
          FROM new_task n
        RETURNING t.id, t.token, t.activation, t.node_id, t.payload, t.attempts, t.lease_owner,
                  t.visible_at, t.kind
    )
    SELECT i.id, i.token, i.activation, i.node_id, i.payload, i.attempts, i.kind
      FROM inserted i
     WHERE i.lease_owner IS NOT NULL;

    -- Wake idle workers only for work nobody holds yet; timers are found by polling.
    SELECT count(*) INTO v_unclaimed
      FROM jsonb_to_recordset(p_change -> 'tasks') AS n(kind text, run_at double precision)
     WHERE n.kind IN ('sql', 'http') AND n.run_at IS NULL;
    IF v_unclaimed > p_claim THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
END;
$$;
