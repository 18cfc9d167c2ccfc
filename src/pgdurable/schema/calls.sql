-- Python steps, the SQL side: df.call, who may call what, and df.start's check of CALL nodes.
--
-- A Python step is a function registered by name in a worker (docs/python.md):
--
--   df.call('billing.charge', '{"order_id": 7, "amount": "$quote.total"}')
--     -> {"node_type":"CALL","query":"{\"name\":\"billing.charge\",\"args\":{...}}"}
--
-- The worker binds args to the function's keyword parameters, after substituting named
-- results and variables into its string values (core/substitute.py, substitute_json). Only
-- a worker that has the name claims the step (df._tasks.call_name, df._claim); until one
-- does, the step waits.
--
-- Python steps run in the operator's worker, with whatever it can reach, so a role calls only
-- what an administrator allowed it: df.grant_call(role, pattern). df.start refuses a graph
-- with a call its submitter may not make, and the worker checks again before every run (a
-- grant revoked meanwhile stops running workflows too).

-- A step name: identifiers joined by dots, at most 200 characters (core/model.py,
-- is_step_name, says the same).
CREATE OR REPLACE FUNCTION df._is_step_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT char_length(name) <= 200
       AND name ~ '^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$';
$$;

-- ---------------------------------------------------------------------------------------------
-- df.call: a Python step. args is a JSON object (NULL: no arguments). Not STRICT: a NULL name
-- is a mistake, refused like df.http's NULL url.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.call(name text, args jsonb DEFAULT '{}') RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF name IS NULL THEN
        RAISE EXCEPTION 'df.call: name cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT df._is_step_name(name) THEN
        RAISE EXCEPTION 'df.call: invalid step name ''%''', name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A step name is identifiers joined by dots, e.g. ''billing.charge''.';
    END IF;
    IF args IS NOT NULL AND jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'df.call: args must be a JSON object of keyword arguments, not %',
            jsonb_typeof(args) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('CALL', NULL, NULL, NULL, NULL,
                        '{"name":' || to_json(name)::text
                            || ',"args":' || df._jsonb_compact(coalesce(args, '{}')) || '}',
                        NULL);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Who may call what.
-- ---------------------------------------------------------------------------------------------

-- Whether role p_role may call the Python step p_name: the engine (the df schema's owner and
-- its members, superusers) may call any; other roles what a grant to them, to a role they
-- inherit from, or to PUBLIC allows. A dropped role may call nothing. Run as the caller: the
-- worker reads every grant; a role, the grants that apply to itself (security.sql), which is
-- all it needs to know of its own calls and nothing of others'.
CREATE OR REPLACE FUNCTION df._may_call(p_role oid, p_name text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- CASE, not AND: pg_has_role raises for a role that does not exist (a grant outlives
    -- its grantee), and only CASE fixes the order of the tests.
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = p_role) THEN false
        WHEN pg_has_role(p_role, (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'df'),
                         'MEMBER') THEN true
        ELSE EXISTS (
            SELECT 1 FROM df._call_grants g
             WHERE (g.pattern = '*' OR g.pattern = p_name
                    OR (right(g.pattern, 2) = '.*' AND starts_with(p_name, left(g.pattern, -1))))
               AND CASE WHEN g.grantee = 0 THEN true
                        WHEN NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = g.grantee)
                        THEN false
                        ELSE pg_has_role(p_role, g.grantee, 'USAGE') END)
    END;
$$;

