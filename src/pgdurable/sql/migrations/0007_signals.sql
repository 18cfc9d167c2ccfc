-- pgdurable schema, version 7: signals, the SQL side (spec §5.1 df.wait_for_signal, §5.2
-- df.signal, §7.9; docs/signals.md).
--
-- df.signal(id, name, data) stores a row in df._signals; it stays there until a SIGNAL wait of
-- that instance and name consumes it (oldest first), however long before the wait starts it
-- was sent. pg_durable drops signals that arrive while no wait is active; pgdurable keeps them
-- (DESIGN.md, "signals sent before the wait starts").
--
-- The engine side, for reference (the worker implements it):
--   * A SIGNAL node that starts waiting gets a df._tasks row of kind 'signal' with payload
--     {"signal_name": <name>, "deadline": <epoch seconds or null>}, visible at its deadline
--     ('infinity' without a timeout), or at once if a matching signal is already buffered
--     (df._checkpoint, migration 5).
--   * A worker that claims it calls df._checkpoint_begin (which locks the instance row FOR NO
--     KEY UPDATE) and then, in the same transaction, df._consume_signal: a signal → the wait
--     completes; none and the deadline passed → it times out; else the task is re-armed (put
--     back to sleep with its lease cleared).
--   * df.signal makes waiting tasks of that name visible at once and NOTIFYs the workers.
--
-- Who may signal. df.signal runs as the caller (SECURITY INVOKER), like df.cancel, and its
-- authority is the caller's own: it INSERTs into df._signals, which users may do only through
-- a column grant (instance_id, name, data) and a row-level security policy that admits an
-- instance the caller can see in df.instances, with sent_by = the caller. Everything that needs
-- more than that (locking, the status check, waking the task) happens in a SECURITY DEFINER
-- trigger, which PostgreSQL runs only for rows that passed the policy and which cannot be
-- called directly. A SECURITY DEFINER function callable by users would be the alternative, but
-- inside it current_user is the owner and PostgreSQL offers no trustworthy way to learn who
-- called it: a user could call it directly and signal anybody's instance.
--
-- A user may therefore also INSERT INTO df._signals (instance_id, name, data) directly, with
-- exactly df.signal's effect (minus its argument checks and the text-to-JSON conversion).
-- Users cannot read, change or delete signals.

-- ---------------------------------------------------------------------------------------------
-- Signal waits are tasks of their own kind.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df._tasks DROP CONSTRAINT _tasks_kind_check;
ALTER TABLE df._tasks ADD CONSTRAINT _tasks_kind_check
    CHECK (kind IN ('start', 'sql', 'timer', 'signal'));

-- ---------------------------------------------------------------------------------------------
-- The signals. Kept until consumed; consumed ones stay as a record until their instance is
-- deleted. Signals of a finished instance are never delivered (it has no waits left, and
-- df.signal refuses new ones), so they need no cleaning up of their own.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df._signals (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- send order
    instance_id  varchar(8) NOT NULL REFERENCES df.instances (id) ON DELETE CASCADE,
    name         text NOT NULL,
    data         jsonb NOT NULL,              -- JSON null is 'null'::jsonb, never SQL NULL
    sent_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_by      regrole NOT NULL DEFAULT quote_ident(current_user)::regrole,
    consumed_at  timestamptz,                 -- NULL while buffered
    consumed_by  integer                      -- the activation of the wait that took it
);

-- "The oldest unconsumed signal <name> of <instance>", for waits and df._checkpoint.
CREATE INDEX signals_pending_idx ON df._signals (instance_id, name, id)
    WHERE consumed_at IS NULL;
-- For ON DELETE CASCADE, which must also find consumed signals.
CREATE INDEX signals_instance_idx ON df._signals (instance_id);

