-- pgdurable schema, version 16: fixes from a security review, and grants as data.
--
-- * An instance's status can no longer be set to NULL (the status trigger's WHEN clause
--   was NULL for it, so it did not fire), and no role but the engine touches another role's
--   instance rows (a BYPASSRLS role could write their updated_at).
-- * 'public' means PUBLIC only when no role of that exact name exists: a role named "Public"
--   is granted as itself, not as everybody.
-- * What df.grant_usage grants is one list, df._usage_privileges(); df.grant_usage and
--   df.revoke_usage walk it, so a later version that needs another privilege replaces that
--   list alone (and calls df.refresh_grants()).
-- * df.refresh_grants renews only grants df.grant_usage made (INSERT (id) on df.instances,
--   which nothing else hands out), switches to each grantor only if the caller is a member
--   of it, and puts the caller's role back afterwards.

-- ---------------------------------------------------------------------------------------------
-- Statuses
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df.instances ALTER COLUMN status SET NOT NULL;

DROP TRIGGER instances_status ON df.instances;
CREATE TRIGGER instances_status BEFORE UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                       AND NOT coalesce(NEW.status = 'cancelled'
                                        AND OLD.status IN ('pending', 'running')
                                        AND OLD.submitted_by
                                            = quote_ident(current_user)::regrole, false))
    EXECUTE FUNCTION df._refuse_status_change();

-- Any UPDATE of another role's instance (the engine's excepted). Ordinary roles cannot even
-- see such rows; this holds BYPASSRLS roles to the same.
CREATE TRIGGER instances_owner BEFORE UPDATE ON df.instances
    FOR EACH ROW WHEN (OLD.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');

-- Trigger functions need no EXECUTE to fire; this SECURITY DEFINER one (migration 14) should
-- not be callable either.
REVOKE ALL ON FUNCTION df._instance_finished() FROM PUBLIC;

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
-- security and the triggers of migrations 10 and 16 narrow each to the role's own rows.
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
           -- (Two entries: a grantor not yet renewed for the second can still revoke the first.)
           ('SELECT (instance_id, generation, output)', 'df._runs'),
           ('SELECT (checkpoints)', 'df._runs'),
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

CREATE OR REPLACE FUNCTION df.refresh_grants() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g        record;
    v_caller text := current_user;
    v_role   text := current_setting('role');  -- 'none' unless the caller did SET ROLE
    v_http   oid := to_regprocedure('df.http(text,text,text,jsonb,integer)');
    v_owner  oid := (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'df');
BEGIN
    FOR g IN
        SELECT a.grantor, a.is_grantable,
               (SELECT r.rolname FROM pg_roles r WHERE r.oid = a.grantor) AS grantor_name,
               CASE WHEN a.grantee = 0 THEN 'public'
                    ELSE (SELECT r.rolname FROM pg_roles r WHERE r.oid = a.grantee) END AS role,
               EXISTS (SELECT 1 FROM pg_proc p, aclexplode(p.proacl) h
                        WHERE p.oid = v_http AND h.privilege_type = 'EXECUTE'
                          AND h.grantor = a.grantor AND h.grantee = a.grantee) AS http
          FROM pg_attribute att, aclexplode(att.attacl) a
         WHERE att.attrelid = 'df.instances'::regclass AND att.attname = 'id'
           AND a.privilege_type = 'INSERT' AND a.grantee <> v_owner
         -- The owner's grants first: delegated administrators may need theirs renewed before
         -- they can pass the new privileges on.
         ORDER BY a.grantor <> v_owner, a.grantor, a.grantee
    LOOP
        BEGIN
            IF NOT pg_has_role(v_caller, g.grantor, 'MEMBER') THEN
                RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege';
            END IF;
            PERFORM set_config('role', g.grantor_name, true);
            PERFORM df.grant_usage(g.role, g.http, g.is_grantable);
            PERFORM set_config('role', v_role, true);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg_durable: "%" was granted df usage by "%", who must run SELECT df.grant_usage(%, %, %) again to grant what this version adds',
                g.role, g.grantor_name, quote_literal(g.role), g.http, g.is_grantable;
        END;
    END LOOP;
END;
$$;

SELECT df.refresh_grants();
