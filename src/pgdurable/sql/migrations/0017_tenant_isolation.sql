-- pgdurable schema, version 17: no tenant can stall the others.
--
-- * Fair shares. Each task carries its submitter's role (df._tasks.role_oid, indexed with
--   visible_at), so a worker claims per role: among the roles with due work, the one holding
--   the fewest of its slots goes first, and no role gets more than the worker's per-role cap
--   (df._claim, at the end of this file).
-- * Checkpoints never wait long on a lock a tenant can hold. A tenant may lock its own
--   df.instances rows (SELECT ... FOR UPDATE, an UPDATE left open), and df.signal locks the
--   instance and its signal tasks until the sender commits. The functions that write progress
--   give up after lock_timeout; the worker then rolls the step back, gives its task back with a
--   growing delay (df._tasks.deferrals) and goes on with other work.
-- * Signal payloads no bigger than a step result may be (df._consume_signal).
-- ---------------------------------------------------------------------------------------------

ALTER TABLE df._tasks ADD COLUMN role_oid oid;
UPDATE df._tasks t SET role_oid = i.submitted_by FROM df.instances i WHERE i.id = t.instance_id;
ALTER TABLE df._tasks ALTER COLUMN role_oid SET NOT NULL;
-- How often the task was given back because its checkpoint could not get a lock: the next
-- try waits longer each time.
ALTER TABLE df._tasks ADD COLUMN deferrals integer NOT NULL DEFAULT 0;
-- The claim walks the roles that have tasks (one index probe each), then takes each role's
-- due tasks in order.
CREATE INDEX tasks_role_visible_idx ON df._tasks (role_oid, visible_at);

-- The start task carries the submitter; every later task inherits it (df._checkpoint).
CREATE OR REPLACE FUNCTION df._instance_created() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO df._runs (instance_id, vars)
    SELECT NEW.id, coalesce(jsonb_object_agg(v.name, v.value), '{}')
      FROM df.vars v
     WHERE v.owner = NEW.submitted_by AND v.value IS NOT NULL;
    INSERT INTO df._tasks (instance_id, role_oid, activation, kind)
    VALUES (NEW.id, NEW.submitted_by, 0, 'start');
    PERFORM pg_notify('pgdurable_tasks', '');
    RETURN NULL;
END;
$$;

