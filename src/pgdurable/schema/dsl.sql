-- The graph DSL: builders, wrappers and operators.
--
-- Every builder returns the JSON text of a graph node (an "envelope", pg_durable's Durofut);
-- nothing is written until df.start(). The text is compact, keys always in the order
-- node_type, left_node, right_node, condition_node, extra_nodes, query, result_name, and
-- strings escaped like serde_json (to_json(text) escapes exactly the same characters).
-- Children are embedded verbatim: the `json` type (unlike jsonb) keeps each value's original
-- text, so only the top level of an operand is ever re-serialised.
--
-- Builders are VOLATILE, as in pg_durable, except the operator helpers, which are IMMUTABLE.
-- Node-typed arguments go through df._ensure(); literal arguments (df.sql's query, names,
-- break values, sleep seconds) never do. df.http (http.sql), df.wait_for_schedule
-- (schedule.sql) and df.wait_for_signal (signals.sql) are builders too.

-- ---------------------------------------------------------------------------------------------
-- Non-future helpers.
--
-- df.setvar/unsetvar/clearvars/await_instance act immediately and return a plain word ('OK',
-- a status). Used as a workflow step, e.g. `df.setvar('k', 'v') ~> 'SELECT ...'`, that word
-- would silently become a SQL step. So each of them records in the session setting
-- df.non_future_helper which helper ran, in which statement (statement_timestamp()), and what
-- it returned; a builder that then receives exactly that text as a plain-text step in the
-- same statement refuses it.
--
-- The returned text is part of the marker so that legitimate code is not refused: a client
-- sending `SELECT df.setvar(...); SELECT df.start('SELECT ...')` as one query string, or a
-- PL/pgSQL block calling df.setvar() and then df.start(), runs every statement with the same
-- statement_timestamp(). Format: <helper> '|' <epoch of statement start> '|' <returned text>.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._mark_non_future_helper(helper text, returned text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT NULL::void FROM pg_catalog.set_config('df.non_future_helper',
        helper || '|' || extract(epoch FROM statement_timestamp())::text || '|' || returned,
        false);
$$;

-- The helper whose result `step` is, if it was returned earlier in the current statement.
-- Deliberately STABLE, not IMMUTABLE: the answer depends on the session setting.
CREATE OR REPLACE FUNCTION df._non_future_helper(step text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    marker text := current_setting('df.non_future_helper', true);
    parts  text[];
BEGIN
    IF marker IS NULL OR marker = '' THEN
        RETURN NULL;
    END IF;
    -- The returned text may itself contain '|'; helper and timestamp never do.
    parts := regexp_match(marker, '^([^|]*)\|([^|]*)\|(.*)$', 's');
    IF parts IS NULL
       OR parts[2] <> extract(epoch FROM statement_timestamp())::text
       OR parts[3] <> step THEN
        RETURN NULL;
    END IF;
    RETURN parts[1];
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Envelope serialisation.
-- ---------------------------------------------------------------------------------------------

-- The compact envelope text from its parts. Children are envelope texts copied as is (the
-- caller took them from a `json` value, whose text is the input's); NULL means "absent" and
-- the key is omitted, as is an empty extra_nodes. STABLE like to_json(), which lets
-- PostgreSQL inline it into its callers (builders are called a lot while graphs are built).
CREATE OR REPLACE FUNCTION df._envelope(
    node_type text, left_node text, right_node text, condition_node text, extra_nodes text[],
    query text, result_name text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"node_type":' || to_json(node_type)::text
        || coalesce(',"left_node":' || left_node, '')
        || coalesce(',"right_node":' || right_node, '')
        || coalesce(',"condition_node":' || condition_node, '')
        || CASE WHEN cardinality(extra_nodes) > 0
                THEN ',"extra_nodes":[' || array_to_string(extra_nodes, ',') || ']'
                ELSE '' END
        || coalesce(',"query":' || to_json(query)::text, '')
        || coalesce(',"result_name":' || to_json(result_name)::text, '')
        || '}';
$$;

-- Why a node cannot be read as an envelope, given its members (NULL when absent), or NULL
-- if it can. Shallow: children must be objects, but their own insides are checked by
-- df.start(), which reports a path.
CREATE OR REPLACE FUNCTION df._shape_error(
    left_node json, right_node json, condition_node json, extra_nodes json, query json,
    result_name json)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF json_typeof(left_node) NOT IN ('null', 'object')
       OR json_typeof(right_node) NOT IN ('null', 'object') THEN
        RETURN 'Durofut children must be JSON objects';
    END IF;
    IF json_typeof(condition_node) NOT IN ('null', 'object') THEN
        RETURN 'condition_node must be a Durofut JSON object';
    END IF;
    IF json_typeof(extra_nodes) NOT IN ('null', 'array') THEN
        RETURN 'extra_nodes must be an array of Durofut JSON objects';
    END IF;
    -- Nested, so that nodes without extra branches never run the subquery.
    IF json_typeof(extra_nodes) = 'array' THEN
        IF EXISTS (SELECT 1 FROM json_array_elements(extra_nodes) AS e
                    WHERE json_typeof(e.value) <> 'object') THEN
            RETURN 'extra_nodes entries must be Durofut JSON objects';
        END IF;
    END IF;
    IF json_typeof(query) NOT IN ('null', 'string') THEN
        RETURN 'invalid type: query must be a string';
    END IF;
    IF json_typeof(result_name) NOT IN ('null', 'string') THEN
        RETURN 'invalid type: result_name must be a string';
    END IF;
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._ensure: normalise a node-typed argument. Returns the envelope text with its
-- top level in canonical form; new_name, if given, replaces the result name (df.as).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._ensure(step text, new_name text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    helper     text;
    err        text;
    member     text;
    val        json;
    m_type     json;     -- the members of the envelope
    m_left     json;
    m_right    json;
    m_cond     json;
    m_extra    json;
    m_query    json;
    m_name     json;
    extras     text[];
BEGIN
    IF step IS NULL THEN
        RETURN NULL;
    END IF;
    -- Rules 1 and 4: plain text is a SQL step, unless it is what a non-future helper just
    -- returned.
    IF ltrim(step, E' \t\n\r') NOT LIKE '{%' THEN
        helper := df._non_future_helper(step);
        IF helper IS NOT NULL THEN
            RAISE EXCEPTION '% cannot be used as a workflow step. Call % before df.start().',
                helper, helper USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END IF;

    -- One pass over the text picks up the top-level members (the last of duplicates wins,
    -- as with ->). Each `json` value keeps its exact text; json_typeof() only looks at its
    -- first token. Reading members one by one with -> would rescan the whole text each time,
    -- which adds up when graphs are built step by step.
    BEGIN
        FOR member, val IN SELECT e.key, e.value FROM json_each(step::json) AS e LOOP
            CASE member
                WHEN 'node_type' THEN m_type := val;
                WHEN 'left_node' THEN m_left := val;
                WHEN 'right_node' THEN m_right := val;
                WHEN 'condition_node' THEN m_cond := val;
                WHEN 'extra_nodes' THEN m_extra := val;
                WHEN 'query' THEN m_query := val;
                WHEN 'result_name' THEN m_name := val;
                ELSE NULL;  -- unknown members are ignored
            END CASE;
        END LOOP;
    EXCEPTION WHEN data_exception THEN
        -- Starts with '{' but is not JSON (e.g. a PL/pgSQL block body): a SQL step.
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END;

    -- Rule 4: JSON without a string node_type is SQL text too.
    IF json_typeof(m_type) IS DISTINCT FROM 'string' THEN
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END IF;

    -- Rule 3: it claims to be an envelope but cannot be read as one.
    err := df._shape_error(m_left, m_right, m_cond, m_extra, m_query, m_name);
    IF err IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid Durofut JSON: failed to deserialize workflow step: %', err
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Rule 4: an unknown node type is taken as SQL text (df.start() would reject it).
    IF NOT (m_type #>> '{}') = ANY (df._node_types()) THEN
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END IF;

    -- Rule 2. JSON null members count as absent, like serde's Option.
    IF json_typeof(m_extra) = 'array' THEN
        SELECT array_agg(e.value::text ORDER BY e.ordinality) INTO extras
          FROM json_array_elements(m_extra) WITH ORDINALITY AS e;
    END IF;
    RETURN df._envelope(
        m_type #>> '{}',
        CASE WHEN json_typeof(m_left) = 'object' THEN m_left::text END,
        CASE WHEN json_typeof(m_right) = 'object' THEN m_right::text END,
        CASE WHEN json_typeof(m_cond) = 'object' THEN m_cond::text END,
        extras,
        m_query #>> '{}',
        coalesce(new_name, m_name #>> '{}'));
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Helpers for config strings.
-- ---------------------------------------------------------------------------------------------

-- A jsonb value as compact JSON text (no spaces), like serde_json prints it; jsonb's own text
-- form puts a space after every ':' and ','. Object members come in jsonb's order (shorter
-- keys first), the only order a jsonb argument still has.
CREATE OR REPLACE FUNCTION df._jsonb_compact(value jsonb) RETURNS text
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
CREATE OR REPLACE FUNCTION df._json_seconds(seconds double precision) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT seconds::numeric::text;
$$;


-- ---------------------------------------------------------------------------------------------
-- Builders. STRICT ones give NULL for a NULL argument, as in pg_durable.
-- ---------------------------------------------------------------------------------------------

-- A SQL step. The query is taken literally, even if it looks like an envelope.
CREATE OR REPLACE FUNCTION df.sql(query text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('SQL', NULL, NULL, NULL, NULL, query, NULL);
$$;

-- a, then b.
CREATE OR REPLACE FUNCTION df.seq(a text, b text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('THEN', df._ensure(a), df._ensure(b), NULL, NULL, NULL, NULL);
$$;

-- Name fut's result so later steps can use $name.
CREATE OR REPLACE FUNCTION df.as(fut text, name text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF name = '' THEN
        RAISE EXCEPTION 'df.as: result name cannot be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Explicit ASCII classes: [[:alpha:]] and \w would accept non-ASCII letters.
    IF name !~ '^[a-zA-Z_][a-zA-Z0-9_]*$' THEN
        RAISE EXCEPTION 'df.as: result name ''%'' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*',
            name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._ensure(fut, name);
END;
$$;

-- Both branches in parallel; the result is the array of both results.
CREATE OR REPLACE FUNCTION df.join(a text, b text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('JOIN', df._ensure(a), df._ensure(b), NULL, NULL, NULL, NULL);
$$;

-- Three branches in parallel; the third is the JOIN's extra node.
CREATE OR REPLACE FUNCTION df.join3(a text, b text, c text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('JOIN', df._ensure(a), df._ensure(b), NULL,
                        ARRAY[df._ensure(c)], NULL, NULL);
$$;

-- Both branches in parallel; the first to finish decides.
CREATE OR REPLACE FUNCTION df.race(a text, b text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('RACE', df._ensure(a), df._ensure(b), NULL, NULL, NULL, NULL);
$$;

-- Run condition; then then_branch if its result is truthy, else else_branch.
CREATE OR REPLACE FUNCTION df.if(condition text, then_branch text, else_branch text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('IF', df._ensure(then_branch), df._ensure(else_branch),
                        df._ensure(condition), NULL, NULL, NULL);
$$;

-- Branch on whether the named result has rows. The name is checked when the IF runs.
CREATE OR REPLACE FUNCTION df.if_rows(result_name text, then_branch text, else_branch text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('IF', df._ensure(then_branch), df._ensure(else_branch),
                        NULL, NULL,
                        '{"condition_type":"result_has_rows","result_name":'
                            || to_json(result_name)::text || '}',
                        NULL);
$$;

-- Repeat body forever (until df.break), or while condition holds after each pass.
CREATE OR REPLACE FUNCTION df.loop(body text, condition text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF body IS NULL THEN
        RAISE EXCEPTION 'df.loop: body cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN df._envelope('LOOP', df._ensure(body), NULL,
                        df._ensure(condition), NULL, NULL, NULL);
END;
$$;

-- Leave the nearest enclosing loop, which completes with value (a literal, never SQL).
CREATE OR REPLACE FUNCTION df.break(value text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT df._envelope('BREAK', NULL, NULL, NULL, NULL,
                        '{"break_value":' || coalesce(to_json(value)::text, 'null') || '}',
                        NULL);
$$;

-- A durable timer.
CREATE OR REPLACE FUNCTION df.sleep(seconds bigint) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF seconds < 0 THEN
        RAISE EXCEPTION 'Sleep duration must be non-negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('SLEEP', NULL, NULL, NULL, NULL, seconds::text, NULL);
END;
$$;

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
CREATE OR REPLACE FUNCTION df.retry(
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
        RAISE EXCEPTION 'df.retry: retry_on must list error codes (SQLSTATE codes or classes, or http, http_5xx, http_timeout, http_connection, timeout, python)'
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
CREATE OR REPLACE FUNCTION df.timeout(step text, seconds double precision) RETURNS text
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
-- df.map: run body once for each row of the named result source (or each element, if it is
-- a JSON array), at most max_parallel at once; the result is the array of the items'
-- results, in row order. Inside body, the item is the named result item_name. A failing item
-- fails the map (the others are cancelled), unless collect_errors: then every item runs, and
-- each entry of the result is {"ok": true, "result": ...} or {"ok": false, "error": ...}.
--
--   df.map('rows', 'INSERT ... $item.id') -> {"node_type":"MAP","left_node":<body>,
--       "query":"{\"source\":\"rows\",\"item\":\"item\",\"max_parallel\":10,
--                \"collect_errors\":false}"}
--
-- pgdurable's own (pg_durable has no map). The names are checked here and again by df.start
-- (df._map_config_error); whether source exists is known only when the map starts.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.map(
    source text, body text, max_parallel integer DEFAULT 10, item_name text DEFAULT 'item',
    collect_errors boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_config text;
    v_err    text;
BEGIN
    IF body IS NULL THEN
        RETURN NULL;
    END IF;
    v_config := '{"source":' || coalesce(to_json(source)::text, 'null')
        || ',"item":' || coalesce(to_json(item_name)::text, 'null')
        || ',"max_parallel":' || coalesce(max_parallel::text, 'null')
        || ',"collect_errors":' || coalesce(collect_errors::text, 'null') || '}';
    v_err := df._map_config_error(v_config::json);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION 'df.map: %', v_err USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('MAP', df._ensure(body), NULL, NULL, NULL, v_config, NULL);
END;
$$;

-- What is wrong with a MAP node's config, or NULL: accepts what the worker's loader
-- (pgdurable.core.model) can run; item, max_parallel and collect_errors have defaults there.
CREATE OR REPLACE FUNCTION df._map_config_error(config json) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN json_typeof(config -> 'source') IS DISTINCT FROM 'string'
          OR (config ->> 'source') !~ '^[a-zA-Z_][a-zA-Z0-9_]*$' THEN
            'source must be the name of an earlier result'
        WHEN coalesce(json_typeof(config -> 'item'), 'string') <> 'string'
          OR coalesce(config ->> 'item', 'item') !~ '^[a-zA-Z_][a-zA-Z0-9_]*$' THEN
            'item_name must be a valid result name'
        WHEN coalesce(json_typeof(config -> 'max_parallel'), 'number') <> 'number'
          OR coalesce(config ->> 'max_parallel', '10') !~ '^[0-9]+$'
          OR coalesce(config ->> 'max_parallel', '10')::numeric NOT BETWEEN 1 AND 1000 THEN
            'max_parallel must be an integer from 1 to 1000'
        WHEN coalesce(json_typeof(config -> 'collect_errors'), 'boolean') <> 'boolean' THEN
            'collect_errors must be true or false'
    END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.start's checks for hand-written RETRY/TIMEOUT/MAP envelopes.
-- ---------------------------------------------------------------------------------------------

-- Why a RETRY/TIMEOUT node's config (its query, present) is unacceptable, or NULL. Accepts what
-- the builders produce and what the worker's loader (pgdurable.core.model) can run: absent
-- backoff keys and a null retry_on are allowed, as the loader has defaults for them. Values
-- are read from the `json` text, as the worker reads them: 3.0 is not an integer there.
CREATE OR REPLACE FUNCTION df._wrapper_config_error(node_type text, query text) RETURNS text
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

    IF node_type = 'MAP' THEN
        RETURN df._map_config_error(config);
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
-- Operator helpers, IMMUTABLE as in pg_durable.
--
-- With constant operands PostgreSQL evaluates an IMMUTABLE call once while planning. That is
-- harmless for the non-future-helper check: an operand that is a helper's result is a call
-- to a VOLATILE function, so the expression is not constant and the check runs at execution,
-- after the helper has recorded its marker.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.as_op(fut text, name text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT df.as(fut, name);
$$;

CREATE OR REPLACE FUNCTION df.loop_prefix_op(body text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT df.loop(body);
$$;

-- `condition ?> then_branch` is half an IF; `!>` completes it. The operands are kept as
-- given; df.if normalises them when the else branch arrives.
CREATE OR REPLACE FUNCTION df.if_then_op(condition text, then_branch text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN jsonb_build_object('_partial_if', true, 'condition', condition,
                              'then_branch', then_branch)::text;
END;
$$;

CREATE OR REPLACE FUNCTION df.if_else_op(partial_if text, else_branch text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    partial jsonb;
BEGIN
    BEGIN
        partial := partial_if::jsonb;
    EXCEPTION WHEN data_exception THEN
        partial := NULL;
    END;
    IF jsonb_typeof(partial) IS DISTINCT FROM 'object' OR partial ->> '_partial_if' IS NULL THEN
        RAISE EXCEPTION 'Invalid if-then-else: left side of !> must be a ?> expression'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df.if(partial ->> 'condition', partial ->> 'then_branch', else_branch);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Operators. They live in pg_catalog so that `'a' ~> 'b'` works with any search_path, as in
-- pg_durable. Creating objects in pg_catalog needs a superuser; on managed PostgreSQL the
-- installer may not be one, and then the operators go into schema df, where users reach them
-- with df on their search_path or as OPERATOR(df.~>).
--
-- All of them share PostgreSQL's single precedence level for user-defined operators, left
-- associative; there is nothing to configure. CREATE OPERATOR has no OR REPLACE: an operator
-- that exists (in either schema) is left as it is, since it calls its function by reference.
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
    op      record;
    v_where text := 'pg_catalog';
BEGIN
    FOR op IN
        SELECT o.name, o.leftarg, o.func
          FROM (VALUES ('~>', 'text', 'df.seq'), ('|=>', 'text', 'df.as_op'),
                       ('&', 'text', 'df.join'), ('|', 'text', 'df.race'),
                       ('?>', 'text', 'df.if_then_op'), ('!>', 'text', 'df.if_else_op'),
                       ('@>', NULL, 'df.loop_prefix_op')) AS o (name, leftarg, func)
         WHERE NOT EXISTS (
                   SELECT 1 FROM pg_catalog.pg_operator p
                    WHERE p.oprname = o.name
                      AND p.oprleft = coalesce(o.leftarg::regtype, 0)
                      AND p.oprright = 'text'::regtype
                      AND p.oprnamespace IN ('pg_catalog'::regnamespace, 'df'::regnamespace))
    LOOP
        LOOP
            BEGIN
                EXECUTE format('CREATE OPERATOR %s.%s (%s RIGHTARG = text, FUNCTION = %s)',
                               v_where, op.name,
                               CASE WHEN op.leftarg IS NOT NULL
                                    THEN 'LEFTARG = ' || op.leftarg || ',' ELSE '' END,
                               op.func);
                EXIT;
            EXCEPTION WHEN insufficient_privilege THEN
                IF v_where = 'df' THEN
                    RAISE;
                END IF;
                v_where := 'df';
                RAISE NOTICE 'pgdurable: no permission to create the DSL operators in pg_catalog '
                    '(not a superuser?); they are created in schema df. Put df on the '
                    'search_path (SET search_path = "$user", public, df) or write OPERATOR(df.~>).';
            END;
        END LOOP;
    END LOOP;
END;
$$;
