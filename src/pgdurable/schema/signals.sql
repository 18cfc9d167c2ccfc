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
--   * Sending takes no lock the engine needs, so a sender that keeps its transaction open
--     holds up nothing: the row is inserted, and its trigger (df._signal_sent) checks the
--     instance's status and NOTIFYs pgdurable_signals with the instance id, which PostgreSQL
--     delivers when the sender commits (and never if it rolls back). A worker that hears it
--     wakes the instance's sleeping waits that have a signal buffered, in a short transaction
--     of its own (df._wake_signal_waits); and every few seconds it sweeps for any it missed.
--
-- Who may signal. df.signal runs as the caller (SECURITY INVOKER), like df.cancel, and its
-- authority is the caller's own: it INSERTs into df._signals, which users may do only through
-- a column grant (instance_id, name, data) and a row-level security policy that admits an
-- instance the caller can see in df.instances, with sent_by = the caller. The status check and
-- the notification happen in a SECURITY DEFINER trigger, which PostgreSQL runs only for rows
-- that passed the policy and which cannot be called directly; waking tasks is the worker's
-- alone (only the schema owner may call df._wake_signal_waits). A SECURITY DEFINER function
-- callable by users would be the alternative, but inside it current_user is the owner and
-- PostgreSQL offers no trustworthy way to learn who called it: a user could call it directly
-- and signal anybody's instance.
--
-- A user may therefore also INSERT INTO df._signals (instance_id, name, data) directly, with
-- exactly df.signal's effect (minus its argument checks and the text-to-JSON conversion).
-- Users cannot read, change or delete signals. The policy and the grant are in security.sql.
--
-- transaction_mode => 'new' sends the signal in a transaction of its own, on the loopback
-- connection df.start's 'new' mode uses (df._in_new_transaction, start.sql): it is delivered
-- at once and stays sent whatever the caller's transaction does.

