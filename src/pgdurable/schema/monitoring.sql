-- Monitoring from SQL (docs/monitoring.md).
--
-- Every function here except df.workers, df.worker_tasks and df.metrics runs as the caller
-- (SECURITY INVOKER) and reads only tables that row-level security limits to the caller's
-- own instances: another role's instance id looks exactly like an unknown one, and
-- superusers see everything. df.list_instances is in client.sql, df.explain in explain.sql.

-- ---------------------------------------------------------------------------------------------
-- df.instance_nodes: every node of an instance with its physical status and the
-- status a reader should see.
--
-- The physical status of a node is what the engine last wrote. It says "pending" for the arm
-- of an IF that was not taken, for the rest of a sequence after a failure and for the nodes
-- of a RACE loser that never got to run, and "completed" for nodes of an earlier loop
-- iteration that the current one has not reached yet. inferred_status says what these mean:
--
-- 1. Each stamped node has a scope and a generation: status_details is
--    {"execution_id": "<scope>::<generation>"} (written by the interpreter,
--    src/pgdurable/core/interpreter.py). scope_max[scope] is the highest generation stamped
--    in a scope.
-- 2. A node is superseded if its generation is below scope_max of its scope, or if its scope
--    (a JOIN/RACE branch or nested loop, "<parent scope>::<parent generation>::<child root>")
--    was spawned in a generation that is superseded in the parent scope, recursively.
-- 3. Walking down from the root, each node knows its nearest non-superseded terminal ancestor
--    (NTA) and its highest-generation stamped ancestor (MGA; the nearest one among ties):
--      terminal, not superseded   -> its physical status
--      terminal, superseded       -> 'skipped' (from NTA) if there is an NTA,
--                                    else 'pending' (from MGA)
--      not terminal, with an NTA  -> 'skipped' (from NTA)
--      not terminal, superseded   -> 'pending' (from MGA)
--      otherwise                  -> 'running' if physically running, else 'pending'
-- 4. Nodes the walk does not reach keep their physical status.
--
-- One deliberate addition to pg_durable's rules: a superseded node that is not terminal and has
-- no NTA reads 'pending', not 'running'. pgdurable leaves a RACE loser's unfinished nodes
-- 'running' (the loser is abandoned, not stamped); in a loop, the next iteration must not
-- show them as running while it has not reached them.
--
-- Children are the ones the interpreter runs: left and right, an IF's or a while-LOOP's
-- condition_node and a join3's extra_nodes (both ids in the node's JSON query), and
-- the one child (left) of pgdurable's RETRY and TIMEOUT wrappers.
--
-- df.nodes rows may be written by hand (users hold INSERT on them), so the graph need not be a
-- tree: each non-root node is given one parent (the smallest id among the nodes naming it),
-- which makes the walk visit a node at most once, whatever cycles or shared children the rows
-- describe.
--
-- Other SQL (df.explain) reuses this function for its status markers; its columns are
-- pg_durable's, in pg_durable's order.
-- ---------------------------------------------------------------------------------------------

