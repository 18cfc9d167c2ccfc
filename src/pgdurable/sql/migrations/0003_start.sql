-- pgdurable schema, version 3: df.start() (spec §3.4, §6.1, §6.3).
--
-- df.start validates a graph envelope, flattens it into df.nodes rows (one per node, random
-- 8-hex ids, children referenced by id) and inserts the df.instances row, all in the caller's
-- transaction: a ROLLBACK leaves nothing behind, and workers only ever see committed
-- instances. The engine's rows (df._runs, df._tasks, the df.vars snapshot) are created by the
-- AFTER INSERT trigger on df.instances (migration 5), not here.
--
-- The graph is parsed once (as jsonb) and walked by recursive queries, once to validate it
-- and once to insert it, so a 10,000-node graph costs a handful of statements rather than
-- one PL/pgSQL iteration per node (about 0.3 s plus the commit's foreign-key checks).

-- A random instance id: the last 8 hex digits of a version 4 UUID, as in pg_durable.
CREATE FUNCTION df._random_id() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT right(gen_random_uuid()::text, 8);
$$;

-- A random node id. Node ids only need to be unique within their instance, which df.start
-- checks; random() is ten times cheaper than gen_random_uuid(), which matters at 10,000 nodes.
CREATE FUNCTION df._random_node_id() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT lpad(to_hex(floor(random() * 4294967296)::bigint), 8, '0');
$$;

-- Why an IF/LOOP/JOIN node's query config is unacceptable, or NULL. merge_needed says the
-- node has a condition child (IF/LOOP) or extra branches (JOIN) whose ids go into the config.
CREATE FUNCTION df._config_error(node_type text, query text, merge_needed boolean) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    field  text := CASE node_type WHEN 'JOIN' THEN 'extra_nodes' ELSE 'condition_node' END;
    config jsonb;
BEGIN
    BEGIN
        config := query::jsonb;
    EXCEPTION WHEN data_exception THEN
        IF merge_needed THEN
            RETURN format('query in %s must be valid JSON config: %s', node_type, SQLERRM);
        END IF;
        RETURN NULL;
    END;
    -- The pre-0.2.6 form kept child references inside query; the executor reads them from
    -- first-class fields only.
    IF jsonb_typeof(config) = 'object' AND config ? field THEN
        RETURN format('%s in %s must be a first-class Durofut field, not embedded in query',
                      field, node_type);
    END IF;
    IF merge_needed AND jsonb_typeof(config) <> 'object' THEN
        RETURN format('query in %s must be a JSON config object', node_type);
    END IF;
    RETURN NULL;
END;
$$;

-- config (a JSON object text, or NULL for none) with "key":value appended, compact. The
-- existing members keep their order and their values' text.
CREATE FUNCTION df._merge_config(config text, key text, value text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT '{' || coalesce((
               SELECT string_agg(to_json(e.key)::text || ':' || e.value::text, ','
                                 ORDER BY e.ordinality) || ','
                 FROM json_each(config::json) WITH ORDINALITY AS e), '')
           || to_json(key)::text || ':' || value || '}';
$$;

-- ---------------------------------------------------------------------------------------------
-- df._walk: the nodes of a graph in visiting order, each with a fresh id, its parent's id,
-- its slot in the parent and its path (root, root.left, root.extra_nodes[0], ...).
--
-- Rows carry the node's location (keys, for #>) rather than the node itself: copying every
-- subtree into the query's intermediate results costs far more than looking nodes up again.
-- Children that are not JSON objects are not visited (their parent is reported). The walk
-- stops early: nodes one level past the depth limit are visited but not expanded, and at most
-- 10,001 nodes are returned, enough to report either limit.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._walk(root jsonb, root_id text)
RETURNS TABLE (id text, parent_id text, slot text, pos integer, path text, depth integer,
               ord integer[], keys text[])
LANGUAGE sql VOLATILE
-- A custom plan would copy the whole graph into the plan as a constant.
SET plan_cache_mode = force_generic_plan
AS $$
WITH RECURSIVE walk (id, parent_id, slot, pos, path, depth, ord, keys) AS (
    SELECT coalesce(root_id, df._random_node_id()), NULL::text, 'root'::text, 0, 'root'::text,
           0, ARRAY[]::integer[], ARRAY[]::text[]
    UNION ALL
    SELECT df._random_node_id(), w.id, c.slot, c.pos, w.path || c.seg, w.depth + 1,
           w.ord || c.pos, w.keys || c.keys
      FROM walk w
     -- OFFSET 0: look the node up once per row, not once per use below.
     CROSS JOIN LATERAL (SELECT root #> w.keys AS node OFFSET 0) AS p
     CROSS JOIN LATERAL (
               SELECT 'left', 1, '.left', ARRAY['left_node'], p.node -> 'left_node'
               UNION ALL
               SELECT 'right', 2, '.right', ARRAY['right_node'], p.node -> 'right_node'
               UNION ALL
               SELECT 'condition', 3, '.condition_node', ARRAY['condition_node'],
                      p.node -> 'condition_node'
               UNION ALL
               SELECT 'extra', 3 + e.i::integer, '.extra_nodes[' || (e.i - 1) || ']',
                      ARRAY['extra_nodes', (e.i - 1)::text], e.v
                 FROM jsonb_array_elements(
                          CASE WHEN jsonb_typeof(p.node -> 'extra_nodes') = 'array'
                               THEN p.node -> 'extra_nodes' END)
                      WITH ORDINALITY AS e (v, i)
           ) AS c (slot, pos, seg, keys, child)
     WHERE w.depth <= 256 AND jsonb_typeof(c.child) = 'object'
)
SELECT * FROM walk LIMIT 10001;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._graph_error: validate a graph (spec §3.4). Returns how many nodes were visited (10,001
-- means "too many") and the first invalid node in pre-order with the reason, if any.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._graph_error(root jsonb, OUT node_count bigint, OUT path text, OUT err text)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- Each lateral level is fenced with OFFSET 0 so that a node is looked up, and its facts
    -- derived, once per row rather than once per use; only the error leaves the row.
    SELECT count(*),
           (array_agg(w.path ORDER BY w.ord) FILTER (WHERE c.err IS NOT NULL))[1],
           (array_agg(c.err ORDER BY w.ord) FILTER (WHERE c.err IS NOT NULL))[1]
      INTO node_count, path, err
      FROM df._walk(root, NULL) AS w
     CROSS JOIN LATERAL (
        SELECT CASE
            WHEN w.depth > 256 THEN
                'Graph exceeds maximum nesting depth of 256. Simplify the workflow or break '
                'it into multiple instances.'
            WHEN coalesce(jsonb_typeof(t.node -> 'node_type'), 'null') = 'null' THEN
                'missing field node_type'
            WHEN t.node_type IS NULL THEN
                'invalid type: node_type must be a string'
            WHEN NOT t.node_type = ANY (df._node_types()) THEN
                'Unknown node_type ''' || t.node_type || '''. Valid types: '
                    || array_to_string(df._node_types(), ', ')
            -- The shape checks of df._shape_error, for nodes below the root.
            WHEN jsonb_typeof(t.node -> 'left_node') NOT IN ('null', 'object')
              OR jsonb_typeof(t.node -> 'right_node') NOT IN ('null', 'object') THEN
                'Durofut children must be JSON objects'
            WHEN jsonb_typeof(t.node -> 'condition_node') NOT IN ('null', 'object') THEN
                'condition_node must be a Durofut JSON object'
            WHEN jsonb_typeof(t.node -> 'extra_nodes') NOT IN ('null', 'array') THEN
                'extra_nodes must be an array of Durofut JSON objects'
            WHEN t.has_extras AND jsonb_path_exists(
                    t.node, 'strict $.extra_nodes[*] ? (@.type() != "object")', '{}', true) THEN
                'extra_nodes entries must be Durofut JSON objects'
            WHEN jsonb_typeof(t.node -> 'query') NOT IN ('null', 'string') THEN
                'invalid type: query must be a string'
            WHEN jsonb_typeof(t.node -> 'result_name') NOT IN ('null', 'string') THEN
                'invalid type: result_name must be a string'
            WHEN t.has_condition AND t.node_type NOT IN ('IF', 'LOOP') THEN
                'condition_node is not valid for ' || t.node_type || ' nodes'
            WHEN t.has_extras AND t.node_type <> 'JOIN' THEN
                'extra_nodes is not valid for ' || t.node_type || ' nodes'
            -- The table constraints would reject what follows, with less helpful messages.
            WHEN t.result_name !~ '^[a-zA-Z_][a-zA-Z0-9_]*$' THEN
                'result_name ''' || t.result_name || ''' is not a valid identifier — must '
                    || 'match [a-zA-Z_][a-zA-Z0-9_]*'
            WHEN t.node_type IN ('THEN', 'IF', 'JOIN', 'RACE')
             AND NOT (t.has_left AND t.has_right) THEN
                t.node_type || ' nodes require left_node and right_node'
            WHEN t.node_type = 'LOOP' AND NOT t.has_left THEN
                'LOOP nodes require left_node'
            WHEN t.node_type = 'LOOP' AND t.has_right THEN
                'right_node is not valid for LOOP nodes'
            WHEN t.node_type NOT IN ('THEN', 'IF', 'JOIN', 'RACE', 'LOOP')
             AND (t.has_left OR t.has_right) THEN
                CASE WHEN t.has_left THEN 'left_node' ELSE 'right_node' END
                    || ' is not valid for ' || t.node_type || ' nodes'
            WHEN t.node_type NOT IN ('THEN', 'IF', 'JOIN', 'RACE', 'LOOP')
             AND t.query IS NULL THEN
                'query is required for ' || t.node_type || ' nodes'
            WHEN t.node_type = 'IF' AND NOT t.has_condition AND t.query IS NULL THEN
                'IF nodes require a condition_node (df.if) or a condition query (df.if_rows)'
            WHEN t.node_type IN ('IF', 'LOOP', 'JOIN') AND t.query IS NOT NULL THEN
                df._config_error(t.node_type, t.query,
                                 CASE t.node_type WHEN 'JOIN' THEN t.has_extras
                                                  ELSE t.has_condition END)
            END AS err
          FROM (
            SELECT n.node,
                   CASE WHEN jsonb_typeof(n.node -> 'node_type') = 'string'
                        THEN n.node ->> 'node_type' END AS node_type,
                   CASE WHEN jsonb_typeof(n.node -> 'query') = 'string'
                        THEN n.node ->> 'query' END AS query,
                   CASE WHEN jsonb_typeof(n.node -> 'result_name') = 'string'
                        THEN n.node ->> 'result_name' END AS result_name,
                   coalesce(jsonb_typeof(n.node -> 'left_node'), 'null') <> 'null' AS has_left,
                   coalesce(jsonb_typeof(n.node -> 'right_node'), 'null') <> 'null' AS has_right,
                   coalesce(jsonb_typeof(n.node -> 'condition_node'), 'null') <> 'null'
                       AS has_condition,
                   jsonb_typeof(n.node -> 'extra_nodes') = 'array'
                       AND jsonb_array_length(n.node -> 'extra_nodes') > 0 AS has_extras
              FROM (SELECT root #> w.keys AS node OFFSET 0) AS n
            OFFSET 0
          ) AS t
        OFFSET 0
     ) AS c;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._insert_nodes: write a validated graph into df.nodes in pre-order (parents before
-- children; the graph's foreign keys are checked at commit), with the storage forms of spec
-- §6.3. The root gets root_id. Returns false, writing nothing, if two nodes drew the same id.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._insert_nodes(
    root jsonb, instance_id text, root_id text, submitted_by regrole, database text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    inserted bigint;
BEGIN
    WITH visited AS MATERIALIZED (
        SELECT * FROM df._walk(root, root_id)
    ),
    children AS (
        SELECT v.parent_id,
               max(v.id) FILTER (WHERE v.slot = 'left') AS left_id,
               max(v.id) FILTER (WHERE v.slot = 'right') AS right_id,
               max(v.id) FILTER (WHERE v.slot = 'condition') AS condition_id,
               array_agg(v.id ORDER BY v.pos) FILTER (WHERE v.slot = 'extra') AS extra_ids
          FROM visited v
         WHERE v.parent_id IS NOT NULL
         GROUP BY v.parent_id
    ),
    rows AS (
        INSERT INTO df.nodes AS n (id, instance_id, node_type, query, result_name, left_node,
                                   right_node, submitted_by, database)
        SELECT v.id, _insert_nodes.instance_id, f.node_type,
               CASE
                   WHEN f.node_type IN ('THEN', 'RACE') THEN NULL
                   WHEN f.node_type IN ('IF', 'LOOP') AND k.condition_id IS NOT NULL THEN
                       df._merge_config(f.query, 'condition_node', to_json(k.condition_id)::text)
                   WHEN f.node_type = 'JOIN' AND k.extra_ids IS NOT NULL THEN
                       df._merge_config(f.query, 'extra_nodes', array_to_json(k.extra_ids)::text)
                   ELSE f.query
               END,
               f.result_name, k.left_id, k.right_id, _insert_nodes.submitted_by,
               _insert_nodes.database
          FROM visited v
          LEFT JOIN children k ON k.parent_id = v.id
         CROSS JOIN LATERAL (
                   SELECT x.node ->> 'node_type' AS node_type, x.node ->> 'query' AS query,
                          x.node ->> 'result_name' AS result_name
                     FROM (SELECT root #> v.keys AS node OFFSET 0) AS x
               ) AS f
         WHERE (SELECT count(DISTINCT d.id) = count(*) FROM visited d)
         ORDER BY v.ord
        RETURNING 1
    )
    SELECT count(*) INTO inserted FROM rows;
    RETURN inserted > 0;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.start (spec §6.1)
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.start(
    fut text, label text DEFAULT NULL, database text DEFAULT NULL,
    transaction_mode text DEFAULT 'caller')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
DECLARE
    -- Parameters copied so that statements below never confuse them with column names.
    v_label    text := label;
    v_database text := database;
    v_mode     text := lower(coalesce(transaction_mode, 'caller'));
    v_parsed   json;
    v_root     jsonb;
    v_type     text;
    v_err      text;
    v_helper   text;
    v_role     regrole;
    v_login    boolean;
    v_super    boolean;
    v_check    record;
    v_root_id  text := df._random_node_id();
    v_id       text;
    v_got      text;
BEGIN
    IF v_mode = 'new' THEN
        RAISE EXCEPTION 'df.start(): transaction_mode => ''new'' is not supported yet by this pgdurable version'
            USING ERRCODE = 'feature_not_supported';
    ELSIF v_mode <> 'caller' THEN
        RAISE EXCEPTION 'invalid transaction_mode "%" for df.start(): expected ''caller'' or ''new''',
            transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF fut IS NULL THEN
        RAISE EXCEPTION 'df.start(): fut cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    -- 1. Strict parse: plain text, or JSON without a string node_type, is one SQL step; an
    --    envelope must have a known type and a readable top level.
    IF ltrim(fut, E' \t\n\r') LIKE '{%' THEN
        BEGIN
            v_parsed := fut::json;
        EXCEPTION WHEN data_exception THEN
            v_parsed := NULL;
        END;
    END IF;
    IF json_typeof(v_parsed -> 'node_type') = 'string' THEN
        v_type := v_parsed ->> 'node_type';
        IF NOT v_type = ANY (df._node_types()) THEN
            RAISE EXCEPTION 'Invalid durable function: Unknown node_type ''%''. Valid types: %',
                v_type, array_to_string(df._node_types(), ', ')
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_err := df._shape_error(v_parsed -> 'left_node', v_parsed -> 'right_node',
                                 v_parsed -> 'condition_node', v_parsed -> 'extra_nodes',
                                 v_parsed -> 'query', v_parsed -> 'result_name');
        IF v_err IS NOT NULL THEN
            RAISE EXCEPTION 'Invalid durable function: Malformed Durofut JSON with node_type ''%'': %',
                v_type, v_err USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_root := fut::jsonb;
    ELSE
        IF v_parsed IS NULL THEN
            v_helper := df._non_future_helper(fut);
            IF v_helper IS NOT NULL THEN
                RAISE EXCEPTION 'Invalid durable function: % cannot be used as a workflow step. Call % before df.start().',
                    v_helper, v_helper USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END IF;
        v_root := jsonb_build_object('node_type', 'SQL', 'query', fut);
    END IF;

    -- 2. The target database.
    IF v_database IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = v_database) THEN
        RAISE EXCEPTION 'database "%" does not exist', v_database
            USING ERRCODE = 'invalid_catalog_name';
    END IF;

    -- 3. Identity: workers log in as this role to run the instance's SQL.
    v_role := quote_ident(current_user)::regrole;
    SELECT r.rolcanlogin, r.rolsuper INTO v_login, v_super
      FROM pg_catalog.pg_roles r WHERE r.oid = v_role;
    IF NOT v_login THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege. The background worker must connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as a role with LOGIN.',
            current_user USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- 4. Superuser guard (spec §10.4); workers check again when they load the instance.
    IF v_super AND lower(coalesce(
            current_setting('pg_durable.enable_superuser_instances', true), 'off'))
            NOT IN ('on', 'true', '1', 'yes') THEN
        RAISE EXCEPTION 'pg_durable: superuser instances are disabled. current_user "%" is a superuser, but pg_durable.enable_superuser_instances is off. Set pg_durable.enable_superuser_instances = on to allow this.',
            current_user USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- 5. Validate the whole graph before writing anything.
    v_check := df._graph_error(v_root);
    IF v_check.node_count > 10000 THEN
        RAISE EXCEPTION 'Invalid durable function graph: root: Workflow exceeds maximum node count of 10000. Simplify the workflow or break it into multiple instances.'
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF v_check.err IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid durable function graph: %: %', v_check.path, v_check.err
            USING ERRCODE = CASE WHEN v_check.err LIKE 'Graph exceeds%'
                                 THEN 'program_limit_exceeded' ELSE 'invalid_parameter_value' END;
    END IF;

    -- 6. The instance row, under a fresh id. ON CONFLICT sees every row, also those RLS hides.
    FOR attempt IN 1..10 LOOP
        v_id := df._random_id();
        INSERT INTO df.instances AS i (id, label, root_node, submitted_by, database)
        VALUES (v_id, v_label, v_root_id, v_role, v_database)
        ON CONFLICT (id) DO NOTHING
        RETURNING i.id INTO v_got;
        EXIT WHEN v_got IS NOT NULL;
    END LOOP;
    IF v_got IS NULL THEN
        RAISE EXCEPTION 'Failed to create instance: exhausted 10 attempts to generate a collision-free ID';
    END IF;

    -- 7. The nodes. Node ids are drawn per node; in the rare case two collide (about 1 in 90
    --    for a 10,000-node graph) nothing was written and the ids are drawn again.
    FOR attempt IN 1..10 LOOP
        EXIT WHEN df._insert_nodes(v_root, v_id, v_root_id, v_role, v_database);
        IF attempt = 10 THEN
            RAISE EXCEPTION 'Failed to create instance: exhausted 10 attempts to generate collision-free node IDs';
        END IF;
    END LOOP;

    RETURN v_id;
END;
$$;
