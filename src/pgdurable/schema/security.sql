-- Security: who may see and do what (docs/security.md has the threat model).
--
-- Row-level security keeps ordinary roles to their own rows. It does nothing against a role
-- with BYPASSRLS, and its column grants let a role set its own instance's status to
-- anything. The triggers below close both holes for every role that is neither a superuser
-- nor the owner of the df schema (the worker): such a role can write rows only under its own
-- name, and can change an instance's status only by cancelling or restarting it.
-- df.grant_usage hands a role what it needs to use pg_durable's interface, and no more.

-- ---------------------------------------------------------------------------------------------
-- Row-level security: a role sees and changes only its own rows. The owner (the worker) and
-- superusers bypass it (it is not FORCEd).
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df.instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.nodes ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.vars ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._signals ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._executions ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._call_grants ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS instances_user_isolation ON df.instances;
CREATE POLICY instances_user_isolation ON df.instances FOR ALL
    USING (submitted_by = quote_ident(current_user)::regrole)
    WITH CHECK (submitted_by = quote_ident(current_user)::regrole);
DROP POLICY IF EXISTS nodes_user_isolation ON df.nodes;
CREATE POLICY nodes_user_isolation ON df.nodes FOR ALL
    USING (submitted_by = quote_ident(current_user)::regrole)
    WITH CHECK (submitted_by = quote_ident(current_user)::regrole);
DROP POLICY IF EXISTS vars_user_isolation ON df.vars;
CREATE POLICY vars_user_isolation ON df.vars FOR ALL
    USING (owner = quote_ident(current_user)::regrole)
    WITH CHECK (owner = quote_ident(current_user)::regrole);

-- The monitoring functions run as the caller and read a few columns of the caller's own runs
-- and their execution history (df.grant_usage grants SELECT on those): these policies limit
-- rows to instances the caller can see in df.instances.
DROP POLICY IF EXISTS runs_user_isolation ON df._runs;
CREATE POLICY runs_user_isolation ON df._runs FOR SELECT
    USING (EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));
DROP POLICY IF EXISTS executions_user_isolation ON df._executions;
CREATE POLICY executions_user_isolation ON df._executions FOR SELECT
    USING (EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- A role sees the grants of Python steps that apply to it (its own, those of roles it
-- inherits from, PUBLIC's): df._may_call, which df.start runs as the caller, reads them. A
-- grant that outlived its grantee applies to nobody (pg_has_role would raise).
DROP POLICY IF EXISTS call_grants_grantee ON df._call_grants;
CREATE POLICY call_grants_grantee ON df._call_grants FOR SELECT
    USING (CASE WHEN grantee = 0 THEN true
                WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = grantee)
                THEN false
                ELSE pg_has_role(grantee, 'USAGE') END);

-- Users only insert signals (no SELECT, UPDATE or DELETE privilege, so no policies for them;
-- signals.sql says why). The subquery runs as the inserting role, under df.instances' own
-- policy: it sees the role's own instances (superusers and BYPASSRLS roles skip this policy
-- altogether).
DROP POLICY IF EXISTS signals_sender_insert ON df._signals;
CREATE POLICY signals_sender_insert ON df._signals FOR INSERT
    WITH CHECK (sent_by = quote_ident(current_user)::regrole
                AND EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- pg_durable's readiness probe is for everybody.
GRANT USAGE ON SCHEMA _duroxide TO PUBLIC;
GRANT SELECT ON _duroxide._worker_ready TO PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Who is the engine: superusers and members of the df schema's owner (the worker's role, and
-- SECURITY DEFINER functions, inside which current_user is the owner). pg_has_role treats a
-- superuser as a member of every role.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._is_engine() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(current_user, n.nspowner, 'MEMBER')
      FROM pg_namespace n WHERE n.nspname = 'df';
$$;

