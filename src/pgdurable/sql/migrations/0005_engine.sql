-- pgdurable schema, version 5: the engine's write path.
--
-- How a step commits (DESIGN.md principle 2). A worker claims a task and gets a secret token.
-- For a SQL step it opens a transaction on a connection logged in as the submitting role, runs
-- the user's statement, then calls df._checkpoint_begin and df._checkpoint in that same
-- transaction and commits. The statement, its recorded result and the graph's advance are
-- therefore one transaction: a crash before COMMIT undoes all three, and another worker reruns
-- the step. These functions are SECURITY DEFINER so a user connection can write engine state,
-- and they refuse to do anything without the current token of the task, which the user's SQL
-- never sees (it is sent as a bind parameter after the statement ran).
--
-- Lock order, everywhere: the df.instances row, then df._tasks rows.
--
-- Times written here use clock_timestamp(): a step's transaction began before its statement
-- ran, perhaps long ago, and now() would date its results (and leases) that far back.

-- ---------------------------------------------------------------------------------------------
-- df.start() inserts the instance row; this trigger creates its engine state, snapshots the
-- submitter's variables (spec §6.1 step 8), queues the start task and wakes the workers. All of
-- it is part of the caller's transaction, so a rollback leaves nothing and NOTIFY is only
-- delivered on commit.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._instance_created() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO df._runs (instance_id, vars)
    SELECT NEW.id, coalesce(jsonb_object_agg(v.name, v.value), '{}')
      FROM df.vars v
     WHERE v.owner = NEW.submitted_by AND v.value IS NOT NULL;
    INSERT INTO df._tasks (instance_id, activation, kind) VALUES (NEW.id, 0, 'start');
    PERFORM pg_notify('pgdurable_tasks', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER instances_created AFTER INSERT ON df.instances
    FOR EACH ROW EXECUTE FUNCTION df._instance_created();

-- df.cancel() sets status 'cancelled': drop the instance's queued work at once, and tell
-- workers (the payload is the instance id) to cancel its statements in flight.
CREATE FUNCTION df._instance_cancelled() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM df._tasks WHERE instance_id = NEW.id;
    PERFORM pg_notify('pgdurable_cancel', NEW.id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER instances_cancelled AFTER UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled')
    EXECUTE FUNCTION df._instance_cancelled();

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint_begin: lock the instance and return what the interpreter needs, provided the
-- caller still holds the task. No row back means the task is gone (its instance was cancelled,
-- or a RACE it belonged to was decided) or its lease was taken over: the caller must roll back.
-- ---------------------------------------------------------------------------------------------
-- role_exists is false when the submitter was dropped: a pooled connection may still be logged
-- in as it, so the step is rolled back and the instance failed instead.
CREATE FUNCTION df._checkpoint_begin(p_task bigint, p_token uuid)
RETURNS TABLE (instance_status text, state jsonb, vars jsonb, now double precision,
               role_exists boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_instance varchar(8);
BEGIN
    -- A stale token must not even lock the instance: the worker holding it may be frozen
    -- with this transaction open.
    SELECT t.instance_id INTO v_instance FROM df._tasks t WHERE t.id = p_task AND t.token = p_token;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM df.instances i WHERE i.id = v_instance FOR NO KEY UPDATE;
    PERFORM 1 FROM df._tasks t WHERE t.id = p_task AND t.token = p_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT i.status, r.state, r.vars, extract(epoch FROM clock_timestamp())::float8,
               EXISTS (SELECT 1 FROM pg_roles WHERE oid = i.submitted_by)
          FROM df.instances i JOIN df._runs r ON r.instance_id = i.id
         WHERE i.id = v_instance;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint: apply one interpreter transition and retire the task that caused it.
--
-- p_change is the transition as JSON:
--   state       the new interpreter state
--   generation  root execution number
--   writes      [{"id", "status", "result" (JSON text or null), "execution_id"}], one per node
--   tasks       [{"activation", "kind", "node_id", "payload", "run_at" (epoch s or null)}]
--   dropped     activation numbers whose tasks are abandoned (RACE losers)
--   outcome     null, or {"status": "completed"|"failed", "output": text}
-- Up to p_claim of the new SQL tasks that can run now are leased to p_worker for
-- p_lease_seconds and returned, so the worker goes on with them without another claim.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._checkpoint(
    p_task bigint, p_token uuid, p_change jsonb,
    p_worker uuid, p_claim integer, p_lease_seconds double precision)
RETURNS TABLE (task_id bigint, token uuid, activation integer, node_id varchar(8),
               payload jsonb, attempts integer)
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
           updated_at = clock_timestamp()
      FROM jsonb_to_recordset(p_change -> 'writes')
           AS w(id varchar(8), status text, result text, execution_id text)
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
               n.kind = 'sql' AND n.run_at IS NULL
               AND row_number() OVER (PARTITION BY n.kind = 'sql' AND n.run_at IS NULL
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
                  t.visible_at
    )
    SELECT i.id, i.token, i.activation, i.node_id, i.payload, i.attempts FROM inserted i
     WHERE i.lease_owner IS NOT NULL;

    -- Wake idle workers only for work nobody holds yet; timers are found by polling.
    SELECT count(*) INTO v_unclaimed
      FROM jsonb_to_recordset(p_change -> 'tasks') AS n(kind text, run_at double precision)
     WHERE n.kind = 'sql' AND n.run_at IS NULL;
    IF v_unclaimed > p_claim THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
END;
$$;

-- The write path is for workers and their step connections; nobody else needs to see it, but
-- it must be callable by every role a step runs as (the token is the real guard).
REVOKE ALL ON FUNCTION df._instance_created() FROM PUBLIC;
REVOKE ALL ON FUNCTION df._instance_cancelled() FROM PUBLIC;
