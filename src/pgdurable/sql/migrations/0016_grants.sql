-- pgdurable schema, version 16: grants as data.
--
-- * What df.grant_usage grants is one list, df._usage_privileges(); df.grant_usage and
--   df.revoke_usage walk it, so a later version that needs another privilege replaces that
--   list alone (and calls df.refresh_grants(), migration 10). This version's list adds what
--   the monitoring functions read as the caller (migrations 12 and 14).
-- * df.grant_usage refuses up front what the caller cannot pass on: PostgreSQL raises for a
--   privilege the caller lacks altogether, yet only warns, granting nothing, for one held
--   without GRANT OPTION (an administrator made with with_grant but without include_http
--   would see "granted" while the role got no HTTP access).
-- * 'public' means PUBLIC only when no role of that exact name exists: a role named "Public"
--   is granted as itself, not as everybody.

-- ---------------------------------------------------------------------------------------------
-- Grants
-- ---------------------------------------------------------------------------------------------

-- The grantee clause for p_role: PUBLIC for 'public' (any case, as PostgreSQL reads the
-- keyword) unless a role has exactly that name.
CREATE FUNCTION df._grantee(p_role text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN lower(p_role) = 'public'
                     AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_role)
                THEN 'PUBLIC' ELSE format('%I', p_role) END;
$$;

-- What a role needs to build, start and watch its own workflows, in grant order. Row-level
-- security and the triggers of migration 10 narrow each to the role's own rows.
CREATE FUNCTION df._usage_privileges(OUT privilege text, OUT object text)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('USAGE', 'SCHEMA df'),
           ('SELECT', 'df.instances'),
           -- df.cancel sets the status; the triggers allow nothing else.
           ('UPDATE (status, updated_at)', 'df.instances'),
           ('SELECT', 'df.nodes'),
           -- df.start writes the instance and its nodes as the caller.
           ('INSERT (id, label, root_node, submitted_by, database)', 'df.instances'),
           ('INSERT (id, instance_id, node_type, query, result_name, left_node, right_node, '
            'submitted_by, database)', 'df.nodes'),
           ('SELECT, INSERT, UPDATE, DELETE', 'df.vars'),
           -- The monitoring functions: the role's own runs and their execution history.
           -- (Entries a grantor gained in different versions stay apart: one not yet renewed
           -- for a later entry can still revoke the earlier ones.)
           ('SELECT (instance_id, generation, output)', 'df._runs'),
           ('SELECT (checkpoints)', 'df._runs'),
           ('SELECT (finished_at)', 'df._runs'),
           ('SELECT', 'df._executions'),
           -- df.signal: signals to the role's own instances.
           ('INSERT (instance_id, name, data)', 'df._signals');
$$;

CREATE OR REPLACE FUNCTION df.grant_usage(
    p_role text, include_http boolean DEFAULT false, with_grant boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := df._grantee(p_role);
    opt     text := CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END;
    fn      text;
    p       record;
BEGIN
    -- Refused up front what the caller cannot pass on (PostgreSQL only warns, granting
    -- nothing, for a privilege held without GRANT OPTION).
    IF NOT has_schema_privilege('df', 'USAGE WITH GRANT OPTION') THEN
        RAISE EXCEPTION 'pg_durable: "%" cannot grant df usage: it does not hold USAGE on schema df WITH GRANT OPTION',
            current_user USING ERRCODE = 'insufficient_privilege',
            HINT = 'Ask a superuser or the owner of schema df, or a role granted df.grant_usage(..., with_grant => true).';
    END IF;
    IF include_http THEN
        FOREACH fn IN ARRAY df._private_functions('http') LOOP
            IF NOT has_function_privilege(fn, 'EXECUTE WITH GRANT OPTION') THEN
                RAISE EXCEPTION 'pg_durable: "%" cannot grant HTTP access: it does not hold EXECUTE on % WITH GRANT OPTION',
                    current_user, fn USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Only a superuser, the owner of schema df, or a role granted df.grant_usage(..., include_http => true, with_grant => true) can grant include_http.';
            END IF;
        END LOOP;
    END IF;

    FOR p IN SELECT * FROM df._usage_privileges() LOOP
        EXECUTE format('GRANT %s ON %s TO %s%s', p.privilege, p.object, grantee, opt);
    END LOOP;
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
    RAISE NOTICE 'pg_durable: granted df usage privileges to "%"', p_role;
END;
$$;

-- Undo df.grant_usage. PostgreSQL's grantor rules apply: only grants made by the caller are
-- revoked, CASCADE takes along whatever the grantee passed on. A privilege the caller holds
-- nothing of (e.g. one a later version added, not yet renewed for it) it granted nothing of.
CREATE OR REPLACE FUNCTION df.revoke_usage(p_role text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := df._grantee(p_role);
    stmt    text;
BEGIN
    FOR stmt IN
        SELECT format('REVOKE EXECUTE ON FUNCTION %s FROM %s CASCADE', f.fn, grantee)
          FROM unnest(df._private_functions('http') || df._private_functions('admin')) AS f (fn)
        UNION ALL
        (SELECT format('REVOKE %s ON %s FROM %s CASCADE', p.privilege, p.object, grantee)
           FROM df._usage_privileges() WITH ORDINALITY AS p (privilege, object, ord)
          ORDER BY p.ord DESC)  -- schema usage last
    LOOP
        BEGIN
            EXECUTE stmt;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
    END LOOP;
    RAISE NOTICE 'pg_durable: revoked df usage privileges granted by "%" from "%"',
        current_user, p_role;
END;
$$;

SELECT df.refresh_grants();