-- The JSON value of a text, or NULL if it is not JSON: a hand-written node's query may be
-- anything, and one bad row must not break monitoring of the whole instance.
CREATE OR REPLACE FUNCTION df._jsonb_or_null(value text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN value::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text,
               right_node text, status text, result text, status_details text,
               inferred_status text, inferred_status_from_ancestor_id text,
               updated_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH RECURSIVE
node AS (
    SELECT n.id::text AS id, n.node_type, n.query, n.result_name, n.left_node::text AS left_node,
           n.right_node::text AS right_node, n.status, n.result, n.status_details, n.updated_at,
           n.status IN ('completed', 'failed') AS terminal,
           -- {scope, generation}; NULL for a node never stamped (or stamped unreadably).
           regexp_match(n.status_details ->> 'execution_id', '^(.+)::([0-9]{1,9})$') AS stamp,
           CASE WHEN n.node_type IN ('IF', 'LOOP', 'JOIN')
                THEN df._jsonb_or_null(n.query) END AS config
      FROM df.nodes n
     WHERE n.instance_id = instance_id_param
),
edge AS (
    SELECT p.id AS parent, c.child
      FROM node p,
           LATERAL (SELECT p.left_node
                    UNION ALL SELECT p.right_node
                    UNION ALL SELECT p.config ->> 'condition_node'
                     WHERE p.node_type IN ('IF', 'LOOP') AND jsonb_typeof(p.config) = 'object'
                    UNION ALL SELECT e.value
                      FROM jsonb_array_elements_text(
                               CASE WHEN p.node_type = 'JOIN'
                                         AND jsonb_typeof(p.config -> 'extra_nodes') = 'array'
                                    THEN p.config -> 'extra_nodes' END) AS e) AS c (child)
     WHERE c.child IS NOT NULL
),
root AS (
    SELECT i.root_node::text AS id FROM df.instances i WHERE i.id = instance_id_param
),
parent_of AS (
    SELECT DISTINCT ON (e.child) e.child, e.parent
      FROM edge e
     WHERE e.child NOT IN (SELECT r.id FROM root r)
     ORDER BY e.child, e.parent
),
scope_max AS (
    SELECT n.stamp[1] AS scope, max(n.stamp[2]::integer) AS generation
      FROM node n
     WHERE n.stamp IS NOT NULL
     GROUP BY n.stamp[1]
),
-- Each scope's lineage up to the instance's root scope; dead once a spawning generation is
-- behind its parent scope.
lineage (scope, cur, dead) AS (
    SELECT s.scope, s.scope, false FROM scope_max s
    UNION ALL
    SELECT l.scope, up.m[1], l.dead OR up.m[2]::integer < coalesce(pm.generation, 0)
      FROM lineage l
     CROSS JOIN LATERAL regexp_match(l.cur, '^(.+)::([0-9]{1,9})::[0-9a-f]{8}$') AS up (m)
      LEFT JOIN scope_max pm ON pm.scope = up.m[1]
     WHERE up.m IS NOT NULL
),
dead_scope AS (
    SELECT l.scope FROM lineage l GROUP BY l.scope HAVING bool_or(l.dead)
),
judged AS (
    SELECT n.*, n.stamp[2]::integer AS generation,
           n.stamp IS NOT NULL
           AND (n.stamp[2]::integer < s.generation
                OR EXISTS (SELECT 1 FROM dead_scope d WHERE d.scope = n.stamp[1]))
           AS superseded
      FROM node n
      LEFT JOIN scope_max s ON s.scope = n.stamp[1]
),
walk (id, nta, mga, mga_generation) AS (
    SELECT r.id, NULL::text, NULL::text, NULL::integer FROM root r
    UNION ALL
    SELECT c.child,
           CASE WHEN p.terminal AND NOT p.superseded THEN p.id ELSE w.nta END,
           CASE WHEN p.generation >= coalesce(w.mga_generation, 0) THEN p.id ELSE w.mga END,
           CASE WHEN p.generation >= coalesce(w.mga_generation, 0)
                THEN p.generation ELSE w.mga_generation END
      FROM walk w
      JOIN judged p ON p.id = w.id
      JOIN parent_of c ON c.parent = w.id
)
SELECT j.id, j.node_type, j.query, j.result_name, j.left_node, j.right_node, j.status,
       j.result::text, j.status_details::text,
       CASE WHEN w.id IS NULL OR (j.terminal AND NOT j.superseded) THEN j.status
            WHEN w.nta IS NOT NULL THEN 'skipped'
            WHEN j.terminal OR j.superseded THEN 'pending'
            WHEN j.status = 'running' THEN 'running'
            ELSE 'pending' END,
       CASE WHEN w.id IS NULL OR (j.terminal AND NOT j.superseded) THEN NULL
            WHEN w.nta IS NOT NULL THEN w.nta
            WHEN j.terminal OR j.superseded THEN w.mga END,
       j.updated_at
  FROM judged j
  LEFT JOIN walk w ON w.id = j.id;
$$;

-- pg_durable's older form: the nodes as stored, one execution, no inference. The
-- second argument is accepted and ignored, as there.
CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id_param text, _last_n_executions integer)
RETURNS TABLE (execution_id bigint, node_id text, node_type text, query text,
               result_name text, left_node text, right_node text, status text, result text,
               updated_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 1::bigint, n.id::text, n.node_type, n.query, n.result_name, n.left_node::text,
           n.right_node::text, n.status, n.result::text, n.updated_at
      FROM df.nodes n
     WHERE n.instance_id = instance_id_param;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.instance_info and df.instance_executions. Run as the caller: another role's
-- instance gives no row, like an unknown one.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.id::text, i.label, 'pg_durable::orchestration::execute-function-graph'::text,
           '1.0.0'::text, r.generation::bigint, i.status, r.output
      FROM df.instances i
      LEFT JOIN df._runs r ON r.instance_id = i.id
     WHERE i.id = $1;
$$;

-- Newest first; limit_count is capped at 10,000, NULL means the default 5. The
-- current execution comes from df._runs (its finished_at) and df.instances, the
-- ended ones from the history (a root loop's iterations, and the runs df.restart ran again,
-- 'Failed' or 'Cancelled'); run as the caller, under row-level security on all three. An
-- execution after a restarted one began with the restart.
CREATE OR REPLACE FUNCTION df.instance_executions(instance_id text, limit_count integer DEFAULT 5)
RETURNS TABLE (execution_id bigint, status text, event_count bigint, duration_ms bigint,
               output text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := least(coalesce($2, 5), 10000);
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        WITH current AS (
            SELECT r.generation,
                   CASE i.status WHEN 'completed' THEN 'Completed'
                                 WHEN 'failed' THEN 'Failed'
                                 WHEN 'cancelled' THEN 'Cancelled'
                                 ELSE 'Running' END AS status,
                   coalesce(p.restarted_at, p.finished_at, i.created_at) AS started_at,
                   CASE WHEN i.status IN ('completed', 'failed', 'cancelled')
                        THEN r.finished_at END AS finished_at,
                   r.checkpoints - coalesce(p.first_event + p.events, 0) AS events,
                   CASE WHEN i.status IN ('completed', 'failed', 'cancelled')
                        THEN r.output END AS output
              FROM df._runs r
              JOIN df.instances i ON i.id = r.instance_id
              LEFT JOIN df._executions p
                     ON p.instance_id = r.instance_id AND p.generation = r.generation - 1
             WHERE r.instance_id = $1
        ), every AS (
            SELECT c.generation, c.status, c.events, c.started_at, c.finished_at, c.output
              FROM current c
            UNION ALL
            SELECT e.generation, e.status, e.events, e.started_at, e.finished_at, e.output
              FROM df._executions e
             WHERE e.instance_id = $1
               AND e.generation < (SELECT c.generation FROM current c)
        )
        SELECT x.generation::bigint, x.status, x.events::bigint,
               CASE WHEN x.finished_at IS NULL THEN 0::bigint
                    ELSE greatest(0, round(extract(epoch FROM x.finished_at - x.started_at)
                                           * 1000))::bigint END,
               x.output
          FROM every x
         ORDER BY x.generation DESC
         LIMIT v_limit;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Workers (pgdurable's own; pg_durable has one executor per cluster). Each live worker keeps a
-- row in df._worker_epoch and heartbeats it every third of its lease (10 s with the default
-- 30 s lease, worker/loop.py); a worker killed without a clean stop leaves its row behind until
-- another worker starts and sweeps rows silent for ten minutes. So a worker is alive when its
-- last heartbeat is younger than three heartbeat intervals: stale_after, 30 s by default (pass
-- three times lease/3 for workers run with another --lease-seconds).
--
-- What a worker holds are the tasks leased to it (df._tasks.lease_owner): steps it runs now,
-- and steps its checkpoints handed to it. A lease that ran out stays with its worker until
-- another worker claims the task, so the tasks of a dead worker show here with an expired
-- lease. step_names are the Python steps the worker runs (docs/python.md).
--
-- System-wide data (hosts, pids, every tenant's instance ids), not limited by row-level
-- security: SECURITY DEFINER, and EXECUTE only by explicit grant, like df.metrics
-- (df.grant_usage(role, with_grant => true), or GRANT EXECUTE).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.workers(stale_after interval DEFAULT interval '30 seconds')
RETURNS TABLE (worker_id uuid, hostname text, pid integer, started_at timestamptz,
               last_seen_at timestamptz, alive boolean, concurrency integer, version text,
               tasks_held bigint, step_names text[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.epoch_id, w.hostname, w.pid, w.started_at, w.last_seen_at,
           coalesce(w.last_seen_at > now() - $1, false), w.concurrency, w.version,
           (SELECT count(*) FROM df._tasks t WHERE t.lease_owner = w.epoch_id),
           w.step_names
      FROM df._worker_epoch w
     ORDER BY w.started_at, w.epoch_id;
$$;

-- The tasks each worker holds: which step of which instance, since when (its lease runs to
-- lease_expires_at and is extended by the heartbeat), and how often it was claimed.
CREATE OR REPLACE FUNCTION df.worker_tasks()
RETURNS TABLE (worker_id uuid, task_id bigint, instance_id text, submitted_by text,
               node_id text, node_type text, kind text, attempts integer,
               lease_expires_at timestamptz, lease_expired boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT t.lease_owner, t.id, t.instance_id::text, i.submitted_by::text, t.node_id::text,
           n.node_type, t.kind, t.attempts, t.visible_at, t.visible_at <= now()
      FROM df._tasks t
      JOIN df.instances i ON i.id = t.instance_id
      LEFT JOIN df.nodes n ON n.instance_id = t.instance_id AND n.id = t.node_id
     WHERE t.lease_owner IS NOT NULL
     ORDER BY t.lease_owner, t.id;
$$;

-- The caller's Python steps that wait for a worker: running CALL nodes whose step no live
-- worker has (docs/python.md). Run as the caller: another role's instances are not seen.
CREATE OR REPLACE FUNCTION df.waiting_calls()
RETURNS TABLE (instance_id text, node_id text, step_name text, waiting_since timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT n.instance_id::text, n.id::text, df._call_name(n.query), n.started_at
      FROM df.nodes n
      JOIN df.instances i ON i.id = n.instance_id
     WHERE n.node_type = 'CALL' AND n.status = 'running'
       AND i.status IN ('pending', 'running')
       AND NOT df._step_has_worker(df._call_name(n.query))
     ORDER BY n.started_at, n.instance_id, n.id;
$$;

REVOKE EXECUTE ON FUNCTION df.workers(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.worker_tasks() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.metrics: system-wide counts, so not filtered by row-level security; EXECUTE
-- only by explicit grant (df.grant_usage(role, with_grant => true), or GRANT EXECUTE).
-- running_instances counts pending ones too: the engine holds them as started. Cancelled
-- instances count in total_instances only. total_executions is the sum of the instances'
-- executions (root loop iterations and df.restart's runs); total_events the committed checkpoints, pgdurable's
-- counterpart of history events.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.metrics()
RETURNS TABLE (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*),
           count(*) FILTER (WHERE i.status IN ('pending', 'running')),
           count(*) FILTER (WHERE i.status = 'completed'),
           count(*) FILTER (WHERE i.status = 'failed'),
           coalesce(sum(r.generation), 0)::bigint,
           coalesce(sum(r.checkpoints), 0)::bigint
      FROM df.instances i
      LEFT JOIN df._runs r ON r.instance_id = i.id;
$$;

REVOKE EXECUTE ON FUNCTION df.metrics() FROM PUBLIC;