-- ---------------------------------------------------------------------------------------------
-- df._signal_sent: after a signal row is inserted, refuse a finished instance, note the signal
-- for df.await_instance, and have the workers wake the instance's waits after the commit.
--
-- The status is read without a lock, in the sender's snapshot. A signal to an instance that
-- finishes meanwhile (or, in REPEATABLE READ and SERIALIZABLE, after the sender's snapshot)
-- is accepted and never consumed, as if it had come a moment later; one to an instance
-- already finished is refused. The foreign key check holds the instance row FOR KEY SHARE,
-- which conflicts with no lock the engine takes but a DELETE (the retention purge, of
-- finished instances only).
--
-- df.undelivered_signals, a transaction-local setting, lists (",id,id,") the instances this
-- transaction has signalled: df.await_instance refuses to wait for one of them, which cannot
-- get the signal before the commit. A savepoint rolled back takes its entries along. (A user
-- who sets it only fails its own awaits.)
--
-- NOTIFY sends one notification per channel and payload and transaction, however many
-- signals the transaction inserted for the instance.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._signal_sent() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_status text;
    v_sent   text := coalesce(nullif(current_setting('df.undelivered_signals', true), ''), ',');
BEGIN
    SELECT i.status INTO v_status FROM df.instances i WHERE i.id = NEW.instance_id;
    IF NOT FOUND THEN
        -- Not visible in this snapshot (it can only have been deleted, not hidden).
        RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    -- Beyond pg_durable, which accepts such a signal and drops it: say it was not delivered.
    IF v_status IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'Instance % is %: signal ''%'' was not delivered',
            NEW.instance_id, v_status, NEW.name
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF position(',' || NEW.instance_id || ',' IN v_sent) = 0 THEN
        PERFORM set_config('df.undelivered_signals', v_sent || NEW.instance_id || ',', true);
    END IF;
    PERFORM pg_notify('pgdurable_signals', NEW.instance_id);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER signals_sent AFTER INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._signal_sent();

-- ---------------------------------------------------------------------------------------------
-- For the worker (the schema owner), in its checkpoint transaction, after df._checkpoint_begin
-- locked the instance. Under that lock nothing else consumes this instance's signals.
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

-- ---------------------------------------------------------------------------------------------
-- df._wake_signal_waits: for the worker (the schema owner). Makes the sleeping waits of
-- p_instances (or, for NULL, a sweep: of every instance) that have a signal buffered due now,
-- and returns the instances among them whose row it could not lock at that moment (a
-- checkpoint, or its tenant, holds it): the worker calls again for those shortly. The worker
-- calls it, in a transaction of its own, when NOTIFY pgdurable_signals tells it that signals
-- to those instances were committed; and, with NULL, when it starts listening and every few
-- seconds, for a notification nobody heard (no worker listening at the commit, a worker
-- stopped before it woke the waits, an instance it could not lock and gave up on).
--
-- Why a signal S and a checkpoint C that starts or re-arms a wait concurrently cannot miss
-- each other. Every transaction that creates or re-arms a 'signal' task is a checkpoint
-- transaction; it holds the instance row FOR NO KEY UPDATE (df._checkpoint_begin) from
-- before it looks for a buffered signal (df._consume_signal, or df._signal_pending in
-- df._checkpoint) until its commit. This function runs only after S committed, and locks the instance row
-- FOR SHARE, which conflicts with that, before it looks for tasks to wake:
--   * this function got the lock first: C's lock waits for our commit, so C's statements
--     after it (READ COMMITTED: a new snapshot each) see S, and consume it or make the new
--     task due at once;
--   * C holds the lock: SKIP LOCKED passes the instance over and returns it, and the worker
--     calls again until it gets the lock, when C has committed; the UPDATE below (a new
--     snapshot, taken after the lock) then sees the task C wrote or re-armed.
--   * C committed before this function took the lock: as in the second case, the UPDATE
--     sees C's task.
-- What the sender's transaction saw or locked plays no part (it only inserted a row): its
-- isolation level does not matter. The worker's connections are READ COMMITTED whatever the
-- role's default (worker/connections.py).
-- A task leased to a worker is left alone: the worker is about to checkpoint it, which is one
-- of the cases above; making it visible would only let another worker steal the lease.
--
-- Lock order, as everywhere: the instance rows (in id order), then df._tasks rows (in id
-- order; SKIP LOCKED, since only another worker waking the same task can hold a sleeping
-- wait's row: claims, heartbeats and deferrals lock only due or leased tasks, checkpoints
-- and cancels only under the instance lock).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._wake_signal_waits(p_instances text[]) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_wanted text[] := p_instances;
    v_locked text[];
    v_woken  integer;
BEGIN
    IF v_wanted IS NULL THEN
        SELECT array_agg(DISTINCT t.instance_id) INTO v_wanted
          FROM df._tasks t
         WHERE t.kind = 'signal' AND t.lease_owner IS NULL AND t.visible_at > now()
           AND df._signal_pending(t.instance_id, t.payload ->> 'signal_name');
    END IF;
    SELECT array_agg(l.id) INTO v_locked
      FROM (SELECT i.id FROM df.instances i
             WHERE i.id = ANY (v_wanted)
             ORDER BY i.id
               FOR SHARE SKIP LOCKED) l;
    WITH due AS (
        SELECT t.id FROM df._tasks t
         WHERE t.instance_id = ANY (v_locked)
           AND t.kind = 'signal' AND t.lease_owner IS NULL AND t.visible_at > now()
           AND df._signal_pending(t.instance_id, t.payload ->> 'signal_name')
         ORDER BY t.id
           FOR UPDATE SKIP LOCKED
    )
    UPDATE df._tasks t SET visible_at = now() FROM due WHERE t.id = due.id;
    GET DIAGNOSTICS v_woken = ROW_COUNT;
    IF v_woken > 0 THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
    -- Passed over: to be tried again (a finished or deleted instance waits for nothing).
    RETURN QUERY
        SELECT i.id::text FROM df.instances i
         WHERE i.id = ANY (v_wanted) AND NOT i.id = ANY (coalesce(v_locked, '{}'))
           AND i.status NOT IN ('completed', 'failed', 'cancelled');
END;
$$;

REVOKE ALL ON FUNCTION df._signal_sent() FROM PUBLIC;
REVOKE ALL ON FUNCTION df._wake_signal_waits(text[]) FROM PUBLIC;
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
-- transaction_mode 'caller' (the default): part of the caller's transaction, delivered when it
-- commits; 'new': sent and committed at once by a transaction of its own (on the loopback, as
-- df.start's 'new' mode), whatever becomes of the caller's. STRICT: any NULL argument gives
-- NULL and sends nothing.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.signal(instance_id text, signal_name text,
                                     signal_data text DEFAULT '{}',
                                     transaction_mode text DEFAULT 'caller')
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    v_mode   text := lower(transaction_mode);
    v_data   jsonb;
BEGIN
    IF v_mode NOT IN ('caller', 'new') THEN
        RAISE EXCEPTION 'invalid transaction_mode "%" for df.signal(): expected ''caller'' or ''new''',
            transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
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
    -- A finished instance is refused by the trigger (in 'new' mode, on the loopback).
    IF v_mode = 'new' THEN
        -- current_user, not session_user: the effective role signals, as in caller mode.
        RETURN df._in_new_transaction('signal', ARRAY[instance_id, signal_name, signal_data],
                                      current_user::text);
    END IF;
    BEGIN
        v_data := signal_data::jsonb;
    EXCEPTION WHEN data_exception THEN
        v_data := to_jsonb(signal_data);
    END;
    -- The trigger checks the instance again and has it woken after the commit.
    INSERT INTO df._signals (instance_id, name, data)
    VALUES (signal.instance_id, signal.signal_name, v_data);
    RETURN 'OK';
END;
$$;

-- ---------------------------------------------------------------------------------------------
