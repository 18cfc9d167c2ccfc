-- Signals: df.wait_for_signal, df.signal, and how a wait receives what was sent (docs/signals.md).
--
-- df.signal(id, name, data) stores a row in df._signals; it stays there until a SIGNAL wait of
-- that instance and name consumes it (oldest first), however long before the wait starts it
-- was sent. pg_durable drops signals that arrive while no wait is active; pgdurable keeps them.
--
-- The engine side:
--   * A SIGNAL node that starts waiting gets a df._tasks row of kind 'signal' with payload
--     {"signal_name": <name>, "deadline": <epoch seconds or null>}, visible at its deadline
--     ('infinity' without a timeout), or at once if a matching signal is already buffered
--     (df._checkpoint, engine.sql).
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
-- Users cannot read, change or delete signals. The policy and the grant are in security.sql.

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
CREATE OR REPLACE FUNCTION df._signal_sent() RETURNS trigger
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

CREATE OR REPLACE TRIGGER signals_sent AFTER INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._signal_sent();

-- ---------------------------------------------------------------------------------------------
-- For the worker (the schema owner), in its checkpoint transaction, after df._checkpoint_begin
-- locked the instance. Under that lock nothing else consumes this instance's signals, and no
-- df.signal of it is between its lock and its commit.
-- ---------------------------------------------------------------------------------------------

-- Take the oldest unconsumed signal p_name of p_instance for the wait of activation
-- p_activation: mark it consumed and return its data (a JSON null is 'null'::jsonb) and its
-- size, or no row if there is none. A payload above p_max_bytes (pg_durable.max_result_bytes
-- as the worker's own session reads it: users may SET any pg_durable.* placeholder in their
-- sessions, so only the worker's value counts) is consumed all the same but never handed
-- over: data is NULL, and the worker fails the wait. Lock waits are bounded like the
-- checkpoint's (engine.sql).
CREATE OR REPLACE FUNCTION df._consume_signal(p_instance varchar, p_name text, p_activation integer,
                                   p_max_bytes bigint)
RETURNS TABLE (data jsonb, data_bytes bigint)
LANGUAGE sql VOLATILE SET lock_timeout = '500ms' AS $$
    WITH taken AS (
        UPDATE df._signals s
           SET consumed_at = clock_timestamp(), consumed_by = p_activation
         WHERE s.id = (SELECT o.id FROM df._signals o
                        WHERE o.instance_id = p_instance AND o.name = p_name
                          AND o.consumed_at IS NULL
                        ORDER BY o.id
                        LIMIT 1
                          FOR UPDATE)
        RETURNING s.data, octet_length(s.data::text)::bigint AS data_bytes
    )
    SELECT CASE WHEN t.data_bytes <= p_max_bytes THEN t.data END, t.data_bytes FROM taken t;
$$;

-- Whether a signal p_name of p_instance is waiting to be consumed.
CREATE OR REPLACE FUNCTION df._signal_pending(p_instance varchar, p_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM df._signals s
                    WHERE s.instance_id = p_instance AND s.name = p_name
                      AND s.consumed_at IS NULL);
$$;

REVOKE ALL ON FUNCTION df._signal_sent() FROM PUBLIC;
REVOKE ALL ON FUNCTION df._consume_signal(varchar, text, integer, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION df._signal_pending(varchar, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.wait_for_signal: a SIGNAL node. Not STRICT (the timeout may be NULL);
-- a NULL name is refused like an empty one rather than silently giving NULL.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.wait_for_signal(name text, timeout_seconds integer DEFAULT NULL)
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
-- df.signal: send a signal to one of the caller's instances. Returns 'OK'.
-- signal_data is JSON if it parses as JSON, else it is delivered as a JSON string.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.signal(instance_id text, signal_name text, signal_data text DEFAULT '{}')
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