-- ---------------------------------------------------------------------------------------------
-- Rows are written under the writer's own name. RLS's WITH CHECK already says so for ordinary
-- roles; this also holds a BYPASSRLS role to it, which could otherwise insert an instance (or
-- a signal) under another role's name and have the worker run SQL as that role, or change
-- another role's variables, which that role's next instances would substitute into its SQL.
-- TG_ARGV[0] names the identity column. The WHEN clauses keep the common case (a role writing
-- its own rows) free of a function call per row.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._refuse_forged_identity() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT df._is_engine() THEN
        RAISE EXCEPTION 'permission denied: % of a row in df.% must be the current role "%"',
            TG_ARGV[0], TG_TABLE_NAME, current_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER instances_identity BEFORE INSERT OR UPDATE OF submitted_by ON df.instances
    FOR EACH ROW WHEN (NEW.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');
CREATE OR REPLACE TRIGGER nodes_identity BEFORE INSERT OR UPDATE OF submitted_by ON df.nodes
    FOR EACH ROW WHEN (NEW.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');
CREATE OR REPLACE TRIGGER signals_identity BEFORE INSERT OR UPDATE OF sent_by ON df._signals
    FOR EACH ROW WHEN (NEW.sent_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('sent_by');
-- Users may update and delete their variables, so the old owner counts as well.
CREATE OR REPLACE TRIGGER vars_identity_insert BEFORE INSERT ON df.vars
    FOR EACH ROW WHEN (NEW.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');
CREATE OR REPLACE TRIGGER vars_identity_update BEFORE UPDATE ON df.vars
    FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM quote_ident(current_user)::regrole
                       OR NEW.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');
CREATE OR REPLACE TRIGGER vars_identity_delete BEFORE DELETE ON df.vars
    FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');

-- A signal goes only to the sender's own instances. The policy on df._signals says so for
-- ordinary roles; a BYPASSRLS role skips it, and sees every instance, so the owner is compared
-- explicitly. The error is df.signal's, so another role's instance still looks missing.
CREATE OR REPLACE FUNCTION df._refuse_foreign_signal() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT df._is_engine() AND NOT EXISTS (
           SELECT 1 FROM df.instances i
            WHERE i.id = NEW.instance_id
              AND i.submitted_by = quote_ident(current_user)::regrole) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER signals_owner BEFORE INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._refuse_foreign_signal();

-- ---------------------------------------------------------------------------------------------
-- Statuses are the engine's. Users hold UPDATE (status, updated_at) on their own instances
-- because that is how df.cancel and df.restart, which run as the caller, cancel and restart;
-- with it they could also mark a running instance 'completed', or revive a completed one. The
-- only changes left to them are the cancel of their own pending or running instance, and the
-- restart (back to 'running') of their own failed or cancelled one, whose engine part the
-- trigger instances_restarted does (engine.sql) (a BYPASSRLS role sees the others' too).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._refuse_status_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF df._is_engine() THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'permission denied to change the status of instance % from % to %',
        OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A user can only cancel a pending or running instance (df.cancel) and '
                     'restart a failed or cancelled one (df.restart); every other status is '
                     'set by the engine.';
END;
$$;

-- The engine writes every instance's status twice (running, then its end), as the owner of
-- schema df inside its SECURITY DEFINER functions. The owner's oid is written into the two
-- guards' WHEN clauses, so that those writes call no function at all. Should the schema change
-- owners, the guard functions still let the new owner through (df._is_engine), at the cost of
-- the call; the former owner keeps passing until the next install, as the engine it was.
DO $guards$
DECLARE
    v_owner oid := (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'df');
BEGIN
    -- coalesce: for a NULL new status the condition is NULL, and the trigger would not fire.
    EXECUTE format($sql$
        CREATE OR REPLACE TRIGGER instances_status BEFORE UPDATE OF status ON df.instances
            FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                               AND quote_ident(current_user)::regrole::oid <> %s::oid
                               AND NOT coalesce(((NEW.status = 'cancelled'
                                                  AND OLD.status IN ('pending', 'running'))
                                                 OR (NEW.status = 'running'
                                                     AND OLD.status IN ('failed', 'cancelled')))
                                                AND OLD.submitted_by
                                                    = quote_ident(current_user)::regrole,
                                                false))
            EXECUTE FUNCTION df._refuse_status_change()
    $sql$, v_owner);
    -- Any UPDATE of another role's instance (the engine's excepted). Ordinary roles cannot
    -- even see such rows; this holds BYPASSRLS roles to the same (they could write its
    -- updated_at).
    EXECUTE format($sql$
        CREATE OR REPLACE TRIGGER instances_owner BEFORE UPDATE ON df.instances
            FOR EACH ROW WHEN (OLD.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole
                               AND quote_ident(current_user)::regrole::oid <> %s::oid)
            EXECUTE FUNCTION df._refuse_forged_identity('submitted_by')
    $sql$, v_owner);
END;
$guards$;

-- ---------------------------------------------------------------------------------------------
-- Grants
-- ---------------------------------------------------------------------------------------------

-- The grantee clause for p_role: PUBLIC for 'public' (any case, as PostgreSQL reads the
-- keyword) unless a role has exactly that name.
CREATE OR REPLACE FUNCTION df._grantee(p_role text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN lower(p_role) = 'public'
                     AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_role)
                THEN 'PUBLIC' ELSE format('%I', p_role) END;
$$;

-- What a role needs to build, start and watch its own workflows, in grant order. Row-level
-- security and the triggers above narrow each to the role's own rows.
CREATE OR REPLACE FUNCTION df._usage_privileges(OUT privilege text, OUT object text)
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
           -- (Each release that adds a privilege adds an entry of its own: a grantor that
           -- df.refresh_grants has not renewed yet can still revoke the entries it holds.)
           ('SELECT (instance_id, generation, output)', 'df._runs'),
           ('SELECT (checkpoints)', 'df._runs'),
           ('SELECT (finished_at)', 'df._runs'),
           ('SELECT (restarts)', 'df._runs'),
           ('SELECT', 'df._executions'),
           -- df.signal: signals to the role's own instances.
           ('INSERT (instance_id, name, data)', 'df._signals'),
           -- df.start's check of Python steps: the grants that apply to the role.
           ('SELECT', 'df._call_grants');
$$;

-- The functions whose EXECUTE is not public, by kind, with their exact signatures: HTTP
-- steps, and what administrators get (df.grant_usage(role, with_grant => true)). Functions
-- that do not exist are skipped.
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
                                          'df.worker_tasks()',
                                          'df.grant_call(text,text)',
                                          'df.revoke_call(text,text)',
                                          'df.call_grants()']
                  END) WITH ORDINALITY AS f (sig, ord)
     WHERE to_regprocedure(f.sig) IS NOT NULL;
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

-- ---------------------------------------------------------------------------------------------
-- df.refresh_grants: after an upgrade, give every role that was granted usage what this
-- version's df.grant_usage grants, with the same include_http and with_grant, from the same
-- grantor (so that grantor's df.revoke_usage still takes all of it away). `pgdurable install`
-- runs it after every upgrade; an administrator may run it at any time.
--
-- A grant df.grant_usage made is found through INSERT (id) on df.instances, which nothing else
-- hands out (a bare GRANT USAGE ON SCHEMA df is not widened); include_http through EXECUTE on
-- df.http from the same grantor, with_grant through the grant option. Each grant is renewed
-- as its grantor, if the caller is a member of it (a superuser is a member of every role; a
-- grant by a superuser is recorded as the schema owner's), and the caller's role is put back
-- afterwards; for any other grant the caller is told in a NOTICE which role has to run
-- df.grant_usage again.
-- ---------------------------------------------------------------------------------------------
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

REVOKE EXECUTE ON FUNCTION df.refresh_grants() FROM PUBLIC;

-- Administration is not for everybody: df.grant_usage(role, with_grant => true) hands it on.
REVOKE EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.revoke_usage(text) FROM PUBLIC;
