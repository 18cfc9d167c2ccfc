-- pgdurable schema, version 10: tenant isolation that does not depend on row-level security
-- alone, df.metrics, and re-granting after an upgrade.
--
-- Row-level security (migration 1) keeps ordinary roles to their own rows. It does nothing
-- against a role with BYPASSRLS, and its column grants let a role set its own instance's
-- status to anything. The triggers below close both holes for every role that is neither a
-- superuser nor the owner of the df schema (the worker): such a role can write rows only under
-- its own name, and can change an instance's status only by cancelling it. See
-- docs/security.md for the whole threat model.

-- ---------------------------------------------------------------------------------------------
-- Who is the engine: superusers and members of the df schema's owner (the worker's role, and
-- SECURITY DEFINER functions, inside which current_user is the owner). pg_has_role treats a
-- superuser as a member of every role.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._is_engine() RETURNS boolean
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
CREATE FUNCTION df._refuse_forged_identity() RETURNS trigger
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

CREATE TRIGGER instances_identity BEFORE INSERT OR UPDATE OF submitted_by ON df.instances
    FOR EACH ROW WHEN (NEW.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');
CREATE TRIGGER nodes_identity BEFORE INSERT OR UPDATE OF submitted_by ON df.nodes
    FOR EACH ROW WHEN (NEW.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');
CREATE TRIGGER signals_identity BEFORE INSERT OR UPDATE OF sent_by ON df._signals
    FOR EACH ROW WHEN (NEW.sent_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('sent_by');
-- Users may update and delete their variables, so the old owner counts as well.
CREATE TRIGGER vars_identity_insert BEFORE INSERT ON df.vars
    FOR EACH ROW WHEN (NEW.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');
CREATE TRIGGER vars_identity_update BEFORE UPDATE ON df.vars
    FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM quote_ident(current_user)::regrole
                       OR NEW.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');
CREATE TRIGGER vars_identity_delete BEFORE DELETE ON df.vars
    FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');

-- A signal goes only to the sender's own instances. The policy on df._signals says so for
-- ordinary roles; a BYPASSRLS role skips it, and sees every instance, so the owner is compared
-- explicitly. The error is df.signal's, so another role's instance still looks missing.
CREATE FUNCTION df._refuse_foreign_signal() RETURNS trigger
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

CREATE TRIGGER signals_owner BEFORE INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._refuse_foreign_signal();

-- ---------------------------------------------------------------------------------------------
-- Statuses are the engine's. Users hold UPDATE (status, updated_at) on their own instances
-- (spec §10.1) because that is how df.cancel, which runs as the caller, cancels; with it they
-- could also mark a running instance 'completed', or revive a finished one. The only change
-- left to them is the cancel of their own pending or running instance (a BYPASSRLS role sees
-- the others' too).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._refuse_status_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF df._is_engine() THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'permission denied to change the status of instance % from % to %',
        OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A user can only cancel a pending or running instance (df.cancel); '
                     'every other status is set by the engine.';
END;
$$;

ALTER TABLE df.instances ALTER COLUMN status SET NOT NULL;

-- coalesce: for a NULL new status the condition is NULL, and the trigger would not fire.
CREATE TRIGGER instances_status BEFORE UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                       AND NOT coalesce(NEW.status = 'cancelled'
                                        AND OLD.status IN ('pending', 'running')
                                        AND OLD.submitted_by
                                            = quote_ident(current_user)::regrole, false))
    EXECUTE FUNCTION df._refuse_status_change();

-- Any UPDATE of another role's instance (the engine's excepted). Ordinary roles cannot even
-- see such rows; this holds BYPASSRLS roles to the same (they could write its updated_at).
CREATE TRIGGER instances_owner BEFORE UPDATE ON df.instances
    FOR EACH ROW WHEN (OLD.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');

-- ---------------------------------------------------------------------------------------------
-- df.metrics (spec §9.3): system-wide counts, so not filtered by row-level security; EXECUTE
-- only by explicit grant (df.grant_usage(role, with_grant => true), or GRANT EXECUTE).
-- running_instances counts pending ones too: the engine holds them as started. Cancelled
-- instances count in total_instances only. total_executions is the sum of the instances'
-- generations (root loop iterations); total_events the committed checkpoints, pgdurable's
-- counterpart of history events.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.metrics()
RETURNS TABLE (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*),
           count(*) FILTER (WHERE i.status IN ('pending', 'running')),
           count(*) FILTER (WHERE i.status = 'completed'),
           count(*) FILTER (WHERE i.status = 'failed'),
           coalesce(sum(r.generation), 0)::bigint,
           coalesce(sum(r.checkpoints), 0)::bigint
      FROM df.instances i
      LEFT JOIN df._runs r ON r.instance_id = i.id;
$$;

REVOKE EXECUTE ON FUNCTION df.metrics() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.refresh_grants: after an upgrade, give every role that was granted usage what this
-- version's df.grant_usage grants, with the same include_http and with_grant, from the same
-- grantor (so that grantor's df.revoke_usage still takes all of it away). Run by each upgrade
-- that adds privileges, and by hand at any time.
--
-- A grant df.grant_usage made is found through INSERT (id) on df.instances, which nothing else
-- hands out (a bare GRANT USAGE ON SCHEMA df is not widened); include_http through EXECUTE on
-- df.http from the same grantor, with_grant through the grant option. Each grant is renewed
-- as its grantor, if the caller is a member of it (a superuser is a member of every role; a
-- grant by a superuser is recorded as the schema owner's), and the caller's role is put back
-- afterwards; for any other grant the caller is told in a NOTICE which role has to run
-- df.grant_usage again.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.refresh_grants() RETURNS void
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

-- This version adds df.metrics to what with_grant administrators hold.
SELECT df.refresh_grants();
