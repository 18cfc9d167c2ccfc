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

-- ---------------------------------------------------------------------------------------------
-- df.list_instances, the paginated overload (spec §9.2). The basic overload (migration 4)
-- already orders ties on created_at by id, the order this one pages through.
--
-- Keyset pagination: a page is the instances after the last row of the previous page in the
-- order (created_at DESC, id ASC), so pages neither skip nor repeat rows when instances are
-- started or removed between two calls. The cursor names that last row: the lower-case hex of
-- 'v1|<created_at with microseconds and UTC offset>|<id>'. Opaque to callers, but exactly
-- pg_durable's, so cursors can be passed between the two.
-- ---------------------------------------------------------------------------------------------

-- The row a cursor names, or the spec's error for anything that is not a cursor this function
-- could have produced: odd length, non-hex, more than 512 hex digits, not UTF-8, another
-- version, an empty part, a timestamp of another shape, or a date that does not exist.
CREATE FUNCTION df._list_cursor(cursor text, OUT created_at timestamptz, OUT id text)
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_text   text;
    v_parts  text[];
BEGIN
    IF length(cursor) <= 512 AND length(cursor) % 2 = 0 AND cursor ~ '^[0-9a-fA-F]*$' THEN
        BEGIN
            -- convert_from refuses invalid UTF-8 and NUL bytes.
            v_text := convert_from(decode(cursor, 'hex'), 'UTF8');
            -- 'v1|<timestamp>|<id>'; the id is the rest, whatever it holds.
            v_parts := regexp_match(v_text, '^v1\|([^|]+)\|(.+)$');
            IF v_parts[1] ~ '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}[+-]\d{2}(:\d{2})?$' THEN
                created_at := v_parts[1]::timestamptz;  -- refuses e.g. a 13th month
                id := v_parts[2];
                RETURN;
            END IF;
        EXCEPTION WHEN others THEN
            NULL;  -- reported below, like every other malformed cursor
        END;
    END IF;
    RAISE EXCEPTION 'df.list_instances: invalid after_cursor'
        USING ERRCODE = 'invalid_parameter_value';
END;
$$;

CREATE FUNCTION df.list_instances(status_filter text, limit_count integer, label_filter text,
                                  after_cursor text DEFAULT NULL)