-- Lock waits. 500 ms is far above what checkpoints of one instance make each other wait (a
-- few milliseconds each), and short enough that a held lock costs a worker slot only briefly.
ALTER FUNCTION df._checkpoint_begin(bigint, uuid) SET lock_timeout = '500ms';

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint (version 9's, with the role carried to new tasks and a lock timeout).
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
CREATE OR REPLACE FUNCTION df._checkpoint(
    p_task bigint, p_token uuid, p_change jsonb,
    p_worker uuid, p_claim integer, p_lease_seconds double precision)
RETURNS TABLE (task_id bigint, token uuid, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, kind text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '500ms' AS $$
DECLARE
    v_instance varchar(8);
    v_role     oid;       -- the submitter, carried from task to task
    v_outcome  jsonb := nullif(p_change -> 'outcome', 'null'::jsonb);
    v_unclaimed integer;
    v_cancelled integer;  -- tasks withdrawn whose workers were told to cancel them
BEGIN
    DELETE FROM df._tasks t WHERE t.id = p_task AND t.token = p_token
    RETURNING t.instance_id, t.role_oid INTO v_instance, v_role;
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
               (instance_id, role_oid, activation, kind, node_id, payload, visible_at,
                lease_owner, token, attempts)
        SELECT v_instance, v_role, n.activation, n.kind, n.node_id, n.payload,
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

-- ---------------------------------------------------------------------------------------------
-- Signal payloads no bigger than a step result (pg_durable.max_result_bytes).
--
-- A wait consumes its signal with df._consume_signal in the worker's own session, which now
-- takes the worker's limit (the setting as the worker's session sees it: users may SET any
-- pg_durable.* placeholder in their own sessions, so only the worker's value counts) and never
-- hands over a payload above it: the signal is consumed all the same, and the worker learns
-- only its size, and fails the wait.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION df._consume_signal(varchar, text, integer);
CREATE FUNCTION df._consume_signal(p_instance varchar, p_name text, p_activation integer,
                                   p_max_bytes bigint)
RETURNS TABLE (data jsonb, data_bytes bigint)
LANGUAGE sql VOLATILE AS $$
    WITH taken AS (
        UPDATE df._signals s
           SET consumed_at = clock_timestamp(), consumed_by = p_activation
         WHERE s.id = (SELECT o.id FROM df._signals o
                        WHERE o.instance_id = p_instance AND o.name = p_name
                          AND o.consumed_at IS NULL
                        ORDER BY o.id
                        LIMIT 1
                          FOR UPDATE)
        RETURNING s.data, octet_length(s.data::text)::bigint AS data_bytes
    )
    SELECT CASE WHEN t.data_bytes <= p_max_bytes THEN t.data END, t.data_bytes FROM taken t;
$$;
REVOKE ALL ON FUNCTION df._consume_signal(varchar, text, integer, bigint) FROM PUBLIC;
-- Its lock waits are bounded like the checkpoint's (see the top of this file).
ALTER FUNCTION df._consume_signal(varchar, text, integer, bigint) SET lock_timeout = '500ms';

-- ---------------------------------------------------------------------------------------------
-- df._waiting_roles: the roles that have due tasks nobody holds (a leased task is due only
-- once its lease ran out). The roles that have tasks are found by a loose index scan (one
-- probe of tasks_role_visible_idx per role, none at all when nothing is due), and those with
-- due tasks kept.
-- ---------------------------------------------------------------------------------------------
-- (No SET clause: PostgreSQL then inlines it into df._claim's query and plans them as one.)
CREATE FUNCTION df._waiting_roles() RETURNS SETOF oid
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE roles (role_oid) AS (
        (SELECT t.role_oid FROM df._tasks t
          WHERE EXISTS (SELECT 1 FROM df._tasks d WHERE d.visible_at <= now())
          ORDER BY t.role_oid LIMIT 1)
        UNION ALL
        SELECT (SELECT t.role_oid FROM df._tasks t WHERE t.role_oid > r.role_oid
                 ORDER BY t.role_oid LIMIT 1)
          FROM roles r
         WHERE r.role_oid IS NOT NULL
    )
    SELECT r.role_oid FROM roles r
     WHERE r.role_oid IS NOT NULL
       AND EXISTS (SELECT 1 FROM df._tasks t
                    WHERE t.role_oid = r.role_oid AND t.visible_at <= now());
$$;
REVOKE ALL ON FUNCTION df._waiting_roles() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._claim: lease up to p_limit due tasks to worker p_worker, shared fairly between roles.
--
-- The free slots go to the roles with due tasks (df._waiting_roles) like water: the level is
-- what each would hold if the free slots and those the roles hold already (p_held_roles,
-- p_held_slots: this worker's) were shared evenly, and each role offers its due tasks, oldest first, up to that level and
-- under p_cap, locking them as it goes (SKIP LOCKED: workers claiming at once take different
-- tasks). The offers are taken in turns: a role's n-th offer has turn held + n, so the slots
-- go to the roles holding the fewest, and a lone role gets every slot. Offers not taken (the
-- level is rounded up) stay locked until the claim commits, a moment later.
--
-- A function rather than a statement of the worker's: PostgreSQL would plan that statement
-- again at every call, for its parameter values, which costs more than running it; here the
-- plan is made once per session.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._claim(p_worker uuid, p_limit integer, p_lease double precision,
                          p_cap integer, p_held_roles oid[], p_held_slots integer[])
RETURNS TABLE (id bigint, token uuid, kind text, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, instance_id varchar(8), role text,
               role_oid oid, database text, label text, created_at timestamptz,
               deferrals integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT w.role_oid, coalesce(h.slots, 0) AS held
          FROM df._waiting_roles() AS w (role_oid)
          LEFT JOIN unnest(p_held_roles, p_held_slots) AS h (role_oid, slots)
                 ON h.role_oid = w.role_oid
    ), level AS (
        SELECT ceil((p_limit + sum(d.held)) / count(*)::numeric)::integer AS slots FROM due d
    ), offered AS (
        SELECT o.id, o.visible_at, d.held + o.rank AS turn
          FROM due d CROSS JOIN level l
         CROSS JOIN LATERAL (
               SELECT k.id, k.visible_at, row_number() OVER (ORDER BY k.visible_at, k.id) AS rank
                 FROM (SELECT t.id, t.visible_at FROM df._tasks t
                        WHERE t.role_oid = d.role_oid AND t.visible_at <= now()
                        ORDER BY t.visible_at
                        LIMIT greatest(least(l.slots - d.held, p_limit, p_cap - d.held), 0)
                          FOR UPDATE SKIP LOCKED) k
               ) o
    ), picked AS (
        SELECT o.id FROM offered o ORDER BY o.turn, o.visible_at, o.id LIMIT p_limit
    ), claimed AS (
        UPDATE df._tasks t
           SET lease_owner = p_worker,
               token = gen_random_uuid(),
               visible_at = now() + make_interval(secs => p_lease),
               attempts = t.attempts + 1
          FROM picked
         WHERE t.id = picked.id
        RETURNING t.*
    )
    SELECT c.id, c.token, c.kind, c.activation, c.node_id, c.payload, c.attempts,
           c.instance_id,
           -- The login name, not regrole's text, which quotes names like "Odd Name". A dropped
           -- role leaves its number, which fails the login as it should.
           coalesce(a.rolname, i.submitted_by::text)::text, i.submitted_by::oid, i.database,
           i.label, i.created_at, c.deferrals
      FROM claimed c JOIN df.instances i ON i.id = c.instance_id
      LEFT JOIN pg_roles a ON a.oid = i.submitted_by;
END;
$$;
REVOKE ALL ON FUNCTION df._claim(uuid, integer, double precision, integer, oid[], integer[])
    FROM PUBLIC;
