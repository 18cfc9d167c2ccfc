-- pgdurable schema, version 12: monitoring from SQL (spec §5.4, §9.1–9.5; docs/monitoring.md).
--
-- Every function here except df.workers and df.worker_tasks runs as the caller (SECURITY
-- INVOKER) and reads only tables that row-level security limits to the caller's own
-- instances: another role's instance id looks exactly like an unknown one, and superusers see
-- everything (spec §10.3).

-- ---------------------------------------------------------------------------------------------
-- df.instance_nodes (spec §9.5): every node of an instance with its physical status and the
-- status a reader should see.
--
-- The physical status of a node is what the engine last wrote. It says "pending" for the arm
-- of an IF that was not taken, for the rest of a sequence after a failure and for the nodes
-- of a RACE loser that never got to run, and "completed" for nodes of an earlier loop
-- iteration that the current one has not reached yet. inferred_status says what these mean:
--
-- 1. Each stamped node has a scope and a generation: status_details is
--    {"execution_id": "<scope>::<generation>"} (spec §9.4, written by the interpreter,
--    src/pgdurable/graph/interpreter.py). scope_max[scope] is the highest generation stamped
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
-- One deliberate addition to the spec's rules: a superseded node that is not terminal and has
-- no NTA reads 'pending', not 'running'. pgdurable leaves a RACE loser's unfinished nodes
-- 'running' (the loser is abandoned, not stamped); in a loop, the next iteration must not
-- show them as running while it has not reached them.
--
-- Children are the ones the interpreter runs: left and right, an IF's or a while-LOOP's
-- condition_node and a join3's extra_nodes (both ids in the node's JSON query, spec §6.3), and
-- the one child (left) of pgdurable's RETRY and TIMEOUT wrappers.
--
-- df.nodes rows may be written by hand (users hold INSERT on them), so the graph need not be a
-- tree: each non-root node is given one parent (the smallest id among the nodes naming it),
-- which makes the walk visit a node at most once, whatever cycles or shared children the rows
-- describe.
--
-- Other SQL (df.explain) reuses this function for its status markers; its columns are the
-- spec's, in the spec's order.
-- ---------------------------------------------------------------------------------------------

-- The JSON value of a text, or NULL if it is not JSON: a hand-written node's query may be
-- anything, and one bad row must not break monitoring of the whole instance.
CREATE FUNCTION df._jsonb_or_null(value text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN value::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE FUNCTION df.instance_nodes(instance_id_param text)
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

-- pg_durable's older form (spec §5.4): the nodes as stored, one execution, no inference. The
-- second argument is accepted and ignored, as there.
CREATE FUNCTION df.instance_nodes(instance_id_param text, _last_n_executions integer)
RETURNS TABLE (execution_id bigint, node_id text, node_type text, query text,
               result_name text, left_node text, right_node text, status text, result text,
               updated_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 1::bigint, n.id::text, n.node_type, n.query, n.result_name, n.left_node::text,
           n.right_node::text, n.status, n.result::text, n.updated_at
      FROM df.nodes n
     WHERE n.instance_id = instance_id_param;
$$;
