-- pgdurable schema, version 8: HTTP steps and per-step retry and time limits, the SQL side
-- (spec §3.2, §5.1 df.http/df.http_multipart, §6.3, §10.1; DESIGN.md "retries, step timeouts").
--
-- df.http and df.http_multipart build HTTP / HTTP_MULTIPART nodes exactly as pg_durable does,
-- but never refuse because of the egress policy. In pg_durable that policy is a Cargo feature
-- compiled into the extension, so its builders can (and do) refuse at build time ("df.http()
-- is disabled. Rebuild with ..."). In pgdurable the operator sets the policy on the worker,
-- which may differ from one deployment to the next and is not visible from SQL; it is enforced
-- when the step runs. The builders therefore only do the checks that hold everywhere (scheme,
-- method, timeout, multipart parts). Who may use HTTP at all is decided by EXECUTE on these
-- two functions, revoked from PUBLIC, granted by df.grant_usage(role, include_http => true).
--
-- df.retry and df.timeout are pgdurable's own (pg_durable has neither). They are wrapper
-- nodes rather than options of each builder, so that any step — a SQL statement, an HTTP
-- call, a whole sequence or JOIN — gets a retry policy or a time limit the same way, and
-- they nest (a time limit per attempt, or around all attempts). Each has one child in
-- left_node and its policy as a JSON config in query, the storage form every other node with
-- a config uses (spec §6.3), so df.start, df.nodes and the worker's loader need no new
-- columns. The worker (pgdurable.graph) gives them their meaning.
--
-- Existing functions redefined here: df._node_types (the two new types, appended so that
-- messages listing the valid types only grow at the end) and df._graph_error (structural
-- rules for the new types). df.start, df._ensure and df._insert_nodes pick the new types up
-- through df._node_types and need no change: a RETRY/TIMEOUT row stores its child in
-- left_node and its config unchanged in query, which is _insert_nodes' default.

-- ---------------------------------------------------------------------------------------------
-- df.nodes accepts the new types. Their structure: one child (left_node), a config (query).
--
-- The constraints are added NOT VALID: every existing row satisfied the old ones, which the
-- new ones only widen, so there is nothing to check, and validating would scan all of
-- df.nodes while holding the ACCESS EXCLUSIVE lock ALTER TABLE takes — in an upgrade with
-- instances in flight, workers would wait for that scan. New rows are checked all the same.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df.nodes
    DROP CONSTRAINT nodes_type_chk,
    DROP CONSTRAINT nodes_structure_chk,
    ADD CONSTRAINT nodes_type_chk CHECK (node_type IN (
        'SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
        'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'RETRY', 'TIMEOUT')) NOT VALID,
    ADD CONSTRAINT nodes_structure_chk CHECK (CASE node_type
        WHEN 'THEN' THEN left_node IS NOT NULL AND right_node IS NOT NULL AND query IS NULL
        WHEN 'IF'   THEN left_node IS NOT NULL AND right_node IS NOT NULL AND query IS NOT NULL
        WHEN 'LOOP' THEN left_node IS NOT NULL AND right_node IS NULL
        WHEN 'JOIN' THEN left_node IS NOT NULL AND right_node IS NOT NULL
        WHEN 'RACE' THEN left_node IS NOT NULL AND right_node IS NOT NULL AND query IS NULL
        WHEN 'RETRY' THEN left_node IS NOT NULL AND right_node IS NULL AND query IS NOT NULL
        WHEN 'TIMEOUT' THEN left_node IS NOT NULL AND right_node IS NULL AND query IS NOT NULL
        ELSE left_node IS NULL AND right_node IS NULL AND query IS NOT NULL
    END) NOT VALID;

CREATE OR REPLACE FUNCTION df._node_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
                 'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'RETRY', 'TIMEOUT'];
$$;

-- ---------------------------------------------------------------------------------------------
-- Helpers for config strings.
-- ---------------------------------------------------------------------------------------------

-- A jsonb value as compact JSON text (no spaces), like serde_json prints it; jsonb's own text
-- form puts a space after every ':' and ','. Object members come in jsonb's order (shorter
-- keys first), the only order a jsonb argument still has.
CREATE FUNCTION df._jsonb_compact(value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    CASE jsonb_typeof(value)
    WHEN 'object' THEN
        RETURN '{' || coalesce((SELECT string_agg(to_json(e.key)::text || ':'
                                                  || df._jsonb_compact(e.value), ','
                                                  ORDER BY e.ordinality)
                                  FROM jsonb_each(value) WITH ORDINALITY AS e), '') || '}';
    WHEN 'array' THEN
        RETURN '[' || coalesce((SELECT string_agg(df._jsonb_compact(e.value), ','
                                                  ORDER BY e.ordinality)
                                  FROM jsonb_array_elements(value) WITH ORDINALITY AS e), '')
            || ']';
    ELSE
        -- Scalars print without spaces; strings are escaped as to_json() escapes them.
        RETURN value::text;
    END CASE;
END;
$$;

-- A number of seconds as a JSON number: integral values without a fraction (1, 60), others
-- as short decimals (0.5). Through numeric, whose text never uses an exponent and, unlike
-- float8's, does not depend on the session's extra_float_digits. Callers refuse NaN and
-- infinities, which JSON cannot represent.
CREATE FUNCTION df._json_seconds(seconds double precision) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT seconds::numeric::text;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.http, df.http_multipart (spec §5.1). Not STRICT, because body and headers may be NULL
-- (JSON null in the config), and so may parts, to be refused with pg_durable's message.
--
-- NULL handling. The spec leaves open what a NULL does in a parameter that may not be NULL;
-- pgdurable raises, as df.loop does for a NULL body ('df.loop: body cannot be NULL'): an HTTP
-- step without a URL, a method or a time limit is a mistake, and returning NULL would only
-- move the surprise to df.start ('fut cannot be NULL') or, inside an operator, make the whole
-- graph NULL. These checks come first, as argument checks do in pg_durable; a NULL parts is
-- checked with the other parts checks.
-- ---------------------------------------------------------------------------------------------

-- Why url is refused by the scheme check (spec §5.1 check 2), or NULL. A URL with a '{' is
-- left alone: a {var} may supply its scheme at run time (a $var does not count; its URL fails
-- here, as in pg_durable). The worker checks the final URL again before every request.
CREATE FUNCTION df._http_scheme_error(url text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT format('Blocked: unsupported URL scheme ''%s''. Only http and https are allowed.',
                  s.scheme)
      FROM (SELECT lower(split_part(url, '://', 1)) AS scheme) AS s
     WHERE strpos(url, '{') = 0 AND s.scheme NOT IN ('http', 'https');
$$;

CREATE FUNCTION df.http(
    url text, method text DEFAULT 'POST', body text DEFAULT NULL, headers jsonb DEFAULT NULL,
    timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_method text := upper(method);
    v_err    text;
BEGIN
    IF url IS NULL THEN
        RAISE EXCEPTION 'df.http: url cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF method IS NULL THEN
        RAISE EXCEPTION 'df.http: method cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF timeout_seconds IS NULL THEN
        RAISE EXCEPTION 'df.http: timeout_seconds cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_err := df._http_scheme_error(url);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION '%', v_err USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_method NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method: %. Must be GET, POST, PUT, DELETE, or PATCH',
            v_method USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('HTTP', NULL, NULL, NULL, NULL,
                        '{"url":' || to_json(url)::text
                            || ',"method":' || to_json(v_method)::text
                            || ',"body":' || coalesce(to_json(body)::text, 'null')
                            || ',"headers":' || coalesce(df._jsonb_compact(headers), 'null')
                            || ',"timeout_seconds":' || timeout_seconds::text
                            || '}',
                        NULL);
END;
$$;

-- Parts are objects {name, data_b64[, filename][, content_type]}; like pg_durable, only the
-- list itself is checked here, each part when the request is built.
CREATE FUNCTION df.http_multipart(
    url text, method text DEFAULT 'POST', parts jsonb DEFAULT NULL, headers jsonb DEFAULT NULL,
    timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_method text := upper(method);
    v_err    text;
BEGIN
    IF url IS NULL THEN
        RAISE EXCEPTION 'df.http_multipart: url cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF method IS NULL THEN
        RAISE EXCEPTION 'df.http_multipart: method cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF timeout_seconds IS NULL THEN
        RAISE EXCEPTION 'df.http_multipart: timeout_seconds cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_err := df._http_scheme_error(url);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION '%', v_err USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_method NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method for multipart: %. Must be POST, PUT, or PATCH',
            v_method USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF parts IS NULL THEN
        RAISE EXCEPTION 'parts is required and cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(parts) <> 'array' THEN
        RAISE EXCEPTION 'parts must be a JSON array of part objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_array_length(parts) = 0 THEN
        RAISE EXCEPTION 'parts must contain at least one part'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('HTTP_MULTIPART', NULL, NULL, NULL, NULL,
                        '{"url":' || to_json(url)::text
                            || ',"method":' || to_json(v_method)::text
                            || ',"parts":' || df._jsonb_compact(parts)
                            || ',"headers":' || coalesce(df._jsonb_compact(headers), 'null')
                            || ',"timeout_seconds":' || timeout_seconds::text
                            || '}',
                        NULL);
END;
$$;

-- Outbound requests are a privilege (spec §10.1). df.grant_usage(role, include_http => true)
-- and df.revoke_usage already grant and revoke EXECUTE on these two (df._private_functions
-- lists them and skips functions that do not exist, so until now they did nothing for HTTP).
-- Roles given include_http before this migration hold nothing on them: nothing recorded
-- that they asked for it, so they must be granted again.
REVOKE EXECUTE ON FUNCTION df.http(text, text, text, jsonb, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.http_multipart(text, text, jsonb, jsonb, integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.retry, df.timeout: pgdurable's wrapper nodes.
--
--   df.retry(step, 3)  -> {"node_type":"RETRY","left_node":<step>,"query":"{\"max_attempts\":3,
--                          \"backoff_seconds\":1,\"max_backoff_seconds\":60,\"retry_on\":null}"}
--   df.timeout(step, 10) -> {"node_type":"TIMEOUT","left_node":<step>,
--                            "query":"{\"timeout_seconds\":10}"}
--
-- The step is a node-typed argument, auto-wrapped like every operator operand. Config keys
-- come in a fixed order, numbers print without a needless fraction (1, not 1.0).
--
-- The values are checked here, when a mistake is cheapest to see, and again by df.start for
-- hand-written envelopes (df._wrapper_config_error). retry_on's entries are not checked
-- against a list: what they match (SQLSTATE codes and classes, the http* and timeout
-- categories) is decided when a step fails, by the worker.
-- ---------------------------------------------------------------------------------------------

-- Not STRICT, because retry_on is optional. A NULL step gives NULL like the strict builders
-- (so `df.retry(NULL, 3) ~> b` is NULL like `NULL ~> b`); a NULL number is refused with the
-- same message as an out-of-range one rather than silently dropping the policy.
CREATE FUNCTION df.retry(
    step text, max_attempts integer, backoff_seconds double precision DEFAULT 1,
    max_backoff_seconds double precision DEFAULT 60, retry_on text[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF step IS NULL THEN
        RETURN NULL;
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'df.retry: max_attempts must be at least 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF backoff_seconds IS NULL OR backoff_seconds < 0 THEN
        RAISE EXCEPTION 'df.retry: backoff_seconds must be non-negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NaN compares greater than everything in PostgreSQL, so it passed the checks above.
    IF backoff_seconds IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'df.retry: backoff_seconds must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_backoff_seconds IS NULL OR max_backoff_seconds < backoff_seconds THEN
        RAISE EXCEPTION 'df.retry: max_backoff_seconds must be at least backoff_seconds'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_backoff_seconds IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'df.retry: max_backoff_seconds must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A list, not a matrix; an empty list would retry nothing, which is no policy at all.
    IF retry_on IS NOT NULL
       AND (cardinality(retry_on) = 0 OR array_ndims(retry_on) <> 1
            OR EXISTS (SELECT 1 FROM unnest(retry_on) AS c (code)
                        WHERE c.code IS NULL OR c.code = '')) THEN
        RAISE EXCEPTION 'df.retry: retry_on must list error codes (SQLSTATE codes or classes, or http, http_5xx, http_timeout, http_connection, timeout)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('RETRY', df._ensure(step), NULL, NULL, NULL,
                        '{"max_attempts":' || max_attempts::text
                            || ',"backoff_seconds":' || df._json_seconds(backoff_seconds)
                            || ',"max_backoff_seconds":' || df._json_seconds(max_backoff_seconds)
                            || ',"retry_on":' || coalesce(array_to_json(retry_on)::text, 'null')
                            || '}',
                        NULL);
END;
$$;

-- A time limit on step, whatever it is; its message is df.wait_for_signal's for the same
-- mistake.
CREATE FUNCTION df.timeout(step text, seconds double precision) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF seconds IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'df.timeout: seconds must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('TIMEOUT', df._ensure(step), NULL, NULL, NULL,
                        '{"timeout_seconds":' || df._json_seconds(seconds) || '}', NULL);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.start's checks for hand-written RETRY/TIMEOUT envelopes.
-- ---------------------------------------------------------------------------------------------

-- Why a RETRY/TIMEOUT node's config (its query, present) is unacceptable, or NULL. Accepts what
-- the builders produce and what the worker's loader (pgdurable.graph.model) can run: absent
-- backoff keys and a null retry_on are allowed, as the loader has defaults for them. Values
-- are read from the `json` text, as the worker reads them: 3.0 is not an integer there.
CREATE FUNCTION df._wrapper_config_error(node_type text, query text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    config  json;
    v       json;
    backoff numeric := 0;
BEGIN
    BEGIN
        config := query::json;
    EXCEPTION WHEN data_exception THEN
        RETURN format('query in %s must be valid JSON config: %s', node_type, SQLERRM);
    END;
    IF json_typeof(config) <> 'object' THEN
        RETURN format('query in %s must be a JSON config object', node_type);
    END IF;

    IF node_type = 'TIMEOUT' THEN
        v := config -> 'timeout_seconds';
        IF json_typeof(v) IS DISTINCT FROM 'number' OR v::text::numeric <= 0 THEN
            RETURN 'query in TIMEOUT: timeout_seconds must be a positive number';
        END IF;
        RETURN NULL;
    END IF;

    v := config -> 'max_attempts';
    IF json_typeof(v) IS DISTINCT FROM 'number' OR v::text !~ '^[0-9]+$'
       OR v::text::numeric < 1 THEN
        RETURN 'query in RETRY: max_attempts must be an integer of at least 1';
    END IF;
    v := config -> 'backoff_seconds';
    IF v IS NOT NULL THEN
        IF json_typeof(v) <> 'number' OR v::text::numeric < 0 THEN
            RETURN 'query in RETRY: backoff_seconds must be a non-negative number';
        END IF;
        backoff := v::text::numeric;
    END IF;
    v := config -> 'max_backoff_seconds';
    IF v IS NOT NULL AND (json_typeof(v) <> 'number' OR v::text::numeric < backoff) THEN
        RETURN 'query in RETRY: max_backoff_seconds must be a number of at least backoff_seconds';
    END IF;
    v := config -> 'retry_on';
    IF json_typeof(v) = 'array' THEN
        IF json_array_length(v) = 0
           OR EXISTS (SELECT 1 FROM json_array_elements(v) AS e
                       WHERE json_typeof(e.value) <> 'string' OR e.value #>> '{}' = '') THEN
            v := 'false';  -- reported below
        END IF;
    END IF;
    IF coalesce(json_typeof(v), 'null') NOT IN ('null', 'array') THEN
        RETURN 'query in RETRY: retry_on must be null or a non-empty array of non-empty strings';
    END IF;
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._graph_error (migration 3) with the rules for RETRY and TIMEOUT: like LOOP, exactly one
-- child, in left_node; like the leaves, a query, which must be their config. Everything else is
-- unchanged.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._graph_error(
    root jsonb, OUT node_count bigint, OUT path text, OUT err text)
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
            WHEN t.node_type IN ('LOOP', 'RETRY', 'TIMEOUT') AND NOT t.has_left THEN
                t.node_type || ' nodes require left_node'
            WHEN t.node_type IN ('LOOP', 'RETRY', 'TIMEOUT') AND t.has_right THEN
                'right_node is not valid for ' || t.node_type || ' nodes'
            WHEN t.node_type NOT IN ('THEN', 'IF', 'JOIN', 'RACE', 'LOOP', 'RETRY', 'TIMEOUT')
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
            WHEN t.node_type IN ('RETRY', 'TIMEOUT') THEN
                df._wrapper_config_error(t.node_type, t.query)
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