RETURNS TABLE (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text, created_at timestamptz,
               completed_at timestamptz, next_cursor text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit    integer := coalesce(limit_count, 100);
    v_max      integer := df._list_instances_max_limit();
    v_after    timestamptz;
    v_after_id text;
    v_where    text := '';
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_limit > v_max THEN
        RAISE EXCEPTION 'df.list_instances: limit_count (%) exceeds pg_durable.list_instances_max_limit (%); request fewer rows, or use the paginated df.list_instances overload (after_cursor/next_cursor) for large result sets',
            v_limit, v_max USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF after_cursor IS NOT NULL THEN
        SELECT c.created_at, c.id INTO v_after, v_after_id FROM df._list_cursor(after_cursor) c;
    END IF;
    -- Only the filters given are in the statement, planned for these values: each filter has
    -- an index that yields rows in page order (spec §2.2), so a page costs about its size.
    IF status_filter IS NOT NULL THEN
        v_where := v_where || ' AND i.status = $2';
    END IF;
    IF label_filter IS NOT NULL THEN
        v_where := v_where || ' AND i.label = $3';
    END IF;
    IF v_after IS NOT NULL THEN
        -- The first condition is implied by the second; spelled out, it bounds the index scan,
        -- so a deep page does not read every row before it.
        v_where := v_where || ' AND i.created_at <= $4'
                           || ' AND (i.created_at < $4 OR (i.created_at = $4 AND i.id > $5))';
    END IF;
    -- One row more than the page tells whether there is a next page; the cursor then names
    -- the page's last row and is repeated on every row (spec §9.2).
    RETURN QUERY EXECUTE format($q$
        WITH page AS (
            SELECT i.id, i.label, i.status, i.created_at, i.completed_at,
                   row_number() OVER (ORDER BY i.created_at DESC, i.id) AS n
              FROM (SELECT i.*
                      FROM df.instances i
                     WHERE i.created_at IS NOT NULL %s
                     ORDER BY i.created_at DESC, i.id
                     LIMIT $1 + 1) i
        )
        SELECT p.id::text, p.label, 'pg_durable::orchestration::execute-function-graph'::text,
               p.status, r.generation::bigint, r.output, p.created_at, p.completed_at,
               (SELECT encode(convert_to('v1|' || to_char(l.created_at,
                                                          'YYYY-MM-DD"T"HH24:MI:SS.USOF')
                                         || '|' || l.id, 'UTF8'), 'hex')
                  FROM page l WHERE l.n = $1 AND EXISTS (SELECT 1 FROM page m WHERE m.n > $1))
          FROM page p
          LEFT JOIN df._runs r ON r.instance_id = p.id
         WHERE p.n <= $1
         ORDER BY p.n
    $q$, v_where)
    USING v_limit, status_filter, label_filter, v_after, v_after_id;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Execution history (spec §9.3). An execution is one generation of the instance's root: the
-- whole run, or one iteration of a loop at the root (spec §7.7: each iteration is a new
-- generation, "continue-as-new" in pg_durable). df._runs keeps only the current generation,
-- which df.instance_executions derives when read (from df._runs and df.instances); this table
-- keeps the executions that ended by the loop's next iteration, written by a trigger when the
-- generation changes: df._checkpoint stays as it is, and a workflow without a root loop
-- writes no row here at all.
--
--   status       'ContinuedAsNew' (the loop began its next iteration). The current execution
--                reads 'Running' while it runs (also while the instance is pending: the
--                engine holds it as started), then 'Completed', 'Failed', or 'Cancelled' for a
--                cancelled instance (the df status, capitalised like the others; pg_durable's
--                engine reports no fixed spelling for it)
--   started_at   the start of the instance for the first; the end of the one before for the
--                others
--   first_event  df._runs.checkpoints when it began (0 for the first)
--   events       its checkpoints (the one that begins an iteration counts in the new one)
--   output       the iteration's body result
--
-- A root loop may iterate for ever (one iteration a second at most); only the newest 1,000
-- executions of an instance are kept, each with its body result, so the history of one
-- instance stays bounded.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df._executions (
    instance_id  varchar(8) NOT NULL REFERENCES df._runs (instance_id) ON DELETE CASCADE,
    generation   integer NOT NULL,
    status       text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    first_event  bigint NOT NULL,
    events       bigint,
    output       text,
    PRIMARY KEY (instance_id, generation)
);

-- Like df._runs: users read the history of their own instances only (SELECT is granted by
-- df.grant_usage, migration 16).
ALTER TABLE df._executions ENABLE ROW LEVEL SECURITY;
CREATE POLICY executions_user_isolation ON df._executions FOR SELECT
    USING (EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- A root loop began its next iteration: the execution that ended is recorded. It began when
-- the one before it ended (or with the instance), at that one's last checkpoint count (or 0).
-- The interpreter state (graph/interpreter.py, format 1) still holds the loop's activation,
-- whose "last" is the body result of the iteration that ended; the root loop is the one
-- iterating execution "0". Nothing here may fail a checkpoint, so a state of another shape
-- only loses that output.
CREATE FUNCTION df._execution_continued() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_output  text;
BEGIN
    IF jsonb_typeof(NEW.state -> 'acts') = 'object' THEN
        SELECT a.value ->> 'last' INTO v_output
          FROM jsonb_each(NEW.state -> 'acts') AS a
         WHERE jsonb_typeof(a.value) = 'object' AND a.value ->> 'loop_exec' = '0'
         LIMIT 1;
    END IF;
    INSERT INTO df._executions (instance_id, generation, status, started_at, finished_at,
                                first_event, events, output)
    SELECT NEW.instance_id, OLD.generation, 'ContinuedAsNew',
           coalesce(p.finished_at, i.created_at, clock_timestamp()), clock_timestamp(),
           coalesce(p.first_event + p.events, 0),
           OLD.checkpoints - coalesce(p.first_event + p.events, 0), v_output
      FROM df.instances i
      LEFT JOIN df._executions p
             ON p.instance_id = NEW.instance_id AND p.generation = OLD.generation - 1
     WHERE i.id = NEW.instance_id
    ON CONFLICT (instance_id, generation) DO NOTHING;
    DELETE FROM df._executions e
     WHERE e.instance_id = NEW.instance_id AND e.generation <= NEW.generation - 1000;
    RETURN NULL;
END;
$$;

-- Every checkpoint sets generation; the WHEN clause keeps the trigger to real changes, so an
-- ordinary checkpoint queues nothing.
CREATE TRIGGER runs_execution_continued AFTER UPDATE OF generation ON df._runs
    FOR EACH ROW WHEN (NEW.generation IS DISTINCT FROM OLD.generation)
    EXECUTE FUNCTION df._execution_continued();

REVOKE ALL ON FUNCTION df._execution_continued() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.instance_info and df.instance_executions (spec §9.3). Run as the caller: another role's
-- instance gives no row, like an unknown one.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.id::text, i.label, 'pg_durable::orchestration::execute-function-graph'::text,
           '1.0.0'::text, r.generation::bigint, i.status, r.output
      FROM df.instances i
      LEFT JOIN df._runs r ON r.instance_id = i.id
     WHERE i.id = $1;
$$;

-- Newest first; limit_count is capped at 10,000 (spec §9.3), NULL means the default 5. The
-- current execution comes from df._runs (its finished_at: migration 14) and df.instances, the
-- ended ones from the history; run as the caller, under row-level security on all three.
CREATE FUNCTION df.instance_executions(instance_id text, limit_count integer DEFAULT 5)
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
                   coalesce(p.finished_at, i.created_at) AS started_at,
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
-- Workers (pgdurable's own; spec §2.5 has one executor per cluster). Each live worker keeps a
-- row in df._worker_epoch and heartbeats it every third of its lease (10 s with the default
-- 30 s lease, worker/loop.py); a worker killed without a clean stop leaves its row behind until
-- another worker starts and sweeps rows silent for ten minutes. So a worker is alive when its
-- last heartbeat is younger than three heartbeat intervals: stale_after, 30 s by default (pass
-- three times lease/3 for workers run with another --lease-seconds).
--
-- What a worker holds are the tasks leased to it (df._tasks.lease_owner): steps it runs now,
-- and steps its checkpoints handed to it. A lease that ran out stays with its worker until
-- another worker claims the task, so the tasks of a dead worker show here with an expired
-- lease.
--
-- System-wide data (hosts, pids, every tenant's instance ids), not limited by row-level
-- security: SECURITY DEFINER, and EXECUTE only by explicit grant, like df.metrics
-- (df.grant_usage(role, with_grant => true), or GRANT EXECUTE).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.workers(stale_after interval DEFAULT interval '30 seconds')
RETURNS TABLE (worker_id uuid, hostname text, pid integer, started_at timestamptz,
               last_seen_at timestamptz, alive boolean, concurrency integer, version text,
               tasks_held bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.epoch_id, w.hostname, w.pid, w.started_at, w.last_seen_at,
           coalesce(w.last_seen_at > now() - $1, false), w.concurrency, w.version,
           (SELECT count(*) FROM df._tasks t WHERE t.lease_owner = w.epoch_id)
      FROM df._worker_epoch w
     ORDER BY w.started_at, w.epoch_id;
$$;

-- The tasks each worker holds: which step of which instance, since when (its lease runs to
-- lease_expires_at and is extended by the heartbeat), and how often it was claimed.
CREATE FUNCTION df.worker_tasks()
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

REVOKE EXECUTE ON FUNCTION df.workers(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.worker_tasks() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Privileges. df._private_functions (migration 4) learns the two worker functions, so that
-- df.grant_usage(..., with_grant => true) passes them on with df.metrics and df.revoke_usage
-- takes them back. What the monitoring functions read as the caller (the history of the
-- role's own instances, the checkpoint count and end of its runs) is granted by migration
-- 16's df.grant_usage, which renews existing grants.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._private_functions(kind text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(f.sig ORDER BY f.ord), '{}')
      FROM unnest(CASE kind
                  WHEN 'http' THEN ARRAY['df.http(text,text,text,jsonb,integer)',
                                         'df.http_multipart(text,text,jsonb,jsonb,integer)']
                  WHEN 'admin' THEN ARRAY['df.grant_usage(text,boolean,boolean)',
                                          'df.revoke_usage(text)',
                                          'df.metrics()',
                                          'df.workers(interval)',
                                          'df.worker_tasks()']
                  END) WITH ORDINALITY AS f (sig, ord)
     WHERE to_regprocedure(f.sig) IS NOT NULL;
$$;
