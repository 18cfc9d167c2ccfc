-- pgdurable schema, version 4: the client functions (spec §5.2, §5.3, §5.5, §9.1, §10.1).
--
-- All of them run as the caller (SECURITY INVOKER) unless noted, so row-level security on
-- df.instances, df.nodes and df.vars scopes them to the caller's own rows.

-- True inside a workflow step: workers set df.in_workflow on the connections that run them.
CREATE FUNCTION df._in_workflow() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('df.in_workflow', true), '') = 'true';
$$;

-- ---------------------------------------------------------------------------------------------
-- Instance control (spec §5.2)
-- ---------------------------------------------------------------------------------------------

-- The instance's status, or NULL if it does not exist or belongs to someone else.
CREATE FUNCTION df.status(instance_id text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.status FROM df.instances i WHERE i.id = $1;
$$;

-- The root node's result once the instance completed; NULL in every other case.
CREATE FUNCTION df.result(instance_id text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT n.result::text
      FROM df.instances i
      JOIN df.nodes n ON n.instance_id = i.id AND n.id = i.root_node
     WHERE i.id = $1 AND n.status = 'completed';
$$;

-- Wait until the instance is terminal and return its status. PL/pgSQL in READ COMMITTED
-- takes a new snapshot per statement, so every poll sees what workers committed meanwhile.
-- (LISTEN cannot help here: notifications only arrive between transactions.)
CREATE FUNCTION df.await_instance(instance_id text, timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    v_status text;
    -- bigint: timeout_seconds * 10 overflows integer for timeouts of years.
    v_polls  bigint := timeout_seconds::bigint * 10;
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.await_instance() cannot be called inside a workflow - wait for instances from the client that started them'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        SELECT i.status INTO v_status FROM df.instances i WHERE i.id = await_instance.instance_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'Instance not found: %', instance_id USING ERRCODE = 'no_data_found';
        END IF;
        IF v_status IN ('completed', 'failed', 'cancelled') THEN
            v_status := lower(v_status);
            PERFORM df._mark_non_future_helper('df.await_instance()', v_status);
            RETURN v_status;
        END IF;
        PERFORM pg_sleep(0.1);
        v_polls := v_polls - 1;
        EXIT WHEN v_polls <= 0;
    END LOOP;
    RAISE EXCEPTION 'Timeout after %s waiting for instance % (status: %). Check if background worker is running.',
        timeout_seconds, instance_id, v_status;
END;
$$;

CREATE FUNCTION df.wait_for_completion(instance_id text, timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    RAISE WARNING 'df.wait_for_completion() is deprecated; use df.await_instance() instead';
    RETURN df.await_instance(instance_id, timeout_seconds);
END;
$$;

-- Cancel an instance. Setting the status is the whole request: the engine's trigger on
-- df.instances drops the instance's queued work and tells the workers (migration 5). A
-- terminal instance is left as it is, and the call still succeeds (it is idempotent).
CREATE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user')
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    -- Under RLS, someone else's instance looks exactly like a missing one.
    IF NOT EXISTS (SELECT 1 FROM df.instances i WHERE i.id = cancel.instance_id) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    BEGIN
        UPDATE df.instances i
           SET status = 'cancelled', updated_at = now()
         WHERE i.id = cancel.instance_id
           AND i.status NOT IN ('completed', 'failed', 'cancelled');
    EXCEPTION WHEN OTHERS THEN
        -- Spec §5.2: a failed cancel request is reported in the result, not raised.
        RETURN 'Failed to cancel: ' || SQLERRM;
    END;
    RETURN format('Instance %s cancelled: %s', instance_id, reason);
END;
$$;

-- A no-op kept for compatibility: workers pick up new instances by themselves.
CREATE FUNCTION df.run(instance_id text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN $1 IS NULL THEN 'Triggered run for all pending instances'
                ELSE 'Triggered run for instance: ' || $1 END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Variables (spec §5.3). Each role has its own; {name} in a step's SQL is replaced by the
-- value the submitter had when the instance started. The explicit owner filter keeps
-- superusers, who bypass RLS, to their own variables too.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.setvar(name text, value text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
-- Unqualified names in the statements are df.vars columns; parameters are written setvar.x.
#variable_conflict use_column
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.setvar() cannot be called inside a workflow - set variables before starting the workflow'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    INSERT INTO df.vars AS v (name, value, owner)
    VALUES (setvar.name, setvar.value, quote_ident(current_user)::regrole)
    ON CONFLICT (owner, name) DO UPDATE SET value = EXCLUDED.value;
    PERFORM df._mark_non_future_helper('df.setvar()', 'OK');
    RETURN 'OK';
END;
$$;

CREATE FUNCTION df.getvar(name text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT v.value FROM df.vars v
     WHERE v.owner = quote_ident(current_user)::regrole AND v.name = $1;
$$;

CREATE FUNCTION df.unsetvar(name text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.unsetvar() cannot be called inside a workflow - manage variables before starting the workflow'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    DELETE FROM df.vars v
     WHERE v.owner = quote_ident(current_user)::regrole AND v.name = unsetvar.name;
    PERFORM df._mark_non_future_helper('df.unsetvar()', 'OK');
    RETURN 'OK';
END;
$$;

CREATE FUNCTION df.clearvars() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.clearvars() cannot be called inside a workflow - manage variables before starting the workflow'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    DELETE FROM df.vars v WHERE v.owner = quote_ident(current_user)::regrole;
    PERFORM df._mark_non_future_helper('df.clearvars()', 'OK');
    RETURN 'OK';
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Monitoring: df.list_instances, basic overload (spec §9.1)
-- ---------------------------------------------------------------------------------------------

-- pg_durable.list_instances_max_limit, or its default 1000 when unset or out of range. It is
-- a placeholder setting here (no extension registers it), hence the lenient parsing.
CREATE FUNCTION df._list_instances_max_limit() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN s ~ '^\s*[0-9]{1,7}\s*$' AND s::integer BETWEEN 1 AND 1000000
                THEN s::integer ELSE 1000 END
      FROM coalesce(current_setting('pg_durable.list_instances_max_limit', true), '') AS s;
$$;

CREATE FUNCTION df.list_instances(status_filter text DEFAULT NULL, limit_count integer DEFAULT 100)
RETURNS TABLE (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_limit integer := coalesce(limit_count, 100);
    v_max   integer := df._list_instances_max_limit();
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_limit > v_max THEN
        RAISE EXCEPTION 'df.list_instances: limit_count (%) exceeds pg_durable.list_instances_max_limit (%); request fewer rows, or use the paginated df.list_instances overload (after_cursor/next_cursor) for large result sets',
            v_limit, v_max USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- execution_count and output come from the engine's run record, whose generation and
    -- output columns users may read for their own instances.
    RETURN QUERY
        SELECT i.id::text, i.label, 'pg_durable::orchestration::execute-function-graph'::text,
               i.status, r.generation::bigint, r.output
          FROM df.instances i
          LEFT JOIN df._runs r ON r.instance_id = i.id
         WHERE list_instances.status_filter IS NULL OR i.status = list_instances.status_filter
         ORDER BY i.created_at DESC, i.id
         LIMIT v_limit;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Misc (spec §5.5)
-- ---------------------------------------------------------------------------------------------

-- '<version> (built <time the schema reached this version, UTC>)'. SECURITY DEFINER only to
-- read df._migrations, which users have no privileges on. The version must equal
-- pgdurable.__version__ (a test checks it); a migration that bumps it replaces this function.
CREATE FUNCTION df.version() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT '0.1.0 (built '
           || coalesce(to_char(max(m.applied_at) AT TIME ZONE 'UTC',
                               'YYYY-MM-DD"T"HH24:MI:SS"Z"'), 'unknown')
           || ')'
      FROM df._migrations m;
$$;

CREATE FUNCTION df.duroxide_schema() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '_duroxide'::text;
$$;

-- The database SQL steps run in by default: pg_durable.database if set, else this one.
CREATE FUNCTION df.target_database() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('pg_durable.database', true), ''),
                    current_database())::text;
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges (spec §10.1)
-- ---------------------------------------------------------------------------------------------

-- The functions whose EXECUTE is not public, by kind, with their exact signatures. Functions
-- that do not exist (yet) are skipped, so a later migration adding df.http only has to
-- create it and revoke it from PUBLIC.
CREATE FUNCTION df._private_functions(kind text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(f.sig ORDER BY f.ord), '{}')
      FROM unnest(CASE kind
                  WHEN 'http' THEN ARRAY['df.http(text,text,text,jsonb,integer)',
                                         'df.http_multipart(text,text,jsonb,jsonb,integer)']
                  WHEN 'admin' THEN ARRAY['df.grant_usage(text,boolean,boolean)',
                                          'df.revoke_usage(text)',
                                          'df.metrics()']
                  END) WITH ORDINALITY AS f (sig, ord)
     WHERE to_regprocedure(f.sig) IS NOT NULL;
$$;

-- Let p_role use pg_durable. Additive; runs as the caller, who needs every privilege it
-- passes on WITH GRANT OPTION (superusers and with_grant admins have them).
CREATE FUNCTION df.grant_usage(
    p_role text, include_http boolean DEFAULT false, with_grant boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := CASE WHEN lower(p_role) = 'public' THEN 'PUBLIC' ELSE format('%I', p_role) END;
    opt     text := CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END;
    fn      text;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA df TO %s%s', grantee, opt);
    IF include_http THEN
        FOREACH fn IN ARRAY df._private_functions('http') LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', fn, grantee, opt);
        END LOOP;
    END IF;
    IF with_grant THEN
        FOREACH fn IN ARRAY df._private_functions('admin') LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', fn, grantee, opt);
        END LOOP;
    END IF;
    EXECUTE format('GRANT SELECT ON df.instances TO %s%s', grantee, opt);
    EXECUTE format('GRANT UPDATE (status, updated_at) ON df.instances TO %s%s', grantee, opt);
    EXECUTE format('GRANT SELECT ON df.nodes TO %s%s', grantee, opt);
    EXECUTE format('GRANT INSERT (id, label, root_node, submitted_by, database) ON df.instances '
                   'TO %s%s', grantee, opt);
    EXECUTE format('GRANT INSERT (id, instance_id, node_type, query, result_name, left_node, '
                   'right_node, submitted_by, database) ON df.nodes TO %s%s', grantee, opt);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON df.vars TO %s%s', grantee, opt);
    -- For df.list_instances: generation and output of the role's own runs (RLS on df._runs).
    EXECUTE format('GRANT SELECT (instance_id, generation, output) ON df._runs TO %s%s',
                   grantee, opt);
    RAISE NOTICE 'pg_durable: granted df usage privileges to "%"', p_role;
END;
$$;

-- Undo df.grant_usage. PostgreSQL's grantor rules apply: only grants made by the caller are
-- revoked, CASCADE takes along whatever the grantee passed on.
CREATE FUNCTION df.revoke_usage(p_role text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := CASE WHEN lower(p_role) = 'public' THEN 'PUBLIC' ELSE format('%I', p_role) END;
    fn      text;
BEGIN
    FOREACH fn IN ARRAY df._private_functions('http') || df._private_functions('admin') LOOP
        BEGIN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s CASCADE', fn, grantee);
        EXCEPTION WHEN insufficient_privilege THEN
            -- The caller has no privilege on it at all, so it granted nothing to revoke.
            NULL;
        END;
    END LOOP;
    EXECUTE format('REVOKE SELECT, INSERT, UPDATE, DELETE ON df.vars FROM %s CASCADE', grantee);
    EXECUTE format('REVOKE SELECT (instance_id, generation, output) ON df._runs FROM %s CASCADE',
                   grantee);
    EXECUTE format('REVOKE INSERT (id, instance_id, node_type, query, result_name, left_node, '
                   'right_node, submitted_by, database) ON df.nodes FROM %s CASCADE', grantee);
    EXECUTE format('REVOKE INSERT (id, label, root_node, submitted_by, database) ON df.instances '
                   'FROM %s CASCADE', grantee);
    EXECUTE format('REVOKE SELECT ON df.nodes FROM %s CASCADE', grantee);
    EXECUTE format('REVOKE UPDATE (status, updated_at) ON df.instances FROM %s CASCADE', grantee);
    EXECUTE format('REVOKE SELECT ON df.instances FROM %s CASCADE', grantee);
    EXECUTE format('REVOKE USAGE ON SCHEMA df FROM %s CASCADE', grantee);
    RAISE NOTICE 'pg_durable: revoked df usage privileges granted by "%" from "%"',
        current_user, p_role;
END;
$$;

REVOKE EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.revoke_usage(text) FROM PUBLIC;