ALTER TABLE df._signals ENABLE ROW LEVEL SECURITY;
-- Users only insert (no SELECT, UPDATE or DELETE privilege, so no policies for them). The
-- subquery runs as the inserting role, under df.instances' own policy: it sees the role's own
-- instances (superusers and BYPASSRLS roles skip this policy altogether).
CREATE POLICY signals_sender_insert ON df._signals FOR INSERT
    WITH CHECK (sent_by = quote_ident(current_user)::regrole
                AND EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- ---------------------------------------------------------------------------------------------
-- df._signal_sent: after a signal row is inserted, check its instance and wake its waits.
--
-- Why a signal and a wait that starts or re-arms concurrently cannot miss each other:
-- every transaction that creates or re-arms a 'signal' task is a checkpoint transaction; it
-- holds the instance row FOR NO KEY UPDATE (df._checkpoint_begin) while it looks for a buffered
-- signal (df._consume_signal, or the EXISTS in df._checkpoint) and writes the task. This
-- trigger takes the instance row FOR SHARE, which conflicts with that, before it looks for
-- tasks to wake. So one of the two commits first:
--   * the signal first: the checkpoint's lock waits for the signal's commit, and its later
--     statements (READ COMMITTED: a new snapshot each) see the signal and consume it, or make
--     the new task visible at once;
--   * the checkpoint first: the signal's FOR SHARE waits for it, and the UPDATE below (a new
--     snapshot) sees the task the checkpoint wrote or re-armed, and makes it visible.
-- The signal row is inserted just before this trigger takes the lock; that is no earlier than
-- it matters, because nobody else sees the row before the commit (a checkpoint running
-- meanwhile neither sees nor waits for it). What counts is that the lock is held before the
-- UPDATE below looks for tasks, and until the commit.
-- A task leased to a worker is left alone: the worker is about to checkpoint it, which is one
-- of the two cases above; making it visible would only let another worker steal the lease.
--
-- The UPDATE's fresh snapshot is what READ COMMITTED gives. A caller in a REPEATABLE READ or
-- SERIALIZABLE transaction keeps the snapshot of its first statement, which may predate a
-- checkpoint that committed while this trigger waited for the lock; the UPDATE would not see
-- that checkpoint's task. Such a caller therefore also locks FOR SHARE the instance's df._runs
-- row (df._checkpoint, which inserts every new task, updates it) and the signal tasks of that
-- name (a re-arm updates its task row): in those isolation levels
-- PostgreSQL raises a serialization failure (SQLSTATE 40001, "could not serialize access due to
-- concurrent update") if any of them changed since the snapshot, and the caller retries, as
-- it must for any serialization failure.
--
-- Lock order, as everywhere: the instance row, then (df._runs and) df._tasks rows.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df._signal_sent() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_status text;
    v_woken  integer;
BEGIN
    SELECT i.status INTO v_status FROM df.instances i WHERE i.id = NEW.instance_id FOR SHARE;
    IF NOT FOUND THEN
        -- Deleted since the foreign key check (it can only have been deleted, not hidden).
        RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    -- Beyond pg_durable, which accepts such a signal and drops it: say it was not delivered.
    IF v_status IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'Instance % is %: signal ''%'' was not delivered',
            NEW.instance_id, v_status, NEW.name
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM 1 FROM df._runs r WHERE r.instance_id = NEW.instance_id FOR SHARE;
        PERFORM 1 FROM df._tasks t
          WHERE t.instance_id = NEW.instance_id AND t.kind = 'signal'
            AND t.payload ->> 'signal_name' = NEW.name
          ORDER BY t.id
            FOR SHARE;
    END IF;
    UPDATE df._tasks t
       SET visible_at = now()
     WHERE t.instance_id = NEW.instance_id
       AND t.kind = 'signal'
       AND t.payload ->> 'signal_name' = NEW.name
       AND t.lease_owner IS NULL
       AND t.visible_at > now();
    GET DIAGNOSTICS v_woken = ROW_COUNT;
    IF v_woken > 0 THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER signals_sent AFTER INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._signal_sent();

-- ---------------------------------------------------------------------------------------------
-- For the worker (the schema owner), in its checkpoint transaction, after df._checkpoint_begin
-- locked the instance. Under that lock nothing else consumes this instance's signals, and no
-- df.signal of it is between its lock and its commit.
-- ---------------------------------------------------------------------------------------------

-- Take the oldest unconsumed signal p_name of p_instance for the wait of activation
-- p_activation: mark it consumed and return its data (a JSON null is 'null'::jsonb), or SQL
-- NULL if there is none.
CREATE FUNCTION df._consume_signal(p_instance varchar, p_name text, p_activation integer)
RETURNS jsonb
LANGUAGE sql VOLATILE AS $$
    UPDATE df._signals s
       SET consumed_at = clock_timestamp(), consumed_by = p_activation
     WHERE s.id = (SELECT o.id FROM df._signals o
                    WHERE o.instance_id = p_instance AND o.name = p_name
                      AND o.consumed_at IS NULL
                    ORDER BY o.id
                    LIMIT 1
                      FOR UPDATE)
    RETURNING s.data;
$$;

-- Whether a signal p_name of p_instance is waiting to be consumed.
CREATE FUNCTION df._signal_pending(p_instance varchar, p_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM df._signals s
                    WHERE s.instance_id = p_instance AND s.name = p_name
                      AND s.consumed_at IS NULL);
$$;

REVOKE ALL ON FUNCTION df._signal_sent() FROM PUBLIC;
REVOKE ALL ON FUNCTION df._consume_signal(varchar, text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION df._signal_pending(varchar, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.wait_for_signal (spec §5.1, §3.2): a SIGNAL node. Not STRICT (the timeout may be NULL);
-- a NULL name is refused like an empty one rather than silently giving NULL.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.wait_for_signal(name text, timeout_seconds integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'Signal name cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('SIGNAL', NULL, NULL, NULL, NULL,
                        '{"signal_name":' || to_json(name)::text
                            || ',"timeout_seconds":' || coalesce(timeout_seconds::text, 'null')
                            || '}',
                        NULL);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.signal (spec §5.2): send a signal to one of the caller's instances. Returns 'OK'.
-- signal_data is JSON if it parses as JSON, else it is delivered as a JSON string.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION df.signal(instance_id text, signal_name text, signal_data text DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    v_data jsonb;
BEGIN
    IF instance_id = '' THEN
        RAISE EXCEPTION 'Instance ID cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF signal_name = '' THEN
        RAISE EXCEPTION 'Signal name cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Under RLS, someone else's instance looks exactly like a missing one.
    IF NOT EXISTS (SELECT 1 FROM df.instances i WHERE i.id = signal.instance_id) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    BEGIN
        v_data := signal_data::jsonb;
    EXCEPTION WHEN data_exception THEN
        v_data := to_jsonb(signal_data);
    END;
    -- The trigger locks the instance, refuses a finished one and wakes the waits.
    INSERT INTO df._signals (instance_id, name, data)
    VALUES (signal.instance_id, signal.signal_name, v_data);
    RETURN 'OK';
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges. df.grant_usage and df.revoke_usage (migration 4) now also grant and revoke the
-- INSERT df.signal needs; they are otherwise unchanged. Roles granted usage before this
-- migration get it here, from the installing role.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.grant_usage(
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
    -- For df.signal: signals to the role's own instances (RLS on df._signals).
    EXECUTE format('GRANT INSERT (instance_id, name, data) ON df._signals TO %s%s', grantee, opt);
    RAISE NOTICE 'pg_durable: granted df usage privileges to "%"', p_role;
END;
$$;

CREATE OR REPLACE FUNCTION df.revoke_usage(p_role text) RETURNS void
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
    BEGIN
        EXECUTE format('REVOKE INSERT (instance_id, name, data) ON df._signals FROM %s CASCADE',
                       grantee);
    EXCEPTION WHEN insufficient_privilege THEN
        -- An admin made before migration 7 holds nothing on df._signals, so granted nothing.
        NULL;
    END;
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

-- Every role that was granted usage before this migration (it holds INSERT on df.instances.id,
-- which only df.grant_usage hands out) may signal from now on, as it may cancel.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT a.grantee, bool_or(a.is_grantable) AS opt
          FROM pg_attribute att, aclexplode(att.attacl) a
         WHERE att.attrelid = 'df.instances'::regclass AND att.attname = 'id'
           AND a.privilege_type = 'INSERT'
         GROUP BY a.grantee
    LOOP
        -- regrole's text is the role name, already quoted where it needs to be.
        EXECUTE format('GRANT INSERT (instance_id, name, data) ON df._signals TO %s%s',
                       CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE r.grantee::regrole::text END,
                       CASE WHEN r.opt THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END;
$$;
