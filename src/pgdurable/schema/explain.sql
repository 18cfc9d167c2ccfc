-- df.explain: a workflow drawn as text.
--
-- df.explain(input) draws a workflow as a tree of text lines, either a live instance with
-- the status of each node (input: an instance id) or a graph that has not been started (a
-- dry run; input: an envelope, a DSL expression, or one SQL statement):
--
--   SQL: SELECT 1 |=> 'a' ✓
--   → JOIN (2) ⏳
--       ║ branch 1:
--         ├─SQL: SELECT 2 ✓
--       ║ branch 2:
--         └─SLEEP 5s ⏳
--   → SQL: SELECT 'done' ○
--
-- Both modes turn their nodes into the same form, a jsonb map from node id to an "entry"
-- (df._explain_entry: the node's finished line and its children in drawing order), and one
-- renderer (df._explain_tree) walks that map. The walk is a recursive query, not recursive
-- PL/pgSQL: a graph may be 256 levels deep and 10,000 nodes wide, and one query pass per
-- level costs far less than a function call per node. Node lookups go through the jsonb map
-- (a binary search) rather than a join, so the cost never depends on the plan PostgreSQL
-- picks for a recursive join.
--
-- Everything runs as the caller (SECURITY INVOKER): in live mode row-level security shows
-- the caller's own instances only, and another role's instance is "not found".

-- ---------------------------------------------------------------------------------------------
-- Text helpers
-- ---------------------------------------------------------------------------------------------

-- Free text shown on one line (SQL, URLs, labels, outputs...): a line break, with the
-- indentation around it, becomes one space, so a multi-line statement cannot break the
-- drawing. Text without line breaks is left exactly as it is.
CREATE OR REPLACE FUNCTION df._explain_flat(s text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN s ~ '[\r\n]'
                THEN btrim(regexp_replace(s, '\s*[\r\n]\s*', ' ', 'g'), E' \t')
                ELSE s END;
$$;

-- s cut to its first keep_bytes bytes followed by '...' when it is longer than max_bytes
-- bytes (pg_durable counts SQL and outputs in bytes). The cut never splits a multi-byte
-- character: it keeps the longest run of whole characters that fits in keep_bytes.
CREATE OR REPLACE FUNCTION df._explain_cut(s text, max_bytes integer, keep_bytes integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE
        WHEN octet_length(s) <= max_bytes THEN s
        ELSE (SELECT left(s, c.n)
                FROM generate_series(keep_bytes, 0, -1) AS c (n)
               WHERE octet_length(left(s, c.n)) <= keep_bytes
               LIMIT 1) || '...'
    END;
$$;

-- The config object stored in a node's query, or NULL if the query is not a
-- JSON object. As `json`, so numbers keep the text they were written with (0.5, not 0.50).
-- A hand-written graph may hold anything there; explaining it must not fail.
CREATE OR REPLACE FUNCTION df._explain_config(query text) RETURNS json
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    config json;
BEGIN
    config := query::json;
    IF json_typeof(config) = 'object' THEN
        RETURN config;
    END IF;
    RETURN NULL;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._explain_entry: one node, ready to draw.
--
--   {"t": node type,
--    "l": its line without indentation: label, ` |=> 'name'`, status marker (NULL for THEN,
--         which has no line of its own),
--    "c": its children in drawing order, each {"id": child id, "h": block header, "c":
--         connector}; a THEN's two sides have no header, and its left side keeps the
--         connector the THEN itself was drawn with (absent "c")}
--
-- Children come from left_node/right_node and from condition_node/extra_nodes, which a
-- dry run passes directly and which stored nodes keep in their config (IF/LOOP
-- {"condition_node":"<id>"}, JOIN {"extra_nodes":[...]}). status is the inferred status in
-- live mode and NULL in a dry run (no marker).
--
-- Line formats (pg_durable's, plus pgdurable's RETRY and TIMEOUT):
--   SQL: <query>              cut to 47 bytes + '...' when over 50 bytes
--   SLEEP <n>s
--   WAIT '<cron>'
--   HTTP <METHOD> <url>       url cut to 37 characters + '...' when over 40 (also multipart)
--   SIGNAL '<name>'           or SIGNAL '<name>' (<timeout>s)
--   LOOP (infinite)           or LOOP (while)
--   BREAK                     or BREAK '<value>', value cut to 17 bytes + '...' when over 20
--   IF, JOIN (<branches>), RACE
--   RETRY (max <n> attempts)  or RETRY (max <n> attempts, on <retry_on, ...>)
--   TIMEOUT <seconds>s
--   CALL <name>               a Python step
--   MAP '<source>' (max <n> at once)
-- A node whose config cannot be read shows its type and its raw query, cut like SQL.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._explain_entry(
    node_type text, query text, result_name text, left_node text, right_node text,
    condition_node text, extra_nodes text[], status text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    config   json;
    url      text;
    branches text[];
    label    text;
    children jsonb;
BEGIN
    -- Only these types keep settings in query; a SQL query is never parsed.
    IF node_type NOT IN ('SQL', 'SLEEP', 'THEN', 'RACE') AND query IS NOT NULL THEN
        config := df._explain_config(query);
    END IF;
    IF node_type IN ('IF', 'LOOP') THEN
        condition_node := coalesce(condition_node, config ->> 'condition_node');
    END IF;
    IF node_type = 'JOIN' AND extra_nodes IS NULL
       AND json_typeof(config -> 'extra_nodes') = 'array' THEN
        extra_nodes := ARRAY(SELECT json_array_elements_text(config -> 'extra_nodes'));
    END IF;
    IF node_type IN ('JOIN', 'RACE') THEN
        branches := ARRAY[left_node, right_node]
            || CASE WHEN node_type = 'JOIN' THEN coalesce(extra_nodes, '{}') ELSE '{}' END;
    END IF;

    -- The label.
    IF node_type IN ('WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'BREAK', 'RETRY',
                     'TIMEOUT', 'CALL', 'MAP') AND config IS NULL THEN
        label := node_type || ' '
            || df._explain_cut(df._explain_flat(coalesce(query, '')), 50, 47);
    ELSIF node_type IN ('HTTP', 'HTTP_MULTIPART') THEN
        url := df._explain_flat(coalesce(config ->> 'url', ''));
        label := 'HTTP ' || coalesce(config ->> 'method', '?') || ' '
            || CASE WHEN char_length(url) > 40 THEN left(url, 37) || '...' ELSE url END;
    ELSE
        label := CASE node_type
            WHEN 'THEN' THEN NULL
            WHEN 'SQL' THEN
                'SQL: ' || df._explain_cut(df._explain_flat(coalesce(query, '')), 50, 47)
            WHEN 'SLEEP' THEN
                'SLEEP ' || df._explain_flat(coalesce(query, '')) || 's'
            WHEN 'WAIT_SCHEDULE' THEN
                'WAIT ''' || df._explain_flat(coalesce(config ->> 'cron_expr', '')) || ''''
            WHEN 'SIGNAL' THEN
                'SIGNAL ''' || df._explain_flat(coalesce(config ->> 'signal_name', '')) || ''''
                    || CASE WHEN json_typeof(config -> 'timeout_seconds') = 'number'
                            THEN ' (' || (config -> 'timeout_seconds')::text || 's)'
                            ELSE '' END
            WHEN 'LOOP' THEN
                CASE WHEN condition_node IS NULL THEN 'LOOP (infinite)' ELSE 'LOOP (while)' END
            WHEN 'BREAK' THEN
                -- A string shows as its text, any other JSON value as JSON (only a
                -- hand-written graph has those); null is no value.
                CASE coalesce(json_typeof(config -> 'break_value'), 'null')
                    WHEN 'null' THEN 'BREAK'
                    WHEN 'string' THEN
                        'BREAK ''' || df._explain_cut(
                            df._explain_flat(config ->> 'break_value'), 20, 17) || ''''
                    ELSE
                        'BREAK ''' || df._explain_cut(
                            df._explain_flat((config -> 'break_value')::text), 20, 17) || ''''
                END
            WHEN 'CALL' THEN 'CALL ' || df._explain_flat(coalesce(config ->> 'name', '?'))
            WHEN 'MAP' THEN
                'MAP ''' || df._explain_flat(coalesce(config ->> 'source', '?')) || ''' (max '
                    || coalesce(config ->> 'max_parallel', '10') || ' at once)'
            WHEN 'IF' THEN 'IF'
            WHEN 'JOIN' THEN 'JOIN (' || cardinality(branches) || ')'
            WHEN 'RACE' THEN 'RACE'
            WHEN 'RETRY' THEN
                'RETRY (max ' || coalesce(config ->> 'max_attempts', '?') || ' attempt'
                    || CASE WHEN config ->> 'max_attempts' = '1' THEN '' ELSE 's' END
                    || CASE WHEN json_typeof(config -> 'retry_on') = 'array'
                            THEN ', on ' || (SELECT string_agg(e.code, ', ' ORDER BY e.ord)
                                               FROM json_array_elements_text(config -> 'retry_on')
                                                    WITH ORDINALITY AS e (code, ord))
                            ELSE '' END
                    || ')'
            WHEN 'TIMEOUT' THEN
                'TIMEOUT ' || coalesce((config -> 'timeout_seconds')::text, '?') || 's'
            ELSE node_type
        END;
    END IF;

    -- The children, in drawing order.
    CASE node_type
    WHEN 'THEN' THEN
        children := jsonb_build_array(jsonb_build_object('id', left_node),
                                      jsonb_build_object('id', right_node, 'c', '→ '));
    WHEN 'LOOP' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '↻ body:', 'c', '└─'));
        IF condition_node IS NOT NULL THEN
            children := children || jsonb_build_array(
                jsonb_build_object('id', condition_node, 'h', '? while:', 'c', '└─'));
        END IF;
    WHEN 'IF' THEN
        -- df.if_rows has no condition node, hence no condition block.
        children := CASE WHEN condition_node IS NOT NULL THEN jsonb_build_array(
                            jsonb_build_object('id', condition_node, 'h', '? condition:',
                                               'c', '└─'))
                         ELSE '[]' END
            || jsonb_build_array(jsonb_build_object('id', left_node, 'h', '✓ then:', 'c', '└─'),
                                 jsonb_build_object('id', right_node, 'h', '✗ else:', 'c', '└─'));
    WHEN 'JOIN', 'RACE' THEN
        -- Branches are siblings: all but the last hang from a '├─'.
        SELECT jsonb_agg(jsonb_build_object(
                   'id', b.id, 'h', '║ branch ' || b.ord || ':',
                   'c', CASE WHEN b.ord < cardinality(branches) THEN '├─' ELSE '└─' END)
                   ORDER BY b.ord)
          INTO children
          FROM unnest(branches) WITH ORDINALITY AS b (id, ord);
    WHEN 'RETRY' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '↻ attempt:', 'c', '└─'));
    WHEN 'TIMEOUT' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '⏱ within:', 'c', '└─'));
    WHEN 'MAP' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '∀ each item:', 'c', '└─'));
    WHEN 'SQL', 'CALL' THEN
        -- The graph the step returned, which runs in its place (df.continue_with).
        children := CASE WHEN left_node IS NULL THEN '[]' ELSE jsonb_build_array(
                        jsonb_build_object('id', left_node, 'h', '⤷ continued with:',
                                           'c', '└─')) END;
    ELSE
        children := '[]';
    END CASE;

    RETURN jsonb_build_object(
        't', node_type,
        'l', label || coalesce(' |=> ''' || result_name || '''', '')
                   || CASE status
                          WHEN 'completed' THEN ' ✓'
                          WHEN 'failed' THEN ' ✗'
                          WHEN 'running' THEN ' ⏳'
                          WHEN 'pending' THEN ' ○'
                          WHEN 'skipped' THEN ' ⊘'
                          ELSE ''
                      END,
        'c', children);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._explain_tree: the lines of the tree under root_id, given the entries of its nodes.
--
-- The drawing rules:
--   * A THEN chain is flattened: its non-THEN leaves are drawn one below the other, the
--     first with the connector of the chain's place, the others with '→ ', all at the same
--     indentation. (A THEN's left side takes over the THEN's own place and connector, its
--     right side gets '→ ', which flattens nested THENs on either side.)
--   * A compound node's children are drawn in blocks, each a header line ('↻ body:',
--     '? condition:', '║ branch 2:', ...) and the child's subtree, indented 2 more, with
--     '└─' or, for a JOIN/RACE branch that is not the last, '├─'.
--   * The blocks of a node inside a chain are indented 4 more than the chain; those of a
--     node standing alone are too, except below a '├─' branch, where '│   ' continues the
--     branch line down to the next sibling.
--
-- Each row of the recursive query is one line to draw, either a node (its line is its
-- entry's, after prefix and connector) or a block header; key orders them (pre-order).
-- A valid graph (depth <= 256, <= 10,000 nodes) has fewer than 20,000 rows. Stored graphs
-- are written by users too, and one that loops back on itself would never end: the walk
-- stops one level past the depth limit and after 20,000 rows, and err says which limit.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._explain_tree(root_id text, nodes jsonb, OUT lines text[], OUT err text)
LANGUAGE plpgsql STABLE
-- A custom plan would copy the whole node map into the plan as a constant.
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    WITH RECURSIVE tree (id, header, prefix, conn, in_chain, key, depth) AS (
        SELECT root_id, NULL::text, ''::text, ''::text, false, ARRAY[]::integer[], 0
        UNION ALL
        SELECT c.id, c.header, c.prefix, c.conn, c.in_chain, t.key || c.pos, t.depth + 1
          FROM tree t
         -- OFFSET 0: look the entry up once per row, not once per use below.
         CROSS JOIN LATERAL (SELECT nodes -> t.id AS entry OFFSET 0) AS e
         CROSS JOIN LATERAL (
                   SELECT t.prefix || CASE WHEN t.in_chain OR t.conn <> '├─' THEN '    '
                                           ELSE '│   ' END AS indent
               ) AS p
         CROSS JOIN LATERAL jsonb_array_elements(e.entry -> 'c') WITH ORDINALITY AS b (child, ord)
         CROSS JOIN LATERAL (
                   -- A THEN's sides continue its chain.
                   SELECT b.child ->> 'id', NULL::text, t.prefix,
                          coalesce(b.child ->> 'c', t.conn), true, b.ord::integer
                    WHERE e.entry ->> 't' = 'THEN'
                   UNION ALL
                   -- A block: its header, then the child below it.
                   SELECT NULL, p.indent || (b.child ->> 'h'), NULL, NULL, NULL,
                          2 * b.ord::integer - 1
                    WHERE e.entry ->> 't' <> 'THEN'
                   UNION ALL
                   SELECT b.child ->> 'id', NULL, p.indent || '  ', b.child ->> 'c', false,
                          2 * b.ord::integer
                    WHERE e.entry ->> 't' <> 'THEN'
               ) AS c (id, header, prefix, conn, in_chain, pos)
         WHERE t.id IS NOT NULL AND t.depth <= 256
    ),
    -- The recursive query runs only as far as rows are read: LIMIT stops a runaway walk.
    capped AS MATERIALIZED (
        SELECT * FROM tree LIMIT 20001
    )
    SELECT CASE
               WHEN count(*) > 20000 THEN
                   'Workflow exceeds maximum node count of 10000. Simplify the workflow or '
                   'break it into multiple instances.'
               WHEN max(t.depth) > 256 THEN
                   'Graph exceeds maximum nesting depth of 256. Simplify the workflow or '
                   'break it into multiple instances.'
           END,
           -- THEN nodes and dangling child references draw nothing.
           array_agg(l.line ORDER BY t.key) FILTER (WHERE l.line IS NOT NULL)
      INTO err, lines
      FROM capped t
     CROSS JOIN LATERAL (
               SELECT coalesce(t.header, t.prefix || t.conn || (nodes -> t.id ->> 'l')) AS line
           ) AS l;
END;
$$;

-- The final text: every line right-padded with spaces to the longest line's length (in
-- characters) plus 4, joined with newlines, no trailing newline.
CREATE OR REPLACE FUNCTION df._explain_text(lines text[]) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT string_agg(rpad(l.line, w.width), E'\n' ORDER BY l.ord)
      FROM unnest(lines) WITH ORDINALITY AS l (line, ord),
           (SELECT max(char_length(x.line)) + 4 AS width FROM unnest(lines) AS x (line)) AS w;
$$;

-- ---------------------------------------------------------------------------------------------
-- Dry run: a graph envelope, validated like df.start validates it, and drawn.
-- ---------------------------------------------------------------------------------------------

-- input as an envelope (a JSON object with a string node_type), or NULL if it is not one.
CREATE OR REPLACE FUNCTION df._explain_envelope(input text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    root jsonb;
BEGIN
    IF ltrim(input, E' \t\n\r') NOT LIKE '{%' THEN
        RETURN NULL;
    END IF;
    root := input::jsonb;
    IF jsonb_typeof(root -> 'node_type') = 'string' THEN
        RETURN root;
    END IF;
    RETURN NULL;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION df._explain_graph(root jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_check record;
    v_nodes jsonb;
    v_tree  record;
BEGIN
    -- The graph errors of df.start, returned as text rather than raised.
    v_check := df._graph_error(root);
    IF v_check.node_count > 10000 THEN
        RETURN 'Invalid durable function graph: root: Workflow exceeds maximum node count of '
            '10000. Simplify the workflow or break it into multiple instances.';
    END IF;
    IF v_check.err IS NOT NULL THEN
        RETURN format('Invalid durable function graph: %s: %s', v_check.path, v_check.err);
    END IF;

    -- The nodes as df.start would store them, each named by its position in the graph (its
    -- path of child positions: df._walk's random ids may collide, positions cannot).
    WITH visited AS MATERIALIZED (
        SELECT w.ord, w.slot, w.pos, w.keys FROM df._walk(root, NULL) AS w
    ),
    children AS (
        SELECT v.ord[1:cardinality(v.ord) - 1]::text AS parent,
               max(v.ord::text) FILTER (WHERE v.slot = 'left') AS left_id,
               max(v.ord::text) FILTER (WHERE v.slot = 'right') AS right_id,
               max(v.ord::text) FILTER (WHERE v.slot = 'condition') AS condition_id,
               array_agg(v.ord::text ORDER BY v.pos) FILTER (WHERE v.slot = 'extra') AS extra_ids
          FROM visited v
         WHERE cardinality(v.ord) > 0
         GROUP BY 1
    )
    SELECT jsonb_object_agg(v.ord::text, df._explain_entry(
               f.node_type, f.query, f.result_name, k.left_id, k.right_id, k.condition_id,
               k.extra_ids, NULL))
      INTO v_nodes
      FROM visited v
      LEFT JOIN children k ON k.parent = v.ord::text
     CROSS JOIN LATERAL (
               SELECT x.node ->> 'node_type', x.node ->> 'query', x.node ->> 'result_name'
                 FROM (SELECT root #> v.keys AS node OFFSET 0) AS x
           ) AS f (node_type, query, result_name);

    v_tree := df._explain_tree('{}', v_nodes);
    IF v_tree.err IS NOT NULL THEN
        RETURN 'Invalid durable function graph: root: ' || v_tree.err;
    END IF;
    RETURN df._explain_text(v_tree.lines);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Live mode: an instance of the caller's, with a header and the inferred status of every
-- node (df.instance_nodes: an untaken IF arm shows ⊘ skipped, not ○ pending).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._explain_instance(instance_id text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_instance record;
    v_output   text;
    v_restarts integer;
    v_nodes    jsonb;
    v_tree     record;
    v_lines    text[];
BEGIN
    -- Under row-level security: another role's instance is not found, like an unknown one.
    -- Ids are lower case; an id typed in upper case is found all the same.
    SELECT i.id, i.label, i.status, i.root_node INTO v_instance
      FROM df.instances i
     WHERE i.id = lower(instance_id);
    IF NOT FOUND THEN
        RETURN format('Instance ''%s'' not found', instance_id);
    END IF;
    -- The run's output (the root's result, or the error it failed with), which users may
    -- read for their own instances; a role granted less simply sees no Output line.
    IF has_column_privilege('df._runs', 'output', 'SELECT') THEN
        SELECT r.output INTO v_output FROM df._runs r WHERE r.instance_id = v_instance.id;
    END IF;
    -- pgdurable's df.restart: how often the instance was run again (each ended run is an
    -- execution of df.instance_executions). Only a restarted instance has the line.
    IF has_column_privilege('df._runs', 'restarts', 'SELECT') THEN
        SELECT nullif(r.restarts, 0) INTO v_restarts
          FROM df._runs r WHERE r.instance_id = v_instance.id;
    END IF;

    -- A running Python step that no live worker has says so: it waits for one.
    SELECT jsonb_object_agg(n.node_id, CASE
               WHEN n.node_type = 'CALL' AND n.inferred_status = 'running'
                AND NOT df._step_has_worker(df._call_name(n.query))
               THEN jsonb_set(e.entry, '{l}',
                              to_jsonb((e.entry ->> 'l') || ' (waiting for a worker that has this step)'))
               ELSE e.entry END)
      INTO v_nodes
      FROM df.instance_nodes(v_instance.id) AS n
     CROSS JOIN LATERAL (
           SELECT df._explain_entry(n.node_type, n.query, n.result_name, n.left_node,
                                    n.right_node, NULL, NULL, n.inferred_status) AS entry) e;
    IF v_nodes IS NULL THEN
        RETURN format('No nodes found for instance ''%s''', v_instance.id);
    END IF;
    v_tree := df._explain_tree(v_instance.root_node, v_nodes);
    IF v_tree.err IS NOT NULL THEN
        RETURN 'Invalid durable function graph: root: ' || v_tree.err;
    END IF;

    -- The header. The status is df.instances', capitalised as pg_durable's engine names
    -- statuses (Running, Completed...).
    v_lines := ARRAY[
        'Instance: ' || v_instance.id
            -- Cut like the output: every line is padded to the longest, so one long label
            -- would widen them all.
            || coalesce(' (' || df._explain_cut(df._explain_flat(v_instance.label), 60, 57)
                        || ')', ''),
        'Status:   ' || CASE v_instance.status
                            WHEN 'completed' THEN '✓'
                            WHEN 'failed' THEN '✗'
                            WHEN 'cancelled' THEN '✗'
                            WHEN 'running' THEN '⏳'
                            ELSE '○'
                        END
            || ' ' || initcap(v_instance.status)];
    IF v_restarts IS NOT NULL THEN
        v_lines := v_lines || ('Restarts: ' || v_restarts);
    END IF;
    IF v_output IS NOT NULL THEN
        v_lines := v_lines || ('Output:   ' || df._explain_cut(df._explain_flat(v_output), 60, 57));
    END IF;
    RETURN df._explain_text(v_lines || ''::text || coalesce(v_tree.lines, '{}'));
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.explain
--
-- What the input is, after trimming white space, in this order:
--   1. exactly 8 hex digits: a live instance;
--   2. an envelope (JSON with a string node_type): a dry run of that graph;
--   3. a statement starting with a SQL keyword: a dry run of that one SQL step;
--   4. text containing ~>, |=>, ?>, !>, @> or df.: a DSL expression, evaluated as
--      `SELECT <input>` by the caller and its result explained like df.start would take it
--      (an envelope, else one SQL step);
--   5. anything else: a message saying what explain accepts.
--
-- pgdurable checks 3 before 4 (pg_durable the other way round), so that a statement that
-- happens to mention the df schema, e.g. 'SELECT count(*) FROM df.instances', is explained
-- as the SQL step it is, rather than evaluated as `SELECT SELECT ...`, which can only fail.
--
-- The expression runs in a subtransaction that is read-only and always rolled back:
-- explaining must change nothing, so `df.explain('df.start(...)')` does not start an
-- instance (it fails, as a write would), and whatever else the text contains is undone.
-- Its errors are returned as text, 'Failed to evaluate expression: <message>', like every
-- other error of df.explain (pg_durable leaves raising or returning open). Cancels and
-- statement timeouts are not caught.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.explain(input text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT SECURITY INVOKER AS $$
DECLARE
    v_input     text := btrim(input, E' \t\n\r\f');
    v_root      jsonb;
    v_value     text;
    v_evaluated boolean := false;
    v_error     text;
BEGIN
    IF v_input ~ '^[0-9a-fA-F]{8}$' THEN
        RETURN df._explain_instance(v_input);
    END IF;

    v_root := df._explain_envelope(v_input);
    IF v_root IS NOT NULL THEN
        RETURN df._explain_graph(v_root);
    END IF;

    IF v_input ~* '^(select|insert|update|delete|with)[ \t\r\n]'
       OR v_input ~* '^(create|alter|drop|call|do|truncate|grant|revoke|explain) ' THEN
        RETURN df._explain_graph(jsonb_build_object('node_type', 'SQL', 'query', v_input));
    END IF;

    IF v_input ~ '~>|\|=>|\?>|!>|@>|df\.' THEN
        BEGIN
            PERFORM pg_catalog.set_config('transaction_read_only', 'on', true);
            EXECUTE 'SELECT ' || v_input INTO v_value;
            v_evaluated := true;
            -- Roll the subtransaction back (and transaction_read_only with it); v_value stays.
            RAISE EXCEPTION 'df.explain: undo the evaluation';
        EXCEPTION WHEN OTHERS THEN
            IF NOT v_evaluated THEN
                v_error := SQLERRM;
            END IF;
        END;
        IF v_error IS NOT NULL THEN
            RETURN 'Failed to evaluate expression: ' || v_error;
        END IF;
        IF v_value IS NULL THEN
            RETURN 'Expression returned NULL';
        END IF;
        -- What df.start would make of the value: a graph, or else one SQL step.
        v_root := coalesce(df._explain_envelope(v_value),
                           jsonb_build_object('node_type', 'SQL', 'query', v_value));
        RETURN df._explain_graph(v_root);
    END IF;

    RETURN 'Cannot explain input: not a valid Durofut JSON, instance ID, SQL statement, or DSL '
        'expression.' || E'\n'
        || 'Hint: DSL expressions use df.*() functions and operators like ~>, |=>, &, |.';
END;
$$;
