-- df.start: validate a graph and store it as an instance.
--
-- df.start validates a graph envelope, flattens it into df.nodes rows (one per node, random
-- 8-hex ids, children referenced by id) and inserts the df.instances row, all in the caller's
-- transaction: a ROLLBACK leaves nothing behind, and workers only ever see committed
-- instances. The engine's rows (df._runs, df._tasks, the df.vars snapshot) are created by the
-- AFTER INSERT trigger on df.instances (engine.sql), not here.
--
-- The graph is parsed once (as jsonb) and walked once by a recursive query that validates
-- it and, only if all of it is valid, inserts it, so a 10,000-node graph costs a handful of
-- statements rather than one PL/pgSQL iteration per node (about 0.3 s plus the commit's
-- foreign-key checks).
--
-- transaction_mode => 'new' starts the instance in a transaction of its own, which commits
-- whatever the caller's transaction does afterwards. PL/pgSQL cannot commit part of its
-- caller's transaction, so the start runs on a second connection to this database (the
-- "loopback"), opened with the dblink contrib extension, and that connection runs an ordinary
-- df.start in caller mode and commits. df.signal(..., transaction_mode => 'new') goes the same
-- way (df._in_new_transaction serves both).
--
-- Security (SQL runs as the role that submitted it, no escalation):
--
--   * The loopback logs in as the caller's session_user: the identity the caller logged in
--     with, which SET ROLE does not change and only a superuser can change. It then does
--     SET ROLE to the caller's current_user, so `SET ROLE app; SELECT df.start(...)` submits
--     as app exactly as in caller mode. PostgreSQL checks that SET ROLE against the login
--     role's memberships, so the loopback can only act as a role the caller's own session
--     could become: nothing the caller passes in can widen that.
--   * Only superusers may open dblink connections without a password, so the connection is
--     opened by dblink_connect_u inside a SECURITY DEFINER function owned by the schema
--     owner. Its connection string is built from server settings (socket directory, port),
--     the current database and session_user; the caller chooses none of them.
--   * The graph, label and database (a signal's instance, name and data) travel to the
--     loopback as quoted literals (format %L), the role name as a quoted identifier (%I): no
--     text the caller passes is ever parsed as SQL.
--
-- dblink is installed, when it is not there yet and the installer may (a superuser), into a
-- schema of its own that PUBLIC has no USAGE on: users cannot reach dblink through schema df
-- or public. An existing dblink is used wherever it is (the schema is looked up at each call,
-- and called through EXECUTE so that this file does not depend on dblink being installed).
-- Without dblink, the install still succeeds and 'new' explains what is missing.

-- A random instance id: the last 8 hex digits of a version 4 UUID, as in pg_durable.
CREATE OR REPLACE FUNCTION df._random_id() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT right(gen_random_uuid()::text, 8);
$$;

-- A random node id. Node ids only need to be unique within their instance, which df.start
-- checks; random() is ten times cheaper than gen_random_uuid(), which matters at 10,000 nodes.
CREATE OR REPLACE FUNCTION df._random_node_id() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT lpad(to_hex(floor(random() * 4294967296)::bigint), 8, '0');
$$;

-- Why an IF/LOOP/JOIN node's query config is unacceptable, or NULL. merge_needed says the
-- node has a condition child (IF/LOOP) or extra branches (JOIN) whose ids go into the config.
CREATE OR REPLACE FUNCTION df._config_error(node_type text, query text, merge_needed boolean) RETURNS text
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
CREATE OR REPLACE FUNCTION df._merge_config(config text, key text, value text) RETURNS text
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
CREATE OR REPLACE FUNCTION df._walk(root jsonb, root_id text)
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
-- df._checked_walk: df._walk's rows, each with its node's type, query and result name and
-- what is wrong with the node, if anything (NULL: nothing). df.start validates and stores a
-- graph in one walk of it (df._insert_nodes); df.explain reports its errors (df._graph_error).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._checked_walk(root jsonb, root_id text)
RETURNS TABLE (id text, parent_id text, slot text, pos integer, path text, depth integer,
               ord integer[], keys text[], node_type text, query text, result_name text,
               err text)
LANGUAGE sql VOLATILE
-- A custom plan would copy the whole graph into the plan as a constant.
SET plan_cache_mode = force_generic_plan
AS $$
    -- Each lateral level is fenced with OFFSET 0 so that a node is looked up, and its facts
    -- derived, once per row rather than once per use.
    SELECT w.id, w.parent_id, w.slot, w.pos, w.path, w.depth, w.ord, w.keys,
           c.node_type, c.query, c.result_name, c.err
      FROM df._walk(root, root_id) AS w
     CROSS JOIN LATERAL (
        SELECT t.node_type, t.query, t.result_name, CASE
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
            WHEN t.node_type IN ('LOOP', 'RETRY', 'TIMEOUT', 'MAP') AND NOT t.has_left THEN
                t.node_type || ' nodes require left_node'
            WHEN t.node_type IN ('LOOP', 'RETRY', 'TIMEOUT', 'MAP') AND t.has_right THEN
                'right_node is not valid for ' || t.node_type || ' nodes'
            WHEN t.node_type NOT IN ('THEN', 'IF', 'JOIN', 'RACE', 'LOOP', 'RETRY', 'TIMEOUT',
                                     'MAP')
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
            WHEN t.node_type IN ('RETRY', 'TIMEOUT', 'MAP') THEN
                df._wrapper_config_error(t.node_type, t.query)
            -- Also whether the caller (the submitter) may call the step.
            WHEN t.node_type = 'CALL' THEN
                df._call_error(t.query, quote_ident(current_user)::regrole::oid)
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
$$;

-- ---------------------------------------------------------------------------------------------
-- df._graph_error: validate a graph. Returns how many nodes were visited (10,001 means "too
-- many") and the first invalid node in pre-order with the reason, if any.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._graph_error(
    root jsonb, OUT node_count bigint, OUT path text, OUT err text)
LANGUAGE sql VOLATILE AS $$
    SELECT count(*),
           (array_agg(w.path ORDER BY w.ord) FILTER (WHERE w.err IS NOT NULL))[1],
           (array_agg(w.err ORDER BY w.ord) FILTER (WHERE w.err IS NOT NULL))[1]
      FROM df._checked_walk(root, NULL) AS w;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._insert_nodes: validate a graph and, if it is valid, write it into df.nodes in pre-order
-- (parents before children; the graph's foreign keys are checked at commit), in one walk of
-- it. A THEN's or RACE's query is dropped; an IF's or LOOP's condition and a JOIN's extra
-- branches are referenced by id from its JSON config in query. The root gets root_id.
-- Returns df._graph_error's answer, and whether the nodes were written: not if the graph is
-- invalid or too large, nor if two nodes drew the same id (df.start draws them again).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._insert_nodes(
    root jsonb, instance_id text, root_id text, submitted_by regrole, database text,
    OUT node_count bigint, OUT path text, OUT err text, OUT inserted boolean)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    WITH visited AS MATERIALIZED (
        SELECT * FROM df._checked_walk(root, root_id)
    ),
    verdict AS (
        SELECT count(*) AS node_count,
               (array_agg(v.path ORDER BY v.ord) FILTER (WHERE v.err IS NOT NULL))[1] AS path,
               (array_agg(v.err ORDER BY v.ord) FILTER (WHERE v.err IS NOT NULL))[1] AS err,
               count(DISTINCT v.id) = count(*) AS unique_ids
          FROM visited v
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
        SELECT v.id, _insert_nodes.instance_id, v.node_type,
               CASE
                   WHEN v.node_type IN ('THEN', 'RACE') THEN NULL
                   WHEN v.node_type IN ('IF', 'LOOP') AND k.condition_id IS NOT NULL THEN
                       df._merge_config(v.query, 'condition_node', to_json(k.condition_id)::text)
                   WHEN v.node_type = 'JOIN' AND k.extra_ids IS NOT NULL THEN
                       df._merge_config(v.query, 'extra_nodes', array_to_json(k.extra_ids)::text)
                   ELSE v.query
               END,
               v.result_name, k.left_id, k.right_id, _insert_nodes.submitted_by,
               _insert_nodes.database
          FROM visited v
          LEFT JOIN children k ON k.parent_id = v.id
         WHERE (SELECT d.err IS NULL AND d.node_count <= 10000 AND d.unique_ids FROM verdict d)
         ORDER BY v.ord
        RETURNING 1
    )
    SELECT d.node_count, d.path, d.err, (SELECT count(*) FROM rows) > 0
      INTO node_count, path, err, inserted
      FROM verdict d;
END;
$$;


-- ---------------------------------------------------------------------------------------------
-- The shape of a df.nodes row: ids, type, result name and children. df.start writes only
-- graphs it validated, but a role may insert its own nodes rows; these checks keep the
-- engine from ever reading a malformed one. They run once per inserting statement, over the
-- rows it inserted, rather than as CHECK constraints, which PostgreSQL would rebuild and
-- evaluate again at every status write of the engine (several per step) though these columns
-- never change. A violation is reported as a CHECK's would be, under the constraint names
-- pg_durable gives them.
-- ---------------------------------------------------------------------------------------------
-- The name of the first check a row fails, or NULL. As in a CHECK, a NULL test passes.
CREATE OR REPLACE FUNCTION df._node_shape_violation(
    id text, node_type text, query text, result_name text, left_node text, right_node text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN (id ~ '^[0-9a-f]{8}$') IS FALSE THEN 'nodes_id_hex8_chk'
        WHEN (left_node ~ '^[0-9a-f]{8}$') IS FALSE
          OR (right_node ~ '^[0-9a-f]{8}$') IS FALSE THEN 'nodes_children_hex8_chk'
        WHEN (node_type = ANY (df._node_types())) IS FALSE THEN 'nodes_type_chk'
        WHEN (result_name ~ '^[A-Za-z_][A-Za-z0-9_]*$') IS FALSE THEN 'nodes_result_name_chk'
        WHEN (CASE node_type
                  WHEN 'THEN' THEN left_node IS NOT NULL AND right_node IS NOT NULL
                                   AND query IS NULL
                  WHEN 'IF' THEN left_node IS NOT NULL AND right_node IS NOT NULL
                                 AND query IS NOT NULL
                  WHEN 'LOOP' THEN left_node IS NOT NULL AND right_node IS NULL
                  WHEN 'JOIN' THEN left_node IS NOT NULL AND right_node IS NOT NULL
                  WHEN 'RACE' THEN left_node IS NOT NULL AND right_node IS NOT NULL
                                   AND query IS NULL
                  WHEN 'RETRY' THEN left_node IS NOT NULL AND right_node IS NULL
                                    AND query IS NOT NULL
                  WHEN 'TIMEOUT' THEN left_node IS NOT NULL AND right_node IS NULL
                                      AND query IS NOT NULL
                  WHEN 'MAP' THEN left_node IS NOT NULL AND right_node IS NULL
                                  AND query IS NOT NULL
                  -- A step may point at the graph it returned (df.continue_with).
                  WHEN 'SQL' THEN right_node IS NULL AND query IS NOT NULL
                  WHEN 'CALL' THEN right_node IS NULL AND query IS NOT NULL
                  ELSE left_node IS NULL AND right_node IS NULL AND query IS NOT NULL
              END) IS FALSE THEN 'nodes_structure_chk'
    END;
$$;

CREATE OR REPLACE FUNCTION df._refuse_malformed_node(p_id text, p_constraint text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'new row for relation "nodes" violates check constraint "%"', p_constraint
        USING ERRCODE = 'check_violation', SCHEMA = 'df', TABLE = 'nodes',
              CONSTRAINT = p_constraint, DETAIL = format('Failing node: %s.', p_id);
END;
$$;

-- The rows a statement inserted (transition tables need a statement-level trigger).
CREATE OR REPLACE FUNCTION df._check_new_nodes() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id         text;
    v_constraint text;
BEGIN
    SELECT n.id, v.name INTO v_id, v_constraint
      FROM new_nodes n
     CROSS JOIN LATERAL df._node_shape_violation(n.id, n.node_type, n.query, n.result_name,
                                                 n.left_node, n.right_node) AS v (name)
     WHERE v.name IS NOT NULL
     LIMIT 1;
    IF FOUND THEN
        PERFORM df._refuse_malformed_node(v_id, v_constraint);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER nodes_shape AFTER INSERT ON df.nodes
    REFERENCING NEW TABLE AS new_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION df._check_new_nodes();

-- An UPDATE that names those columns (the engine's never do; roles may not update df.nodes):
-- row by row, as a trigger with a column list cannot have a transition table.
CREATE OR REPLACE FUNCTION df._check_changed_node() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_constraint text := df._node_shape_violation(
        NEW.id, NEW.node_type, NEW.query, NEW.result_name, NEW.left_node, NEW.right_node);
BEGIN
    IF v_constraint IS NOT NULL THEN
        PERFORM df._refuse_malformed_node(NEW.id, v_constraint);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER nodes_shape_changed
    AFTER UPDATE OF id, node_type, query, result_name, left_node, right_node ON df.nodes
    FOR EACH ROW EXECUTE FUNCTION df._check_changed_node();

-- ---------------------------------------------------------------------------------------------
-- dblink, if it can be had.
-- ---------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension e WHERE e.extname = 'dblink') THEN
        RETURN;  -- already installed by an administrator: used where it is
    END IF;
    -- dblink is not a trusted extension: only a superuser can create it.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                    WHERE r.rolname = current_user AND r.rolsuper)
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions a
                       WHERE a.name = 'dblink') THEN
        RAISE NOTICE 'pgdurable: dblink is not installed, so df.start(..., transaction_mode => ''new'') is unavailable until an administrator runs CREATE EXTENSION dblink';
        RETURN;
    END IF;
    -- A broken package (control file without the library) must not fail the whole install.
    BEGIN
        CREATE SCHEMA IF NOT EXISTS _pgdurable_dblink;
        REVOKE ALL ON SCHEMA _pgdurable_dblink FROM PUBLIC;
        COMMENT ON SCHEMA _pgdurable_dblink IS
            'dblink for pgdurable''s df.start(..., transaction_mode => ''new''); not for users';
        CREATE EXTENSION dblink SCHEMA _pgdurable_dblink;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'pgdurable: could not install dblink (%), so df.start(..., transaction_mode => ''new'') is unavailable', SQLERRM;
    END;
END;
$$;

-- ---------------------------------------------------------------------------------------------

-- A value for a libpq connection string: single-quoted, with \ and ' escaped. E'' strings,
-- which mean the same whatever the caller's standard_conforming_strings.
CREATE OR REPLACE FUNCTION df._conninfo_value(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT E'\'' || replace(replace(value, E'\\', E'\\\\'), E'\'', E'\\\'') || E'\'';
$$;

-- Close the loopback connection if it is open, cancelling a statement it may still run (the
-- caller was interrupted while waiting for it). Never fails: it runs on error paths, which
-- must report the original error.
CREATE OR REPLACE FUNCTION df._close_loopback(dblink_schema text, conn text, cancel boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    open text[];
BEGIN
    EXECUTE format('SELECT %I.dblink_get_connections()', dblink_schema) INTO open;
    IF conn = ANY (coalesce(open, '{}')) THEN
        IF cancel THEN
            EXECUTE format('SELECT %I.dblink_cancel_query($1)', dblink_schema) USING conn;
        END IF;
        EXECUTE format('SELECT %I.dblink_disconnect($1)', dblink_schema) USING conn;
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgdurable: could not close the transaction_mode => ''new'' loopback connection: %',
        SQLERRM;
END;
$$;

-- Only df._in_new_transaction (running as the schema owner) needs it.
REVOKE ALL ON FUNCTION df._close_loopback(text, text, boolean) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._in_new_transaction: transaction_mode => 'new', for df.start and df.signal. Runs
-- df.<action>(args[1], args[2], args[3]) in caller mode on a loopback connection that logs in
-- as session_user, does SET ROLE role, and commits on its own; returns what it returned.
-- action is 'start' (args: fut, label, database; df._start_in_new_transaction below) or
-- 'signal' (args: instance_id, signal_name, signal_data; df.signal in signals.sql); both call
-- it with role = their current_user. Starts and signals share the launch slots.
--
-- Anyone with USAGE on schema df may call it directly, with any role name: the loopback's
-- SET ROLE then fails unless the caller's login role may become that role, and nothing is
-- written. SECURITY DEFINER only so that dblink_connect_u (superuser-only: it needs no
-- password) may be used; nothing in here runs the caller's text: the function called is one
-- of two fixed names, its arguments are quoted literals.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._in_new_transaction(action text, args text[], role text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- How errors name the function called ('df.start()'), and what it does.
    v_what       text := format('df.%s()', action);
    v_verb       text := CASE action WHEN 'start' THEN 'submit' ELSE 'signal' END;
    -- Advisory lock class of the launch slots: ASCII "PGDF", as in pg_durable.
    c_lock_class constant integer := 1346982470;
    -- dblink connections are per backend; this name is reserved for this function.
    c_conn       constant text := 'pg_durable:new-transaction';
    -- The loopback's own limits, pg_durable's.
    c_timeout_ms constant integer := 30000;
    v_login      text := session_user;
    v_can_login  boolean;
    v_max        integer := df._int_setting('pg_durable.max_new_transaction_starts');
    v_wait_s     integer := df._int_setting('pg_durable.new_transaction_start_timeout');
    v_deadline   timestamptz;
    v_schema     text;
    v_sockets    text[];
    v_host       text;
    v_conninfo   text;
    v_slot       integer;
    v_phase      text := 'slot';  -- slot, connect, role, run: what an error interrupted
    v_result     text;
    v_state      text;
    v_message    text;
    v_detail     text;
    v_hint       text;
    v_context    text;
    v_remote     boolean;
    v_busy       integer;
    v_nap        double precision := 0.0005;  -- seconds, doubling up to 50 ms
BEGIN
    IF action IS DISTINCT FROM 'start' AND action IS DISTINCT FROM 'signal' THEN
        RAISE EXCEPTION 'df._in_new_transaction(): unknown action "%"', action
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- 1. A workflow step's own df.start (df.signal) already commits with the step; one that
    --    survives the step's rollback would be repeated each time the step is retried.
    IF df._in_workflow() THEN
        RAISE EXCEPTION '% with transaction_mode => ''new'' cannot be called inside a workflow - a workflow step''s df.% already commits with the step; use the default transaction_mode',
            v_what, action USING ERRCODE = 'feature_not_supported';
    END IF;

    -- 2. A submitting role must be able to log in (workers log in as it), as in caller mode.
    SELECT r.rolcanlogin INTO v_can_login FROM pg_catalog.pg_roles r WHERE r.rolname = role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role "%" does not exist', role USING ERRCODE = 'undefined_object';
    END IF;
    IF action = 'start' AND NOT v_can_login THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege. The background worker must connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as a role with LOGIN.',
            role USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF action = 'start' AND args[1] IS NULL THEN
        RAISE EXCEPTION 'df.start(): fut cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    -- dblink, and the right to use its password-less connect as this function's owner.
    SELECT n.nspname INTO v_schema
      FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'dblink';
    IF v_schema IS NULL THEN
        RAISE EXCEPTION '%: transaction_mode => ''new'' needs the dblink extension; ask an administrator to run CREATE EXTENSION dblink',
            v_what USING ERRCODE = 'feature_not_supported',
                  HINT = 'pgdurable opens a second connection to this database with dblink to '
                         'commit the ' || action || ' on its own. Install dblink into a schema that '
                         'PUBLIC has no USAGE on, e.g. CREATE SCHEMA _pgdurable_dblink; '
                         'CREATE EXTENSION dblink SCHEMA _pgdurable_dblink.';
    END IF;
    IF NOT has_schema_privilege(v_schema, 'USAGE')
       OR NOT has_function_privilege(
               format('%I.dblink_connect_u(text, text)', v_schema), 'EXECUTE') THEN
        RAISE EXCEPTION '%: transaction_mode => ''new'' needs USAGE on schema % and EXECUTE on %.dblink_connect_u(text, text) for the pgdurable schema owner "%"; ask an administrator to grant them',
            v_what, quote_ident(v_schema), quote_ident(v_schema), current_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- Where the loopback connects: this server's first Unix socket directory (entries may be
    -- double-quoted), else TCP on localhost; always this port and database.
    v_sockets := regexp_match(coalesce(current_setting('unix_socket_directories', true), ''),
                              '^[[:space:]]*(?:"((?:[^"]|"")*)"|([^,]*))');
    v_host := coalesce(replace(v_sockets[1], '""', '"'), btrim(v_sockets[2]));
    v_host := coalesce(nullif(v_host, ''), 'localhost');
    v_conninfo := format(
        'host=%s port=%s dbname=%s user=%s application_name=%s connect_timeout=10',
        df._conninfo_value(v_host), df._conninfo_value(current_setting('port')),
        df._conninfo_value(current_database()), df._conninfo_value(v_login),
        df._conninfo_value('pg_durable:backend:new-transaction'));

    BEGIN
        -- 3. Admission control across sessions: a session-level advisory lock per launch slot.
        --    Session-level so that it is held only while this call runs, not until the
        --    caller's transaction ends; released below on every path.
        v_deadline := clock_timestamp() + make_interval(secs => v_wait_s);
        LOOP
            FOR s IN 0 .. v_max - 1 LOOP
                IF pg_try_advisory_lock(c_lock_class, s) THEN
                    v_slot := s;
                    EXIT;
                END IF;
            END LOOP;
            EXIT WHEN v_slot IS NOT NULL;
            IF clock_timestamp() >= v_deadline THEN
                RAISE EXCEPTION 'pg_durable: transaction_mode => ''new'' launch limit reached (max_new_transaction_starts=%). Timed out after %s waiting for a launch slot before opening the loopback session.',
                    v_max, v_wait_s USING ERRCODE = 'too_many_connections';
            END IF;
            PERFORM pg_sleep(0.1);
        END LOOP;

        -- 4. The loopback. A connection left over by an interrupted call is closed first.
        v_phase := 'connect';
        PERFORM df._close_loopback(v_schema, c_conn, false);
        EXECUTE format('SELECT %I.dblink_connect_u($1, $2)', v_schema) USING c_conn, v_conninfo;

        v_phase := 'role';
        IF role IS DISTINCT FROM v_login THEN
            EXECUTE format('SELECT %I.dblink_exec($1, $2)', v_schema)
                USING c_conn, format('SET ROLE %I', role);
        END IF;

        v_phase := 'run';
        EXECUTE format('SELECT %I.dblink_exec($1, $2)', v_schema)
            USING c_conn, format('SET df.in_workflow = ''false''; SET lock_timeout = %s; '
                                 'SET statement_timeout = %s', c_timeout_ms, c_timeout_ms);
        -- Caller mode on the loopback; it commits when the statement ends (autocommit). Sent
        -- asynchronously and waited for in pg_sleep, which a cancel or the caller's
        -- statement_timeout interrupts (a synchronous dblink() call is not interruptible
        -- before PostgreSQL 17); the loopback's statement is then cancelled below.
        EXECUTE format('SELECT %I.dblink_send_query($1, $2)', v_schema)
            USING c_conn, format('SELECT df.%s(%L::text, %L::text, %L::text)',
                                 action, args[1], args[2], args[3]);
        LOOP
            EXECUTE format('SELECT %I.dblink_is_busy($1)', v_schema) INTO v_busy USING c_conn;
            EXIT WHEN v_busy = 0;
            PERFORM pg_sleep(v_nap);
            v_nap := least(v_nap * 2, 0.05);
        END LOOP;
        EXECUTE format('SELECT t.r FROM %I.dblink_get_result($1) AS t (r text)', v_schema)
            INTO v_result USING c_conn;

        PERFORM df._close_loopback(v_schema, c_conn, false);
        PERFORM pg_advisory_unlock(c_lock_class, v_slot);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT,
                                v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                v_context = PG_EXCEPTION_CONTEXT;
        -- An error the loopback reported: dblink re-raises it here with the remote SQLSTATE
        -- and this context. Anything else (say, a cancel of the caller's own statement) was
        -- raised here and goes on unchanged.
        v_remote := coalesce(
            v_context LIKE '%on dblink connection named "' || c_conn || '"%', false);
        IF v_phase <> 'slot' THEN
            -- A statement the caller stopped waiting for is cancelled on the loopback too.
            PERFORM df._close_loopback(v_schema, c_conn, v_phase = 'run' AND NOT v_remote);
        END IF;
        IF v_slot IS NOT NULL THEN
            PERFORM pg_advisory_unlock(c_lock_class, v_slot);
        END IF;

        IF v_phase = 'connect' AND v_state LIKE '08%' THEN
            -- libpq's reason is in the detail ("connection to server ... failed: FATAL: ...").
            v_message := format(
                '%s: transaction_mode => ''new'' could not open its loopback connection '
                'as role "%s": %s',
                v_what, v_login, coalesce(nullif(btrim(v_detail, E' \n'), ''), v_message));
            v_detail := '';
            v_hint := format(
                'The loopback logs in to this server (host %s, port %s) as your session user, '
                'without a password. Allow that login in pg_hba.conf (trust, or peer with a '
                'user map, on the local socket), or give the server''s operating-system user '
                'a password file (~/.pgpass or PGPASSFILE) with this role''s password.',
                v_host, current_setting('port'));
        ELSIF v_phase = 'role' AND v_remote THEN
            v_message := format(
                '%s: transaction_mode => ''new'' cannot %s as role "%s": the '
                'loopback logs in as your session user "%s", which may not SET ROLE to it (%s)',
                v_what, v_verb, role, v_login, v_message);
            v_hint := format(
                'Inside a SECURITY DEFINER function %s %ss as the '
                'function''s owner; with transaction_mode => ''new'' the role you '
                'logged in as must be allowed to SET ROLE to that owner. Use the default '
                'transaction_mode there.', v_what, v_verb);
        ELSIF v_phase = 'run' AND v_remote AND v_state IN ('55P03', '57014') THEN
            v_message := format(
                'pg_durable: transaction_mode => ''new'' launch hit %s after %sms in the '
                'loopback session: %s',
                CASE v_state WHEN '55P03' THEN 'lock_timeout' ELSE 'statement_timeout' END,
                c_timeout_ms, v_message);
            -- Both limits are 30 s, and the statement's starts first: a lock wait usually
            -- ends as a statement_timeout.
            v_hint := 'The loopback is a session of its own: if the calling transaction holds '
                      'a lock the ' || action || ' needs (e.g. on a df table), the loopback '
                      'waits for it while the calling transaction waits for the loopback.';
        ELSIF v_phase = 'run' AND v_remote THEN
            -- Validation errors and the like, readable as they came (a signal's as in caller
            -- mode, since df.signal checked the same before it came here).
            IF action = 'start' THEN
                v_message := 'df.start() on new transaction failed: ' || v_message;
            END IF;
        ELSE
            RAISE;
        END IF;
        -- RAISE prints DETAIL and HINT lines even when they are empty.
        IF v_detail <> '' AND v_hint <> '' THEN
            RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message, DETAIL = v_detail,
                                  HINT = v_hint;
        ELSIF v_detail <> '' THEN
            RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message, DETAIL = v_detail;
        ELSIF v_hint <> '' THEN
            RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message, HINT = v_hint;
        END IF;
        RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message;
    END;
    RETURN v_result;
END;
$$;

-- df.start(fut, label, database) in a transaction of its own, as role (df.start passes its
-- current_user): df._in_new_transaction's 'start'. Runs as the caller.
CREATE OR REPLACE FUNCTION df._start_in_new_transaction(
    fut text, label text, database text, role text)
RETURNS text
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT df._in_new_transaction('start', ARRAY[fut, label, database], role);
$$;

-- ---------------------------------------------------------------------------------------------
-- df.start: validate a graph and store it as a new instance, in the caller's transaction
-- ('caller'), or in one of its own that commits at once ('new', the function above).
-- ---------------------------------------------------------------------------------------------
-- df.start's df.instances row under a random id; returns the id. (ON CONFLICT sees every
-- row, also those RLS hides.)
CREATE OR REPLACE FUNCTION df._insert_instance(
    p_label text, p_root_id text, p_role regrole, p_database text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
DECLARE
    v_id  text;
    v_got text;
BEGIN
    FOR attempt IN 1..10 LOOP
        v_id := df._random_id();
        INSERT INTO df.instances AS i (id, label, root_node, submitted_by, database)
        VALUES (v_id, p_label, p_root_id, p_role, p_database)
        ON CONFLICT (id) DO NOTHING
        RETURNING i.id INTO v_got;
        IF v_got IS NOT NULL THEN
            RETURN v_got;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'Failed to create instance: exhausted 10 attempts to generate a collision-free ID';
END;
$$;

CREATE OR REPLACE FUNCTION df.start(
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
    v_plain    boolean := false;  -- fut is one SQL step
BEGIN
    IF v_mode = 'new' THEN
        -- current_user, not session_user: the effective role submits, as in caller mode.
        RETURN df._start_in_new_transaction(fut, v_label, v_database, current_user::text);
    ELSIF v_mode <> 'caller' THEN
        RAISE EXCEPTION 'invalid transaction_mode "%" for df.start(): expected ''caller'' or ''new''',
            transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF fut IS NULL THEN
        RAISE EXCEPTION 'df.start(): fut cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    -- Plain text, or JSON without a string node_type, is one SQL step; an envelope must have
    -- a known type and a readable top level.
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
        v_plain := true;
    END IF;

    IF v_database IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = v_database) THEN
        RAISE EXCEPTION 'database "%" does not exist', v_database
            USING ERRCODE = 'invalid_catalog_name';
    END IF;

    -- Workers log in as this role to run the instance's SQL.
    v_role := quote_ident(current_user)::regrole;
    SELECT r.rolcanlogin, r.rolsuper INTO v_login, v_super
      FROM pg_catalog.pg_roles r WHERE r.oid = v_role;
    IF NOT v_login THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege. The background worker must connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as a role with LOGIN.',
            current_user USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- Superusers only where allowed (settings.sql says whose value counts); workers check
    -- again when they load the instance.
    IF v_super AND NOT df._superuser_instances_enabled() THEN
        RAISE EXCEPTION 'pg_durable: superuser instances are disabled. current_user "%" is a superuser, but pg_durable.enable_superuser_instances is off. Set pg_durable.enable_superuser_instances = on to allow this.',
            current_user USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- Plain text is one SQL node: nothing to validate or walk (the common case, kept cheap).
    IF v_plain THEN
        v_id := df._insert_instance(v_label, v_root_id, v_role, v_database);
        INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by, database)
        VALUES (v_root_id, v_id, 'SQL', fut, v_role, v_database);
        RETURN v_id;
    END IF;

    v_id := df._insert_instance(v_label, v_root_id, v_role, v_database);

    -- The graph is validated as its nodes are written, and none is written unless all are
    -- valid; an error rolls back the instance too. Node ids are drawn per node; in the rare
    -- case two collide (about 1 in 90 for a 10,000-node graph) nothing was written and the
    -- ids are drawn again.
    FOR attempt IN 1..10 LOOP
        v_check := df._insert_nodes(v_root, v_id, v_root_id, v_role, v_database);
        IF v_check.node_count > 10000 THEN
            RAISE EXCEPTION 'Invalid durable function graph: root: Workflow exceeds maximum node count of 10000. Simplify the workflow or break it into multiple instances.'
                USING ERRCODE = 'program_limit_exceeded';
        END IF;
        IF v_check.err IS NOT NULL THEN
            RAISE EXCEPTION 'Invalid durable function graph: %: %', v_check.path, v_check.err
                USING ERRCODE = CASE WHEN v_check.err LIKE 'Graph exceeds%'
                                     THEN 'program_limit_exceeded'
                                     ELSE 'invalid_parameter_value' END;
        END IF;
        EXIT WHEN v_check.inserted;
        IF attempt = 10 THEN
            RAISE EXCEPTION 'Failed to create instance: exhausted 10 attempts to generate collision-free node IDs';
        END IF;
    END LOOP;

    RETURN v_id;
END;
$$;