-- The message of a call that p_role may not make, or NULL if it may.
CREATE OR REPLACE FUNCTION df._call_refusal(p_role oid, p_name text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('Blocked: role %s may not call Python step ''%s''. An administrator allows '
                  'it with SELECT df.grant_call(%L, %L).',
                  coalesce(quote_ident((SELECT r.rolname::text FROM pg_roles r
                                         WHERE r.oid = p_role)), p_role::text),
                  p_name,
                  coalesce((SELECT r.rolname::text FROM pg_roles r WHERE r.oid = p_role),
                           p_role::text),
                  p_name)
     WHERE NOT df._may_call(p_role, p_name);
$$;

-- What is wrong with a CALL node's config (its query) for submitter p_role, or NULL: df.start's
-- check (df._checked_walk), which accepts what the worker's loader can run.
CREATE OR REPLACE FUNCTION df._call_error(query text, p_role oid) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_config jsonb;
BEGIN
    BEGIN
        v_config := query::jsonb;
    EXCEPTION WHEN data_exception THEN  -- not JSON, or JSON jsonb cannot hold (\u0000)
        RETURN 'CALL config is not valid JSON';
    END;
    IF jsonb_typeof(v_config) <> 'object' THEN
        RETURN 'CALL config must be a JSON object';
    END IF;
    IF jsonb_typeof(v_config -> 'name') IS DISTINCT FROM 'string'
       OR NOT df._is_step_name(v_config ->> 'name') THEN
        RETURN 'CALL config needs a step name (identifiers joined by dots)';
    END IF;
    IF coalesce(jsonb_typeof(v_config -> 'args'), 'object') <> 'object' THEN
        RETURN 'CALL args must be a JSON object';
    END IF;
    RETURN df._call_refusal(p_role, v_config ->> 'name');
END;
$$;

-- The step name of a CALL node's config (its query), or NULL if it has none.
CREATE OR REPLACE FUNCTION df._call_name(config text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN config::jsonb ->> 'name';
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END;
$$;

-- Whether a live worker (one seen in the last 30 s) has the Python step p_name: a call that
-- none has waits (df.waiting_calls, df.explain, `pgdurable show`). SECURITY DEFINER: users may
-- not read df._worker_epoch; this tells only whether some worker has a step of that name.
CREATE OR REPLACE FUNCTION df._step_has_worker(p_name text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM df._worker_epoch w
                    WHERE w.last_seen_at > now() - interval '30 seconds'
                      AND p_name = ANY (w.step_names));
$$;

-- A grant pattern: a step name, a name prefix ending in '.*', or '*'.
CREATE OR REPLACE FUNCTION df._is_call_pattern(pattern text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pattern = '*' OR df._is_step_name(pattern)
        OR (right(pattern, 2) = '.*' AND df._is_step_name(left(pattern, -2)));
$$;

-- The grantee's oid for df.grant_call: 0 for PUBLIC (as df._grantee reads the word).
CREATE OR REPLACE FUNCTION df._call_grantee(p_role text) RETURNS oid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_oid oid;
BEGIN
    IF df._grantee(p_role) = 'PUBLIC' THEN
        RETURN 0;
    END IF;
    SELECT r.oid INTO v_oid FROM pg_roles r WHERE r.rolname = p_role;
    IF v_oid IS NULL THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = 'undefined_object';
    END IF;
    RETURN v_oid;
END;
$$;

-- Allow p_role (or 'public') to call the Python steps p_pattern matches. For administrators:
-- EXECUTE is not public; df.grant_usage(role, with_grant => true) hands it on.
CREATE OR REPLACE FUNCTION df.grant_call(p_role text, p_pattern text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_pattern IS NULL OR NOT df._is_call_pattern(p_pattern) THEN
        RAISE EXCEPTION 'df.grant_call: invalid pattern ''%''', p_pattern
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A pattern is a step name (''billing.charge''), a prefix ending in '
                         '''.*'' (''billing.*''), or ''*''.';
    END IF;
    PERFORM df._forget_dropped_grantees();
    INSERT INTO df._call_grants (grantee, pattern, granted_by)
    VALUES (df._call_grantee(p_role), p_pattern, session_user::regrole)
    ON CONFLICT (grantee, pattern) DO NOTHING;
END;
$$;

-- Grants whose grantee was dropped grant nothing (df._may_call), and nobody can name them to
-- revoke them; they go whenever grants change, before a new role could get their oid.
CREATE OR REPLACE FUNCTION df._forget_dropped_grantees() RETURNS integer
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM df._call_grants g
         WHERE g.grantee <> 0 AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = g.grantee)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone;
$$;
REVOKE ALL ON FUNCTION df._forget_dropped_grantees() FROM PUBLIC;

-- Take back a df.grant_call (p_pattern NULL: every pattern granted to p_role). Steps already
-- started fail when they next run.
CREATE OR REPLACE FUNCTION df.revoke_call(p_role text, p_pattern text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_count   integer;
    v_dropped integer := df._forget_dropped_grantees();
BEGIN
    IF df._grantee(p_role) <> 'PUBLIC'
       AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_role) THEN
        RETURN v_dropped;  -- a dropped role: its grants just went
    END IF;
    DELETE FROM df._call_grants g
     WHERE g.grantee = df._call_grantee(p_role)
       AND (p_pattern IS NULL OR g.pattern = p_pattern);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- The grants, for administrators.
CREATE OR REPLACE FUNCTION df.call_grants()
RETURNS TABLE (grantee text, pattern text, granted_by regrole, granted_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN g.grantee = 0 THEN 'public'
                ELSE coalesce((SELECT r.rolname::text FROM pg_roles r WHERE r.oid = g.grantee),
                              g.grantee::text) END,
           g.pattern, g.granted_by, g.granted_at
      FROM df._call_grants g
     ORDER BY 1, 2;
$$;

REVOKE EXECUTE ON FUNCTION df.grant_call(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.revoke_call(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.call_grants() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.continue_with: the result of a step that is the rest of the workflow. A SQL step that
-- returns it (SELECT df.continue_with(<graph>), one row, one column) or a Python step that
-- returns a graph (pgdurable.dsl) does not end: the graph runs in its place, and the step
-- ends as the graph does, with its result. The worker checks the graph as df.start does,
-- counting it against the instance's limits (10,000 nodes, 256 deep); its nodes are recorded
-- in df.nodes like the others, and the step's left_node points at its root. Plain text is a
-- SQL step, as everywhere.
-- ---------------------------------------------------------------------------------------------
--
-- The graph comes back signed, for the session's login role, with a key only the engine
-- reads (df._keys): the worker runs a result as a graph only if the signature holds for the
-- instance's submitter. So data that merely looks like such a result (a row read from a
-- table, an API's answer) is a plain result, whoever wrote it. SECURITY DEFINER: it reads the
-- key; it signs only for session_user, whom the caller already is.
CREATE OR REPLACE FUNCTION df.continue_with(graph text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_graph text := df._ensure(graph);
    v_key   text := (SELECT k.secret FROM df._keys k WHERE k.name = 'continue_with');
BEGIN
    RETURN jsonb_build_object(
        'df.continue_with', v_graph,
        'signature', encode(sha256(convert_to(
            v_key || ':' || session_user || ':' || v_graph || ':' || v_key, 'UTF8')), 'hex'));
END;
$$;
